"""Rendering results: a rich table for people, JSON or CSV for scripts (docs/reference.md).

Every command's result is a JSON-able dict. ``emit`` writes it to stdout in the chosen format: JSON
as is (NaN and infinities become ``null``), CSV as one row per block (:func:`flatten_row` says how
lists and objects become cells), and a table through the command's own table builder.
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
LIST_SEPARATOR = ";"  # CSV cells of list fields other than shapes (block names never contain it)


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
    """CSV cells: ``[lo, hi]`` pairs become ``key_lo``/``key_hi``; shapes (``*_shape``) become ``AxBxC``;
    any other list of plain values is joined with ``;`` (``layer1.0;layer1.1``), and a list holding
    lists or objects is written as JSON; an object becomes one ``key_sub`` column per field."""
    flat: dict[str, Any] = {}
    for key, value in jsonable(row).items():
        if isinstance(value, list) and key.endswith(("_ci95", "_ci")) and len(value) == 2:
            flat[f"{key}_lo"], flat[f"{key}_hi"] = value
        elif isinstance(value, list) and key.endswith("shape"):
            flat[key] = "x".join(str(v) for v in value)
        elif isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value):
            flat[key] = json.dumps(value, separators=(",", ":"))
        elif isinstance(value, list):
            flat[key] = LIST_SEPARATOR.join("" if v is None else str(v) for v in value)
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


class _ReportConsole(Console):
    """rich's Console, except that a closed pipe (``resprobe align … | head -1``) is a BrokenPipeError
    for the caller to handle (the command line ends quietly) instead of rich's own ``exit(1)``."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


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
        console = report_console(out)
        rendered = table(payload)
        for item in rendered if isinstance(rendered, (list, tuple)) else [rendered]:
            print_table(console, item)
    out.flush()


def report_console(out: Any) -> Console:
    """The console a table goes to. A pipe or file gets a wide one: tables are never truncated where
    nobody can resize them. Markup and emoji codes are off: paths, specs and class names are shown as
    typed (``[bold]`` and ``synthetic:100`` stay as they are)."""
    probe = Console(file=out)
    return _ReportConsole(file=out, soft_wrap=False, width=probe.width if probe.is_terminal else 220,
                          markup=False, emoji=False, highlight=False)


def print_table(console: Console, item: RenderableType) -> None:
    """``item``, a table's title on lines of its own: rich wraps a title to the table's width (32
    characters for a narrow table), which would break a path in the title over several lines."""
    if isinstance(item, Table) and item.title:
        for line in str(item.title).splitlines():
            console.print(Text(line, style="table.title"), soft_wrap=True)
        item.title = None
    console.print(item)


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


def plain_signed(value: Any, digits: int = 4) -> str:
    """A number with its sign and no colour (for quantities where neither sign means "refines")."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:+.{digits}f}"


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


def blocks_table(payload: Mapping[str, Any]) -> RenderableType | list[RenderableType]:
    table = new_table(f"{payload['model']} — {len(payload['blocks'])} residual blocks, "
                      f"{payload['params']:,} parameters",
                      "block", "stage", "index", "kind", "in", "out", "params", right=("stage", "index", "params"))
    add_block_rows(table, payload["blocks"], lambda b: [
        b["name"], str(b["stage"]), str(b["index"]),
        Text(b["kind"], style="yellow" if b["kind"] == "transition" else ""),
        shape(b["in_shape"]), shape(b["out_shape"]), f"{b['params']:,}",
    ])
    if not payload.get("shared"):
        return table
    # A shared model: each shared block once; the rows above count what each iteration owns.
    table.title += "\nshared stages: a block's params are its iteration's own (norms, LoRA factors)"
    shared = new_table("shared blocks (counted once)", "shared block", "stage", "iterations", "params",
                       right=("stage", "params"))
    for s in payload["shared"]:
        shared.add_row(str(s["name"]), str(s["stage"]), ", ".join(s["iterations"]), f"{s['params']:,}")
    return [table, shared]


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
             "the loss gradient (refines); removal est. = −⟨U, ∂ℓ/∂out⟩: first-order loss change if the "
             "update were removed (positive = removing it hurts)")
    table = new_table(title, "block", "kind", "cos", "95% CI", "frac<0", "‖F‖/‖h‖", "cos U", "‖U‖/‖h‖",
                      "removal est.", "‖F‖", "‖g‖",
                      right=("cos", "95% CI", "frac<0", "‖F‖/‖h‖", "cos U", "‖U‖/‖h‖", "removal est.", "‖F‖", "‖g‖"))

    def cells(b: Mapping[str, Any]) -> list:
        lo, hi = b.get("cos_ci95") or [None, None]
        ci = f"[{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None else "—"
        return [b["name"], Text(b["kind"], style="yellow" if b["kind"] == "transition" else ""),
                signed(b.get("cos_mean")), ci, fmt_num(b.get("frac_negative"), 2), fmt_num(b.get("l2_ratio_mean"), 3),
                signed(b.get("update_cos_mean")), fmt_num(b.get("update_l2_ratio_mean"), 3),
                plain_signed(b["removal_estimate_mean"], 4), fmt_num(b.get("branch_norm_mean"), 3),
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


# --------------------------------------------------------------------------------------------------
# share and finetune


def share_table(payload: Mapping[str, Any]) -> list[RenderableType]:
    before, after = payload["params_before"], payload["params_after"]
    change = f"{after / before:.1%} of" if before else "vs"
    stages = new_table(f"shared → {payload.get('out', '')}: {after:,} parameters ({change} {before:,})",
                       "stage", "replaced blocks", "iterations", "init", "norm", "LoRA rank",
                       right=("stage", "iterations", "LoRA rank"))
    for s in payload["stages"]:
        stages.add_row(str(s["stage"]), ", ".join(s["blocks"]), str(s["iterations"]), s["init"], s.get("norm", ""),
                       "—" if s.get("lora_rank") is None else str(s["lora_rank"]))
    out: list[RenderableType] = [stages]
    rows = [("original", payload.get("eval_original")), ("shared", payload.get("eval_shared")),
            ("shared + recalibrated", payload.get("eval_shared_recalibrated"))]
    rows = [(label, result) for label, result in rows if result]
    if rows and "spans" in payload:  # a language model: loss per token and perplexity
        evals = new_table(f"evaluation on {payload.get('data') or '--data'}", "model", "windows", "tokens", "loss",
                          "perplexity", right=("windows", "tokens", "loss", "perplexity"))
        for label, result in rows:
            evals.add_row(label, f"{result['n']:,}", f"{result['n_tokens']:,}", fmt_num(result["loss"]),
                          fmt_num(result["perplexity"]))
        out.append(evals)
    elif rows:
        evals = new_table(f"evaluation on {payload.get('data') or '--data'}", "model", "n", "loss", "acc", "top5",
                          right=("n", "loss", "acc", "top5"))
        for label, result in rows:
            evals.add_row(label, f"{result['n']:,}", fmt_num(result["loss"]), fmt_num(result["acc"]),
                          fmt_num(result.get("top5")))
        out.append(evals)
    return out


def _epoch_label(row: Mapping[str, Any], per_epoch: int | None) -> str:
    """``start`` for the step-0 row; epochs counted from 1, an epoch cut short (``--max-steps``) with
    the steps it ran: ``2 (60 of 100 steps)``. History rows store the 0-based epoch they ended."""
    if row["step"] == 0:
        return "start"
    number = int(row["epoch"]) + 1
    ran = int(row["step"]) - int(row["epoch"]) * per_epoch if per_epoch else None
    if ran is not None and 0 < ran < per_epoch:
        return f"{number} ({ran:,} of {per_epoch:,} steps)"
    return str(number)


def finetune_table(payload: Mapping[str, Any]) -> list[RenderableType]:
    state = "complete" if payload.get("complete", True) else "interrupted (continue with --resume)"
    # Language models are validated by perplexity, classifiers by accuracy.
    lm = any("val_perplexity" in h for h in payload.get("history") or [])
    second, key = ("val ppl", "perplexity") if lm else ("val acc", "acc")
    history = new_table(f"fine-tuned {payload['steps']:,} steps, {payload['epochs']} epoch(s), {state}",
                        "epoch", "step", "lr", "train loss", "val loss", second,
                        right=("epoch", "step", "lr", "train loss", "val loss", second))
    for h in payload.get("history") or []:
        history.add_row(_epoch_label(h, payload.get("steps_per_epoch")), f"{h['step']:,}",
                        "—" if h.get("lr") is None else f"{h['lr']:.3g}", fmt_num(h["train_loss"]),
                        fmt_num(h.get("val_loss")), fmt_num(h.get(f"val_{key}")))
    files = new_table("files", "", "path", "val loss", second, right=("val loss", second))
    val = payload.get("val") or {}
    files.add_row("last", str(payload["out"]), fmt_num(val.get("loss")), fmt_num(val.get(key)))
    if payload.get("best"):
        best = payload.get("best_val") or {}
        when = "the start" if best.get("step") == 0 else f"step {best.get('step', '?'):,}"
        files.add_row(f"best ({when})", str(payload["best"]), fmt_num(best.get("loss")),
                      fmt_num(best.get(key)))
    return [history, files]


# --------------------------------------------------------------------------------------------------
# ablate


def harm_delta(value: Any, digits: int = 4, worse_if: str = "positive") -> Text:
    """A change coloured by harm: red when it makes the model worse (loss up, accuracy down)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return Text("—", style="dim")
    worse = value > 0 if worse_if == "positive" else value < 0
    better = value < 0 if worse_if == "positive" else value > 0
    return Text(f"{value:+.{digits}f}", style="red" if worse else "green" if better else "")


def ablate_rows(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """CSV rows: one per ranked block, with its proxies when they were computed."""
    proxies = {p["name"]: p for p in (payload.get("proxies") or {}).get("blocks", [])}
    rows = []
    for block in payload["blocks"]:
        row = dict(block)
        extra = proxies.get(block["name"])
        if extra:
            row.update({k: v for k, v in extra.items() if k != "name"})
        rows.append(row)
    return rows


def ablate_table(payload: Mapping[str, Any]) -> list[RenderableType]:
    """The ranking (with proxies when asked), then the removal curve, correlations, unrolling, pruning."""
    base = payload["baseline"]
    proxies = payload.get("proxies") or None
    by_name = {p["name"]: p for p in proxies["blocks"]} if proxies else {}
    proxy_columns = ["BI", "angular", "‖F‖/‖h‖", "cos", "taylor"] if proxies else []
    title = (f"{payload['model']} on {payload.get('data', '')} — {payload['n']:,} samples, baseline loss "
             f"{fmt_num(base['loss'])}, acc {fmt_num(base['acc'])}\nremoving one block at a time; rank 1 = most "
             f"harmful by {payload.get('by', 'loss')}")
    numeric = ("stage", "loss", "acc", "Δloss", "Δacc", "rank", *proxy_columns)
    table = new_table(title, "block", "stage", "kind", "loss", "acc", "Δloss", "Δacc", "rank", *proxy_columns,
                      right=numeric)

    def cells(b: Mapping[str, Any]) -> list:
        row = [b["name"], str(b["stage"]), Text(b["kind"], style="yellow" if b["kind"] == "transition" else ""),
               fmt_num(b["loss"]), fmt_num(b["acc"]), harm_delta(b["delta_loss"]),
               harm_delta(b["delta_acc"], worse_if="negative"), str(b["rank"])]
        if proxies:
            p = by_name.get(b["name"], {})
            row += [fmt_num(p.get("bi"), 4), fmt_num(p.get("angular"), 4), fmt_num(p.get("l2_ratio"), 3),
                    signed(p.get("cos")), fmt_num(p.get("taylor"), 4)]
        return row

    add_block_rows(table, payload["blocks"], cells)
    out: list[RenderableType] = [table]
    if payload.get("cumulative"):
        mode = payload.get("cumulative_mode") or "greedy"
        how = ("greedy: least harmful block removed, the rest re-ranked, repeated" if mode == "greedy"
               else "one-shot: blocks removed in the order of the single-removal ranking")
        curve = new_table(f"removal curve ({how})", "k", "removed", "loss", "acc", "Δloss", "Δacc",
                          right=("k", "loss", "acc", "Δloss", "Δacc"))
        for p in payload["cumulative"]:
            curve.add_row(str(p["k"]), p.get("block") or "(none: baseline)", fmt_num(p["loss"]), fmt_num(p["acc"]),
                          harm_delta(p.get("delta_loss")), harm_delta(p.get("delta_acc"), worse_if="negative"))
        out.append(curve)
    if proxies:
        source = proxies.get("source", "computed")
        corr = new_table(f"can cheap proxies replace the exact Δloss? rank correlation over the ranked blocks "
                         f"(cos, ‖F‖/‖h‖, taylor: {'recorded now' if source == 'computed' else source})",
                         "proxy", "spearman", "kendall τ-b", right=("spearman", "kendall τ-b"))
        labels = {"bi": "block influence 1 − cos(h, out)", "angular": "angular distance arccos(cos)/π",
                  "l2_ratio": "‖F‖/‖h‖", "cos": "cos(F, ∂ℓ/∂h)", "taylor": "first-order −⟨U, ∂ℓ/∂out⟩"}
        for name, values in proxies["correlation"].items():
            corr.add_row(labels.get(name, name), fmt_num(values.get("spearman"), 3), fmt_num(values.get("kendall"), 3))
        out.append(corr)
    unroll = payload.get("unroll")
    if unroll:
        u = new_table(f"unrolling {unroll['block']}: applied {1 + unroll['k']} times, extra applications damped by "
                      f"{unroll['scale']:g}", "samples", "n", "loss", "acc", "intact loss", "intact acc",
                      right=("n", "loss", "acc", "intact loss", "intact acc"))
        border, intact_border = unroll["borderline"], unroll.get("baseline_borderline") or {}
        u.add_row("all", f"{payload['n']:,}", fmt_num(unroll["all"]["loss"]), fmt_num(unroll["all"]["acc"]),
                  fmt_num(base["loss"]), fmt_num(base["acc"]))
        u.add_row("borderline (|margin| < 0.1)", f"{border['n']:,}", fmt_num(border.get("loss")),
                  fmt_num(border.get("acc")), fmt_num(intact_border.get("loss")), fmt_num(intact_border.get("acc")))
        out.append(u)
    pruned = payload.get("pruned")
    if pruned:
        saved = new_table(f"pruned model saved to {pruned['path']}", "removed", "loss", "acc", right=("loss", "acc"))
        saved.add_row(", ".join(pruned["removed"]), fmt_num(pruned["loss"]), fmt_num(pruned["acc"]))
        out.append(saved)
    return out


# --------------------------------------------------------------------------------------------------
# plot


def plot_table(payload: Mapping[str, Any]) -> RenderableType:
    table = new_table("figure written", "out", "kind", "panels")
    table.add_row(str(payload["out"]), str(payload["kind"]), ", ".join(payload["panels"]))
    return table


def lm_eval_table(payload: dict[str, Any]) -> Any:
    """A language model's eval: windows, tokens, loss (mean NLL per scored token), perplexity."""
    table = new_table(f"{payload['model']} on {payload.get('data', '')}", "windows", "tokens", "loss", "perplexity",
                      right=("windows", "tokens", "loss", "perplexity"))
    table.add_row(f"{payload['n']:,}", f"{payload['n_tokens']:,}", fmt_num(payload["loss"]),
                  fmt_num(payload["perplexity"]))
    return table


def lm_ablate_table(payload: Mapping[str, Any]) -> list[RenderableType]:
    """A language model's ablate: per unit the loss per token and perplexity removed (with proxies when
    asked), then the removal curve, the spans and the proxies' rank correlations."""
    base = payload["baseline"]
    proxies = payload.get("proxies") or None
    by_name = {p["name"]: p for p in proxies["blocks"]} if proxies else {}
    proxy_columns = ["BI", "angular", "angular last", "taylor", "cos"] if proxies else []
    title = (f"{payload['model']} on {payload.get('data', '')} — {payload['n']:,} windows, {base['n_tokens']:,} "
             f"tokens, baseline loss {fmt_num(base['loss'])}, perplexity {fmt_num(base['perplexity'])}\n"
             "removing one unit at a time; rank 1 = most harmful")
    numeric = ("loss", "ppl", "Δloss", "Δppl", "rank", *proxy_columns)
    table = new_table(title, "unit", "loss", "ppl", "Δloss", "Δppl", "rank", *proxy_columns, right=numeric)
    for b in payload["blocks"]:
        row = [b["name"], fmt_num(b["loss"]), fmt_num(b["perplexity"]), harm_delta(b["delta_loss"]),
               harm_delta(b["delta_perplexity"]), str(b["rank"])]
        if proxies:
            p = by_name.get(b["name"], {})
            row += [fmt_num(p.get(k), 4) for k in ("bi", "angular", "angular_last", "taylor")] + [signed(p.get("cos"))]
        table.add_row(*row)
    out: list[RenderableType] = [table]
    if payload.get("cumulative"):
        curve = new_table(f"removal curve ({payload.get('cumulative_mode')})", "k", "removed", "loss", "ppl", "Δloss",
                          right=("k", "loss", "ppl", "Δloss"))
        for p in payload["cumulative"]:
            curve.add_row(str(p["k"]), p.get("block") or "(none: baseline)", fmt_num(p["loss"]),
                          fmt_num(p["perplexity"]), harm_delta(p.get("delta_loss")))
        out.append(curve)
    if payload.get("spans"):
        spans = new_table("spans: every contiguous run removed", "start", "length", "first", "loss", "ppl", "Δloss",
                          right=("start", "length", "loss", "ppl", "Δloss"))
        for s in payload["spans"]:
            spans.add_row(str(s["start"]), str(s["length"]), s["removed"][0], fmt_num(s["loss"]),
                          fmt_num(s["perplexity"]), harm_delta(s.get("delta_loss")))
        out.append(spans)
    if proxies:
        corr = new_table("can cheap proxies replace the exact Δloss? rank correlation over the units", "proxy",
                         "spearman", "kendall τ-b", right=("spearman", "kendall τ-b"))
        for name, c in proxies["correlation"].items():
            corr.add_row(name, signed(c.get("spearman")), signed(c.get("kendall")))
        out.append(corr)
    if payload.get("pruned"):
        p = payload["pruned"]
        out.append(Text(f"pruned model written to {p['path']} ({', '.join(p['removed'])} removed): loss "
                        f"{fmt_num(p['loss'])}, perplexity {fmt_num(p['perplexity'])}"))
    return out
