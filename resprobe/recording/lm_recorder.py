"""The hooked pass for language models (DESIGN §8 "Statistics"), streaming on the device.

One forward and one backward per batch of windows, back to the input embeddings' output (the
parameters are frozen; a forward hook makes that output require grad, so layer 0's ``g`` exists).
Every unit (a decoder layer, or its attention/MLP half) has an input ``h`` and an output ``out``, read
by module hooks; tensor hooks on them deliver ``g = ∂ℓ/∂h`` and ``g_out = ∂ℓ/∂out``. When ``g``
arrives, the unit's statistics are reduced at once to per-token sums [B, T] and then per window [B]
(F = U = out − h, flattened over the window's covered positions), and its references are dropped:
nothing tokens×tokens, nothing beyond autograd's own activations. Gradients come from tensor hooks,
never ``register_full_backward_hook`` (which changes the module's outputs into views).

Per window: §1's statistics (``STAT_NAMES``) plus ``token_cos`` / ``token_update_cos``, the mean over
covered tokens of the per-token cos(F_t, g_t) / cos(U_t, g_t) (tokens with a zero norm excluded; NaN
when none is left). ℓ_n is the sum of next-token NLL over window n's scored predictions; the
recording's ``label`` column holds each window's number of scored tokens and ``pred`` is −1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from resprobe.data.text import scored_mask, stats_mask
from resprobe.models.causal_lm import LMAnatomy
from resprobe.recording.recorder import STAT_NAMES, TOKEN_STATS, PendingBatch, _cos, _to_host

LM_STAT_NAMES = STAT_NAMES + TOKEN_STATS


def hidden_of(args: tuple, kwargs: dict) -> Tensor | None:
    """The hidden states a layer (or a module inside it) is called with: first positional argument, or
    the ``hidden_states`` keyword."""
    if args and isinstance(args[0], Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    return value if isinstance(value, Tensor) else None


def output_of(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def window_stats(h: Tensor, out: Tensor, g: Tensor, g_out: Tensor | None, mask: Tensor) -> Tensor:
    """[len(LM_STAT_NAMES), B] float32 for tensors [B, T, D] over the positions ``mask`` [B, T] covers."""
    m = mask.to(torch.float32)
    h32, g32 = h.float(), g.float()
    update = out.float() - h32
    hh = (h32 * h32).sum(-1)
    uu = (update * update).sum(-1)
    gg = (g32 * g32).sum(-1)
    ug = (update * g32).sum(-1)  # per token [B, T]
    input_norm, update_norm, grad_norm = ((hh * m).sum(1).sqrt(), (uu * m).sum(1).sqrt(), (gg * m).sum(1).sqrt())
    dot = (ug * m).sum(1)
    if g_out is not None:
        out_dot = ((update * g_out.float()).sum(-1) * m).sum(1)
    else:
        out_dot = torch.full_like(dot, math.nan)
    cos = _cos(dot, update_norm, grad_norm)
    valid = mask & (uu > 0) & (gg > 0)
    per_token = torch.where(valid, ug / (uu * gg).clamp_min(1e-300).sqrt(), torch.zeros_like(ug))
    count = valid.sum(1)
    token_cos = torch.where(count > 0, per_token.sum(1) / count.clamp_min(1), torch.full_like(dot, math.nan))
    # F = U for every unit of a language model: the branch statistics are the update's.
    return torch.stack([input_norm, update_norm, update_norm, grad_norm, dot, dot, out_dot, cos, cos, token_cos,
                        token_cos])


@dataclass
class _Unit:
    h: Tensor | None = None
    out: Tensor | None = None
    g_out: Tensor | None = None


class LMRecorder:
    """Hooks on every unit of ``anatomy``; :meth:`launch_batch` does one forward + backward.

    The interface of :class:`resprobe.recording.recorder.Recorder` that ``store.run_recording`` uses
    (``launch_batch(input_ids, first_scored, indices)``, ``samples_seen``, ``launches_ahead``)."""

    def __init__(self, anatomy: LMAnatomy, runtime: Any, skip_tokens: int = 0):
        self.anatomy = anatomy
        self.blocks = anatomy.blocks
        self.runtime = runtime
        self.skip_tokens = skip_tokens
        self.samples_seen = 0
        self._handles: list[Any] = []
        self._recording = False
        self._units: list[_Unit] = []
        self._mask: Tensor | None = None
        self._stats: Tensor | None = None
        self._embeds: Tensor | None = None
        # per layer: its units' indices for (whole layer), (attn, mlp)
        self._by_layer: dict[int, dict[str, int]] = {}
        for j, unit in enumerate(self.blocks):
            self._by_layer.setdefault(unit.layer_index, {})[unit.part] = j
        self._install()

    # -- hooks ---------------------------------------------------------------------------------

    def _install(self) -> None:
        model = self.anatomy.model
        embeddings = model.get_input_embeddings()
        self._handles.append(embeddings.register_forward_hook(self._embedding_hook))
        seen: set[int] = set()
        for unit in self.blocks:
            if unit.layer_index in seen:
                continue
            seen.add(unit.layer_index)
            parts = self._by_layer[unit.layer_index]
            self._handles.append(unit.layer.register_forward_pre_hook(self._layer_pre_hook(parts), with_kwargs=True))
            self._handles.append(unit.layer.register_forward_hook(self._layer_hook(parts)))
            entry = self.anatomy.entries.get(unit.layer_index)
            if entry is not None:
                self._handles.append(entry.register_forward_pre_hook(self._entry_hook(parts), with_kwargs=True))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> LMRecorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _embedding_hook(self, _module: nn.Module, _args: tuple, output: Any) -> Any:
        if not self._recording or not isinstance(output, Tensor):
            return None
        if not output.requires_grad:  # frozen weights: the gradient must still reach layer 0's input
            output = output.detach().requires_grad_(True)
        self._embeds = output
        return output

    def _start(self, j: int, h: Tensor) -> None:
        unit = self._units[j] = _Unit(h=h)
        if h.requires_grad:
            h.register_hook(self._grad_hook(j, unit))

    def _finish(self, j: int, out: Tensor) -> None:
        unit = self._units[j]
        unit.out = out
        if out.requires_grad:
            out.register_hook(self._out_grad_hook(unit))

    def _layer_pre_hook(self, parts: dict[str, int]) -> Callable:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            h = hidden_of(args, kwargs)
            if self._recording and h is not None:
                self._start(parts.get("layer", parts.get("attn", -1)), h)

        return hook

    def _entry_hook(self, parts: dict[str, int]) -> Callable:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            h1 = hidden_of(args, kwargs)
            if self._recording and h1 is not None and self._units[parts["attn"]].out is None:
                self._finish(parts["attn"], h1)
                self._start(parts["mlp"], h1)

        return hook

    def _layer_hook(self, parts: dict[str, int]) -> Callable:
        def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            out = output_of(output)
            if self._recording and out is not None:
                self._finish(parts.get("layer", parts.get("mlp", -1)), out)

        return hook

    @staticmethod
    def _out_grad_hook(unit: _Unit) -> Callable:
        def hook(g_out: Tensor) -> None:
            unit.g_out = g_out

        return hook

    def _grad_hook(self, j: int, unit: _Unit) -> Callable:
        def hook(g: Tensor) -> None:
            if unit.h is None or unit.out is None:
                return
            assert self._stats is not None and self._mask is not None
            self._stats[:, :, j] = window_stats(unit.h.detach(), unit.out.detach(), g, unit.g_out, self._mask)
            unit.h = unit.out = unit.g_out = None  # freed as soon as consumed

        return hook

    # -- one batch -----------------------------------------------------------------------------

    @property
    def launches_ahead(self) -> bool:
        return self.runtime.device.type == "cuda"

    def forward_losses(self, input_ids: Tensor, first: Tensor) -> tuple[Tensor, Tensor]:
        """Per-window summed next-token NLL [B] (float32) and scored-token counts [B]."""
        model = self.anatomy.model
        logits = model(input_ids=input_ids, use_cache=False).logits
        return window_losses(logits, input_ids, first)

    def launch_batch(self, input_ids: Tensor, first: Tensor, indices: Tensor) -> PendingBatch:
        model = self.anatomy.model
        model.eval()
        device = self.runtime.device
        input_ids = input_ids.to(device)
        first = first.to(device)
        batch, seq_len = input_ids.shape
        self._mask = stats_mask(first, seq_len, self.skip_tokens)
        self._stats = torch.full((len(LM_STAT_NAMES), batch, len(self.blocks)), math.nan, device=device)
        self._units = [_Unit() for _ in self.blocks]
        self._recording = True
        try:
            with self.runtime.numerics(), torch.enable_grad():
                losses, counts = self.forward_losses(input_ids, first)
                if self._embeds is None:
                    raise RuntimeError("the model's input embeddings were not called")
                torch.autograd.grad(losses.sum(), self._embeds)
        finally:
            self._recording = False
            self._units, self._embeds = [], None
        stats, self._stats = self._stats, None
        self.samples_seen += batch
        host, event = _to_host({"stats": stats, "index": indices, "label": counts,
                                "pred": torch.full_like(counts, -1), "loss": losses.detach()})
        return _LMPending(host, event, {})

    def run_batch(self, input_ids: Tensor, first: Tensor, indices: Tensor) -> Any:
        return self.launch_batch(input_ids, first, indices).result()


class _LMPending(PendingBatch):
    def result(self) -> Any:
        batch = super().result()
        stats = self.host["stats"].numpy()
        batch.stats = {name: stats[i].copy() for i, name in enumerate(LM_STAT_NAMES)}
        return batch


def window_losses(logits: Tensor, input_ids: Tensor, first: Tensor) -> tuple[Tensor, Tensor]:
    """ℓ_n = Σ of next-token NLL over window n's scored predictions, and their count."""
    batch, seq_len = input_ids.shape
    mask = scored_mask(first, seq_len)[:, :-1]
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1),
                          reduction="none").view(batch, seq_len - 1)
    return (nll * mask).sum(1), mask.sum(1)
