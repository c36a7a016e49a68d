"""Figures of resprobe results (``resprobe plot``; needs the ``plot`` extra, i.e. matplotlib).

Inputs: a recording (``RUN.h5``, or the ``RUN.h5.partial`` folder of an unfinished run), the JSON of
``resprobe align -f json`` or of ``resprobe ablate -f json`` (told apart by their fields; ``-`` reads
the JSON from stdin). Figures:

* **align**: per block, the mean cosine of F and of U with ∂ℓ/∂h (95% interval for F), a zero line,
  stages shaded and labelled, transition blocks (no cosine: the shapes differ) hatched; below it the
  ℓ2 ratios ‖F‖/‖h‖ and ‖U‖/‖h‖, and the first-order removal estimate −⟨U, ∂ℓ/∂out⟩
  (``removal_estimate_mean``, the sign of ablate's Δ loss).
* **readout** (recorded with ``--readout``): loss, accuracy and entropy of the model's head applied
  after each last-stage block, and the borderline examples each block corrects or breaks.
* **ablate**: the cost of removing each block (Δ loss, Δ accuracy), the cumulative removal curve and
  the proxies against the exact Δ loss, each when present.

matplotlib is imported only inside functions, and only its object-oriented API is used (a bare
``Figure``, rendered by Agg for PNG): pyplot's global state and backend are never touched, so
plotting from a notebook or a long-running process leaves it as it was. Files are written to a
temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resprobe.errors import BadValue

KINDS = ("auto", "align", "readout", "ablate")
SUFFIXES = {".png": "png", ".svg": "svg"}
PNG_DPI = 150

# Okabe–Ito colours: distinguishable with the common colour-vision deficiencies and in greyscale.
BLUE, ORANGE, GREEN, VERMILLION, PURPLE, GREY = "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#777777"
STAGE_SHADE = "#EDEDED"

STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.grid.axis": "y",
    "grid.color": "#DDDDDD",
    "grid.linewidth": 0.6,
    "axes.axisbelow": True,
    "lines.linewidth": 1.2,
    "lines.markersize": 4.5,
    "errorbar.capsize": 2.0,
    "svg.fonttype": "none",  # text stays text: editable in a paper's figure, searchable, small
    "svg.hashsalt": "resprobe",  # stable element ids: the same input gives the same file
}

# Two short lines each (the name, then the formula): five of them side by side must not touch, even
# in the narrowest figure (7 inches, about 1.2 inches a panel).
PROXY_LABELS = {
    "bi": "block influence\n1 − cos(h, out)",
    "angular": "angular distance\nangle(h, out) / π",
    "l2_ratio": "ℓ2 ratio\n" + r"$\|F\|/\|h\|$",
    "cos": "alignment\n" + r"cos(F, $\partial\ell/\partial h$)",
    "taylor": "removal estimate\n" + r"$-\langle U, \partial\ell/\partial\,\mathrm{out}\rangle$",
}


@dataclass
class PlotResult:
    out: Path
    kind: str
    panels: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "kind": self.kind, "panels": list(self.panels)}


# --------------------------------------------------------------------------------------------------
# Inputs


def load_input(source: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(report payload, recording attributes) from a recording, an align/ablate JSON file, or ``-``."""
    if str(source) == "-":
        return _parse_json(sys.stdin.read(), "stdin"), {}
    path = Path(source)
    if _looks_like_recording(path):
        from resprobe.align import align_report
        from resprobe.recording.reader import open_recording

        recording = open_recording(path)
        return align_report(recording), dict(recording.attrs)
    if not path.exists():
        raise BadValue(f"input not found: {path} (give a recording RUN.h5 or the JSON of `resprobe align`/`ablate`)")
    if path.is_dir():
        raise BadValue(f"{path} is a directory, not a recording or a JSON report")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadValue(f"{path} is neither a recording nor a JSON report (a binary file)") from None
    except OSError as exc:
        raise BadValue(f"cannot read {path}: {exc.strerror or exc}") from None
    return _parse_json(text, str(path)), {}


def _looks_like_recording(path: Path) -> bool:
    """HDF5 by suffix or magic bytes, a partial-run folder, or RUN.h5 whose partial folder exists."""
    if path.suffix.lower() in (".h5", ".hdf5"):
        return True
    if path.is_dir():
        return (path / "meta.json").exists()
    if path.is_file():
        with open(path, "rb") as fh:
            return fh.read(8) == b"\x89HDF\r\n\x1a\n"
    return path.with_name(path.name + ".partial").is_dir()


def _parse_json(text: str, where: str) -> dict[str, Any]:
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadValue(f"{where} is neither a recording nor valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(payload, dict):
        raise BadValue(f"{where}: unknown JSON (expected the object printed by `resprobe align -f json` or "
                       "`resprobe ablate -f json`)")
    return payload


def detect_kind(payload: Mapping[str, Any]) -> str:
    """``align`` or ``ablate``, by the fields each report is known to carry."""
    blocks = payload.get("blocks")
    first = blocks[0] if isinstance(blocks, list) and blocks and isinstance(blocks[0], Mapping) else {}
    if "baseline" in payload and "delta_loss" in first:
        return "ablate"
    if "cos_mean" in first and "n_samples" in payload:
        return "align"
    raise BadValue("unknown JSON: expected the output of `resprobe align -f json` (blocks with cos_mean) or "
                   "`resprobe ablate -f json` (baseline and blocks with delta_loss)")


def has_readout(payload: Mapping[str, Any]) -> bool:
    return bool(payload.get("readout"))


def resolve_kind(payload: Mapping[str, Any], requested: str) -> str:
    """The figure to draw: ``align`` (with the readout when present), ``readout`` or ``ablate``."""
    if requested not in KINDS:
        raise BadValue(f"--kind {requested!r}: choose one of {', '.join(KINDS)}")
    found = detect_kind(payload)
    if requested == "auto":
        return found
    if requested == "ablate" and found != "ablate":
        raise BadValue("--kind ablate needs the JSON of `resprobe ablate -f json`")
    if requested in ("align", "readout") and found != "align":
        raise BadValue(f"--kind {requested} needs a recording or the JSON of `resprobe align -f json`")
    if requested == "readout" and not has_readout(payload):
        raise BadValue("this input holds no readout: record with `--readout` (and `align --readout -f json`)")
    return requested


def shared_stages(payload: Mapping[str, Any], attrs: Mapping[str, Any]) -> dict[int, int]:
    """Stage → iterations for the stages that a resprobe ``share`` checkpoint made one iterated block.

    Best effort (a marker only): the checkpoint named in the report must still exist, be a resprobe
    checkpoint and, when the recording stored its sha256, be the same file. Anything else gives {}.
    """
    candidates = [payload.get("checkpoint"), payload.get("model")]
    path = next((Path(c) for c in candidates if isinstance(c, str) and c and Path(c).is_file()), None)
    if path is None:
        return {}
    expected = attrs.get("checkpoint_sha256")
    if expected and _sha256(path) != expected:
        return {}
    try:
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a loadable checkpoint: no marker, no error
        return {}
    if not isinstance(obj, Mapping) or obj.get("format") != "resprobe-checkpoint":
        return {}
    stages: dict[int, int] = {}
    for recipe in obj.get("recipes") or []:
        if isinstance(recipe, Mapping) and recipe.get("kind") == "share":
            for stage in recipe.get("stages") or []:
                stages[int(stage["stage"])] = len(stage.get("iterations") or stage.get("blocks") or [])
    return stages


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Output


def check_output(out: str | Path, overwrite: bool) -> tuple[Path, str]:
    """(path, matplotlib format) for ``--out``; refuses other suffixes and, without ``overwrite``,
    existing files. Checked before any work so a long load is not wasted on a bad name."""
    path = Path(out)
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise BadValue(f"--out {path}: the figure must end in .png or .svg")
    if path.is_dir():
        raise BadValue(f"--out {path} is a directory")
    if path.exists() and not overwrite:
        raise BadValue(f"{path} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise BadValue(f"--out {path}: directory {path.parent} does not exist")
    return path, fmt


def save_figure(fig: Any, path: Path, fmt: str, overwrite: bool) -> None:
    """Render to a temporary file beside ``path`` and rename it into place: a reader never sees half
    a figure, and an existing file is replaced only with ``overwrite``."""
    # Fixed metadata: the same input gives the same bytes (no date, no version string).
    metadata = {"Date": None, "Creator": None} if fmt == "svg" else {"Software": None}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        # mkstemp creates the file 0600; a figure gets the permissions any new file would (umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            extra = {"pil_kwargs": {"optimize": True}} if fmt == "png" else {}  # lossless, ~20% smaller
            fig.savefig(fh, format=fmt, dpi=PNG_DPI, metadata=metadata, bbox_inches="tight", pad_inches=0.05,
                        **extra)
            fh.flush()
            os.fsync(fh.fileno())
        _install(tmp, path, overwrite)
    except OSError as exc:
        raise BadValue(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _install(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    # A hard link fails if ``path`` appeared since the check: no file is replaced without --overwrite.
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise BadValue(f"{path} exists; pass --overwrite to replace it") from None
    except OSError:  # file systems without hard links
        if path.exists():
            raise BadValue(f"{path} exists; pass --overwrite to replace it") from None
        os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Entry point


def plot(input_path: str | Path, out_path: str | Path, kind: str = "auto", overwrite: bool = False) -> PlotResult:
    """Draw the figure for ``input_path`` into ``out_path`` (.png or .svg)."""
    out, fmt = check_output(out_path, overwrite)
    if kind not in KINDS:
        raise BadValue(f"--kind {kind!r}: choose one of {', '.join(KINDS)}")
    payload, attrs = load_input(input_path)
    chosen, fig, panels = draw(payload, kind, attrs, lambda fig: save_figure(fig, out, fmt, overwrite))
    return PlotResult(out, chosen, panels)


def draw(payload: Mapping[str, Any], kind: str = "auto", attrs: Mapping[str, Any] | None = None,
         then: Any = None) -> tuple[str, Any, list[str]]:
    """The figure of an align or ablate report (``kind`` resolved as ``--kind``): ``(kind, figure,
    panels)``; ``then(figure)`` runs in the same style context (saving). Also ``rp.align(...).plot()``."""
    matplotlib = _matplotlib()
    chosen = resolve_kind(payload, kind)
    with matplotlib.rc_context(STYLE):
        if chosen == "ablate":
            fig, panels = ablate_figure(payload)
        elif chosen == "readout":
            fig, panels = readout_figure(payload)
        else:
            fig, panels = align_figure(payload, shared_stages(payload, attrs or {}))
        if then is not None:
            then(fig)
    return chosen, fig, panels


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise BadValue("plotting needs matplotlib: pip install 'resprobe[plot]'") from None
    return matplotlib


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


# --------------------------------------------------------------------------------------------------
# Shared drawing helpers


def values(rows: Sequence[Mapping[str, Any]], key: str, scale: float = 1.0) -> np.ndarray:
    """``rows[i][key]`` as floats, NaN where missing or null (matplotlib leaves a gap there)."""
    out = np.full(len(rows), np.nan)
    for i, row in enumerate(rows):
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[i] = v * scale
    return out


def stage_spans(blocks: Sequence[Mapping[str, Any]]) -> list[tuple[int, int, int]]:
    """(stage, first position, last position) of each run of consecutive blocks of one stage."""
    spans: list[tuple[int, int, int]] = []
    for i, block in enumerate(blocks):
        stage = int(block.get("stage", 0))
        if spans and spans[-1][0] == stage and spans[-1][2] == i - 1:
            spans[-1] = (stage, spans[-1][1], i)
        else:
            spans.append((stage, i, i))
    return spans


def shade_stages(ax: Any, blocks: Sequence[Mapping[str, Any]]) -> None:
    """Alternate stages shaded grey, so stage boundaries read at a glance."""
    for k, (_, first, last) in enumerate(stage_spans(blocks)):
        if k % 2 == 1:
            ax.axvspan(first - 0.5, last + 0.5, color=STAGE_SHADE, zorder=0, lw=0)
    ax.set_xlim(-0.6, len(blocks) - 0.4)


def label_stages(ax: Any, blocks: Sequence[Mapping[str, Any]], shared: Mapping[int, int] | None = None) -> None:
    """Stage names above the axes (a secondary axis, so the layout engine makes room for them)."""
    spans = stage_spans(blocks)
    shared = shared or {}
    top = ax.secondary_xaxis("top")
    top.set_xticks([(first + last) / 2 for _, first, last in spans])
    labels = []
    for stage, first, last in spans:
        text = f"stage {stage}" if last > first else f"s{stage}"
        if stage in shared:
            text += f"\nshared ×{shared[stage]}"
        labels.append(text)
    top.set_xticklabels(labels, fontsize=8)
    top.tick_params(length=0, pad=2)
    top.spines["top"].set_visible(False)


def mark_transitions(ax: Any, blocks: Sequence[Mapping[str, Any]]) -> Any:
    """Hatch the transition blocks: their F and ∂ℓ/∂h differ in shape, so no cosine or ratio exists.
    Returns one of the patches (for the legend) or None."""
    patch = None
    for i, block in enumerate(blocks):
        if block.get("kind") == "transition":
            patch = ax.axvspan(i - 0.3, i + 0.3, facecolor="none", edgecolor="#AAAAAA", hatch="////", lw=0, zorder=0.5)
    return patch


def block_ticks(ax: Any, blocks: Sequence[Mapping[str, Any]]) -> None:
    """Block names under the axis, rotated; transitions in grey italics."""
    names = [str(b.get("name", i)) for i, b in enumerate(blocks)]
    ax.set_xticks(range(len(names)))
    size = 8 if len(names) <= 24 else 7 if len(names) <= 40 else 6
    ax.set_xticklabels(names, rotation=45, ha="right", rotation_mode="anchor", fontsize=size)
    for label, block in zip(ax.get_xticklabels(), blocks):
        if block.get("kind") == "transition":
            label.set_color(GREY)
            label.set_fontstyle("italic")
    ax.tick_params(axis="x", length=2)


def figure_width(n_blocks: int) -> float:
    """Inches: about a third of an inch per block, between a column-and-a-half and a wide page (deep
    models get taller panels instead, see ``panel_height``)."""
    return float(min(max(3.0 + 0.33 * n_blocks, 7.0), 14.0))


def panel_height(n_blocks: int) -> float:
    """Inches per unit of row height: a little taller for deep models, whose figures are wide."""
    return 2.6 + 0.012 * max(0, n_blocks - 20)


def data_label(spec: Any) -> str:
    """A short name for a data spec: the file or folder name, keeping a ``kind:`` prefix and split."""
    text = str(spec)
    prefix, sep, rest = text.partition(":")
    if sep and len(prefix) > 1 and "/" not in prefix:  # cifar10:DIR[:split], not C:\...
        path, _, split = rest.rpartition(":") if ":" in rest else (rest, "", "")
        return f"{prefix}:{Path(path).name or path}" + (f":{split}" if split else "")
    return Path(text).name or text


def model_label(payload: Mapping[str, Any]) -> str:
    """The model spec, a checkpoint path shortened to its file name (``hf-hub:org/name`` and
    ``torchvision:name`` stay whole: their ``/`` comes after a ``kind:`` prefix)."""
    model = str(payload.get("model") or "model")
    is_path = ("/" in model or os.sep in model) and ":" not in model.split("/")[0]
    return Path(model).name if is_path else model


def signed(v: float, digits: int = 2) -> str:
    """``+0.43`` / ``−0.80``, with a typographic minus as in the axis labels."""
    return f"{v:+.{digits}f}".replace("-", "\u2212")


def _is_finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------------------------------
# align (+ readout)


def align_figure(payload: Mapping[str, Any], shared: Mapping[int, int] | None = None) -> tuple[Any, list[str]]:
    blocks = list(payload["blocks"])
    readout = list(payload.get("readout") or [])
    estimate = removal_estimates(blocks)
    has_estimate = bool(np.isfinite(estimate).any())  # False for an align JSON without first-order figures
    heights = [2.7 if has_estimate else 2.0] + ([0.9] if readout else [])
    fig = _new_figure(figure_width(len(blocks)), sum(heights) * panel_height(len(blocks)))
    rows = fig.subfigures(len(heights), 1, height_ratios=heights, hspace=0.04) if readout else [fig]
    top = rows[0]
    ratios = [1.35, 1.0] + ([1.0] if has_estimate else [])
    axes = top.subplots(len(ratios), 1, sharex=True, height_ratios=ratios)
    draw_cosines(axes[0], blocks, shared)
    draw_ratios(axes[1], blocks)
    panels = ["cosine", "l2_ratio"]
    if has_estimate:
        axes[1].tick_params(axis="x", labelbottom=False, length=0)
        draw_removal_estimate(axes[2], blocks, estimate)
        panels.append("removal_estimate")
    top.suptitle(align_title(payload, shared), fontsize=10, x=0.01, ha="left")
    if readout:
        draw_readout_row(rows[1], readout)
        panels += ["readout", "borderline"]
    return fig, panels


def align_title(payload: Mapping[str, Any], shared: Mapping[int, int] | None) -> str:
    parts = [f"{model_label(payload)}: does each block move h down the loss gradient?"]
    facts = [f"n = {payload.get('n_samples', 0):,} samples"]
    if payload.get("data"):
        facts.append(f"data {data_label(payload['data'])}")
    if _is_finite(payload.get("loss")) and _is_finite(payload.get("acc")):
        facts.append(f"loss {payload['loss']:.3f}, acc {payload['acc']:.1%}")
    if shared:
        facts.append("shared stages: blocks are iterations")
    if not payload.get("complete", True):
        facts.append("INCOMPLETE recording")
    return parts[0] + "\n" + " · ".join(facts)


def draw_cosines(ax: Any, blocks: Sequence[Mapping[str, Any]], shared: Mapping[int, int] | None = None) -> None:
    x = np.arange(len(blocks))
    cos = values(blocks, "cos_mean")
    ucos = values(blocks, "update_cos_mean")
    lo = np.array([(b.get("cos_ci95") or [None, None])[0] for b in blocks], dtype=float)
    hi = np.array([(b.get("cos_ci95") or [None, None])[1] for b in blocks], dtype=float)
    shade_stages(ax, blocks)
    transition = mark_transitions(ax, blocks)
    ax.axhline(0.0, color="black", lw=0.8, zorder=1)
    ok = np.isfinite(cos)
    # F and U side by side (small offsets) so neither hides the other; lines show the trend over
    # depth and break at transitions (NaN).
    ax.plot(x - 0.1, cos, color=BLUE, lw=0.9, alpha=0.6, zorder=2)
    err = np.vstack([cos - np.where(np.isfinite(lo), lo, cos), np.where(np.isfinite(hi), hi, cos) - cos])
    ax.errorbar(x[ok] - 0.1, cos[ok], yerr=err[:, ok], fmt="o", color=BLUE, ecolor=BLUE, elinewidth=1.0,
                zorder=3, label=r"cos(F, $\partial\ell/\partial h$), mean ± 95% CI")
    ax.plot(x + 0.1, ucos, color=ORANGE, lw=0.9, alpha=0.6, zorder=2)
    ax.plot(x[np.isfinite(ucos)] + 0.1, ucos[np.isfinite(ucos)], "s", color=ORANGE, zorder=3, ms=4,
            label=r"cos(U, $\partial\ell/\partial h$), U = out − h")
    if transition is not None:
        transition.set_label("transition block (shapes differ: no cosine)")
    ax.set_ylabel("cosine with " + r"$\partial\ell/\partial h$" + "\n(< 0: descends the loss)")
    _ylim_with_zero(ax, np.concatenate([lo[np.isfinite(lo)], hi[np.isfinite(hi)], ucos[np.isfinite(ucos)]]))
    ax.legend(loc="best", ncols=3 if len(blocks) >= 12 else 1)
    label_stages(ax, blocks, shared)
    ax.tick_params(axis="x", labelbottom=False, length=0)


def _ylim_with_zero(ax: Any, data: np.ndarray) -> None:
    """Keep zero in view with some room on both sides: the sign is the finding."""
    if not len(data):
        ax.set_ylim(-1, 1)
        return
    low, high = min(float(data.min()), 0.0), max(float(data.max()), 0.0)
    pad = 0.12 * max(high - low, 0.02)
    ax.set_ylim(low - pad, high + pad)


def draw_ratios(ax: Any, blocks: Sequence[Mapping[str, Any]]) -> None:
    x = np.arange(len(blocks))
    ratio = values(blocks, "l2_ratio_mean")
    uratio = values(blocks, "update_l2_ratio_mean")
    shade_stages(ax, blocks)
    mark_transitions(ax, blocks)
    ax.plot(x - 0.1, ratio, "o-", color=BLUE, label=r"$\|F\| / \|h\|$", zorder=3)
    ax.plot(x + 0.1, uratio, "s-", color=ORANGE, ms=4, label=r"$\|U\| / \|h\|$", zorder=3)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("ℓ2 ratio\n(relative size)")
    ax.legend(loc="best", ncols=2)
    block_ticks(ax, blocks)
    ax.set_xlim(-0.6, len(blocks) - 0.4)


def removal_estimates(blocks: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """``removal_estimate_mean`` per block; −``first_order_mean`` in JSON written before it existed."""
    out = values(blocks, "removal_estimate_mean")
    legacy = -values(blocks, "first_order_mean")
    has = np.array(["removal_estimate_mean" in b for b in blocks], dtype=bool)
    return np.where(has, out, legacy)


def draw_removal_estimate(ax: Any, blocks: Sequence[Mapping[str, Any]], estimate: np.ndarray) -> None:
    """−⟨U, ∂ℓ/∂out⟩ per block: the first-order loss change if the block's update were undone
    (the sign of ablate's Δ loss: above zero, removing the block would raise the loss)."""
    x = np.arange(len(blocks))
    shade_stages(ax, blocks)
    mark_transitions(ax, blocks)
    ax.axhline(0.0, color="black", lw=0.8, zorder=1)
    ok = np.isfinite(estimate)
    ax.plot(x, estimate, color=GREEN, lw=0.9, alpha=0.6, zorder=2)
    ax.plot(x[ok], estimate[ok], "D", color=GREEN, ms=4, zorder=3,
            label=r"removal estimate $-\langle U, \partial\ell/\partial\,\mathrm{out}\rangle$")
    ax.set_ylabel("removal estimate\n(nats; > 0: removal hurts)")
    _ylim_with_zero(ax, estimate[ok])
    ax.legend(loc="best")
    block_ticks(ax, blocks)
    ax.set_xlim(-0.6, len(blocks) - 0.4)


# --------------------------------------------------------------------------------------------------
# readout


def readout_figure(payload: Mapping[str, Any]) -> tuple[Any, list[str]]:
    readout = list(payload["readout"])
    fig = _new_figure(max(8.0, 2.5 + 1.8 * len(readout)), 3.0)
    draw_readout_row(fig, readout)
    fig.suptitle(f"{model_label(payload)}: the model's head after each last-stage block "
                 f"(n = {payload.get('n_samples', 0):,})", fontsize=10, x=0.01, ha="left")
    return fig, ["readout", "borderline"]


def draw_readout_row(fig: Any, readout: Sequence[Mapping[str, Any]]) -> None:
    """Three panels: loss and entropy (nats), accuracy (%), borderline corrections (counts): one unit
    per axis, so no twin axes to misread."""
    nats_ax, acc_ax, border_ax = fig.subplots(1, 3)
    draw_readout_nats(nats_ax, readout)
    draw_readout_accuracy(acc_ax, readout)
    draw_borderline(border_ax, readout)


def draw_readout_nats(ax: Any, readout: Sequence[Mapping[str, Any]]) -> None:
    x = np.arange(len(readout))
    loss, entropy = values(readout, "loss"), values(readout, "entropy")
    ax.plot(x, loss, "o-", color=BLUE, label="loss")
    ax.plot(x, entropy, "^--", color=PURPLE, label="entropy")
    ax.set_ylabel("nats")
    both = np.concatenate([loss, entropy])
    top = np.nanmax(both) if np.isfinite(both).any() else 0.0
    ax.set_ylim(0, 1.45 * top if top > 0 else 1.0)  # headroom for the legend
    ax.legend(loc="upper left")
    _readout_ticks(ax, readout)
    ax.set_title("readout: loss and entropy", fontsize=9, loc="left")


def draw_readout_accuracy(ax: Any, readout: Sequence[Mapping[str, Any]]) -> None:
    """Top-1 accuracy after each block, on every example and on the borderline ones."""
    x = np.arange(len(readout))
    acc, border = values(readout, "acc", 100.0), values(readout, "borderline_acc", 100.0)
    ax.plot(x, acc, "s-", color=GREEN, label="all")
    if np.isfinite(border).any():
        ax.plot(x, border, "D--", color=ORANGE, ms=4, label="borderline")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 119)  # 0–100 with room for the legend above the lines
    ax.set_yticks(range(0, 101, 25))
    ax.legend(loc="upper left", ncols=2)
    _readout_ticks(ax, readout)
    ax.set_title("readout: accuracy", fontsize=9, loc="left")


def draw_borderline(ax: Any, readout: Sequence[Mapping[str, Any]]) -> None:
    """Borderline examples (|margin| < 0.1 on the intact model) each block corrects or breaks; the
    first block of the stage has no readout before it (n/a)."""
    from matplotlib.ticker import MaxNLocator

    x = np.arange(len(readout))
    corrected = values(readout, "corrected")
    broken = values(readout, "broken")
    width = 0.38
    ax.bar(x - width / 2, np.nan_to_num(corrected), width, color=GREEN, label="corrected (wrong → right)")
    ax.bar(x + width / 2, np.nan_to_num(broken), width, color=VERMILLION, label="broken (right → wrong)")
    for i in np.flatnonzero(~np.isfinite(corrected) & ~np.isfinite(broken)):
        ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=7, color=GREY)
    for xs, ys in ((x - width / 2, corrected), (x + width / 2, broken)):
        for xi, yi in zip(xs, ys):
            if np.isfinite(yi):
                ax.text(xi, yi, f"{int(yi)}", ha="center", va="bottom", fontsize=7)
    top = np.nanmax(np.concatenate([corrected, broken, [0.0]]))
    ax.set_ylim(0, max(1.0, top) * 1.8)  # headroom: the legend sits above the bars
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("examples")
    n = next((r.get("n_borderline") for r in readout if r.get("n_borderline") is not None), 0)
    ax.set_title(f"borderline (|margin| < 0.1, n = {n})", fontsize=9, loc="left")
    ax.legend(loc="upper left")
    _readout_ticks(ax, readout)


def _readout_ticks(ax: Any, readout: Sequence[Mapping[str, Any]]) -> None:
    ax.set_xticks(range(len(readout)))
    ax.set_xticklabels([str(r.get("name")) for r in readout], rotation=30 if len(readout) > 4 else 0,
                       ha="right" if len(readout) > 4 else "center", fontsize=8)
    ax.set_xlim(-0.6, len(readout) - 0.4)


# --------------------------------------------------------------------------------------------------
# ablate


def ablate_figure(payload: Mapping[str, Any]) -> tuple[Any, list[str]]:
    blocks = list(payload["blocks"])
    cumulative = list(payload.get("cumulative") or [])
    proxies = proxy_series(payload)
    heights = [1.9] + ([1.15] if cumulative else []) + ([0.95] if proxies else [])
    fig = _new_figure(figure_width(len(blocks)), sum(heights) * panel_height(len(blocks)))
    rows = fig.subfigures(len(heights), 1, height_ratios=heights, hspace=0.04) if len(heights) > 1 else [fig]
    loss_ax, acc_ax = rows[0].subplots(2, 1, sharex=True, height_ratios=[1.3, 1.0])
    draw_removal_cost(loss_ax, acc_ax, blocks)
    rows[0].suptitle(ablate_title(payload), fontsize=10, x=0.01, ha="left")
    panels = ["delta_loss", "delta_acc"]
    row = 1
    if cumulative:
        draw_cumulative(rows[row].subplots(1, 1), cumulative, payload.get("baseline") or {},
                        str(payload.get("cumulative_mode") or ""))
        panels.append("cumulative")
        row += 1
    if proxies:
        draw_proxies(rows[row], proxies)
        panels.append("proxies")
    return fig, panels


def ablate_title(payload: Mapping[str, Any]) -> str:
    base = payload.get("baseline") or {}
    facts = []
    if _is_finite(base.get("loss")) and _is_finite(base.get("acc")):
        facts.append(f"intact model: loss {base['loss']:.3f}, acc {base['acc']:.1%}")
    if payload.get("model"):
        facts.insert(0, model_label(payload))
    lines = ["Cost of removing one block (the rest intact)", " · ".join(facts)]
    unroll = unroll_line(payload.get("unroll") or {})
    return "\n".join(lines + ([unroll] if unroll else []))


def unroll_line(unroll: Mapping[str, Any]) -> str:
    """One line on ``--unroll`` (paper §4.4): the whole set and its borderline examples."""
    whole = unroll.get("all") or {}
    if not unroll.get("block") or not _is_finite(whole.get("loss")):
        return ""
    text = (f"{unroll['block']} applied 1+{unroll.get('k')} times (S = {unroll.get('scale')}): "
            f"loss {whole['loss']:.3f}")
    if _is_finite(whole.get("acc")):
        text += f", acc {whole['acc']:.1%}"
    border, before = unroll.get("borderline") or {}, unroll.get("baseline_borderline") or {}
    if _is_finite(border.get("loss")):
        text += f"; borderline (n = {border.get('n')}) loss "
        text += f"{before['loss']:.3f} → {border['loss']:.3f}" if _is_finite(before.get("loss")) else \
            f"{border['loss']:.3f}"
    return text


def draw_removal_cost(loss_ax: Any, acc_ax: Any, blocks: Sequence[Mapping[str, Any]]) -> None:
    x = np.arange(len(blocks))
    transition = np.array([b.get("kind") == "transition" for b in blocks])
    for ax, key, scale, color, label in (
        (loss_ax, "delta_loss", 1.0, VERMILLION, "Δ loss when removed (nats)"),
        (acc_ax, "delta_acc", 100.0, BLUE, "Δ top-1 accuracy\n(percentage points)"),
    ):
        shade_stages(ax, blocks)
        y = values(blocks, key, scale)
        bars = ax.bar(x, np.nan_to_num(y), 0.7, color=color, zorder=2)
        for bar, is_transition in zip(bars, transition):
            if is_transition:  # hatched: removing a transition keeps only its shortcut
                bar.set_hatch("////")
                bar.set_facecolor("white")
                bar.set_edgecolor(color)
        ax.axhline(0.0, color="black", lw=0.8, zorder=3)
        ax.set_ylabel(label)
    annotate_ranks(loss_ax, blocks)
    if transition.any():
        from matplotlib.patches import Patch

        loss_ax.legend(handles=[Patch(facecolor=VERMILLION, label="identity block"),
                                Patch(facecolor="white", edgecolor=VERMILLION, hatch="////",
                                      label="transition (shortcut kept)")], loc="best")
    label_stages(loss_ax, blocks)
    loss_ax.tick_params(axis="x", labelbottom=False, length=0)
    block_ticks(acc_ax, blocks)
    acc_ax.set_xlim(-0.6, len(blocks) - 0.4)


def annotate_ranks(ax: Any, blocks: Sequence[Mapping[str, Any]], top: int = 3) -> None:
    """Rank numbers above the most and below the least harmful removals."""
    ranks = values(blocks, "rank")
    y = values(blocks, "delta_loss")
    if not np.isfinite(ranks).any():
        return
    worst = int(np.nanmax(ranks))
    for i, (r, v) in enumerate(zip(ranks, y)):
        if np.isfinite(r) and np.isfinite(v) and (r <= top or r > worst - top):
            ax.annotate(f"#{int(r)}", (i, v), xytext=(0, 2 if v >= 0 else -2), textcoords="offset points",
                        ha="center", va="bottom" if v >= 0 else "top", fontsize=7, color="#333333")
    low, high = ax.get_ylim()
    ax.set_ylim(low - 0.06 * (high - low), high + 0.1 * (high - low))


def draw_cumulative(ax: Any, cumulative: Sequence[Mapping[str, Any]], baseline: Mapping[str, Any],
                    mode: str = "") -> None:
    """Loss (left) and accuracy (right) as blocks are removed one after another; each tick names the
    block removed at that step."""
    steps = sorted(cumulative, key=lambda r: r.get("k", 0))
    if steps and steps[0].get("k", 0) > 0 and _is_finite(baseline.get("loss")):
        steps = [{"k": 0, "removed": [], "loss": baseline["loss"], "acc": baseline.get("acc")}] + steps
    k = np.array([s.get("k", i) for i, s in enumerate(steps)], dtype=float)
    ax.plot(k, values(steps, "loss"), "o-", color=VERMILLION, label="loss")
    ax.set_ylabel("loss (nats)", color=VERMILLION)
    ax.tick_params(axis="y", colors=VERMILLION)
    acc_ax = ax.twinx()
    acc_ax.plot(k, values(steps, "acc", 100.0), "s-", color=BLUE, label="top-1 accuracy")
    acc_ax.set_ylabel("top-1 accuracy (%)", color=BLUE)
    acc_ax.tick_params(axis="y", colors=BLUE)
    acc_ax.spines["right"].set_visible(True)
    acc_ax.grid(False)
    ax.set_xticks(k)
    ax.set_xticklabels(removed_labels(steps), rotation=35, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_xlabel("blocks removed (k) and the block removed at each step")
    ax.set_xlim(k.min() - 0.4, k.max() + 0.4)
    handles = ax.get_legend_handles_labels()[0] + acc_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="center left")
    order = {"greedy": "greedy: least harmful first, re-ranked after each removal",
             "one-shot": "one-shot: the single ranking's least harmful first"}.get(mode.replace("_", "-"), "")
    ax.set_title("cumulative removal" + (f" ({order})" if order else ""), fontsize=9, loc="left")


def removed_labels(steps: Sequence[Mapping[str, Any]]) -> list[str]:
    """``k: name`` of the block newly removed at each step. ``block`` names it when given; else it is
    whatever ``removed`` (the blocks removed so far, or just the new one) adds to the earlier steps."""
    labels: list[str] = []
    seen: set[str] = set()
    for step in steps:
        removed = step.get("removed") or []
        names = [removed] if isinstance(removed, str) else [str(r) for r in removed]
        new = [str(step["block"])] if step.get("block") else [n for n in names if n not in seen] or names[-1:]
        seen.update(names)
        k = int(step.get("k", 0))
        labels.append(f"{k}: {', '.join(new)}" if new and k > 0 else f"{k}: intact")
    return labels


def proxy_series(payload: Mapping[str, Any]) -> list[tuple[str, np.ndarray, np.ndarray, str]]:
    """(proxy, its values, exact Δ loss, correlation text) for each proxy with two or more finite pairs."""
    proxies = payload.get("proxies") or {}
    rows = proxies.get("blocks") or []
    if not rows:
        return []
    delta = {b.get("name"): b.get("delta_loss") for b in payload.get("blocks") or []}
    correlation = proxies.get("correlation") or {}
    names = [k for k in rows[0] if k not in ("name", "stage", "kind", "index")]
    out = []
    for name in names:
        pairs = [(r.get(name), delta.get(r.get("name"))) for r in rows]
        pairs = [(p, d) for p, d in pairs if _is_finite(p) and _is_finite(d)]
        if len(pairs) < 2:
            continue
        stats = correlation.get(name) or {}
        rho, tau = stats.get("spearman"), stats.get("kendall")
        legend = f"ρ = {signed(rho)}" if _is_finite(rho) else "ρ n/a"
        if _is_finite(tau):
            legend += f"\nτ = {signed(tau)}"
        xs, ys = np.array(pairs, dtype=float).T
        out.append((name, xs, ys, legend))
    return out


def proxy_ticks(lo: float, hi: float) -> tuple[np.ndarray, int]:
    """At most 3 ticks in [lo, hi] on steps of 1, 2 or 5, and the power of ten they are written in units
    of (0 unless the largest is below 0.1 or at least 10⁴): a proxy panel is about an inch wide, and
    "−0.006" and "0.000" ran together there. MaxNLocator adds ticks until two fall in view, which can
    make four: every other one is dropped, keeping the one nearest 0."""
    from matplotlib.ticker import MaxNLocator

    ticks = np.asarray(MaxNLocator(nbins=2, steps=[1, 2, 5, 10]).tick_values(lo, hi))
    ticks = ticks[(ticks >= lo) & (ticks <= hi)]
    while len(ticks) > 3:
        ticks = ticks[int(np.argmin(np.abs(ticks))) % 2::2]
    largest = float(np.max(np.abs(ticks))) if len(ticks) else 0.0
    power = math.floor(math.log10(largest)) if largest > 0 else 0
    return ticks, power if power <= -2 or power >= 4 else 0


def compact_tick(value: float) -> str:
    """A tick label with no trailing zeros and a typographic minus: 0.006 → "0.006", 0 → "0"."""
    text = f"{value:.4g}"
    return "0" if float(text) == 0 else text.replace("-", "−")


def draw_proxies(fig: Any, series: Sequence[tuple[str, np.ndarray, np.ndarray, str]]) -> None:
    """One small scatter per proxy; its rank correlations with the exact Δ loss in its title (a
    legend inside such narrow axes would cover the points)."""
    axes = np.atleast_1d(fig.subplots(1, len(series), sharey=True))
    for ax, (name, xs, ys, correlation) in zip(axes, series):
        ax.scatter(xs, ys, s=14, color=PURPLE, alpha=0.85, zorder=3)
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_title(correlation, fontsize=8)
        ticks, power = proxy_ticks(*sorted(ax.get_xlim()))  # the limits once the points are drawn
        ax.set_xticks(ticks, [compact_tick(v / 10.0**power) for v in ticks])
        label = PROXY_LABELS.get(name, name)
        if power:  # in units of 10^power, said under the label: no offset text to collide with it
            label += "\n" + r"(in units of $10^{" + str(power) + r"}$)"
        ax.set_xlabel(label)
        ax.grid(True, axis="both")
    axes[0].set_ylabel("exact Δ loss (nats)")
    fig.suptitle("cheap proxies against the exact removal cost (one point per block; ρ Spearman, τ Kendall)",
                 fontsize=9, x=0.01, ha="left")


__all__ = ["KINDS", "PlotResult", "plot", "load_input", "detect_kind", "resolve_kind", "check_output",
           "save_figure", "align_figure", "readout_figure", "ablate_figure"]
