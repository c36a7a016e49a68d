"""Rankings and removal curves: harm per block, greedy (SLEB-style) and one-shot orders."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from resprobe.ablate_engine import AblationEngine, ProgressFactory, evaluate_pass, lesion_variant
from resprobe.errors import BadValue
from resprobe.evaluate import EvalResult
from resprobe.models.blocks import Block


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
