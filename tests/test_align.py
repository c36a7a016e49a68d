"""The align report's aggregates against a hand computation on a constructed recording."""

from __future__ import annotations

import math

import numpy as np
import pytest

from resprobe.align import summarize
from resprobe.recorder import STAT_NAMES, Recorded


def make_recorded() -> Recorded:
    rng = np.random.default_rng(0)
    n, blocks = 6, [
        {"name": "a.0", "stage": 0, "index": 0, "kind": "identity"},
        {"name": "a.1", "stage": 0, "index": 1, "kind": "identity"},
        {"name": "b.0", "stage": 1, "index": 0, "kind": "transition"},
        {"name": "b.1", "stage": 1, "index": 1, "kind": "identity"},
    ]
    stats = {s: rng.normal(size=(n, 4)).astype(np.float32) for s in STAT_NAMES}
    for s in ("input_norm", "branch_norm", "update_norm", "grad_norm"):
        stats[s] = np.abs(stats[s]) + 0.1
    stats["cos"] = np.clip(stats["cos"], -1, 1)
    stats["update_cos"] = np.clip(stats["update_cos"], -1, 1)
    stats["cos"][2, 1] = np.nan  # a zero norm somewhere: invalid sample
    for s in ("cos", "update_cos", "dot", "update_dot", "out_dot", "update_norm"):
        stats[s][:, 2] = np.nan  # transitions get norms only
    return Recorded([b["name"] for b in blocks], blocks, np.arange(n), np.zeros(n, int), np.zeros(n, int),
                    np.ones(n, np.float32), stats)


def test_block_aggregates_by_hand():
    rec = make_recorded()
    report = summarize(rec)
    b = report["blocks"][1]
    cos = rec.stats["cos"][:, 1].astype(np.float64)
    valid = cos[np.isfinite(cos)]
    assert b["cos_mean"] == pytest.approx(valid.mean())
    half = 1.96 * valid.std(ddof=1) / math.sqrt(len(valid))
    assert b["cos_ci95"] == pytest.approx([valid.mean() - half, valid.mean() + half])
    assert b["frac_negative"] == pytest.approx((valid < 0).mean())
    ratio = rec.stats["branch_norm"][:, 1].astype(np.float64) / rec.stats["input_norm"][:, 1]
    assert b["l2_ratio_mean"] == pytest.approx(ratio.mean())
    uratio = rec.stats["update_norm"][:, 1].astype(np.float64) / rec.stats["input_norm"][:, 1]
    assert b["update_l2_ratio_mean"] == pytest.approx(uratio.mean())
    assert b["first_order_mean"] == pytest.approx(rec.stats["out_dot"][:, 1].astype(np.float64).mean())
    assert b["n_invalid"] == 1 and report["n_invalid"] == 1
    t = report["blocks"][2]
    assert t["cos_mean"] is None and t["l2_ratio_mean"] is None and t["first_order_mean"] is None
    assert t["grad_norm_mean"] == pytest.approx(rec.stats["grad_norm"][:, 2].astype(np.float64).mean())


def test_stage_pooling_by_hand():
    rec = make_recorded()
    stage0 = summarize(rec)["stages"][0]
    pooled = np.concatenate([rec.stats["cos"][:, 0], rec.stats["cos"][:, 1]]).astype(np.float64)
    assert stage0["cos_mean"] == pytest.approx(pooled[np.isfinite(pooled)].mean())
    assert stage0["n_blocks"] == 2 and stage0["n_identity"] == 2
    stage1 = summarize(rec)["stages"][1]
    assert stage1["n_blocks"] == 2 and stage1["n_identity"] == 1
    assert stage1["update_cos_mean"] == pytest.approx(rec.stats["update_cos"][:, 3].astype(np.float64).mean())
