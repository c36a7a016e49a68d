"""The ablate command: exact removal costs per block, greedy and one-shot curves, proxies, unrolling."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any


from resprobe.models.blocks import Anatomy, Block
from resprobe.distributed import barrier, is_main
from resprobe.errors import BadValue
from resprobe.evaluate import EvalResult
from resprobe.share import check_out_path
from resprobe.ablate_engine import AblationEngine, Advance, BATCH_CACHE_BYTES, Batches, ProgressFactory, Variant, evaluate_pass, lesion_variant, unrolled
from resprobe.ablate_curves import BlockRemoval, CurvePoint, _point, greedy_curve, harm, one_shot_points, rank_removals, removal_order
from resprobe.ablate_proxies import InputOutputAngles, Proxies, alignment_summary, proxy_table
from resprobe.ablate_prune import PrunedResult, check_rebuildable, save_pruned

if TYPE_CHECKING:  # pragma: no cover
    from resprobe.probe import Probe


BY_CHOICES = ("loss", "acc")


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
