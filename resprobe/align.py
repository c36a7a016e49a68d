"""Alignment statistics from a recording (docs/reference.md "Report aggregates"; paper §4.1).

Per block: how well the residual branch output F follows the negative loss gradient (``cos``
negative = descending the loss), how large it is against its input (``l2_ratio``), the same for the
actual update U = out − h, and the first-order estimate of the loss change from undoing the update:
``removal_estimate_mean`` = mean −⟨U, ∂ℓ/∂out⟩ (the sign of ``ablate``'s ``delta_loss``: positive
means removing the update would raise the loss). ``first_order_mean`` = mean ⟨U, ∂ℓ/∂out⟩ is the same
quantity with the opposite sign, kept for reports written before ``removal_estimate_mean`` existed.
Per stage: the same means pooled over every valid (sample, identity block) pair of the stage.
Nothing here touches a model: ``align RUN.h5`` recomputes nothing.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from resprobe.recording.recorder import TOKEN_STATS, Recorded

Z95 = 1.96


def _mean(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(values.astype(np.float64).mean()) if len(values) else None


def _ci95(values: np.ndarray) -> list[float | None]:
    """mean ± 1.96·sd/√n over the finite values (sample sd, ddof = 1); [m, m] for a single value."""
    values = values[np.isfinite(values)].astype(np.float64)
    if len(values) == 0:
        return [None, None]
    mean = float(values.mean())
    if len(values) == 1:
        return [mean, mean]
    half = Z95 * float(values.std(ddof=1)) / math.sqrt(len(values))
    return [mean - half, mean + half]


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num.astype(np.float64) / den.astype(np.float64)
    out[~(den > 0)] = np.nan
    return out


def block_columns(recorded: Recorded, j: int) -> dict[str, np.ndarray]:
    """Per-sample derived quantities of block ``j`` (all NaN where undefined)."""
    s = {name: values[:, j] for name, values in recorded.stats.items()}
    return {
        "cos": s["cos"].astype(np.float64),
        "update_cos": s["update_cos"].astype(np.float64),
        "l2_ratio": _ratio(s["branch_norm"], s["input_norm"]),
        "update_l2_ratio": _ratio(s["update_norm"], s["input_norm"]),
        "branch_norm": s["branch_norm"].astype(np.float64),
        "grad_norm": s["grad_norm"].astype(np.float64),
        "out_dot": s["out_dot"].astype(np.float64),
    }


def summarize_block(recorded: Recorded, j: int) -> dict[str, Any]:
    block = recorded.blocks[j]
    c = block_columns(recorded, j)
    identity = block["kind"] == "identity"
    row: dict[str, Any] = {"name": block["name"], "stage": block["stage"], "index": block["index"],
                           "kind": block["kind"]}
    if identity:
        invalid = ~np.isfinite(c["cos"]) | ~np.isfinite(c["update_cos"]) | ~np.isfinite(c["l2_ratio"])
        cos = c["cos"]
        valid_cos = cos[np.isfinite(cos)]
        row.update(
            cos_mean=_mean(cos),
            cos_ci95=_ci95(cos),
            frac_negative=float((valid_cos < 0).mean()) if len(valid_cos) else None,
            l2_ratio_mean=_mean(c["l2_ratio"]),
            update_cos_mean=_mean(c["update_cos"]),
            update_l2_ratio_mean=_mean(c["update_l2_ratio"]),
        )
    else:
        # Transition blocks: F and g differ in shape, so only norms are defined (docs/reference.md).
        invalid = np.zeros(recorded.n_samples, dtype=bool)
        row.update(cos_mean=None, cos_ci95=[None, None], frac_negative=None, l2_ratio_mean=None,
                   update_cos_mean=None, update_l2_ratio_mean=None)
    first_order = _mean(c["out_dot"]) if identity else None  # mean ⟨U, ∂ℓ/∂out⟩
    row.update(
        branch_norm_mean=_mean(c["branch_norm"]),
        grad_norm_mean=_mean(c["grad_norm"]),
        first_order_mean=first_order,
        removal_estimate_mean=-first_order if first_order is not None else None,
        n_valid=int((~invalid).sum()) if identity else 0,
        n_invalid=int(invalid.sum()),
    )
    for name in TOKEN_STATS:  # language models (DESIGN §8): mean of per-token cosines
        if name in recorded.stats:
            row[f"{name}_mean"] = _mean(recorded.stats[name][:, j].astype(np.float64))
    return row


def summarize_stages(recorded: Recorded) -> list[dict[str, Any]]:
    stages: dict[int, list[int]] = {}
    for j, block in enumerate(recorded.blocks):
        stages.setdefault(block["stage"], []).append(j)
    rows = []
    for stage, members in stages.items():
        identity = [j for j in members if recorded.blocks[j]["kind"] == "identity"]
        pooled = {key: np.concatenate([block_columns(recorded, j)[key] for j in identity]) if identity
                  else np.zeros(0) for key in ("cos", "l2_ratio", "update_cos", "update_l2_ratio")}
        rows.append({"stage": stage, "n_blocks": len(members), "n_identity": len(identity),
                     "cos_mean": _mean(pooled["cos"]), "l2_ratio_mean": _mean(pooled["l2_ratio"]),
                     "update_cos_mean": _mean(pooled["update_cos"]),
                     "update_l2_ratio_mean": _mean(pooled["update_l2_ratio"])})
    return rows


def is_lm_recording(recorded: Recorded) -> bool:
    return "token_cos" in recorded.stats


def _lm_losses(recorded: Recorded) -> dict[str, Any]:
    """Language models: mean NLL per scored token (each window's count is in ``label``), perplexity,
    n_tokens and the protocol, in place of the vision loss and accuracy (DESIGN §8 "Loss")."""
    losses = recorded.loss.astype(np.float64)
    ok = np.isfinite(losses)
    n = int(recorded.label[ok].sum())
    loss = float(losses[ok].sum() / n) if n else None
    ppl = (math.exp(loss) if loss < 700 else math.inf) if loss is not None else None
    return {"loss": loss, "perplexity": ppl, "n_tokens": n, "acc": None,
            "protocol": recorded.attrs.get("protocol") or None}


def summarize(recorded: Recorded) -> dict[str, Any]:
    """The ``align`` report's statistics (without provenance fields)."""
    blocks = [summarize_block(recorded, j) for j in range(len(recorded.blocks))]
    report = {
        "n_samples": recorded.n_samples,
        "n_invalid": sum(b["n_invalid"] for b in blocks),
        "complete": bool(recorded.complete),
        "loss": _mean(recorded.loss.astype(np.float64)),
        # Label -1: a custom loss's targets are not classes (rp.align(loss=...)), accuracy is undefined.
        "acc": float((recorded.pred == recorded.label).mean())
        if recorded.n_samples and (recorded.label >= 0).all() else None,
        "blocks": blocks,
        "stages": summarize_stages(recorded),
    }
    if is_lm_recording(recorded):
        report.update(_lm_losses(recorded))
    return report


def align_report(recorded: Recorded, readout: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The full ``align`` JSON: provenance, per-block and per-stage figures, readout when recorded."""
    attrs = recorded.attrs
    if not recorded.complete:
        warnings.warn(f"the recording is incomplete: {recorded.n_samples} of {recorded.n_planned} samples; "
                      "finish it with `resprobe record --resume`", stacklevel=2)
    summary = summarize(recorded)
    report = {
        "model": attrs.get("model"),
        "checkpoint": attrs.get("checkpoint") or None,
        "checkpoint_sha256": attrs.get("checkpoint_sha256") or None,  # stored by record, as every report has it
        "preprocessing": attrs.get("preprocessing") or None,
        "data": attrs.get("data"),
        **summary,
    }
    if readout is not None:
        report["readout"] = readout
    elif recorded.readout:
        from resprobe.readout import summarize_readout

        report["readout"] = summarize_readout(recorded)
    return report
