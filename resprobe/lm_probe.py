"""What every language-model command starts from: the loaded LM, its units, its text windows, where it
runs (the counterpart of probe.py)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from resprobe.errors import BadValue
from resprobe.models.causal_lm import GRANULARITIES, LMAnatomy, LoadedLM, lm_anatomy, load_lm, log


@dataclass
class LMProbe:
    """The language-model counterpart of :class:`resprobe.probe.Probe` (the same attributes that
    ``store.record`` reads: ``anatomy``, ``runtime``, ``describe``, ``loader``, ``make_recorder``)."""

    loaded: LoadedLM
    runtime: Any
    granularity: str = "layer"
    seq_len: int | None = None
    stride: int | None = None
    text_column: str = "text"
    skip_tokens: int = 0
    offline: bool = False
    protocol: dict[str, Any] | None = None
    _anatomy: LMAnatomy | None = None

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def anatomy(self) -> LMAnatomy:
        if self._anatomy is None:
            self._anatomy = lm_anatomy(self.model, int(self.resolved_seq_len()), self.granularity)
        return self._anatomy

    def resolved_seq_len(self) -> int:
        """--seq-len, default min(1024, the model's maximum positions); above the maximum: refused."""
        limit = self.loaded.max_positions
        if self.seq_len is None:
            return min(1024, limit) if limit else 1024
        if self.seq_len < 2:
            raise BadValue(f"--seq-len must be at least 2 (one token predicts the next), got {self.seq_len}")
        if limit is not None and self.seq_len > limit:
            raise BadValue(f"--seq-len {self.seq_len} is above {self.loaded.spec}'s maximum of {limit} positions")
        return self.seq_len

    def data(self, spec: str, limit: int | None = None, seed: int = 0) -> Any:
        from resprobe.data.text import open_windows

        source = open_windows(spec, self.loaded.tokenizer, self.loaded.tokenizer_name, self.resolved_seq_len(),
                              self.stride, self.text_column, self.skip_tokens, limit, seed, self.offline)
        self.protocol = source.protocol
        for note in source.notes:
            log.info(note)
        return source

    def loader(self, source: Any, batch_size: int = 8, workers: int | None = None) -> Iterable:
        from resprobe.data.text import window_loader

        return window_loader(source, batch_size)

    def make_recorder(self, anatomy: LMAnatomy, runtime: Any, target: str = "label", save_tensors: int = 0,
                      readout: Iterable[str] = (), **_: Any) -> Any:
        from resprobe.recording.lm_recorder import LMRecorder

        if save_tensors:
            raise BadValue("--save-tensors is not supported for language models yet")
        if list(readout):
            raise BadValue("--readout is not supported for language models")
        if target != "label":
            raise BadValue("--target pred is not supported for language models (the loss is the next-token NLL)")
        return LMRecorder(anatomy, runtime, skip_tokens=self.skip_tokens)

    def describe(self) -> dict[str, Any]:
        return {"model": self.loaded.spec, "checkpoint": None, "checkpoint_sha256": None, "preprocessing": None,
                "protocol": self.protocol}


def open_lm_probe(spec: str, tokenizer: str | None = None, device: str = "auto", precision: str = "fp32",
                  offline: bool = False, trust_remote_code: bool = False, granularity: str = "layer",
                  seq_len: int | None = None, stride: int | None = None, text_column: str | None = None,
                  skip_tokens: int | None = None, seed: int = 0) -> LMProbe:
    """Load MODEL for an LM command; option values are checked before the model loads."""
    from resprobe.runtime import make_runtime

    if granularity not in GRANULARITIES:
        raise BadValue(f"--granularity {granularity!r}: choose layer or sublayer")
    if skip_tokens is not None and skip_tokens < 0:
        raise BadValue(f"--skip-tokens must be 0 or more, got {skip_tokens}")
    if stride is not None and stride < 1:
        raise BadValue(f"--stride must be at least 1, got {stride}")
    # bf16: the weights themselves are bf16 (no autocast); statistics are accumulated in fp32.
    runtime = make_runtime(device, "fp32" if precision == "bf16" else precision)
    loaded = load_lm(spec, tokenizer, precision, offline, trust_remote_code, seed)
    loaded.model.to(runtime.device)
    probe = LMProbe(loaded, runtime, granularity, seq_len, stride, text_column or "text", int(skip_tokens or 0),
                    offline)
    seq = probe.resolved_seq_len()
    if probe.skip_tokens >= seq:
        raise BadValue(f"--skip-tokens {probe.skip_tokens} leaves no position of a {seq}-token window")
    return probe
