"""Text for language models, cut into windows (DESIGN §8 "Text data").

``text:PATH`` (a .txt file is one document; .jsonl/.parquet files, or a folder of such files, give one
document per row of their text column) or ``hfds:NAME[:CONFIG][:SPLIT]``. Documents are joined with
``"\\n\\n"`` and tokenized once, as the model's tokenizer does a text (its special tokens included).
Windows have exactly ``seq_len`` tokens and start every ``stride`` tokens; a shorter remainder is
dropped and counted. With overlapping windows only the next-token predictions that no earlier window
scored are scored (Hugging Face's perplexity protocol): window k > 0 scores its last ``min(stride,
seq_len − 1)`` predictions. A window is one sample: ``(input_ids [T], first scored position, index)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from resprobe.errors import BadValue, DataError

JOIN = "\n\n"
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def first_scored(k: int, seq_len: int, stride: int) -> int:
    """The first position of window ``k`` whose next-token prediction is scored."""
    return 0 if k == 0 else max(0, seq_len - 1 - stride)


class WindowDataset(Dataset):
    """Window i of a token stream: ``(tokens[b_i : b_i + T], first scored position, i)``."""

    def __init__(self, tokens: Tensor, seq_len: int, stride: int):
        self.tokens, self.seq_len, self.stride = tokens, seq_len, stride
        self.n = max(0, (len(tokens) - seq_len) // stride + 1) if len(tokens) >= seq_len else 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        b = i * self.stride
        return self.tokens[b:b + self.seq_len], first_scored(i, self.seq_len, self.stride), i


@dataclass
class TextSource:
    """Windows ready for a loader, and the protocol every report carries with them."""

    spec: str
    dataset: Dataset
    protocol: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    in_memory: bool = True

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Reading documents


def _jsonl_rows(path: Path, column: str) -> list[str]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise DataError(f"{path}:{number} is not a JSON line") from None
            if not isinstance(row, dict) or column not in row:
                raise DataError(f"{path}:{number} has no {column!r} field (choose the column with --text-column)")
            rows.append(str(row[column]))
    return rows


def _parquet_rows(path: Path, column: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
        raise DataError(f"{path} is not a readable parquet file ({type(exc).__name__})") from None
    if column not in table.column_names:
        raise DataError(f"{path} has no {column!r} column (it has {', '.join(table.column_names)}; "
                        "choose with --text-column)")
    return [str(v) for v in table.column(column).to_pylist() if v is not None]


def _file_documents(path: Path, column: str) -> list[str]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            return [path.read_text(encoding="utf-8")]
        if suffix == ".jsonl":
            return _jsonl_rows(path, column)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} as UTF-8 text ({type(exc).__name__})") from None
    if suffix == ".parquet":
        return _parquet_rows(path, column)
    raise DataError(f"{path}: text data must be .txt, .jsonl or .parquet")


def read_documents(spec: str, column: str = "text", offline: bool = False) -> list[str]:
    """The documents of ``text:PATH`` or ``hfds:NAME[:CONFIG][:SPLIT]``."""
    if spec.startswith("text:"):
        path = Path(spec[5:]).expanduser()
        if not path.exists():
            raise DataError(f"{spec}: {path} does not exist")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not files:
                raise DataError(f"{spec}: the folder holds no .txt, .jsonl or .parquet file")
            return [doc for f in files for doc in _file_documents(f, column)]
        return _file_documents(path, column)
    if spec.startswith("hfds:"):
        return _hub_documents(spec, column, offline)
    raise DataError(f"--data {spec!r}: language models read text:PATH (.txt, .jsonl, .parquet or a folder) or "
                    "hfds:NAME[:CONFIG][:SPLIT]")


def _hub_documents(spec: str, column: str, offline: bool) -> list[str]:
    parts = spec[5:].split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(f"--data {spec!r}: expected hfds:NAME[:CONFIG][:SPLIT]")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 else None) or None, (parts[2] if len(parts) > 2 else "test")
    try:
        import datasets
    except ImportError:
        raise DataError("hfds: data needs the datasets package: pip install 'resprobe[hf]'") from None
    try:
        ds = datasets.load_dataset(name, config, split=split,
                                   download_mode="reuse_cache_if_exists" if offline else None)
    except Exception as exc:  # noqa: BLE001
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{spec} could not be loaded: {text}") from None
    if column not in ds.column_names:
        raise DataError(f"{spec} has no {column!r} column (it has {', '.join(ds.column_names)}; choose with "
                        "--text-column)")
    return [str(v) for v in ds[column] if v is not None]


# --------------------------------------------------------------------------------------------------
# Tokens and windows


def tokenize(documents: list[str], tokenizer: Any) -> tuple[Tensor, bool]:
    """The joined documents' token ids, and whether the tokenizer put a BOS token first."""
    ids = tokenizer(JOIN.join(documents), verbose=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    add_bos = bool(ids) and bos is not None and ids[0] == bos and \
        tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]
    return torch.tensor(ids, dtype=torch.long), add_bos


def open_windows(spec: str, tokenizer: Any, tokenizer_name: str | None, seq_len: int, stride: int | None,
                 column: str = "text", skip_tokens: int = 0, limit: int | None = None, seed: int = 0,
                 offline: bool = False) -> TextSource:
    """``--data SPEC`` as windows of exactly ``seq_len`` tokens (``--limit`` with the seeded rule of §2)."""
    from resprobe.data.loaders import select_indices

    if tokenizer is None:
        raise BadValue("the model has no tokenizer: give one with --tokenizer")
    stride = seq_len if stride is None else stride
    if stride < 1:
        raise BadValue(f"--stride must be at least 1, got {stride}")
    documents = read_documents(spec, column, offline)
    if not any(doc.strip() for doc in documents):
        raise DataError(f"{spec} holds no text")
    tokens, add_bos = tokenize(documents, tokenizer)
    dataset = WindowDataset(tokens, seq_len, stride)
    if len(dataset) == 0:
        raise DataError(f"{spec} gives {len(tokens)} tokens, fewer than one window of --seq-len {seq_len}")
    dropped = len(tokens) - ((len(dataset) - 1) * stride + seq_len)
    chosen = select_indices(len(dataset), limit, seed) if limit is not None else None
    n_windows = len(chosen) if chosen is not None else len(dataset)
    protocol = {"seq_len": seq_len, "stride": stride, "join": JOIN, "add_bos": add_bos, "tokenizer": tokenizer_name,
                "n_windows": n_windows, "skip_tokens": skip_tokens, "n_windows_total": len(dataset),
                "n_documents": len(documents), "n_tokens_total": len(tokens), "dropped_tokens": dropped}
    notes = []
    if limit is not None and limit > len(dataset):
        notes.append(f"{spec} gives {len(dataset)} windows, fewer than the {limit} asked for: all are used")
    source = TextSource(spec, dataset, protocol, notes)
    if chosen is not None:
        from torch.utils.data import Subset

        source.dataset = Subset(dataset, chosen)
    return source


def _collate(batch: list[tuple[Tensor, int, int]]) -> tuple[Tensor, Tensor, Tensor]:
    return (torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.long),
            torch.tensor([b[2] for b in batch], dtype=torch.long))


def window_loader(source: TextSource, batch_size: int) -> DataLoader:
    """Batches of ``(input_ids [B, T], first scored position [B], window index [B])``, in order."""
    if batch_size < 1:
        raise BadValue(f"--batch-size must be at least 1, got {batch_size}")
    return DataLoader(source.dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate)


def scored_mask(first: Tensor, seq_len: int) -> Tensor:
    """[B, T] bool: position t's next-token prediction is scored (t ≥ first, t ≤ T − 2)."""
    t = torch.arange(seq_len, device=first.device)
    return (t[None, :] >= first[:, None]) & (t[None, :] < seq_len - 1)


def stats_mask(first: Tensor, seq_len: int, skip_tokens: int) -> Tensor:
    """[B, T] bool: the positions statistics cover, every one from max(first scored, --skip-tokens) on
    (the window's last position too: its gradient is zero, so it adds to norms of h and U only)."""
    t = torch.arange(seq_len, device=first.device)
    return t[None, :] >= torch.clamp(first, min=skip_tokens)[:, None]
