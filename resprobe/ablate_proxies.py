"""Cheap proxies of removal cost (Block Influence, angular distance, alignment, Taylor) and their rank
correlation with the exact costs."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from resprobe.ablate_engine import Advance
from resprobe.errors import RecordingError
from resprobe.models.blocks import Block

if TYPE_CHECKING:  # pragma: no cover
    from resprobe.probe import Probe


PROXY_NAMES = ("bi", "angular", "l2_ratio", "cos", "taylor")


class InputOutputAngles:
    """Observer: per sample, 1 − cos(h, out) and arccos(cos(h, out))/π of identity blocks.

    Computed in the half-angle form from unit vectors (1 − cos = ‖ĥ − ô‖²/2, θ = 2·atan2(‖ĥ − ô‖,
    ‖ĥ + ô‖)), which keeps its precision when out ≈ h, where arccos of a float32 cosine would not.
    Samples with a zero norm are NaN (excluded from the means).
    """

    def __init__(self, positions: Iterable[int]):
        self.positions = set(positions)

    def __call__(self, j: int, h: Tensor, out: Tensor) -> Tensor | None:
        if j not in self.positions or h.shape != out.shape:
            return None
        a, b = h.flatten(1).float(), out.flatten(1).float()
        na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
        ua, ub = a / na, b / nb
        d, s = (ua - ub).norm(dim=1), (ua + ub).norm(dim=1)
        values = torch.stack([d * d / 2, 2 * torch.atan2(d, s) / math.pi], dim=1)
        valid = ((na > 0) & (nb > 0)).squeeze(1)
        return values.masked_fill(~valid[:, None], float("nan"))

    @staticmethod
    def means(batches: list[Tensor | None]) -> tuple[float | None, float | None]:
        kept = [b for b in batches if b is not None]
        if not kept:
            return None, None
        values = torch.cat(kept).double().cpu().numpy()
        return _nanmean(values[:, 0]), _nanmean(values[:, 1])

    @staticmethod
    def all_means(observed: Mapping[int, list[Tensor | None]], positions: Sequence[int]
                  ) -> dict[int, tuple[float | None, float | None]]:
        """:meth:`means` per position; under torchrun over every rank's samples (float64 sums of the
        finite values and their counts, all-reduced)."""
        from resprobe.distributed import all_reduce_sums, is_distributed

        if not is_distributed():
            return {p: InputOutputAngles.means(observed.get(p, [])) for p in positions}
        sums = []
        for p in positions:
            kept = [b for b in observed.get(p, []) if b is not None]
            values = torch.cat(kept).double().cpu().numpy() if kept else np.zeros((0, 2))
            for col in range(2):
                finite = values[:, col][np.isfinite(values[:, col])]
                sums += [float(finite.sum()), float(len(finite))]
        totals = all_reduce_sums(sums)
        means: dict[int, tuple[float | None, float | None]] = {}
        for i, p in enumerate(positions):
            s0, c0, s1, c1 = totals[4 * i:4 * i + 4]
            means[p] = (s0 / c0 if c0 else None, s1 / c1 if c1 else None)
        return means


def _nanmean(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else None


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank (as ``scipy.stats.rankdata``)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / den if den > 0 else None


def _finite_pairs(x: Sequence[float | None], y: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    return np.array([p[0] for p in pairs], dtype=np.float64), np.array([p[1] for p in pairs], dtype=np.float64)


def spearman(x: Sequence[float | None], y: Sequence[float | None]) -> float | None:
    """Spearman's ρ over the pairs where both are finite; None when undefined (< 2 pairs, constant)."""
    a, b = _finite_pairs(x, y)
    return _pearson(rankdata(a), rankdata(b)) if len(a) >= 2 else None


def kendall_tau_b(x: Sequence[float | None], y: Sequence[float | None]) -> float | None:
    """Kendall's τ-b (tie-corrected) over the pairs where both are finite; None when undefined."""
    a, b = _finite_pairs(x, y)
    n = len(a)
    if n < 2:
        return None
    upper = np.triu_indices(n, k=1)
    dx = np.sign(a[:, None] - a[None, :])[upper]
    dy = np.sign(b[:, None] - b[None, :])[upper]
    n0 = n * (n - 1) / 2
    den = math.sqrt((n0 - float((dx == 0).sum())) * (n0 - float((dy == 0).sum())))
    return float((dx * dy).sum()) / den if den > 0 else None


@dataclass
class ProxyRow:
    name: str
    bi: float | None
    angular: float | None
    l2_ratio: float | None
    cos: float | None
    taylor: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Proxies:
    blocks: list[ProxyRow]
    correlation: dict[str, dict[str, float | None]]
    source: str  # where cos, l2_ratio and taylor came from: "computed" or the recording's path

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": [b.to_dict() for b in self.blocks], "correlation": self.correlation, "source": self.source}


def alignment_summary(probe: Probe, loader: Iterable, recording: str | Path | None = None,
                      advance: Advance | None = None, data: str | None = None) -> dict[str, dict[str, Any]]:
    """Per block name, the ``align`` figures (``cos_mean``, ``l2_ratio_mean``, ``first_order_mean``):
    read from ``recording``, or recorded in memory now (labels as targets). A recording must have
    been made of this model, weights, preprocessing and data (``data``: the spec, when known)."""
    from resprobe.align import summarize

    if recording is not None:
        from resprobe.recording.reader import open_recording

        recorded = open_recording(recording)
        if recorded.block_names != probe.anatomy.names:
            raise RecordingError(f"{recording} was recorded on other blocks ({', '.join(recorded.block_names[:3])}, "
                                 f"...) than this model has; record it from the same model")
        check_recording_fits(recorded, recording, probe, getattr(loader, "dataset", None), data)
        if not recorded.complete:
            warnings.warn(f"{recording} is incomplete ({recorded.n_samples} samples); its proxies cover only those",
                          stacklevel=2)
    else:
        from resprobe.recording.recorder import collect

        recorded = collect(probe, loader, target="label", progress=advance)
    return {row["name"]: row for row in summarize(recorded)["blocks"]}


def check_recording_fits(recorded: Any, recording: str | Path, probe: Probe, dataset: Any,
                         data: str | None = None) -> None:
    """Refuse a recording whose figures are not of this run: another ``--target``, other weights, other
    preprocessing, other data or other samples (``--limit``/``--seed``). Its proxies would be silently wrong."""
    import json

    attrs = recorded.attrs
    here = probe.describe()

    def refuse(what: str) -> None:
        raise RecordingError(f"--recording {recording} was recorded {what}; record it again with the same model, "
                             "weights, preprocessing, --data, --limit and --seed as this ablation")

    target = attrs.get("target") or (attrs.get("options") or {}).get("target") or "label"
    if target != "label":
        refuse(f"with --target {target}, but the proxies are against the labels (record with --target label)")
    if attrs.get("weights_sha256") and here.get("weights_sha256") and attrs["weights_sha256"] != here["weights_sha256"]:
        refuse(f"with other weights (weights_sha256 {attrs['weights_sha256'][:12]}…, here "
               f"{here['weights_sha256'][:12]}…: another checkpoint, or another initialization of a model without "
               "weights)")
    theirs, ours = attrs.get("checkpoint_sha256") or None, here["checkpoint_sha256"]
    if theirs != ours:
        refuse(f"with other weights ({_weights_name(attrs.get('checkpoint'), theirs)}, not "
               f"{_weights_name(here['checkpoint'], ours)})")
    if theirs is None and attrs.get("model") != here["model"]:
        refuse(f"from model {attrs.get('model')}, not {here['model']}")
    recorded_pre = attrs.get("preprocessing")
    if recorded_pre is not None and json.loads(json.dumps(recorded_pre)) != json.loads(json.dumps(here["preprocessing"])):
        keys = [k for k in here["preprocessing"] if recorded_pre.get(k) != here["preprocessing"][k]]
        refuse(f"with other preprocessing ({', '.join(f'{k} {recorded_pre.get(k)}' for k in keys[:3]) or 'fields'})")
    if data is not None and attrs.get("data") is not None and not same_data_spec(str(attrs["data"]), data):
        refuse(f"on --data {attrs['data']}, not {data}")
    if dataset is None:
        return
    from resprobe.distributed import whole_selection

    dataset = whole_selection(dataset)  # torchrun: every rank compares the whole selection, not its shard
    indices = np.asarray(dataset.indices if isinstance(dataset, torch.utils.data.Subset) else range(len(dataset)))
    n, planned = len(recorded.index), int(attrs.get("n_planned", len(recorded.index)))
    options = attrs.get("options") or {}
    if planned != len(indices) or n > len(indices) or not np.array_equal(recorded.index, indices[:n]):
        refuse(f"on other samples ({planned} with --limit {options.get('limit')} --seed {options.get('seed', 0)}, "
               f"here {len(indices)})")
    labels = _known_labels(dataset)
    if labels is not None and not np.array_equal(np.asarray(recorded.label)[:n], labels[:n]):
        refuse("with other labels for the same samples (another --class-map, or other files under the same name)")


def _weights_name(checkpoint: str | None, sha256: str | None) -> str:
    return f"{checkpoint} (sha256 {sha256[:12]}…)" if sha256 else "no checkpoint"


def same_data_spec(a: str, b: str) -> bool:
    """Two ``--data`` specs name the same data: equal, or paths to the same file or folder."""
    if a.strip() == b.strip():
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _known_labels(dataset: Any) -> np.ndarray | None:
    """The labels of a dataset in loader order, when they are known without reading images."""
    indices = None
    if isinstance(dataset, torch.utils.data.Subset):
        dataset, indices = dataset.dataset, list(dataset.indices)
    labels = getattr(dataset, "labels", None)  # arrays and synthetic data (TensorImages)
    if labels is None:
        labels = getattr(getattr(dataset, "base", None), "targets", None)  # ImageFolder, CIFAR
    if labels is None:
        return None
    labels = np.asarray(labels.numpy() if isinstance(labels, Tensor) else labels, dtype=np.int64)
    return labels[indices] if indices is not None else labels


def proxy_table(positions: Sequence[int], blocks: Sequence[Block],
                angles: Mapping[int, tuple[float | None, float | None]], align: Mapping[str, Mapping[str, Any]],
                delta_loss: Sequence[float], source: str) -> Proxies:
    """Proxies for the ranked blocks (``positions``, ``blocks``), and their Spearman and Kendall τ-b
    correlation with the exact ``delta_loss``. ``angles``: per position, the means of block influence
    and angular distance; ``align``: per block name, the ``align`` figures."""
    rows = []
    for p, block in zip(positions, blocks):
        stats = align.get(block.name, {})
        first_order = stats.get("first_order_mean")
        bi, angular = angles.get(p, (None, None))
        rows.append(ProxyRow(block.name, bi, angular, stats.get("l2_ratio_mean"), stats.get("cos_mean"),
                             -first_order if first_order is not None else None))
    correlation = {}
    for name in PROXY_NAMES:
        values = [getattr(r, name) for r in rows]
        correlation[name] = {"spearman": spearman(values, delta_loss), "kendall": kendall_tau_b(values, delta_loss)}
    return Proxies(rows, correlation, source)
