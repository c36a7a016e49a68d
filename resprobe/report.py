"""Rendering results: a rich table for people, JSON or CSV for scripts (DESIGN.md §2).

Every command's result is a JSON-able dict. ``emit`` writes it to stdout in the chosen format: JSON
as is (NaN and infinities become ``null``), CSV as one row per block with list fields split into
``_lo``/``_hi`` columns, and a table through the command's own table builder.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

FORMATS = ("table", "json", "csv")


def jsonable(obj: Any) -> Any:
    """Plain Python containers and numbers; NaN and infinities as ``None`` (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def to_json(payload: Mapping[str, Any]) -> str:
    return json.dumps(jsonable(payload), indent=2, allow_nan=False)


def flatten_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """CSV cells: ``[lo, hi]`` pairs become ``key_lo``/``key_hi``; shapes become ``AxBxC``."""
    flat: dict[str, Any] = {}
    for key, value in jsonable(row).items():
        if isinstance(value, list) and key.endswith(("_ci95", "_ci")) and len(value) == 2:
            flat[f"{key}_lo"], flat[f"{key}_hi"] = value
        elif isinstance(value, list):
            flat[key] = "x".join(str(v) for v in value)
        elif isinstance(value, dict):
            for sub, subvalue in value.items():
                flat[f"{key}_{sub}"] = subvalue
        else:
            flat[key] = value
    return flat


def to_csv(rows: Iterable[Mapping[str, Any]]) -> str:
    flat = [flatten_row(r) for r in rows]
    columns: list[str] = []
    for row in flat:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in flat:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


def emit(
    payload: Mapping[str, Any],
    fmt: str,
    table: Callable[[Mapping[str, Any]], RenderableType | Sequence[RenderableType]],
    rows: Callable[[Mapping[str, Any]], Iterable[Mapping[str, Any]]] | None = None,
    out: Any = None,
) -> None:
    """Write ``payload`` to stdout as a table, JSON or CSV."""
    out = out or sys.stdout
    if fmt == "json":
        out.write(to_json(payload) + "\n")
    elif fmt == "csv":
        out.write(to_csv(rows(payload) if rows else [payload]))
    else:
        probe = Console(file=out)
        # A pipe or file gets a wide console: tables are never truncated where nobody can resize them.
        console = Console(file=out, soft_wrap=False, width=probe.width if probe.is_terminal else 220)
        rendered = table(payload)
        for item in rendered if isinstance(rendered, (list, tuple)) else [rendered]:
            console.print(item)
    out.flush()


# --------------------------------------------------------------------------------------------------
# Small formatting helpers shared by the tables


def fmt_num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def signed(value: Any, digits: int = 3) -> Text:
    """A number coloured by sign: green when negative (descending the loss), red when positive."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return Text("—", style="dim")
    style = "green" if value < 0 else "red" if value > 0 else ""
    return Text(f"{value:+.{digits}f}", style=style)


def shape(value: Sequence[int]) -> str:
    return "×".join(str(v) for v in value)


def new_table(title: str, *columns: str, right: Sequence[str] = ()) -> Table:
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left", no_wrap=True)
    return table


def add_block_rows(table: Table, blocks: Sequence[Mapping[str, Any]], cells: Callable[[Mapping[str, Any]], list]) -> None:
    """Rows per block with a rule between stages, so stage boundaries are visible at a glance."""
    for i, block in enumerate(blocks):
        stage_ends = i + 1 < len(blocks) and blocks[i + 1].get("stage") != block.get("stage")
        table.add_row(*cells(block), end_section=stage_ends)


# --------------------------------------------------------------------------------------------------
# blocks and eval


def blocks_table(payload: Mapping[str, Any]) -> RenderableType:
    table = new_table(f"{payload['model']} — {len(payload['blocks'])} residual blocks, "
                      f"{payload['params']:,} parameters",
                      "block", "stage", "index", "kind", "in", "out", "params", right=("stage", "index", "params"))
    add_block_rows(table, payload["blocks"], lambda b: [
        b["name"], str(b["stage"]), str(b["index"]),
        Text(b["kind"], style="yellow" if b["kind"] == "transition" else ""),
        shape(b["in_shape"]), shape(b["out_shape"]), f"{b['params']:,}",
    ])
    return table


def eval_table(payload: Mapping[str, Any]) -> RenderableType:
    table = new_table(f"{payload['model']} on {payload.get('data', '')}", "n", "loss", "acc", "top5",
                      right=("n", "loss", "acc", "top5"))
    table.add_row(f"{payload['n']:,}", fmt_num(payload["loss"]), fmt_num(payload["acc"]), fmt_num(payload["top5"]))
    return table


def record_table(payload: Mapping[str, Any]) -> RenderableType:
    table = new_table("recording", "out", "samples", "complete", "seconds", right=("samples", "seconds"))
    table.add_row(str(payload["out"]), f"{payload['n_samples']:,}", "yes" if payload["complete"] else "NO",
                  f"{payload['seconds']:.1f}")
    return table


def align_table(payload: Mapping[str, Any]) -> list[RenderableType]:
    """Per-block alignment, coloured by sign (green: F descends the loss), stages separated."""
    complete = "" if payload.get("complete", True) else "  [INCOMPLETE]"
    title = (f"{payload.get('model')} — {payload['n_samples']:,} samples, loss {fmt_num(payload.get('loss'))}, "
             f"acc {fmt_num(payload.get('acc'))}{complete}\ncos = cos(F, ∂ℓ/∂h): negative = the block moves down "
             "the loss gradient (refines)")
    table = new_table(title, "block", "kind", "cos", "95% CI", "frac<0", "‖F‖/‖h‖", "cos U", "‖U‖/‖h‖",
                      "1st-order", "‖F‖", "‖g‖",
                      right=("cos", "95% CI", "frac<0", "‖F‖/‖h‖", "cos U", "‖U‖/‖h‖", "1st-order", "‖F‖", "‖g‖"))

    def cells(b: Mapping[str, Any]) -> list:
        lo, hi = b.get("cos_ci95") or [None, None]
        ci = f"[{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None else "—"
        return [b["name"], Text(b["kind"], style="yellow" if b["kind"] == "transition" else ""),
                signed(b.get("cos_mean")), ci, fmt_num(b.get("frac_negative"), 2), fmt_num(b.get("l2_ratio_mean"), 3),
                signed(b.get("update_cos_mean")), fmt_num(b.get("update_l2_ratio_mean"), 3),
                signed(b.get("first_order_mean"), 4), fmt_num(b.get("branch_norm_mean"), 3),
                fmt_num(b.get("grad_norm_mean"), 5)]

    add_block_rows(table, payload["blocks"], cells)
    stages = new_table("per stage (pooled over identity blocks)", "stage", "blocks", "identity", "cos", "‖F‖/‖h‖",
                       "cos U", right=("stage", "blocks", "identity", "cos", "‖F‖/‖h‖", "cos U"))
    for s in payload["stages"]:
        stages.add_row(str(s["stage"]), str(s["n_blocks"]), str(s.get("n_identity", "")), signed(s.get("cos_mean")),
                       fmt_num(s.get("l2_ratio_mean"), 3), signed(s.get("update_cos_mean")))
    out: list[RenderableType] = [table, stages]
    if payload.get("readout"):
        readout = new_table("last-stage readout (the model's head after each block)", "block", "loss", "acc",
                            "entropy", "borderline", "corrected", "broken",
                            right=("loss", "acc", "entropy", "borderline", "corrected", "broken"))
        for r in payload["readout"]:
            readout.add_row(r["name"], fmt_num(r["loss"]), fmt_num(r["acc"]), fmt_num(r["entropy"]),
                            str(r["n_borderline"]), fmt_num(r["corrected"]), fmt_num(r["broken"]))
        out.append(readout)
    return out
