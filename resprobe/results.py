"""What the Python API returns (DESIGN.md §2b): the command line's JSON as a dict (``to_json()``), its
tables as DataFrames (``to_pandas()``), its figures (``plot()``), and a readable repr in notebooks.

pandas is optional: only ``to_pandas()`` and the other frames need it, and say so when it is missing.
"""

from __future__ import annotations

import copy
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from resprobe.dataframes import _pandas, frame
from resprobe.errors import BadValue

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from resprobe.recording.recorder import Recorded


def _figure(payload: Mapping[str, Any], kind: str) -> Any:
    """The figure ``resprobe plot`` draws for this JSON (kind: auto, align, readout, ablate)."""
    from resprobe.render.plot import draw

    return draw(payload, kind)[1]


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "—" if value is None else str(value)


def _html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], limit: int = 60) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>"
                   for r in rows[:limit])
    more = f"<p>… {len(rows) - limit} more rows</p>" if len(rows) > limit else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


# --------------------------------------------------------------------------------------------------
# align


ALIGN_COLUMNS = ("name", "stage", "kind", "cos_mean", "l2_ratio_mean", "update_cos_mean", "removal_estimate_mean",
                 "n_valid")


@dataclass
class AlignResult:
    """``rp.align``: ``report`` is the ``resprobe align`` JSON; ``recorded`` the per-sample statistics."""

    report: dict[str, Any]
    recorded: Recorded = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        """The ``resprobe align -f json`` report (a dict; ``json.dumps`` it to write it)."""
        return copy.deepcopy(self.report)

    def to_pandas(self) -> Any:
        """One row per block; columns = the align JSON's block fields."""
        return frame(self.report["blocks"])

    def stages_frame(self) -> Any:
        """One row per stage (the JSON's ``stages``)."""
        return frame(self.report["stages"])

    def samples(self) -> Any:
        """One row per sample × block: the recorded statistics (``input_norm``, ``cos``, ...) and the
        derived ``l2_ratio`` and ``update_l2_ratio``, with the sample's index, label, pred and loss."""
        import numpy as np

        from resprobe.align import block_columns

        rec = self.recorded
        parts = []
        for j, block in enumerate(rec.blocks):
            derived = block_columns(rec, j)
            part = {"index": rec.index, "label": rec.label, "pred": rec.pred, "loss": rec.loss,
                    "block": np.full(rec.n_samples, block["name"], dtype=object),
                    "stage": np.full(rec.n_samples, block["stage"]), "kind": np.full(rec.n_samples, block["kind"],
                                                                                      dtype=object)}
            part.update({name: values[:, j] for name, values in rec.stats.items()})
            part.update(l2_ratio=derived["l2_ratio"], update_l2_ratio=derived["update_l2_ratio"])
            parts.append(_pandas().DataFrame(part))
        pd = _pandas()
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    def plot(self, kind: str = "auto") -> Any:
        """The ``resprobe plot`` figure (a matplotlib Figure): per-block cosine, ℓ2 ratio, removal estimate."""
        return _figure(self.report, kind)

    def __repr__(self) -> str:
        r = self.report
        lines = [f"AlignResult({r.get('model')}, {r['n_samples']} samples, loss {_fmt(r.get('loss'))}, "
                 f"acc {_fmt(r.get('acc'))})"]
        for b in r["blocks"]:
            lines.append(f"  {b['name']:<24} {b['kind']:<10} cos {_fmt(b['cos_mean']):>9}  "
                         f"l2 {_fmt(b['l2_ratio_mean']):>9}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        r = self.report
        title = (f"<b>AlignResult</b> {html.escape(str(r.get('model')))}: {r['n_samples']} samples, "
                 f"loss {_fmt(r.get('loss'))}, acc {_fmt(r.get('acc'))}")
        return f"<div><p>{title}</p>{_html_table(r['blocks'], ALIGN_COLUMNS)}</div>"


class Run:
    """A recording (``rp.record``, ``rp.open_recording``): its per-sample statistics, and ``.align()``."""

    def __init__(self, recorded: Recorded, result: Any = None):
        self.recorded = recorded
        self.result = result  # record's RecordResult, when this run was just written

    def align(self) -> AlignResult:
        from resprobe.align import align_report

        report = align_report(self.recorded)
        report.pop("readout", None) if not self.recorded.readout else None
        return AlignResult(report, self.recorded)

    def __getattr__(self, name: str) -> Any:  # n_samples, stats, attrs, complete, ...
        if name == "recorded":
            raise AttributeError(name)
        return getattr(self.recorded, name)

    def __repr__(self) -> str:
        rec = self.recorded
        state = "complete" if rec.complete else f"incomplete ({rec.n_samples} of {rec.n_planned})"
        return f"Run({rec.attrs.get('model')}, {rec.n_samples} samples, {len(rec.block_names)} blocks, {state})"


# --------------------------------------------------------------------------------------------------
# ablate


ABLATE_COLUMNS = ("name", "stage", "kind", "loss", "acc", "delta_loss", "delta_acc", "rank")


@dataclass
class AblateResult:
    """``rp.ablate``: ``report`` is the ``resprobe ablate`` JSON. ``.pruned(n)`` builds a new module."""

    report: dict[str, Any]
    model: nn.Module = field(repr=False)
    origin: dict[str, Any] | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The ``resprobe ablate -f json`` report (a dict)."""
        return copy.deepcopy(self.report)

    def to_pandas(self) -> Any:
        """One row per ranked block; columns = the ablate JSON's block fields."""
        return frame(self.report["blocks"])

    def cumulative_frame(self) -> Any:
        """The removal curve (``cumulative=K`` or ``one_shot=K``), one row per k; None if not asked for."""
        points = self.report.get("cumulative")
        return frame(points) if points is not None else None

    def proxies_frame(self) -> Any:
        """The proxies per block (``proxies=True``); None if not asked for."""
        proxies = self.report.get("proxies")
        return frame(proxies["blocks"]) if proxies else None

    def plot(self) -> Any:
        """The ``resprobe plot`` figure of this ablation (a matplotlib Figure)."""
        return _figure(self.report, "ablate")

    def removal_order(self) -> list[str]:
        """Least harmful first: the greedy curve's order when computed, else the one-shot ranking's
        (exactly as ``--remove N`` takes them)."""
        points = self.report.get("cumulative")
        if points and self.report.get("cumulative_mode") == "greedy":
            return list(points[-1]["removed"])
        return [b["name"] for b in sorted(self.report["blocks"], key=lambda b: -b["rank"])]

    def pruned(self, n: int | None = None, blocks: Sequence[str] | None = None) -> nn.Module:
        """A new module without the ``n`` least harmful blocks (:meth:`removal_order`) or the named
        ``blocks``; the analysed model is untouched."""
        from resprobe.ablate_prune import prune_model
        from resprobe.api import ORIGIN_ATTR, _set_origin, preserved

        if (n is None) == (blocks is None):
            raise BadValue("pruned: give n (the n least harmful blocks) or blocks (names), one of them")
        if blocks is None:
            order = self.removal_order()
            if not 1 <= int(n) <= len(order):  # type: ignore[arg-type]
                raise BadValue(f"pruned: n must be 1 to {len(order)} (the ranked blocks), got {n}")
            if self.report.get("cumulative_mode") == "greedy" and int(n) >= len(self.report["cumulative"]):
                raise BadValue(f"pruned: the greedy curve stops at {len(self.report['cumulative']) - 1}")
            names = order[:int(n)]  # type: ignore[arg-type]
        else:
            names = list(blocks)
            known = {b["name"] for b in self.report["blocks"]}
            unknown = [name for name in names if name not in known]
            if unknown:
                raise BadValue(f"pruned: no ranked block named {', '.join(unknown)}")
        if self.report.get("granularity") is not None:  # a language model: plain transformers, layers renumbered
            return self._pruned_lm(names)
        with preserved(self.model):  # deepcopy reads the model only; the guard is for its hooks' sake
            new = prune_model(copy.deepcopy(self.model), names)
        origin = dict(getattr(self.model, ORIGIN_ATTR, None) or self.origin or {})
        _set_origin(new, {**origin, "recipes": [*(origin.get("recipes") or []), {"kind": "prune",
                                                                                   "removed": names}]})
        return new

    def _pruned_lm(self, names: Sequence[str]) -> nn.Module:
        """A new ``PreTrainedModel`` without the named decoder layers (``save_pretrained`` writes a folder
        that plain transformers loads); the analysed model is untouched."""
        from resprobe.api import preserved
        from resprobe.models.lm_prune import pruned_copy

        if self.report["granularity"] != "layer":
            raise BadValue("pruned: a model without half layers is not a transformers model; ablate with layers")
        index = {b["name"]: b["index"] for b in self.report["blocks"]}
        with preserved(self.model):
            return pruned_copy(self.model, [index[name] for name in names])

    def __repr__(self) -> str:
        r = self.report
        base = r["baseline"]
        lines = [f"AblateResult({r.get('model')}, {r['n']} samples, baseline loss {_fmt(base['loss'])} "
                 f"acc {_fmt(base['acc'])}, by {r['by']})"]
        for b in sorted(r["blocks"], key=lambda b: b["rank"]):
            lines.append(f"  {b['rank']:>3}  {b['name']:<24} Δloss {_fmt(b['delta_loss']):>9}  "
                         f"Δacc {_fmt(b['delta_acc']):>9}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        r = self.report
        base = r["baseline"]
        title = (f"<b>AblateResult</b> {html.escape(str(r.get('model')))}: {r['n']} samples, baseline loss "
                 f"{_fmt(base['loss'])}, acc {_fmt(base['acc'])}")
        rows = sorted(r["blocks"], key=lambda b: b["rank"])
        return f"<div><p>{title}</p>{_html_table(rows, ABLATE_COLUMNS)}</div>"


# --------------------------------------------------------------------------------------------------
# finetune


@dataclass
class TrainHistory:
    """``rp.finetune``'s history: one row per logged step (step, epoch, lr, loss) and per validation
    (step, epoch, val_loss, val_acc)."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def to_json(self) -> list[dict[str, Any]]:
        return copy.deepcopy(self.rows)

    def to_pandas(self) -> Any:
        return frame(self.rows)

    @property
    def val(self) -> dict[str, Any] | None:
        """The last validation row."""
        return next((r for r in reversed(self.rows) if "val_loss" in r), None)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    def __repr__(self) -> str:
        last = next((r for r in reversed(self.rows) if "loss" in r), None)
        val = self.val
        return (f"TrainHistory({last['step'] if last else 0} steps, loss {_fmt(last['loss']) if last else '—'}"
                + (f", val_loss {_fmt(val['val_loss'])}, val_acc {_fmt(val['val_acc'])}" if val else "") + ")")
