"""Sharing a span of a language model's decoder layers (DESIGN §8 "share"; docs/llm.md "Sharing layers";
Relaxed Recursive Transformers).

``--span A:B --period P``: layers A..B−1 become P shared layers looped (B−A)/P times. Layer A+t is
replaced by iteration t of shared layer t mod P, so shared layer j runs at layers A+j, A+j+P, … It is
the vision machinery of :mod:`resprobe.share` with one shared block per residue j (P "stages" in one
layer list), so everything said there holds: the norms (and any per-layer scale) are per iteration
unless ``norm="shared"``; every other parameter exists once, under ``resprobe_shared``.

Each iteration keeps the plain settings in which the replaced layers differ (``self_attn.layer_idx``,
Gemma 2's sliding window, GPT-2's ``scale_attn_by_inverse_layer_idx`` scaling): iteration t runs as
layer A+t, so masks, rotary embeddings and the KV cache (one cache slot per layer index) behave as in
the original model, and ``generate`` with a cache works.

``lora_rank``: a per-iteration ``W_t = W + B_t A_t`` for every Linear (and GPT-2's transposed Conv1D)
weight, from the rank-R truncated SVD of (original layer's weight − shared weight); with LoRA every other
shared parameter (the biases) gets a per-iteration offset, as for vision models, so full rank reproduces
the original model exactly.
Fused expert tensors of mixture-of-experts layers are not Linear modules: they are shared uncorrected.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from resprobe.errors import BadValue, ModelError
from resprobe.models.blocks import count_params
from resprobe.models.causal_lm import decoder_layers
from resprobe.models.recipes import register_recipe
from resprobe.share import (INITS, NORM_MODES, SharedIteration, SharedStage, StagePlan, _Settings,
                            build_shared_stage)

RECIPE_KIND = "share_lm"
RECIPE_VERSION = 1


def parse_span(text: str | None) -> tuple[int, int]:
    """``--span 2:6`` → ``(2, 6)``: layers 2, 3, 4, 5."""
    if text is None:
        raise BadValue("--span A:B is required for a language model: the layers A..B−1 to share, e.g. --span 2:6")
    start, sep, end = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(start), int(end)
    except ValueError:
        raise BadValue(f"--span {text!r}: expected A:B, the first layer and one past the last, e.g. 2:6") from None


@dataclass
class SpanOptions:
    """What to share and how (the language-model ``share`` options)."""

    start: int
    end: int
    period: int = 1
    init: str = "average"
    norm: str = "unshared"
    lora_rank: int | None = None

    def validate(self, n_layers: int | None = None) -> SpanOptions:
        """Each bad value refused with one line; the span against the model's ``n_layers`` when given."""
        a, b, p = self.start, self.end, self.period
        if self.init not in INITS:
            raise BadValue(f"--init {self.init!r}: choose one of {', '.join(INITS)}")
        if self.norm not in NORM_MODES:
            raise BadValue(f"--norm {self.norm!r}: choose one of {', '.join(NORM_MODES)}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise BadValue(f"--lora-rank must be at least 1, got {self.lora_rank}")
        if a < 0 or b <= a:
            raise BadValue(f"--span {a}:{b}: expected 0 ≤ A < B (layers A..B−1)")
        if b - a < 2:
            raise BadValue(f"--span {a}:{b} holds one layer; sharing needs two or more")
        if n_layers is not None and b > n_layers:
            raise BadValue(f"--span {a}:{b} is out of range: the model has {n_layers} layers (0..{n_layers - 1}), "
                           f"so B is at most {n_layers}")
        if p < 1:
            raise BadValue(f"--period must be at least 1, got {p}")
        if (b - a) % p:
            raise BadValue(f"--period {p} does not divide the span's {b - a} layers ({a}:{b})")
        if (b - a) // p < 2:
            raise BadValue(f"--period {p} loops the span {a}:{b} once, which shares nothing; use a period of at "
                           f"most {(b - a) // 2}")
        return self

    @property
    def iterations(self) -> int:
        return (self.end - self.start) // self.period


@dataclass
class SharedSpan:
    """One shared span as the report lists it (``spans`` in the JSON)."""

    start: int
    end: int
    period: int
    iterations: int
    init: str
    norm: str
    lora_rank: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LMShareResult:
    params_before: int
    params_after: int
    spans: list[SharedSpan]
    stages: list[SharedStage]  # one per shared layer (the vision report's rows)
    recipe: dict[str, Any]


def plan_span(model: nn.Module, options: SpanOptions) -> list[StagePlan]:
    """One plan per shared layer j < P: the layers A+j, A+j+P, … and their iterations (in place)."""
    prefix, layers = decoder_layers(model)
    options.validate(len(layers))
    taken = [i for i in range(options.start, options.end) if isinstance(layers[i], SharedIteration)]
    if taken:
        raise ModelError(f"--span {options.start}:{options.end}: layer {taken[0]} is already shared")
    key = prefix.replace(".", "_")
    plans = []
    for j in range(options.period):
        names = tuple(f"{prefix}.{i}" for i in range(options.start + j, options.end, options.period))
        plans.append(StagePlan(0, prefix, names, names, f"{key}_{options.start}_{options.end}_{j}"))
    return plans


def _settings(norm: str, lora_rank: int | None, init: str) -> _Settings:
    return _Settings(norm, lora_rank, init, "copy")  # with LoRA, per-iteration bias offsets as for vision


def share_span(model: nn.Module, options: SpanOptions) -> LMShareResult:
    """Share ``options``' span of ``model``'s decoder layers, in place. Returns parameter counts (distinct
    tensors), what was shared, and the recipe that rebuilds the structure (:func:`rebuild_shared_span`)."""
    plans = plan_span(model, options)
    settings = _settings(options.norm, options.lora_rank, options.init)
    before = count_params(model)
    for plan in plans:
        build_shared_stage(model, plan, settings, initialize=True)
    after = count_params(model)
    span = SharedSpan(options.start, options.end, options.period, options.iterations, options.init, options.norm,
                      options.lora_rank)
    stages = [SharedStage(0, list(p.blocks), len(p.iterations), options.init, list(p.iterations), options.norm,
                          options.lora_rank) for p in plans]
    recipe = {"kind": RECIPE_KIND, "version": RECIPE_VERSION, "span": span.to_dict(),
              "stages": [p.to_dict() for p in plans]}
    return LMShareResult(before, after, [span], stages, recipe)


@register_recipe(RECIPE_KIND)
def rebuild_shared_span(model: nn.Module, recipe: dict[str, Any]) -> nn.Module:
    """Re-apply a ``share_lm`` recipe's structure to a freshly built model (the weights come from the file)."""
    if int(recipe.get("version", 1)) > RECIPE_VERSION:
        raise ModelError(f"share_lm recipe version {recipe.get('version')} is newer than this resprobe; "
                         "upgrade resprobe")
    span = recipe["span"]
    settings = _settings(str(span["norm"]), span.get("lora_rank"), str(span["init"]))
    for stage in recipe.get("stages") or []:
        build_shared_stage(model, StagePlan.from_dict(stage), settings, initialize=False)
    return model
