"""The removal engine: the intact model runs once per batch with every candidate block's input cached; a
variant (blocks removed, lesioned or unrolled) re-runs only the blocks after its first change."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from resprobe.evaluate import EvalResult, Tally, borderline_mask, is_class_labels, reduce_tallies
from resprobe.models.blocks import Anatomy, Block, BlockFn, Extras, replaced_blocks
from resprobe.runtime import Runtime
from resprobe.share import cache_thread_views

Fn = BlockFn  # called as the block is called: (h, *what else the model passes it) -> its output
Variant = Mapping[int, Fn]  # block position -> what runs there instead of the block
Observer = Callable[[int, Tensor, Tensor], Any]  # (position, block input, block output) -> per-sample values
Advance = Callable[[int], None]
ProgressFactory = Callable[[str, int], Advance]  # (description, total samples) -> advance(n)
BATCH_CACHE_BYTES = int(1.5e9)  # keep the preprocessed batches in memory below this size
MAX_SUFFIX_THREADS = 8  # suffix runs side by side on the CPU (each holds its own activations)


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


@dataclass
class BatchOutcome:
    """One batch of a pass: the base model's logits, each variant's, and what the observer returned."""

    labels: Tensor
    logits: Tensor
    variants: list[Tensor]
    observed: dict[int, Any] = field(default_factory=dict)


@dataclass
class BlockInputs:
    """What one batch's base pass kept for the suffix runs: the inputs of the blocks variants start
    at (and of their segments' wrappers, under ``("segment", first block)``), and what else every
    block from the first of them on received besides its input (EVA's ``rope=``, masks), as the model
    passed it: a suffix run passes the same to each block or its replacement."""

    inputs: dict[Any, Tensor]
    extras: dict[int, Extras]


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
        between threads). Shared stages are fine: each thread runs its own view of a shared block.
        """
        if (not self.fast or self.clone_inputs or self.anatomy.segments or self.runtime.device.type != "cpu"
                or jobs < 2):  # segments: a suffix run patches its stage's container (Anatomy.run_from)
            return 1
        return min(torch.get_num_threads(), jobs, MAX_SUFFIX_THREADS)

    def _suffixes_in_threads(self, images: Tensor, jobs: list[tuple[Variant, int]], cache: BlockInputs,
                             workers: int) -> list[Tensor]:
        def run(job: tuple[Variant, int]) -> Tensor:
            # Grad mode and autocast are per thread; the TF32 flags are global and already set.
            with torch.no_grad(), self.runtime.autocast():
                return self._variant_logits(images, job[0], job[1], cache)

        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads // workers))
        try:
            # A shared block (resprobe share) runs in a view of its own per thread (resprobe.share.
            # thread_view), built once per thread: the threads end with this batch.
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="resprobe-suffix",
                                    initializer=cache_thread_views) as pool:
                # Longest suffix first, so that no thread is left with a long one at the end.
                order = sorted(range(len(jobs)), key=lambda i: jobs[i][1])
                done = dict(zip(order, pool.map(run, [jobs[i] for i in order])))
        finally:
            torch.set_num_threads(threads)
        return [done[i] for i in range(len(jobs))]

    def _base_pass(self, images: Tensor, base: Variant, keep: set[int],
                   observer: Observer | None) -> tuple[Tensor, BlockInputs, dict[int, Any]]:
        for _ in range(2):
            cache: dict[Any, tuple[Tensor, int]] = {}
            extras: dict[int, Extras] = {}
            observed: dict[int, Any] = {}
            handles = self._install_hooks(keep, observer, cache, extras, observed)
            try:
                with replaced_blocks([self.blocks[i] for i in base], list(base.values())):
                    logits = self.model(images)
            finally:
                for handle in handles:
                    handle.remove()
            # torchvision and timm blocks never write into their input, but a custom block might; a
            # changed version counter means a cached tensor is stale: redo the batch with copies.
            if self.clone_inputs or all(t._version == v for t, v in cache.values()):
                return logits, BlockInputs({i: t for i, (t, _) in cache.items()}, extras), observed
            self.clone_inputs = True
        raise AssertionError("unreachable: the second attempt copies every cached input")

    def _install_hooks(self, keep: set[int], observer: Observer | None, cache: dict[Any, tuple[Tensor, int]],
                       extras: dict[int, Extras], observed: dict[int, Any]) -> list[Any]:
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
        for j in range(min(keep, default=len(self.blocks)), len(self.blocks)):
            module = self.blocks[j].module

            def pre_hook(_m: nn.Module, args: tuple, kwargs: dict, j: int = j) -> None:
                if len(args) > 1 or kwargs:  # given again to the block (or its replacement) in suffix runs
                    extras[j] = (args[1:], kwargs)
                if j in keep:
                    h = args[0].detach()
                    h = h.clone() if self.clone_inputs else h
                    cache[j] = (h, h._version)

            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            if observer is not None and j in keep:
                def post_hook(_m: nn.Module, _args: tuple, out: Tensor, j: int = j) -> None:
                    observed[j] = observer(j, cache[j][0], out.detach())

                handles.append(module.register_forward_hook(post_hook))
        return handles

    def _variant_logits(self, images: Tensor, variant: Variant, start: int, cache: BlockInputs) -> Tensor:
        if not self.fast:
            positions = sorted(variant)
            with replaced_blocks([self.blocks[i] for i in positions], [variant[i] for i in positions]):
                return self.model(images)
        h = cache.inputs[start]
        segment = self.anatomy.segment_of(start)
        entry = cache.inputs[("segment", segment.first)] if segment is not None else None
        if self.clone_inputs:  # the block at ``start`` may write into it, and other variants reuse it
            h = h.clone()
            entry = entry.clone() if entry is not None else None
        return self.anatomy.run_from(start, h, variant, entry, cache.extras)


def lesion_variant(anatomy: Anatomy, positions: Iterable[int]) -> dict[int, Fn]:
    """The model with the blocks at ``positions`` removed (each block's own lesion, docs/reference.md)."""
    return {p: anatomy.blocks[p].lesion for p in positions}


def unrolled(block: Block, k: int, scale: float = 1.0) -> Fn:
    """The block applied 1 + k times, extra applications damped: ``h ← h + S·(block(h) − h)``."""
    forward = block.module.forward  # the block's own forward, bound now: patching must not recurse

    def fn(h: Tensor, *args: Any, **kwargs: Any) -> Tensor:  # each application gets what the block got
        out = forward(h, *args, **kwargs)
        for _ in range(k):
            out = out + scale * (forward(out, *args, **kwargs) - out)
        return out

    return fn


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
