"""Which residual blocks can go, and at what cost (docs/reference.md; paper §4.2 and §4.4; Veit et al.
2016 lesions; ShortGPT and Gromov et al. 2024 layer pruning).

The engine
----------
Removing block k changes nothing before it. So, per batch, the model runs once (the pass's *base*:
the intact model, or for a greedy step the model with the blocks removed so far) with forward
pre-hooks that cache block inputs, and every *variant* — a map from block positions to replacement
functions (a lesion, an unrolled block) — is evaluated from the cached input of the first position
where it differs from the base::

    logits = anatomy.run_from(k, h_k, replace={k: block_k.lesion, ...})

so only the blocks from k on and the head are recomputed. For B equal blocks a removal costs about
(B + 1)/2 block evaluations instead of B plus stem and head: roughly half the naive cost
(docs/ablate.md). In a CSPNet, whose stages run their blocks on half of a split and concatenate the
other half back, the stage's input is cached too and the stage re-runs around the blocks from k
(:class:`resprobe.blocks.Segment`). Models whose blocks are not a simple chain (custom models, pruned models with a
removed transition) fall back to a full forward per variant with the blocks patched
(:func:`resprobe.blocks.replaced_blocks`): slower, same results.

Public API: :func:`run_ablation` (what the ``ablate`` command runs), :class:`AblateOptions`,
:class:`AblationReport`; the pieces :class:`AblationEngine`, :func:`evaluate_pass`,
:func:`rank_removals`, :func:`greedy_curve`, :func:`one_shot_curve`, :func:`unrolled`,
:func:`spearman`, :func:`kendall_tau_b`; pruned checkpoints :func:`prune_model`,
:func:`save_pruned` and the ``prune`` recipe.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from resprobe.blocks import GENERIC, Anatomy, Block, BlockFamily, family_of, replaced_blocks
from resprobe.distributed import barrier, is_main
from resprobe.errors import BadValue, ModelError, RecordingError
from resprobe.evaluate import EvalResult, Tally, borderline_mask, is_class_labels, reduce_tallies
from resprobe.models import register_recipe, save_resprobe_checkpoint
from resprobe.runtime import Runtime
from resprobe.share import check_out_path

if TYPE_CHECKING:  # pragma: no cover
    from resprobe.probe import Probe

Fn = Callable[[Tensor], Tensor]
Variant = Mapping[int, Fn]  # block position -> what runs there instead of the block
Observer = Callable[[int, Tensor, Tensor], Any]  # (position, block input, block output) -> per-sample values
Advance = Callable[[int], None]
ProgressFactory = Callable[[str, int], Advance]  # (description, total samples) -> advance(n)

BY_CHOICES = ("loss", "acc")
BATCH_CACHE_BYTES = int(1.5e9)  # keep the preprocessed batches in memory below this size
MAX_SUFFIX_THREADS = 8  # suffix runs side by side on the CPU (each holds its own activations)
PROXY_NAMES = ("bi", "angular", "l2_ratio", "cos", "taylor")
REBUILDABLE_SOURCES = ("timm", "torchvision", "hf-hub", "callable")


# --------------------------------------------------------------------------------------------------
# Data: the same batches, pass after pass


class Batches:
    """The evaluation data as ``(images, labels)`` on the device, iterated once per pass.

    After the first pass the batches stay in memory when they fit in ``cache_bytes`` (a greedy
    curve makes K passes; decoding and normalizing the images again each time would cost as much as
    the small models themselves), otherwise every pass reads the loader again.
    """

    def __init__(self, loader: Iterable, runtime: Runtime, cache_bytes: int = BATCH_CACHE_BYTES):
        self.loader = loader
        self.runtime = runtime
        self.cache_bytes = cache_bytes
        self._cached: list[tuple[Tensor, Tensor]] | None = None

    @property
    def cached(self) -> bool:
        return self._cached is not None

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self._cached is not None:
            yield from self._cached
            return
        kept: list[tuple[Tensor, Tensor]] | None = [] if self.cache_bytes > 0 else None
        size = 0
        for images, labels, *_ in self.loader:
            images, labels = self.runtime.batch(images), labels.to(self.runtime.device)
            if kept is not None:
                size += images.numel() * images.element_size()
                if size > self.cache_bytes:
                    kept = None  # too big: later passes read the loader again
                else:
                    kept.append((images, labels))
            yield images, labels
        if kept is not None:  # only a complete pass is kept
            self._cached = kept


# --------------------------------------------------------------------------------------------------
# The engine


@dataclass
class BatchOutcome:
    """One batch of a pass: the base model's logits, each variant's, and what the observer returned."""

    labels: Tensor
    logits: Tensor
    variants: list[Tensor]
    observed: dict[int, Any] = field(default_factory=dict)


def first_difference(variant: Variant, base: Variant) -> int | None:
    """The first block position where ``variant`` computes something else than ``base`` (None: same)."""
    positions = [i for i in set(variant) | set(base) if variant.get(i) != base.get(i)]
    return min(positions) if positions else None


class AblationEngine:
    """Evaluates variants of a model from cached block inputs (see the module docstring).

    ``fast=False`` forces the full-forward way (also what models that are not a simple chain get).
    """

    def __init__(self, model: nn.Module, anatomy: Anatomy, runtime: Runtime,
                 batches: Iterable[tuple[Tensor, Tensor]], fast: bool = True, loss_fn: Any = None):
        self.model = model
        self.loss_fn = loss_fn  # per-sample loss (outputs, targets) -> [B]; None: cross-entropy
        self.anatomy = anatomy
        self.runtime = runtime
        self.batches = batches
        self.fast = fast and anatomy.can_run_suffix
        # Set once a block is seen changing its own input in place: cached inputs are copied from then on.
        self.clone_inputs = False

    @property
    def blocks(self) -> list[Block]:
        return self.anatomy.blocks

    def run(self, variants: Sequence[Variant], base: Variant | None = None, observer: Observer | None = None,
            advance: Advance | None = None) -> Iterator[BatchOutcome]:
        """Per batch: the base model's logits and every variant's. ``observer`` sees each block's input
        and output in the base pass (reduce at once: the tensors are not kept)."""
        base = dict(base or {})
        starts = [first_difference(v, base) for v in variants]
        keep = {s for s in starts if s is not None} if self.fast else set()
        if observer is not None:
            keep |= set(getattr(observer, "positions", range(len(self.blocks))))
        self.model.eval()
        for images, labels in self.batches:
            # Grad mode and precision are set per batch, never across a ``yield`` (they are global state).
            outcome = self._batch(images, labels, variants, starts, base, keep, observer)
            yield outcome
            if advance is not None:
                advance(len(labels))

    @torch.no_grad()
    def _batch(self, images: Tensor, labels: Tensor, variants: Sequence[Variant], starts: Sequence[int | None],
               base: Variant, keep: set[int], observer: Observer | None) -> BatchOutcome:
        with self.runtime.compute():
            logits, cache, observed = self._base_pass(images, base, keep, observer)
            jobs = [(variant, start) for variant, start in zip(variants, starts) if start is not None]
            workers = self._suffix_workers(len(jobs))
            if workers > 1:
                computed = iter(self._suffixes_in_threads(images, jobs, cache, workers))
            else:
                computed = (self._variant_logits(images, variant, start, cache) for variant, start in jobs)
            outputs = [logits if start is None else next(computed) for start in starts]
        return BatchOutcome(labels, logits, outputs, observed)

    def _suffix_workers(self, jobs: int) -> int:
        """Threads for the variants' suffix runs: on the CPU, one per intra-op thread (at most 8).

        Suffix runs are mostly late blocks, whose small tensors split badly across cores; running
        several suffixes side by side, each single-threaded, keeps every core busy
        (benchmarks/ablate_parts_cpu.py: 0.91–1.0× the sequential time on 2 cores). Not on GPUs
        (one stream), not for the full-forward fallback and segmented models (they patch the shared
        model), and not with a block that writes into its input (the cached inputs would be shared
        between threads).
        """
        if (not self.fast or self.clone_inputs or self.anatomy.segments or self.runtime.device.type != "cpu"
                or jobs < 2):  # segments: a suffix run patches its stage's container (Anatomy.run_from)
            return 1
        return min(torch.get_num_threads(), jobs, MAX_SUFFIX_THREADS)

    def _suffixes_in_threads(self, images: Tensor, jobs: list[tuple[Variant, int]], cache: dict[Any, Tensor],
                             workers: int) -> list[Tensor]:
        def run(job: tuple[Variant, int]) -> Tensor:
            # Grad mode and autocast are per thread; the TF32 flags are global and already set.
            with torch.no_grad(), self.runtime.autocast():
                return self._variant_logits(images, job[0], job[1], cache)

        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads // workers))
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="resprobe-suffix") as pool:
                # Longest suffix first, so that no thread is left with a long one at the end.
                order = sorted(range(len(jobs)), key=lambda i: jobs[i][1])
                done = dict(zip(order, pool.map(run, [jobs[i] for i in order])))
        finally:
            torch.set_num_threads(threads)
        return [done[i] for i in range(len(jobs))]

    def _base_pass(self, images: Tensor, base: Variant, keep: set[int],
                   observer: Observer | None) -> tuple[Tensor, dict[Any, Tensor], dict[int, Any]]:
        for _ in range(2):
            cache: dict[Any, tuple[Tensor, int]] = {}
            observed: dict[int, Any] = {}
            handles = self._install_hooks(keep, observer, cache, observed)
            try:
                with replaced_blocks([self.blocks[i] for i in base], list(base.values())):
                    logits = self.model(images)
            finally:
                for handle in handles:
                    handle.remove()
            # torchvision and timm blocks never write into their input, but a custom block might; a
            # changed version counter means a cached tensor is stale: redo the batch with copies.
            if self.clone_inputs or all(t._version == v for t, v in cache.values()):
                return logits, {i: t for i, (t, _) in cache.items()}, observed
            self.clone_inputs = True
        raise AssertionError("unreachable: the second attempt copies every cached input")

    def _install_hooks(self, keep: set[int], observer: Observer | None, cache: dict[Any, tuple[Tensor, int]],
                       observed: dict[int, Any]) -> list[Any]:
        handles = []
        # A segmented model (CSPNet) runs on from a block with its stage's input too: cached under
        # ("segment", first block of the stage).
        segments = {s.first: s for j in keep if (s := self.anatomy.segment_of(j)) is not None}
        for first, segment in segments.items():
            def entry_hook(_m: nn.Module, args: tuple, first: int = first) -> None:
                x = args[0].detach()
                x = x.clone() if self.clone_inputs else x
                cache[("segment", first)] = (x, x._version)

            handles.append(segment.wrapper.register_forward_pre_hook(entry_hook))
        for j in sorted(keep):
            module = self.blocks[j].module

            def pre_hook(_m: nn.Module, args: tuple, j: int = j) -> None:
                h = args[0].detach()
                h = h.clone() if self.clone_inputs else h
                cache[j] = (h, h._version)

            handles.append(module.register_forward_pre_hook(pre_hook))
            if observer is not None:
                def post_hook(_m: nn.Module, _args: tuple, out: Tensor, j: int = j) -> None:
                    observed[j] = observer(j, cache[j][0], out.detach())

                handles.append(module.register_forward_hook(post_hook))
        return handles

    def _variant_logits(self, images: Tensor, variant: Variant, start: int, cache: dict[Any, Tensor]) -> Tensor:
        if not self.fast:
            positions = sorted(variant)
            with replaced_blocks([self.blocks[i] for i in positions], [variant[i] for i in positions]):
                return self.model(images)
        h = cache[start]
        segment = self.anatomy.segment_of(start)
        entry = cache[("segment", segment.first)] if segment is not None else None
        if self.clone_inputs:  # the block at ``start`` may write into it, and other variants reuse it
            h = h.clone()
            entry = entry.clone() if entry is not None else None
        return self.anatomy.run_from(start, h, dict(variant), entry)


def lesion_variant(anatomy: Anatomy, positions: Iterable[int]) -> dict[int, Fn]:
    """The model with the blocks at ``positions`` removed (each block's own lesion, docs/reference.md)."""
    return {p: anatomy.blocks[p].lesion for p in positions}


def unrolled(block: Block, k: int, scale: float = 1.0) -> Fn:
    """The block applied 1 + k times, extra applications damped: ``h ← h + S·(block(h) − h)``."""
    forward = block.module.forward  # the block's own forward, bound now: patching must not recurse

    def fn(h: Tensor) -> Tensor:
        out = forward(h)
        for _ in range(k):
            out = out + scale * (forward(out) - out)
        return out

    return fn


# --------------------------------------------------------------------------------------------------
# A pass over the data: tallies per variant, over all samples and over the borderline ones


@dataclass
class PassResult:
    """Loss and accuracy of the base model and of every variant, on all and on borderline samples
    (borderline by the base model's margins)."""

    base: EvalResult
    variants: list[EvalResult]
    base_borderline: EvalResult
    borderline: list[EvalResult]
    observed: dict[int, list[Any]]


def evaluate_pass(engine: AblationEngine, variants: Sequence[Variant], base: Variant | None = None,
                  observer: Observer | None = None, advance: Advance | None = None) -> PassResult:
    base_tally, tallies = Tally(), [Tally() for _ in variants]
    base_border, border = Tally(), [Tally() for _ in variants]
    observed: dict[int, list[Any]] = {}
    for outcome in engine.run(variants, base, observer, advance):
        labels, loss_fn = outcome.labels, engine.loss_fn
        base_tally.add(outcome.logits, labels, loss_fn)
        # Borderline samples are defined by class margins: none where the targets are not classes.
        any_borderline = is_class_labels(labels, outcome.logits)
        if any_borderline:
            mask = borderline_mask(outcome.logits, labels)
            any_borderline = bool(mask.any())
        if any_borderline:
            base_border.add(outcome.logits[mask], labels[mask], loss_fn)
        for tally, border_tally, logits in zip(tallies, border, outcome.variants):
            tally.add(logits, labels, loss_fn)
            if any_borderline:
                border_tally.add(logits[mask], labels[mask], loss_fn)
        for j, value in outcome.observed.items():
            observed.setdefault(j, []).append(value)
    reduce_tallies([base_tally, *tallies, base_border, *border])  # torchrun: sums over every rank's batches
    return PassResult(base_tally.result(), [t.result() for t in tallies], base_border.result(),
                      [t.result() for t in border], observed)


# --------------------------------------------------------------------------------------------------
# Ranking and removal curves


def harm(result: EvalResult, by: str) -> float:
    """How bad a model is by ``--by``: its loss, or minus its accuracy. Non-finite counts as worst."""
    if by == "acc" and result.acc is None:
        raise BadValue("by acc needs targets that are class indices; rank by loss")
    value = result.loss if by == "loss" else -result.acc
    return value if math.isfinite(value) else math.inf


def rank_order(harms: Sequence[float]) -> list[int]:
    """Indices from most to least harmful; ties in block order (docs/reference.md)."""
    return sorted(range(len(harms)), key=lambda i: (-harms[i], i))


def removal_order(harms: Sequence[float]) -> list[int]:
    """Least harmful first: exactly the reverse of the ranking, so ``--remove N`` takes the N highest
    ranks (among tied blocks the later one goes first)."""
    return rank_order(harms)[::-1]


@dataclass
class BlockRemoval:
    """One row of the ranking: the model with this block removed."""

    name: str
    stage: int
    index: int
    kind: str
    loss: float
    acc: float
    delta_loss: float
    delta_acc: float
    rank: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _difference(a: float | None, b: float | None) -> float | None:
    """``a − b``; None where accuracy is undefined (a custom loss's targets that are not classes)."""
    return a - b if a is not None and b is not None else None


def rank_removals(blocks: Sequence[Block], results: Sequence[EvalResult], baseline: EvalResult,
                  by: str) -> list[BlockRemoval]:
    """Rows in block order, ``rank`` 1 = most harmful by ``by``."""
    ranks = {i: r + 1 for r, i in enumerate(rank_order([harm(r, by) for r in results]))}
    return [BlockRemoval(b.name, b.stage, b.index, b.kind, r.loss, r.acc, r.loss - baseline.loss,
                         _difference(r.acc, baseline.acc), ranks[i])
            for i, (b, r) in enumerate(zip(blocks, results))]


@dataclass
class CurvePoint:
    """The model with ``removed`` (in removal order) gone; ``block`` is the one removed at step k."""

    k: int
    removed: list[str]
    block: str | None
    loss: float
    acc: float
    delta_loss: float
    delta_acc: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _point(k: int, removed: Sequence[str], result: EvalResult, baseline: EvalResult) -> CurvePoint:
    return CurvePoint(k, list(removed), removed[-1] if removed else None, result.loss, result.acc,
                      result.loss - baseline.loss, _difference(result.acc, baseline.acc))


def greedy_curve(engine: AblationEngine, candidates: Sequence[int], k_max: int, by: str, baseline: EvalResult,
                 singles: Sequence[EvalResult], progress: ProgressFactory | None = None) -> list[CurvePoint]:
    """Remove the least harmful block, re-rank the rest with it removed, repeat up to ``k_max``.

    ``singles`` are the single removals (step 1, already known from the ranking pass). Step s runs
    the model with the s − 1 blocks removed so far as the pass's base, so every candidate is
    evaluated from that pruned model's own cached inputs: equal to a full re-evaluation.
    """
    anatomy = engine.anatomy
    names = [b.name for b in anatomy.blocks]
    remaining, results = list(candidates), list(singles)
    removed: list[int] = []
    points = [_point(0, [], baseline, baseline)]
    for step in range(1, k_max + 1):
        if step > 1:
            advance = progress(f"greedy {step}/{k_max}", baseline.n) if progress else None
            variants = [lesion_variant(anatomy, [*removed, p]) for p in remaining]
            results = evaluate_pass(engine, variants, lesion_variant(anatomy, removed), advance=advance).variants
        pick = removal_order([harm(r, by) for r in results])[0]
        removed.append(remaining.pop(pick))
        points.append(_point(step, [names[p] for p in removed], results.pop(pick), baseline))
    return points


def one_shot_points(engine: AblationEngine, order: Sequence[int], ks: Iterable[int], baseline: EvalResult,
                    single: EvalResult, progress: ProgressFactory | None = None) -> dict[int, CurvePoint]:
    """The model without the first k blocks of ``order`` for each k in ``ks`` (k = 0 is the baseline,
    k = 1 the ``single`` removal already known), the others in one pass from the intact model's cache."""
    anatomy = engine.anatomy
    names = [b.name for b in anatomy.blocks]
    ks = sorted(set(ks))
    to_run = [k for k in ks if k >= 2]
    results: dict[int, EvalResult] = {0: baseline, 1: single}
    if to_run:
        advance = progress("one-shot", baseline.n) if progress else None
        run = evaluate_pass(engine, [lesion_variant(anatomy, order[:k]) for k in to_run], advance=advance)
        results.update(zip(to_run, run.variants))
    return {k: _point(k, [names[p] for p in order[:k]], results[k], baseline) for k in ks}


def one_shot_curve(engine: AblationEngine, order: Sequence[int], k_max: int, baseline: EvalResult,
                   single: EvalResult, progress: ProgressFactory | None = None) -> list[CurvePoint]:
    """Remove the first k blocks of ``order`` (the ranking, least harmful first) for k = 0..k_max:
    ShortGPT's way, one ranking and no re-ranking."""
    points = one_shot_points(engine, order, range(k_max + 1), baseline, single, progress)
    return [points[k] for k in range(k_max + 1)]


# --------------------------------------------------------------------------------------------------
# Proxies: cheap numbers that might predict the exact removal cost


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
        from resprobe.store import open_recording

        recorded = open_recording(recording)
        if recorded.block_names != probe.anatomy.names:
            raise RecordingError(f"{recording} was recorded on other blocks ({', '.join(recorded.block_names[:3])}, "
                                 f"...) than this model has; record it from the same model")
        check_recording_fits(recorded, recording, probe, getattr(loader, "dataset", None), data)
        if not recorded.complete:
            warnings.warn(f"{recording} is incomplete ({recorded.n_samples} samples); its proxies cover only those",
                          stacklevel=2)
    else:
        from resprobe.recorder import collect

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


# --------------------------------------------------------------------------------------------------
# Unrolling


@dataclass(frozen=True)
class UnrollSpec:
    block: str
    k: int
    scale: float = 1.0


def parse_unroll(text: str) -> UnrollSpec:
    """``BLOCK:K[:S]`` → :class:`UnrollSpec` (K ≥ 1 extra applications, S finite)."""
    parts = text.strip().split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise BadValue(f"--unroll {text!r}: expected BLOCK:K or BLOCK:K:S, e.g. layer3.4:2:0.5")
    try:
        k = int(parts[1])
        scale = float(parts[2]) if len(parts) == 3 else 1.0
    except ValueError:
        raise BadValue(f"--unroll {text!r}: K must be an integer and S a number") from None
    spec = UnrollSpec(parts[0], k, scale)
    check_unroll_values(spec)
    return spec


def check_unroll_values(spec: UnrollSpec) -> None:
    if spec.k < 1:
        raise BadValue(f"--unroll {spec.block}:{spec.k}: K (extra applications) must be at least 1")
    if not math.isfinite(spec.scale):
        raise BadValue(f"--unroll {spec.block}:{spec.k}:{spec.scale}: S must be a finite number")


@dataclass
class UnrollResult:
    block: str
    k: int
    scale: float
    all: dict[str, float | None]
    borderline: dict[str, Any]
    baseline_borderline: dict[str, float | None]  # the intact model on the same borderline samples

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _figures(result: EvalResult) -> dict[str, float | None]:
    if result.n == 0:
        return {"loss": None, "acc": None}
    return {"loss": result.loss, "acc": result.acc}


# --------------------------------------------------------------------------------------------------
# Pruned models and their checkpoints


class RemovedBlock(nn.Module):
    """What a removed identity block becomes when its lesion is its input, unchanged (pre-activation and
    transformer blocks, docs/reference.md). Block discovery skips it (``_resprobe_removed``)."""

    _resprobe_removed = True

    def forward(self, x: Tensor) -> Tensor:
        return x


class LesionedBlock(nn.Module):
    """A removed block that keeps what its lesion computes: ``post(shortcut(h))`` (identity blocks
    ``post(h)``: a SiLU post-activation is applied), pre-activation ``shortcut(norm1(h))``. The kept
    modules sit under their original attribute names, so their weights keep their checkpoint keys
    (``layer2.0.downsample.0.weight``)."""

    _resprobe_removed = True

    def __init__(self, block: nn.Module, family: BlockFamily):
        super().__init__()
        self.family = family  # a plain attribute: not a module, no state
        for attr in family.lesion_attrs():
            value = getattr(block, attr, None)
            if isinstance(value, nn.Module):
                setattr(self, attr, value)
            elif isinstance(value, (int, float)):  # NFNet's beta
                object.__setattr__(self, attr, value)

    def forward(self, x: Tensor) -> Tensor:
        return self.family.lesion(self, x)


def _replacement_for(module: nn.Module) -> nn.Module:
    family = family_of(module) or GENERIC
    if family.shortcut_module(module) is None and family.lesion_is_identity_map:
        return RemovedBlock()
    return LesionedBlock(module, family)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def prune_model(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """Replace the named blocks in place by their lesions (:class:`RemovedBlock` / :class:`LesionedBlock`)."""
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ModelError(f"cannot prune {name!r}: the model has no such module") from None
        if getattr(module, "_resprobe_removed", False):
            raise ModelError(f"cannot prune {name!r}: it is already removed")
        _set_submodule(model, name, _replacement_for(module))
    return model


@register_recipe("prune")
def _build_pruned(model: nn.Module, recipe: Mapping[str, Any]) -> nn.Module:
    """Rebuild a pruned model from a freshly built one (resprobe checkpoints, docs/reference.md)."""
    removed = recipe.get("removed")
    if not isinstance(removed, list) or not all(isinstance(n, str) for n in removed):
        raise ModelError("damaged prune recipe: 'removed' must be a list of block names")
    return prune_model(model, removed)


def save_pruned(probe: Probe, names: Sequence[str], path: str | Path,
                figures: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write a resprobe checkpoint of ``probe``'s model without the named blocks.

    The recipe ``{"kind": "prune", "removed": [...]}`` is appended to the model's own recipes, and the
    probe's preprocessing is kept, so ``resprobe eval PATH`` reproduces the ablation's figures. An
    existing ``path`` is replaced (atomically) only with ``overwrite``.
    """
    check_rebuildable(probe)
    pruned = prune_model(copy.deepcopy(probe.model), names)
    recipe = {"kind": "prune", "removed": list(names)}
    meta = {"pruned_from": str(probe.loaded.spec), "pruned_checkpoint": probe.loaded.checkpoint,
            "ablation": dict(figures or {})}
    return save_resprobe_checkpoint(path, probe.loaded, model=pruned, recipes=[*probe.loaded.recipes, recipe],
                                    preprocessing=probe.preprocessing_used.to_dict(), meta=meta,
                                    replace=overwrite, option="--save-pruned")


def check_rebuildable(probe: Probe) -> None:
    source = probe.loaded.arch.get("source")
    if source not in REBUILDABLE_SOURCES:
        raise BadValue(f"--save-pruned: a model loaded from a pickled module ({source}) cannot be rebuilt; "
                       "load it by architecture name with --checkpoint instead")


@dataclass
class PrunedResult:
    path: str
    removed: list[str]
    loss: float
    acc: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# The whole command


@dataclass
class AblateOptions:
    """What ``resprobe ablate`` was asked for (docs/reference.md)."""

    by: str = "loss"
    include_transitions: bool = False
    cumulative: int | None = None
    one_shot: int | None = None
    proxies: bool = False
    recording: str | Path | None = None
    unroll: UnrollSpec | None = None
    save_pruned: str | Path | None = None
    overwrite: bool = False  # replace an existing --save-pruned file
    remove: int | None = None
    remove_blocks: list[str] | None = None
    data: str | None = None  # the --data spec, which a --recording must have been made on

    @property
    def wants_proxies(self) -> bool:
        return self.proxies or self.recording is not None  # --recording implies --proxies

    def check(self) -> None:
        """Checks that need no model (run before loading it)."""
        if self.by not in BY_CHOICES:
            raise BadValue(f"--by {self.by!r}: choose one of {', '.join(BY_CHOICES)}")
        if self.cumulative is not None and self.one_shot is not None:
            raise BadValue("give either --cumulative K (greedy) or --one-shot K, not both")
        for option, k in (("--cumulative", self.cumulative), ("--one-shot", self.one_shot)):
            if k is not None and k < 1:
                raise BadValue(f"{option} {k}: K must be at least 1")
        if self.unroll is not None:
            check_unroll_values(self.unroll)
        if self.remove is not None and self.remove_blocks:
            raise BadValue("give either --remove N or --remove-blocks A,B, not both")
        if (self.remove is not None or self.remove_blocks) and self.save_pruned is None:
            raise BadValue("--remove and --remove-blocks choose what --save-pruned PATH writes: add --save-pruned")
        if self.overwrite and self.save_pruned is None:
            raise BadValue("--overwrite replaces an existing --save-pruned PATH: add --save-pruned")
        if self.save_pruned is not None:
            if self.remove is None and not self.remove_blocks:
                raise BadValue("--save-pruned needs --remove N or --remove-blocks A,B")
            check_out_path(self.save_pruned, self.overwrite, option="--save-pruned")
        if self.remove is not None:
            if self.remove < 1:
                raise BadValue(f"--remove {self.remove}: N must be at least 1")
            if self.cumulative is not None and self.remove > self.cumulative:
                raise BadValue(f"--remove {self.remove} takes the first N of the greedy order, which --cumulative "
                               f"{self.cumulative} stops short of: use --cumulative {self.remove}")
        if self.remove_blocks is not None and len(set(self.remove_blocks)) != len(self.remove_blocks):
            raise BadValue(f"--remove-blocks {','.join(self.remove_blocks)}: a block is named twice")
        if self.recording is not None and not Path(self.recording).exists() \
                and not Path(f"{self.recording}.partial").is_dir():
            raise BadValue(f"--recording {self.recording}: file not found")

    def check_against(self, anatomy: Anatomy, candidates: Sequence[int]) -> None:
        """Checks that need the model's blocks."""
        n = len(candidates)
        if n == 0:
            raise BadValue("the model has no identity blocks to remove; add --include-transitions")
        for option, k in (("--cumulative", self.cumulative), ("--one-shot", self.one_shot), ("--remove", self.remove)):
            if k is not None and k > n:
                raise BadValue(f"{option} {k}: only {n} blocks are ranked"
                               + ("" if self.include_transitions else " (add --include-transitions for more)"))
        for name in self.remove_blocks or []:
            block = _block_named(anatomy, name, "--remove-blocks")
            if not block.can_lesion:
                raise BadValue(f"--remove-blocks: cannot remove transition block {name}: resprobe does not know "
                               "its shortcut")
        if self.unroll is not None:
            block = _block_named(anatomy, self.unroll.block, "--unroll")
            if not block.is_identity:
                raise BadValue(f"--unroll {self.unroll.block}: only identity blocks can be unrolled "
                               f"(it maps {list(block.in_shape)} to {list(block.out_shape)})")


def _block_named(anatomy: Anatomy, name: str, option: str) -> Block:
    for block in anatomy.blocks:
        if block.name == name:
            return block
    shown = ", ".join(anatomy.names[:6]) + (", ..." if len(anatomy.names) > 6 else "")
    raise BadValue(f"{option}: no block named {name!r}; blocks are {shown} (see `resprobe blocks MODEL`)")


def candidate_positions(anatomy: Anatomy, include_transitions: bool) -> list[int]:
    """The blocks that are ranked: identity blocks, and transitions with ``--include-transitions``."""
    positions = [i for i, b in enumerate(anatomy.blocks) if b.is_identity or include_transitions]
    unknown = [anatomy.blocks[i].name for i in positions if not anatomy.blocks[i].can_lesion]
    if unknown:
        raise BadValue(f"--include-transitions: resprobe does not know the shortcut of {', '.join(unknown[:3])}; "
                       "leave out --include-transitions")
    return positions


@dataclass
class AblationReport:
    """Everything ``ablate`` found. Sections not asked for are ``None``."""

    n: int
    by: str
    baseline: EvalResult
    blocks: list[BlockRemoval]
    cumulative: list[CurvePoint] | None = None
    cumulative_mode: str | None = None  # "greedy" | "one-shot"
    proxies: Proxies | None = None
    unroll: UnrollResult | None = None
    pruned: PrunedResult | None = None
    engine: str = "cached"  # "cached" (prefix cache) or "full" (a full forward per removal)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "by": self.by,
            "engine": self.engine,
            "baseline": {"loss": self.baseline.loss, "acc": self.baseline.acc, "top5": self.baseline.top5},
            "blocks": [b.to_dict() for b in self.blocks],
            "cumulative": [p.to_dict() for p in self.cumulative] if self.cumulative is not None else None,
            "cumulative_mode": self.cumulative_mode,
            "proxies": self.proxies.to_dict() if self.proxies else None,
            "unroll": self.unroll.to_dict() if self.unroll else None,
            "pruned": self.pruned.to_dict() if self.pruned else None,
        }


def warn_non_finite(baseline: EvalResult, ranking: Sequence[BlockRemoval]) -> None:
    """NaN or inf is a warning that names the blocks, and the run goes on (docs/reliability.md)."""
    if not math.isfinite(baseline.loss):
        warnings.warn("the intact model's loss is not finite: its outputs hold NaN or inf", stacklevel=3)
    bad = [r.name for r in ranking if not math.isfinite(r.loss)]
    if bad:
        warnings.warn(f"the loss is not finite with {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} removed; "
                      "ranked as most harmful", stacklevel=3)


def _needs_several_passes(options: AblateOptions) -> bool:
    return (options.cumulative or 0) > 1 or (options.one_shot or 0) > 1 or (options.remove or 0) > 1


def run_ablation(probe: Probe, loader: Iterable, options: AblateOptions,
                 progress: ProgressFactory | None = None, fast: bool = True) -> AblationReport:
    """Rank the blocks of ``probe``'s model by removal impact on ``loader``'s data, and whatever else
    ``options`` asks for. ``progress(description, total)`` returns a callback advanced per batch."""
    options.check()
    anatomy = probe.anatomy
    candidates = candidate_positions(anatomy, options.include_transitions)
    options.check_against(anatomy, candidates)
    if options.save_pruned is not None:
        check_rebuildable(probe)
    n = len(getattr(loader, "dataset", []))
    batches = Batches(loader, probe.runtime, BATCH_CACHE_BYTES if _needs_several_passes(options) else 0)
    engine = AblationEngine(probe.model, anatomy, probe.runtime, batches, fast=fast,
                            loss_fn=getattr(probe, "loss_fn", None))

    def start(description: str) -> Advance | None:
        return progress(description, n) if progress else None

    # A recording is read first: one that does not fit this model fails before any work is done.
    align = (alignment_summary(probe, loader, options.recording, data=options.data)
             if options.recording is not None else None)

    # Pass 1, from the intact model: every single removal, unrolling, an explicit prune set, angles.
    variants: list[Variant] = [lesion_variant(anatomy, [p]) for p in candidates]
    unroll_at = explicit_at = None
    if options.unroll is not None:
        u = options.unroll
        unroll_at = len(variants)
        variants.append({anatomy.position(u.block): unrolled(anatomy[u.block], u.k, u.scale)})
    if options.remove_blocks:
        explicit_at = len(variants)
        variants.append(lesion_variant(anatomy, [anatomy.position(name) for name in options.remove_blocks]))
    angles = InputOutputAngles([p for p in candidates if anatomy.blocks[p].is_identity]) \
        if options.wants_proxies else None
    first = evaluate_pass(engine, variants, observer=angles, advance=start("ablate"))
    baseline = first.base
    singles = first.variants[:len(candidates)]
    ranked_blocks = [anatomy.blocks[p] for p in candidates]
    ranking = rank_removals(ranked_blocks, singles, baseline, options.by)
    order = [candidates[i] for i in removal_order([harm(r, options.by) for r in singles])]
    warn_non_finite(baseline, ranking)
    report = AblationReport(n=baseline.n, by=options.by, baseline=baseline, blocks=ranking,
                            engine="cached" if engine.fast else "full")

    # Removal curves. --remove N takes the first N of the greedy order (--cumulative), else of the
    # one-shot order; its figure is that curve's point at k = N.
    pruned_point: CurvePoint | None = None
    if options.cumulative is not None:
        report.cumulative_mode = "greedy"
        report.cumulative = greedy_curve(engine, candidates, options.cumulative, options.by, baseline, singles,
                                         progress)
        if options.remove is not None:
            pruned_point = report.cumulative[options.remove]
    elif options.one_shot is not None or options.remove is not None:
        k_curve = options.one_shot or 0
        wanted = [*range(k_curve + 1), *([options.remove] if options.remove is not None else [])]
        single = singles[candidates.index(order[0])]
        points = one_shot_points(engine, order, wanted, baseline, single, progress)
        if options.one_shot is not None:
            report.cumulative_mode = "one-shot"
            report.cumulative = [points[k] for k in range(k_curve + 1)]
        if options.remove is not None:
            pruned_point = points[options.remove]
    if options.remove_blocks:
        pruned_point = _point(len(options.remove_blocks), options.remove_blocks,
                              first.variants[explicit_at], baseline)  # type: ignore[index]

    if options.wants_proxies:
        if align is None:
            align = alignment_summary(probe, loader, advance=start("proxies (recording)"))
        angle_means = InputOutputAngles.all_means(first.observed, candidates)
        report.proxies = proxy_table(candidates, ranked_blocks, angle_means, align, [r.delta_loss for r in ranking],
                                     str(options.recording) if options.recording is not None else "computed")

    if options.unroll is not None:
        u = options.unroll
        report.unroll = UnrollResult(
            u.block, u.k, u.scale, _figures(first.variants[unroll_at]),  # type: ignore[index]
            {"n": first.borderline[unroll_at].n, **_figures(first.borderline[unroll_at])},  # type: ignore[index]
            _figures(first.base_borderline))

    if options.save_pruned is not None and pruned_point is not None:
        figures = {"loss": pruned_point.loss, "acc": pruned_point.acc}
        path = Path(options.save_pruned).expanduser()
        if is_main():  # torchrun: one writer; the others wait until the file is there
            path = save_pruned(probe, pruned_point.removed, path, figures, options.overwrite)
        barrier()
        report.pruned = PrunedResult(str(path), pruned_point.removed, pruned_point.loss, pruned_point.acc)
    return report
