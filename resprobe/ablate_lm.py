"""``ablate`` for decoder language models (DESIGN §8 "ablate"): exact removal of layers or of their
attention/MLP halves from a prefix cache, greedy and one-shot curves, spans, proxies.

Removal = the unit returns its input: a removed layer returns its hidden states unchanged; a removed
attention half leaves h1 = h (the MLP then reads h); a removed MLP half makes the layer return h1.

The prefix cache: the intact pass (or, for a greedy step, the pass with the blocks removed so far)
keeps every layer's input h_j (and h1_j at sublayer granularity). A variant whose first change is at
layer s runs the model's own forward with layers 0..s−1 replaced by "return the cached h_s" (they
compute nothing), so the model itself builds the position embeddings, the masks and every keyword
argument the later layers receive, exactly as in the intact forward; layers s.. run (or their
removal does), then the final norm and the head. Loss per window: the summed next-token NLL over its
scored tokens (``window_losses``, as ``eval``); reports give it per scored token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from resprobe.ablate_curves import removal_order, rank_order
from resprobe.ablate_proxies import kendall_tau_b, spearman
from resprobe.data.text import stats_mask
from resprobe.errors import BadValue, ModelError
from resprobe.models.blocks import patched_forwards
from resprobe.models.causal_lm import LMAnatomy, LMUnit, perplexity
from resprobe.recording.lm_recorder import hidden_of, output_of, window_losses

Removal = Mapping[int, frozenset]  # layer index -> the parts removed: {"attn"}, {"mlp"} or both (the layer)
WHOLE = frozenset({"attn", "mlp"})
LM_PROXY_NAMES = ("bi", "angular", "angular_last", "taylor", "cos")
Advance = Callable[[int], None]
ProgressFactory = Callable[[str, int], Advance]


def unit_removal(units: Iterable[LMUnit]) -> dict[int, frozenset]:
    """The removal of ``units`` as per-layer removed parts (both halves of a layer = the layer)."""
    removal: dict[int, set] = {}
    for unit in units:
        removal.setdefault(unit.layer_index, set()).update(WHOLE if unit.part == "layer" else {unit.part})
    return {i: frozenset(parts) for i, parts in removal.items()}


def merged(a: Removal, b: Removal) -> dict[int, frozenset]:
    return {i: frozenset(a.get(i, frozenset()) | b.get(i, frozenset())) for i in set(a) | set(b)}


def attention_child(layer: nn.Module) -> nn.Module | None:
    """The attention module of a decoder layer: its first child named like attention (not a norm)."""
    for name, child in layer.named_children():
        low = name.lower()
        if ("attn" in low or "attention" in low) and "norm" not in low and not low.startswith("ln"):
            return child
    return None


def _like(output: Any, hidden: Tensor) -> Any:
    """``hidden`` in the structure the layer returns (a tensor, or a tuple led by the hidden states)."""
    if isinstance(output, tuple):
        return (hidden, *([None] * (len(output) - 1)))
    return hidden


def _keep_h1(seen: dict[str, Tensor]) -> Callable:
    """A pre-hook of a layer's MLP entry that keeps h1, the residual stream between the two halves."""
    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.setdefault("h1", hidden_of(args, kwargs))

    return hook


def _forwards(layers: Sequence[nn.Module], fns: Mapping[int, Callable]) -> Any:
    """Within the context, layer i's forward is ``fns[i]`` (the model's own forward still runs around them)."""
    return patched_forwards([layers[i] for i in fns], list(fns.values()))


@dataclass
class LayerCache:
    """One batch's cached layer inputs h_j, the h1_j of sublayer layers, and the layers' output style."""

    inputs: dict[int, Tensor] = field(default_factory=dict)
    mids: dict[int, Tensor] = field(default_factory=dict)
    tuple_outputs: dict[int, Any] = field(default_factory=dict)  # a layer's output, when it is a tuple


class LMAblationEngine:
    """Runs the model with units removed, from the prefix cache of a base pass (module docstring)."""

    def __init__(self, anatomy: LMAnatomy):
        self.anatomy = anatomy
        self.model = anatomy.model
        first = anatomy.blocks[0]
        self.layers: list[nn.Module] = []
        for unit in anatomy.blocks:
            if unit.layer_index == len(self.layers):
                self.layers.append(unit.layer)
        assert first.layer_index == 0
        self.entries = anatomy.entries  # layer index -> its MLP entry (sublayer granularity)
        # layer index -> an output of the layer when it returns a tuple (a removed layer returns the same)
        self._styles: dict[int, Any] = {}

    # -- what a removed unit computes --------------------------------------------------------------

    def _removed_fn(self, i: int, parts: frozenset) -> Callable:
        layer = self.layers[i]
        original = type(layer).forward.__get__(layer)
        if parts >= WHOLE:
            def skip(*args: Any, **kwargs: Any) -> Any:
                h = hidden_of(args, kwargs)
                return h if not self._tuple_style(i) else _like(self._tuple_style(i), h)

            return skip
        entry = self.entries.get(i)
        if entry is None:
            raise BadValue(f"{self.anatomy.layers_name}.{i}: its attention and MLP halves cannot be removed apart")
        if parts == {"mlp"}:
            def no_mlp(*args: Any, **kwargs: Any) -> Any:
                seen: dict[str, Tensor] = {}
                handle = entry.register_forward_pre_hook(_keep_h1(seen), with_kwargs=True)
                try:
                    out = original(*args, **kwargs)
                finally:
                    handle.remove()
                return _like(out, seen["h1"])  # the layer's output is h1: the MLP update is gone

            return no_mlp
        attention = attention_child(layer)
        if attention is None:
            raise ModelError(f"{self.anatomy.layers_name}.{i}: resprobe finds no attention module to remove")

        def zero(_m: nn.Module, _a: tuple, out: Any) -> Any:
            first = output_of(out)
            return (torch.zeros_like(first), *out[1:]) if isinstance(out, tuple) else torch.zeros_like(first)

        def no_attn(*args: Any, **kwargs: Any) -> Any:
            h = hidden_of(args, kwargs)
            seen: dict[str, Tensor] = {}
            handles = [attention.register_forward_hook(zero),
                       entry.register_forward_pre_hook(_keep_h1(seen), with_kwargs=True)]
            try:
                out = original(*args, **kwargs)
            finally:
                for handle in handles:
                    handle.remove()
            # A zero attention output must leave h1 = h exactly (norms inside the branch map 0 to 0);
            # a branch that adds something to zero (a biased norm) cannot be removed this way.
            if not torch.equal(seen.get("h1", h), h):
                raise ModelError(f"{type(layer).__name__}: its attention branch is not zero when the attention "
                                 "output is: use --granularity layer")
            return out

        return no_attn

    def _tuple_style(self, i: int) -> Any:
        return self._styles.get(i)

    # -- passes --------------------------------------------------------------------------------

    def base_pass(self, input_ids: Tensor, base: Removal, observer: Any = None, keep_from: int = 0,
                  **model_kwargs: Any) -> tuple[Tensor, LayerCache]:
        """The model with ``base`` removed; caches the inputs of layers ``keep_from``.. (and h1)."""
        cache = LayerCache()
        versions: dict[int, int] = {}
        handles = []
        for i in range(0 if observer is not None else keep_from, len(self.layers)):
            layer = self.layers[i]

            def pre(_m: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
                h = hidden_of(args, kwargs).detach()
                cache.inputs[i] = h
                versions[i] = h._version

            def post(_m: nn.Module, _args: tuple, out: Any, i: int = i) -> None:
                if isinstance(out, tuple):
                    cache.tuple_outputs[i] = out
                if observer is not None:
                    observer.layer(i, cache.inputs[i], output_of(out).detach(), cache.mids.get(i))
                    if i < keep_from:  # observed only: no variant starts here, so it is not kept
                        del cache.inputs[i], versions[i]
                        cache.mids.pop(i, None)

            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layer.register_forward_hook(post))
            entry = self.entries.get(i)
            if entry is not None and i not in base:
                def mid(_m: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
                    cache.mids.setdefault(i, hidden_of(args, kwargs).detach())

                handles.append(entry.register_forward_pre_hook(mid, with_kwargs=True))
        try:
            fns = {i: self._removed_fn(i, parts) for i, parts in base.items()}
            with _forwards(self.layers, fns):
                logits = self.model(input_ids=input_ids, use_cache=False, **model_kwargs).logits
        finally:
            for handle in handles:
                handle.remove()
        self._styles.update(cache.tuple_outputs)
        # A layer that wrote into its own input would leave a stale cache: refuse rather than be wrong.
        if any(cache.inputs[i]._version != v for i, v in versions.items()):
            raise ModelError("a decoder layer changed its input in place; resprobe cannot cache its inputs")
        return logits, cache

    def variant_logits(self, input_ids: Tensor, removal: Removal, start: int, cache: LayerCache,
                       **model_kwargs: Any) -> Tensor:
        """Logits with ``removal`` applied (it includes the base pass's removal and equals it before layer
        ``start``), from ``cache``."""
        h = cache.inputs[start]
        fns: dict[int, Callable] = {}
        for i in range(start):
            fns[i] = self._constant(i, h)  # the prefix is not re-run: layer start receives the cached h_start
        for i, parts in removal.items():
            fns[i] = self._removed_fn(i, parts)
        if removal[start] == {"mlp"} and start in cache.mids:  # its output is the cached h1: nothing to run
            fns[start] = self._constant(start, cache.mids[start])
        with _forwards(self.layers, fns):
            return self.model(input_ids=input_ids, use_cache=False, **model_kwargs).logits

    def _constant(self, i: int, value: Tensor) -> Callable:
        style = self._tuple_style(i)

        def constant(*_args: Any, **_kwargs: Any) -> Any:
            return _like(style, value) if style is not None else value

        return constant


# --------------------------------------------------------------------------------------------------
# Proxies reduced on the fly


class AngleProxies:
    """Per unit, sums over the covered tokens of 1 − cos(h_t, out_t) and arccos(cos)/π, and at each
    window's last position arccos(cos)/π (Gromov et al.). Half-angle form from unit vectors (precise
    when out ≈ h); tokens with a zero norm are left out. Nothing beyond [B, T] is kept."""

    def __init__(self, anatomy: LMAnatomy, skip_tokens: int):
        self.units = anatomy.blocks
        self.skip_tokens = skip_tokens
        self.sums = torch.zeros(len(self.units), 5, dtype=torch.float64)  # bi, angular, n, last, n_last
        self._index = {(u.layer_index, u.part): j for j, u in enumerate(self.units)}
        self.mask: Tensor | None = None

    def start_batch(self, first: Tensor, seq_len: int, attention_mask: Tensor | None = None) -> None:
        self.mask = stats_mask(first, seq_len, self.skip_tokens)
        if attention_mask is not None:  # padding is no token
            self.mask = self.mask & attention_mask.bool()

    def layer(self, i: int, h: Tensor, out: Tensor, h1: Tensor | None) -> None:
        if (i, "layer") in self._index:
            self._add(self._index[(i, "layer")], h, out)
        elif h1 is not None:
            self._add(self._index[(i, "attn")], h, h1)
            self._add(self._index[(i, "mlp")], h1, out)

    def _add(self, j: int, a: Tensor, b: Tensor) -> None:
        a, b = a.float(), b.float()
        na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
        ua, ub = a / na, b / nb
        d, s = (ua - ub).norm(dim=-1), (ua + ub).norm(dim=-1)
        bi, angle = d * d / 2, 2 * torch.atan2(d, s) / math.pi  # [B, T]
        valid = (na > 0).squeeze(-1) & (nb > 0).squeeze(-1)
        mask = valid & self.mask
        last = valid[:, -1]
        self.sums[j, 0] += float(bi[mask].double().sum())
        self.sums[j, 1] += float(angle[mask].double().sum())
        self.sums[j, 2] += float(mask.sum())
        self.sums[j, 3] += float(angle[:, -1][last].double().sum())
        self.sums[j, 4] += float(last.sum())

    def means(self) -> list[tuple[float | None, float | None, float | None]]:
        from resprobe.distributed import all_reduce_sums

        s = torch.tensor(all_reduce_sums(self.sums.flatten().tolist()), dtype=torch.float64).view_as(self.sums)
        return [(float(r[0] / r[2]) if r[2] else None, float(r[1] / r[2]) if r[2] else None,
                 float(r[3] / r[4]) if r[4] else None) for r in s]


def gradient_proxies(probe: Any, loader: Iterable, n_tokens: int,
                     advance: Advance | None = None) -> list[tuple[float | None, float | None]]:
    """Per unit, ``taylor`` = −Σ_n ⟨U_n, ∂ℓ_n/∂out_n⟩ / n_tokens (the first-order estimate of
    ``delta_loss``, per scored token, over the statistics' positions) and ``cos`` = the mean over
    windows of cos(U, ∂ℓ/∂h) (``align``'s ``cos_mean``), from one forward + backward per batch."""
    from resprobe.distributed import all_reduce_sums
    from resprobe.recording.lm_recorder import LM_STAT_NAMES, LMRecorder

    units = len(probe.anatomy.blocks)
    dot_sum, cos_sum, cos_n = [0.0] * units, [0.0] * units, [0.0] * units
    out_dot, cos = LM_STAT_NAMES.index("out_dot"), LM_STAT_NAMES.index("cos")
    with LMRecorder(probe.anatomy, probe.runtime, skip_tokens=probe.skip_tokens) as recorder:
        for input_ids, first, indices, *_ in loader:
            stats = recorder.launch_batch(input_ids, first, indices).result().stats
            dots, cosines = stats[LM_STAT_NAMES[out_dot]], stats[LM_STAT_NAMES[cos]]  # [B, units]
            for j in range(units):
                dot_sum[j] += float(dots[:, j].astype("float64").sum())
                finite = cosines[:, j][~_isnan(cosines[:, j])]
                cos_sum[j] += float(finite.astype("float64").sum())
                cos_n[j] += len(finite)
            if advance:
                advance(len(input_ids))
    totals = all_reduce_sums([*dot_sum, *cos_sum, *cos_n])
    dot_sum, cos_sum, cos_n = totals[:units], totals[units:2 * units], totals[2 * units:]
    return [(-d / n_tokens if n_tokens else None, c / k if k else None) for d, c, k in zip(dot_sum, cos_sum, cos_n)]


def _isnan(values: Any) -> Any:
    import numpy as np

    return np.isnan(values)


# --------------------------------------------------------------------------------------------------
# Passes over the windows


@dataclass
class LossTally:
    """Σ of per-window summed NLL (float64) and the scored tokens."""

    total: float = 0.0
    tokens: int = 0

    def add(self, logits: Tensor, input_ids: Tensor, first: Tensor, labels: Tensor | None = None) -> None:
        if labels is None:
            losses, counts = window_losses(logits, input_ids, first)
        else:  # the user's labels (rp.ablate), shifted as transformers' own loss does; -100 is not scored
            targets = labels[:, 1:]
            nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                  ignore_index=-100, reduction="none").view(targets.shape)
            losses, counts = nll.sum(1), (targets != -100).sum(1)
        self.total += float(losses.double().sum())
        self.tokens += int(counts.sum())

    @property
    def loss(self) -> float:
        return self.total / self.tokens if self.tokens else math.nan


def _reduced(tallies: Sequence[LossTally]) -> list[LossTally]:
    from resprobe.distributed import all_reduce_sums, is_distributed

    if not is_distributed():
        return list(tallies)
    sums = all_reduce_sums([x for t in tallies for x in (t.total, t.tokens)])
    return [LossTally(sums[2 * k], int(round(sums[2 * k + 1]))) for k in range(len(tallies))]


class Windows:
    """The windows ``(input_ids, first)`` on the device; kept in memory after the first pass (a greedy
    curve makes K passes) when they fit."""

    def __init__(self, loader: Iterable, device: torch.device):
        self.loader, self.device = loader, device
        self._kept: list[tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]] | None = None

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]]:
        if self._kept is not None:
            yield from self._kept
            return
        kept = []
        for input_ids, first, indices, *extra in self.loader:
            # rp.ablate's batches carry {attention_mask, labels}; the command's windows do not
            more = {k: v.to(self.device) for k, v in (extra[0] if extra else {}).items()}
            batch = (input_ids.to(self.device), first.to(self.device), indices, more)
            kept.append(batch)
            yield batch
        self._kept = kept  # token ids are small: one complete pass is kept


@torch.no_grad()
def evaluate_removals(engine: LMAblationEngine, windows: Windows, removals: Sequence[Removal],
                      base: Removal | None = None, observer: AngleProxies | None = None,
                      advance: Advance | None = None) -> tuple[LossTally, list[LossTally]]:
    """The loss of the model with ``base`` removed, and with each of ``removals`` (each ⊇ ``base``)."""
    base = dict(base or {})
    starts = [min(i for i in r if r[i] != base.get(i)) for r in removals]
    keep_from = min(starts, default=len(engine.layers))
    base_tally, tallies = LossTally(), [LossTally() for _ in removals]
    engine.model.eval()
    for input_ids, first, _, extra in windows:
        labels, model_kwargs = extra.get("labels"), {k: v for k, v in extra.items() if k != "labels"}
        if observer is not None:
            observer.start_batch(first, input_ids.shape[1], model_kwargs.get("attention_mask"))
        logits, cache = engine.base_pass(input_ids, base, observer, keep_from, **model_kwargs)
        base_tally.add(logits, input_ids, first, labels)
        del logits
        for removal, start, tally in zip(removals, starts, tallies):
            tally.add(engine.variant_logits(input_ids, removal, start, cache, **model_kwargs), input_ids, first,
                      labels)
        if advance:
            advance(len(input_ids))
    base_tally, *tallies = _reduced([base_tally, *tallies])
    return base_tally, tallies


# --------------------------------------------------------------------------------------------------
# The report


def _delta(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None and math.isfinite(a) and math.isfinite(b) else None


def _figures(loss: float, baseline: float) -> dict[str, Any]:
    ppl, base_ppl = perplexity(loss), perplexity(baseline)
    return {"loss": loss, "perplexity": ppl, "acc": None, "delta_loss": loss - baseline,
            "delta_perplexity": _delta(ppl, base_ppl), "delta_acc": None}


def _harm(loss: float) -> float:
    return loss if math.isfinite(loss) else math.inf


@dataclass
class LMAblateOptions:
    cumulative: int | None = None
    one_shot: int | None = None
    spans: int | None = None
    proxies: bool = False
    remove: int | None = None
    remove_blocks: list[str] | None = None
    save_pruned: str | None = None
    overwrite: bool = False

    def check(self) -> None:
        """Checks that need no model (run before loading it)."""
        if self.cumulative is not None and self.one_shot is not None:
            raise BadValue("give either --cumulative K (greedy) or --one-shot K, not both")
        for option, k in (("--cumulative", self.cumulative), ("--one-shot", self.one_shot), ("--spans", self.spans),
                          ("--remove", self.remove)):
            if k is not None and k < 1:
                raise BadValue(f"{option} {k}: it must be at least 1")
        if self.remove is not None and self.remove_blocks:
            raise BadValue("give either --remove N or --remove-blocks A,B, not both")
        if (self.remove is not None or self.remove_blocks) and self.save_pruned is None:
            raise BadValue("--remove and --remove-blocks choose what --save-pruned DIR writes: add --save-pruned")
        if self.save_pruned is not None and self.remove is None and not self.remove_blocks:
            raise BadValue("--save-pruned needs --remove N or --remove-blocks A,B")
        if self.overwrite and self.save_pruned is None:
            raise BadValue("--overwrite replaces an existing --save-pruned DIR: add --save-pruned")
        if self.remove is not None and self.cumulative is not None and self.remove > self.cumulative:
            raise BadValue(f"--remove {self.remove} takes the first N of the greedy order, which --cumulative "
                           f"{self.cumulative} stops short of: use --cumulative {self.remove}")
        if self.remove_blocks is not None and len(set(self.remove_blocks)) != len(self.remove_blocks):
            raise BadValue(f"--remove-blocks {','.join(self.remove_blocks)}: a layer is named twice")
        if self.save_pruned is not None:
            from resprobe.models.lm_prune import check_out_dir

            check_out_dir(self.save_pruned, self.overwrite)


def check_lm_options(options: LMAblateOptions, anatomy: LMAnatomy, granularity: str) -> None:
    n = len(anatomy.blocks)
    for option, k in (("--cumulative", options.cumulative), ("--one-shot", options.one_shot),
                      ("--remove", options.remove), ("--spans", options.spans)):
        if k is not None and k > n:
            raise BadValue(f"{option} {k}: the model has only {n} {'units' if granularity == 'sublayer' else 'layers'}")
    if options.spans is not None and options.spans < 1:
        raise BadValue(f"--spans {options.spans}: N must be at least 1")
    for name in options.remove_blocks or []:
        if name not in anatomy.names:
            shown = ", ".join(anatomy.names[:4]) + (", ..." if len(anatomy.names) > 4 else "")
            raise BadValue(f"--remove-blocks: no layer named {name!r}; layers are {shown}")
    if options.save_pruned is not None:
        from resprobe.models.lm_prune import check_out_dir, check_prunable

        if granularity != "layer":
            raise BadValue("--save-pruned writes whole decoder layers: use --granularity layer")
        if options.remove is not None and options.remove >= n:
            raise BadValue(f"--remove {options.remove}: the model has {n} layers and keeps at least one")
        check_out_dir(options.save_pruned, options.overwrite)
        check_prunable(anatomy.model)


def _point(k: int, removed: Sequence[str], loss: float, baseline: float) -> dict[str, Any]:
    return {"k": k, "removed": list(removed), "block": removed[-1] if removed else None, **_figures(loss, baseline)}


def run_lm_ablation(probe: Any, loader: Iterable, options: LMAblateOptions,
                    progress: ProgressFactory | None = None, n_windows: int | None = None) -> dict[str, Any]:
    """The ablate report of a language model (without ``model``/``data``: the caller adds them)."""
    options.check()
    anatomy = probe.anatomy
    check_lm_options(options, anatomy, probe.granularity)
    units = anatomy.blocks
    names = [u.name for u in units]
    engine = LMAblationEngine(anatomy)
    windows = Windows(loader, probe.runtime.device)
    n = n_windows or 0

    def start(description: str) -> Advance | None:
        return progress(description, n) if progress else None

    singles = [unit_removal([u]) for u in units]
    explicit = unit_removal([anatomy[name] for name in options.remove_blocks]) if options.remove_blocks else None
    span_list = [(s, length) for length in range(1, (options.spans or 0) + 1) for s in range(len(units) - length + 1)]
    spans_at = len(singles) + (1 if explicit else 0)
    variants = [*singles, *([explicit] if explicit else []),
                *[unit_removal(units[s:s + length]) for s, length in span_list]]
    angles = AngleProxies(anatomy, probe.skip_tokens) if options.proxies else None
    base, results = evaluate_removals(engine, windows, variants, observer=angles, advance=start("ablate"))
    baseline = base.loss
    losses = [t.loss for t in results[:len(units)]]
    ranks = {i: r + 1 for r, i in enumerate(rank_order([_harm(x) for x in losses]))}
    blocks = [{"name": u.name, "stage": u.stage, "index": u.index, "kind": u.kind, **_figures(loss, baseline),
               "rank": ranks[j]} for j, (u, loss) in enumerate(zip(units, losses))]
    order = removal_order([_harm(x) for x in losses])  # least harmful first
    report: dict[str, Any] = {
        "n": n, "by": "loss", "engine": "cached", "granularity": probe.granularity,
        "baseline": {"loss": baseline, "perplexity": perplexity(baseline), "n_tokens": base.tokens, "acc": None,
                     "top5": None},
        "blocks": blocks, "cumulative": None, "cumulative_mode": None, "spans": None, "proxies": None,
        "unroll": None, "pruned": None,
    }
    if span_list:
        report["spans"] = [{"start": s, "length": length, "removed": names[s:s + length],
                            **{k: v for k, v in _figures(results[spans_at + q].loss, baseline).items()
                               if k in ("loss", "perplexity", "delta_loss", "delta_perplexity")}}
                           for q, (s, length) in enumerate(span_list)]

    pruned_point = None
    if options.cumulative is not None:
        report["cumulative_mode"] = "greedy"
        report["cumulative"] = greedy_lm_curve(engine, windows, units, options.cumulative, baseline, losses,
                                               progress, n)
        if options.remove is not None:
            pruned_point = report["cumulative"][options.remove]
    elif options.one_shot is not None or options.remove is not None:
        k_max = max(options.one_shot or 0, options.remove or 0)
        points = one_shot_lm_curve(engine, windows, units, order, k_max, baseline, losses, progress, n)
        if options.one_shot is not None:
            report["cumulative_mode"] = "one-shot"
            report["cumulative"] = points[:options.one_shot + 1]
        if options.remove is not None:
            pruned_point = points[options.remove]
    if explicit is not None:
        pruned_point = _point(len(options.remove_blocks), options.remove_blocks,
                              results[len(units)].loss, baseline)

    if angles is not None:
        angle_means = angles.means()
        gradient = gradient_proxies(probe, windows, base.tokens, start("proxies (gradients)"))
        rows = [{"name": u.name, "bi": a[0], "angular": a[1], "angular_last": a[2], "taylor": g[0], "cos": g[1]}
                for u, a, g in zip(units, angle_means, gradient)]
        exact = [b["delta_loss"] for b in blocks]
        report["proxies"] = {
            "blocks": rows, "source": "computed",
            "correlation": {p: {"spearman": spearman([r[p] for r in rows], exact),
                                "kendall": kendall_tau_b([r[p] for r in rows], exact)} for p in LM_PROXY_NAMES}}

    if options.save_pruned is not None and pruned_point is not None:
        from resprobe.distributed import barrier, is_main
        from resprobe.models.lm_prune import save_pruned_lm

        if is_main():
            save_pruned_lm(probe.model, probe.loaded.tokenizer,
                           [anatomy[name].layer_index for name in pruned_point["removed"]], options.save_pruned,
                           options.overwrite)
        barrier()
        report["pruned"] = {"path": str(options.save_pruned), "removed": pruned_point["removed"],
                            "loss": pruned_point["loss"], "perplexity": pruned_point["perplexity"], "acc": None}
    return report


def greedy_lm_curve(engine: LMAblationEngine, windows: Windows, units: Sequence[LMUnit], k_max: int,
                    baseline: float, singles: Sequence[float], progress: ProgressFactory | None,
                    n: int) -> list[dict[str, Any]]:
    """SLEB's procedure: remove the unit whose removal hurts least, re-evaluate every remaining unit
    with it removed (from the pruned model's own prefix cache), repeat up to ``k_max``."""
    remaining, losses = list(range(len(units))), list(singles)
    removed: list[int] = []
    points = [_point(0, [], baseline, baseline)]
    for step in range(1, k_max + 1):
        if step > 1:
            advance = progress(f"greedy {step}/{k_max}", n) if progress else None
            base = unit_removal(units[j] for j in removed)
            variants = [merged(base, unit_removal([units[j]])) for j in remaining]
            _, tallies = evaluate_removals(engine, windows, variants, base, advance=advance)
            losses = [t.loss for t in tallies]
        pick = removal_order([_harm(x) for x in losses])[0]
        removed.append(remaining.pop(pick))
        points.append(_point(step, [units[j].name for j in removed], losses.pop(pick), baseline))
    return points


def one_shot_lm_curve(engine: LMAblationEngine, windows: Windows, units: Sequence[LMUnit], order: Sequence[int],
                      k_max: int, baseline: float, singles: Sequence[float], progress: ProgressFactory | None,
                      n: int) -> list[dict[str, Any]]:
    """ShortGPT's way: remove the first k units of the single-removal order, k = 0..k_max, one pass."""
    losses = {0: baseline, 1: singles[order[0]]}
    ks = list(range(2, k_max + 1))
    if ks:
        advance = progress("one-shot", n) if progress else None
        _, tallies = evaluate_removals(engine, windows, [unit_removal(units[j] for j in order[:k]) for k in ks],
                                       advance=advance)
        losses.update({k: t.loss for k, t in zip(ks, tallies)})
    return [_point(k, [units[j].name for j in order[:k]], losses[k], baseline) for k in range(k_max + 1)]

