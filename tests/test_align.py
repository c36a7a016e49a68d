"""The align report's aggregates against a hand computation on a constructed recording."""

from __future__ import annotations

import math

import numpy as np
import pytest

from resprobe.align import summarize
from resprobe.recording.recorder import STAT_NAMES, Recorded


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


@pytest.mark.slow
def test_removal_estimate_matches_a_finite_difference_on_the_fixture(one_thread):
    """``removal_estimate_mean`` against (ℓ(out − εU) − ℓ)/ε per sample, averaged: the model re-run in
    float64 with the block's output moved by a forward hook (everything after it recomputed), with
    U = out − h read from the unmodified forward. Same sign and value as ``delta_loss`` reads, and
    ``ablate``'s ``taylor`` proxy is the same number."""
    import copy

    import torch
    import torch.nn.functional as F

    from conftest import DATA, MODEL
    from resprobe.ablate_proxies import alignment_summary, proxy_table
    from resprobe.probe import open_probe
    probe = open_probe(MODEL, device="cpu")
    loader = probe.loader(probe.data(DATA, limit=32), batch_size=32)
    rows = alignment_summary(probe, loader)  # what align reports, recorded with labels as targets
    chosen = ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]

    model = copy.deepcopy(probe.model).double().eval()
    modules = dict(model.named_modules())
    eps = 1e-5
    for name in chosen:
        row = rows[name]
        assert row["removal_estimate_mean"] == -row["first_order_mean"]
        block, per_sample = modules[name], []
        for x, y, _ in loader:
            x = x.double()
            seen = {}
            handle = block.register_forward_hook(lambda m, args, out: seen.update(h=args[0], out=out))
            with torch.no_grad():
                base = F.cross_entropy(model(x), y, reduction="none")
            handle.remove()
            update = seen["out"] - seen["h"]
            handle = block.register_forward_hook(lambda m, args, out: out - eps * update)
            with torch.no_grad():
                moved = F.cross_entropy(model(x), y, reduction="none")
            handle.remove()
            per_sample.append((moved - base) / eps)
        finite_difference = torch.cat(per_sample).mean().item()
        assert abs(finite_difference) > 1e-4  # a real signal, so the sign check means something
        assert math.copysign(1, row["removal_estimate_mean"]) == math.copysign(1, finite_difference)
        assert row["removal_estimate_mean"] == pytest.approx(finite_difference, rel=1e-3), name


    blocks = [probe.anatomy[name] for name in chosen]
    proxies = proxy_table(range(len(chosen)), blocks, {}, rows, [0.1, 0.2, 0.3, 0.4], "computed")
    for name, proxy in zip(chosen, proxies.blocks):
        assert proxy.name == name
        assert proxy.taylor == pytest.approx(rows[name]["removal_estimate_mean"], rel=1e-6)
