"""ablate: the cached engine against naive full re-evaluation, lesions, curves, proxies, unrolling,
pruned checkpoints and the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import tinymodels
from conftest import FIXTURES
from resprobe.ablate_engine import (
    AblationEngine,
    Batches,
    borderline_mask,
    evaluate_pass,
    lesion_variant,
    unrolled,
)
from resprobe.ablate_proxies import InputOutputAngles, kendall_tau_b, rankdata, spearman
from resprobe.ablate_curves import greedy_curve, harm, one_shot_curve, rank_removals, removal_order
from resprobe.ablate_prune import prune_model, save_pruned
from resprobe.models.blocks import Anatomy, discover_blocks, replaced_blocks
from resprobe.evaluate import EvalResult, Tally
from resprobe.runtime import make_runtime

CPU = make_runtime("cpu")
FAMILIES = ["timm_basic", "timm_seresnext", "timm_resnetv2", "torchvision_tiny", "torchvision_bottleneck"]
FIXTURE_MODEL = str(FIXTURES / "tiny_resnet.pt")
FIXTURE_DATA = str(FIXTURES / "shapes_test.npz")


def tiny(family: str, fc_std: float = 1.0) -> nn.Module:
    model = getattr(tinymodels, family)()
    # timm's ResNetV2 initializes its classifier with std 0.01: logits ≈ 0 would make every removal
    # look harmless and the comparisons meaningless, so give every model a classifier of real size.
    fc = model.get_submodule("head.fc" if family == "timm_resnetv2" else "fc")
    with torch.no_grad():
        fc.weight.normal_(0, fc_std, generator=torch.Generator().manual_seed(7))
    return model


def batches(n: int = 20, size: int = 32, classes: int = 5, split: int = 12, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[:split], y[:split]), (x[split:], y[split:])]


def naive(model: nn.Module, data: list, blocks=(), fns=None) -> EvalResult:
    """The reference: the model's own full forward with the blocks patched (an independent path)."""
    tally = Tally()
    with torch.no_grad(), replaced_blocks(list(blocks), fns):
        for x, y in data:
            tally.add(model(x), y)
    return tally.result()


def close(a: EvalResult, b: EvalResult, tol: float = 1e-5) -> bool:
    return abs(a.loss - b.loss) <= tol and abs(a.acc - b.acc) <= tol


# --------------------------------------------------------------------------------------------------
# The engine


@pytest.mark.parametrize("threads", [2, 1], ids=["suffixes-in-threads", "sequential"])
@pytest.mark.parametrize("family", FAMILIES)
def test_engine_equals_naive_reevaluation(family, threads, monkeypatch):
    model = tiny(family)
    anatomy = discover_blocks(model, (3, 32, 32))
    data = batches()
    engine = AblationEngine(model, anatomy, CPU, data)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # what _suffix_workers reads
    assert engine.fast and engine._suffix_workers(10) == threads
    positions = list(range(len(anatomy.blocks)))  # identity and transition blocks
    # The references first: the threaded pass leaves torch at the patched thread count (2), and full
    # forwards on two threads of a busy machine are several times slower than on one.
    base_reference = naive(model, data)
    references = [naive(model, data, [anatomy.blocks[p]]) for p in positions]
    result = evaluate_pass(engine, [lesion_variant(anatomy, [p]) for p in positions])
    assert close(result.base, base_reference)
    for p, r, reference in zip(positions, result.variants, references):
        assert close(r, reference), (anatomy.blocks[p].name, r, reference)
    assert max(abs(r.loss - result.base.loss) for r in result.variants) > 1e-3  # removals matter


# Transition lesions written by hand per family: residual branch gone, shortcut (and post) kept.
HAND_LESIONS = {
    "timm_basic": lambda b, h: b.act2(b.downsample(h)),
    "timm_seresnext": lambda b, h: b.act3(b.downsample(h)),
    "timm_resnetv2": lambda b, h: b.downsample(b.norm1(h)),
    "torchvision_tiny": lambda b, h: torch.relu(b.downsample(h)),
    "torchvision_bottleneck": lambda b, h: torch.relu(b.downsample(h)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_transition_lesions_match_hand_written(family):
    model = tiny(family)
    anatomy = discover_blocks(model, (3, 32, 32))
    data = batches(n=12, split=6)
    engine = AblationEngine(model, anatomy, CPU, data)
    transitions = [i for i, b in enumerate(anatomy.blocks) if not b.is_identity]
    assert transitions
    result = evaluate_pass(engine, [lesion_variant(anatomy, [p]) for p in transitions])
    for p, r in zip(transitions, result.variants):
        block = anatomy.blocks[p]
        hand = HAND_LESIONS[family]
        assert close(r, naive(model, data, [block], [lambda h, m=block.module: hand(m, h)]))


def test_full_forward_fallback_equals_cached_engine():
    model = tiny("timm_basic")
    anatomy = discover_blocks(model, (3, 32, 32))
    data = batches()
    variants = [lesion_variant(anatomy, [p]) for p in range(len(anatomy.blocks))]
    fast = evaluate_pass(AblationEngine(model, anatomy, CPU, data), variants)
    slow_engine = AblationEngine(model, anatomy, CPU, data, fast=False)
    assert not slow_engine.fast
    slow = evaluate_pass(slow_engine, variants)
    for a, b in zip(fast.variants, slow.variants):
        assert close(a, b)


def test_custom_model_without_head_uses_full_forward():
    model = tinymodels.custom_net()
    anatomy = discover_blocks(model, (3, 16, 16), ["body.*"])
    assert not anatomy.can_run_suffix
    data = batches(size=16)
    engine = AblationEngine(model, anatomy, CPU, data)
    assert not engine.fast
    result = evaluate_pass(engine, [lesion_variant(anatomy, [p]) for p in range(3)])
    for p, r in enumerate(result.variants):
        assert close(r, naive(model, data, [anatomy.blocks[p]]))


class Overwriting(nn.Module):
    """A block that destroys its input after use: the cache must not keep a reference to it."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        out = x + torch.tanh(self.conv(x))
        x.mul_(0.0)
        return out


class OverwritingNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(Overwriting(8), Overwriting(8), Overwriting(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.body(self.stem(x)).mean((2, 3)))


def test_inputs_written_in_place_are_copied():
    model = OverwritingNet().eval()
    found = discover_blocks(model, (3, 16, 16), ["body.*"])
    anatomy = Anatomy(model, found.blocks, head=lambda h: model.fc(h.mean((2, 3))), chained=True)
    data = batches(size=16)
    engine = AblationEngine(model, anatomy, CPU, data)
    result = evaluate_pass(engine, [lesion_variant(anatomy, [p]) for p in range(3)])
    assert engine.clone_inputs
    for p, r in enumerate(result.variants):
        assert close(r, naive(model, data, [anatomy.blocks[p]]))


def test_batches_are_read_once_when_small():
    reads = []

    class Loader:
        def __iter__(self):
            reads.append(1)
            return iter([(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), torch.arange(2))])

    cached = Batches(Loader(), CPU)
    for _ in range(3):
        assert len(list(cached)) == 1
    assert len(reads) == 1 and cached.cached
    uncached = Batches(Loader(), CPU, cache_bytes=8)  # smaller than one batch
    for _ in range(2):
        list(uncached)
    assert len(reads) == 3 and not uncached.cached


# --------------------------------------------------------------------------------------------------
# Ranking and curves


class Shift(nn.Module):
    """Adds a constant to the logits: the loss depends only on the sum of the kept shifts."""

    def __init__(self, d: float):
        super().__init__()
        self.register_buffer("c", torch.tensor([0.0, d]))

    def forward(self, h):
        return h + self.c


class ShiftNet(nn.Module):
    def __init__(self, shifts):
        super().__init__()
        self.body = nn.Sequential(*[Shift(d) for d in shifts])

    def forward(self, x):
        return self.body(x.flatten(1)[:, :2] * 0)


def ce0(d: float) -> float:
    """Cross-entropy of logits [0, d] against class 0."""
    return math.log1p(math.exp(d))


@pytest.mark.parametrize("fast", [True, False])
def test_greedy_and_one_shot_on_a_hand_checkable_model(fast):
    # Shifts of the wrong-class logit: A = −2 helps, B = +1 hurts, C = −0.5 helps; baseline d = −1.5.
    model = ShiftNet([-2.0, 1.0, -0.5]).eval()
    found = discover_blocks(model, (3, 2, 2), ["body.*"])
    anatomy = Anatomy(model, found.blocks, head=(lambda h: h) if fast else None, chained=True)
    data = [(torch.zeros(4, 3, 2, 2), torch.zeros(4, dtype=torch.long))]
    engine = AblationEngine(model, anatomy, CPU, data)
    assert engine.fast is fast
    candidates = [0, 1, 2]
    first = evaluate_pass(engine, [lesion_variant(anatomy, [p]) for p in candidates])
    assert first.base.loss == pytest.approx(ce0(-1.5)) and first.base.acc == 1.0
    assert [r.loss for r in first.variants] == pytest.approx([ce0(0.5), ce0(-2.5), ce0(-1.0)])
    ranking = rank_removals(anatomy.blocks, first.variants, first.base, "loss")
    assert [r.rank for r in ranking] == [1, 3, 2]  # A most harmful, B least (removing it helps)
    assert ranking[0].delta_acc == -1.0 and ranking[1].delta_loss < 0
    greedy = greedy_curve(engine, candidates, 3, "loss", first.base, first.variants)
    assert [p.k for p in greedy] == [0, 1, 2, 3]
    assert [p.block for p in greedy] == [None, "body.1", "body.2", "body.0"]
    assert greedy[2].removed == ["body.1", "body.2"]
    assert [p.loss for p in greedy] == pytest.approx([ce0(-1.5), ce0(-2.5), ce0(-2.0), ce0(0.0)])
    order = removal_order([harm(r, "loss") for r in first.variants])
    assert order == [1, 2, 0]
    one_shot = one_shot_curve(engine, order, 3, first.base, first.variants[1])
    assert [p.loss for p in one_shot] == pytest.approx([p.loss for p in greedy])


def test_rank_ties_in_block_order_and_by_acc():
    base = EvalResult(4, 1.0, 0.5, None)
    results = [EvalResult(4, 2.0, 0.25, None), EvalResult(4, 1.5, 0.25, None), EvalResult(4, 1.2, 0.5, None)]
    blocks = discover_blocks(tiny("torchvision_tiny"), (3, 32, 32)).blocks[:3]
    by_acc = rank_removals(blocks, results, base, "acc")
    assert [r.rank for r in by_acc] == [1, 2, 3]  # the first two tie on acc: block order
    assert removal_order([harm(r, "acc") for r in results]) == [2, 1, 0]
    by_loss = rank_removals(blocks, results, base, "loss")
    assert [r.rank for r in by_loss] == [1, 2, 3] and by_loss[0].delta_loss == 1.0


def test_greedy_equals_naive_greedy():
    model = tiny("timm_basic")
    anatomy = discover_blocks(model, (3, 32, 32))
    data = batches()
    engine = AblationEngine(model, anatomy, CPU, data)
    candidates = list(range(len(anatomy.blocks)))  # with transitions: shapes stay consistent via shortcuts
    first = evaluate_pass(engine, [lesion_variant(anatomy, [p]) for p in candidates])
    curve = greedy_curve(engine, candidates, 3, "loss", first.base, first.variants)
    removed: list[int] = []
    for point in curve[1:]:
        remaining = [p for p in candidates if p not in removed]
        losses = [naive(model, data, [anatomy.blocks[i] for i in [*removed, p]]).loss for p in remaining]
        best = min(range(len(remaining)), key=lambda i: (losses[i], -remaining[i]))
        removed.append(remaining[best])
        assert point.removed == [anatomy.blocks[i].name for i in removed]
        assert point.loss == pytest.approx(losses[best], abs=1e-5)


# --------------------------------------------------------------------------------------------------
# Proxies


def test_block_influence_and_angular_distance_by_hand():
    model = tiny("torchvision_tiny")
    anatomy = discover_blocks(model, (3, 32, 32))
    data = batches()
    identity = [i for i, b in enumerate(anatomy.blocks) if b.is_identity]
    observer = InputOutputAngles(identity)
    result = evaluate_pass(AblationEngine(model, anatomy, CPU, data), [], observer=observer)
    for p in identity:
        bi, angular = InputOutputAngles.means(result.observed[p])
        ins, outs = [], []
        module = anatomy.blocks[p].module

        def keep(_m, args, out):  # returns None: a forward hook's return value would replace the output
            ins.append(args[0].clone())
            outs.append(out.clone())

        handle = module.register_forward_hook(keep)
        with torch.no_grad():
            for x, _ in data:
                model(x)
        handle.remove()
        h, out = torch.cat(ins).flatten(1).double(), torch.cat(outs).flatten(1).double()
        cos = (h * out).sum(1) / (h.norm(dim=1) * out.norm(dim=1))
        assert bi == pytest.approx(float((1 - cos).mean()), abs=1e-6)
        assert angular == pytest.approx(float((torch.arccos(cos) / math.pi).mean()), abs=1e-5)


def test_rank_correlations_match_scipy():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(3, 15))
        x = rng.integers(0, 5, n).astype(float) if trial % 2 else rng.normal(size=n)  # ties every other trial
        y = rng.integers(0, 4, n).astype(float) if trial % 3 == 0 else rng.normal(size=n)
        assert np.allclose(rankdata(x), stats.rankdata(x))
        rho, tau = spearman(x, y), kendall_tau_b(x, y)
        expected_rho, expected_tau = stats.spearmanr(x, y)[0], stats.kendalltau(x, y)[0]
        for got, expected in ((rho, expected_rho), (tau, expected_tau)):
            if math.isnan(expected):
                assert got is None
            else:
                assert got == pytest.approx(expected, abs=1e-12)
    # Missing values are left out pairwise; fewer than two pairs or a constant side gives None.
    assert spearman([1.0, None, 3.0, 2.0], [1.0, 5.0, 3.0, 2.0]) == pytest.approx(1.0)
    assert kendall_tau_b([1.0, None], [1.0, 2.0]) is None
    assert spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None


# --------------------------------------------------------------------------------------------------
# Unrolling


def test_unroll_matches_a_hand_loop():
    model = tiny("torchvision_tiny", fc_std=0.03)  # a small classifier: 17 of 20 samples borderline
    anatomy = discover_blocks(model, (3, 32, 32))
    data = batches()
    p = anatomy.position("layer1.1")
    block = anatomy.blocks[p]
    result = evaluate_pass(AblationEngine(model, anatomy, CPU, data), [{p: unrolled(block, 2, 0.5)}])

    def by_hand(h):
        own = type(block.module).forward
        out = own(block.module, h)
        for _ in range(2):
            out = out + 0.5 * (own(block.module, out) - out)
        return out

    assert close(result.variants[0], naive(model, data, [block], [by_hand]))
    border_tally, n_border = Tally(), 0
    with torch.no_grad():
        for x, y in data:
            probs = torch.softmax(model(x), 1)
            others = probs.clone()
            others[torch.arange(len(y)), y] = -1
            margin = probs[torch.arange(len(y)), y] - others.max(1).values
            mask = (margin > -0.1) & (margin < 0.1)
            assert torch.equal(mask, borderline_mask(model(x), y))
            with replaced_blocks([block], [by_hand]):
                logits = model(x)
            if mask.any():
                border_tally.add(logits[mask], y[mask])
            n_border += int(mask.sum())
    assert result.borderline[0].n == n_border == 17
    assert result.borderline[0].loss == pytest.approx(border_tally.result().loss, abs=1e-5)


# --------------------------------------------------------------------------------------------------
# Pruned models


def test_pruned_model_keeps_other_blocks_and_their_stage_and_index():
    model = tiny("torchvision_tiny")
    before = discover_blocks(model, (3, 32, 32))
    data = batches()
    expected = naive(model, data, [before["layer1.0"], before["layer2.0"]])
    prune_model(model, ["layer1.0", "layer2.0"])  # an identity block, and the only block of stage 1
    after = discover_blocks(model, (3, 32, 32))
    assert [(b.name, b.stage, b.index) for b in after.blocks] == [
        (b.name, b.stage, b.index) for b in before.blocks if b.name not in ("layer1.0", "layer2.0")]
    assert close(naive(model, data), expected, tol=1e-6)
    assert "layer2.0.downsample.0.weight" in model.state_dict()  # the kept shortcut's weights


def test_run_ablation_remove_beyond_one_shot_curve(tmp_path):
    from resprobe.ablate import AblateOptions, run_ablation
    from resprobe.evaluate import evaluate
    from resprobe.models.loading import load_model
    from resprobe.probe import open_probe

    probe = open_probe(FIXTURE_MODEL, device="cpu")
    source = probe.data(FIXTURE_DATA, limit=24)
    loader = probe.loader(source, batch_size=10)
    path = tmp_path / "p.pt"
    report = run_ablation(probe, loader, AblateOptions(by="acc", one_shot=1, save_pruned=path, remove=3))
    assert report.by == "acc" and [p.k for p in report.cumulative] == [0, 1]
    order = sorted(report.blocks, key=lambda b: -b.rank)[:3]  # least harmful first: the highest ranks
    assert report.pruned.removed == [b.name for b in order]
    data = [(x, y) for x, y, _ in loader]
    reference = naive(probe.model, data, [probe.anatomy[b.name] for b in order])
    assert report.pruned.loss == pytest.approx(reference.loss, abs=1e-6) and report.pruned.acc == reference.acc
    loaded = load_model(str(path))
    assert loaded.recipes[-1] == {"kind": "prune", "removed": report.pruned.removed}
    assert loaded.preprocessing == probe.preprocessing.to_dict()
    again = evaluate(loaded.model, loader, CPU)
    assert again.loss == pytest.approx(report.pruned.loss, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# The command line


def ablate_json(run, *args: str) -> dict:
    return json.loads(run("ablate", *args, "--device", "cpu", "-f", "json").stdout)


def test_cli_ablate_report_and_pruned_round_trip(run, tmp_path):
    pruned = tmp_path / "pruned.pt"
    payload = ablate_json(run, FIXTURE_MODEL, "--data", FIXTURE_DATA, "--limit", "32", "--cumulative", "2",
                          "--save-pruned", str(pruned), "--remove", "2")
    assert payload["n"] == 32 and payload["engine"] == "cached" and payload["cumulative_mode"] == "greedy"
    assert [b["name"] for b in payload["blocks"]] == ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2",
                                                      "layer3.1", "layer4.1"]
    assert sorted(b["rank"] for b in payload["blocks"]) == list(range(1, 8))
    for b in payload["blocks"]:
        assert set(b) >= {"name", "stage", "kind", "loss", "acc", "delta_loss", "delta_acc", "rank"}
        assert b["delta_loss"] == pytest.approx(b["loss"] - payload["baseline"]["loss"])
    curve = payload["cumulative"]
    assert [p["k"] for p in curve] == [0, 1, 2] and curve[0]["removed"] == []
    assert payload["pruned"]["removed"] == curve[2]["removed"]
    assert payload["proxies"] is None and payload["unroll"] is None

    evaluated = json.loads(run("eval", str(pruned), "--data", FIXTURE_DATA, "--limit", "32", "--device", "cpu",
                               "-f", "json").stdout)
    assert evaluated["loss"] == pytest.approx(curve[2]["loss"], abs=1e-6)
    assert evaluated["acc"] == pytest.approx(curve[2]["acc"], abs=1e-9)
    listed = json.loads(run("blocks", str(pruned), "-f", "json").stdout)["blocks"]
    assert [b["name"] for b in listed if b["name"] in curve[2]["removed"]] == []
    assert len(listed) == 8
    twice = tmp_path / "twice.pt"  # a pruned model is ablated and pruned again like any other
    again = ablate_json(run, str(pruned), "--data", FIXTURE_DATA, "--limit", "32", "--save-pruned", str(twice),
                        "--remove", "1")
    assert again["baseline"]["loss"] == pytest.approx(curve[2]["loss"], abs=1e-6)
    assert again["engine"] == "cached" and len(again["blocks"]) == 5
    evaluated = json.loads(run("eval", str(twice), "--data", FIXTURE_DATA, "--limit", "32", "--device", "cpu",
                               "-f", "json").stdout)
    assert evaluated["loss"] == pytest.approx(again["pruned"]["loss"], abs=1e-6)


def test_cli_remove_blocks_with_a_transition(run, tmp_path):
    pruned = tmp_path / "t.pt"
    payload = ablate_json(run, FIXTURE_MODEL, "--data", FIXTURE_DATA, "--limit", "24", "--include-transitions",
                          "--save-pruned", str(pruned), "--remove-blocks", "layer3.0,layer1.1", "--one-shot", "3")
    assert len(payload["blocks"]) == 10 and payload["cumulative_mode"] == "one-shot"
    assert len(payload["cumulative"]) == 4
    evaluated = json.loads(run("eval", str(pruned), "--data", FIXTURE_DATA, "--limit", "24", "--device", "cpu",
                               "-f", "json").stdout)
    assert evaluated["loss"] == pytest.approx(payload["pruned"]["loss"], abs=1e-6)
    # A removed transition runs between the remaining blocks (discovery finds it as the module between
    # them), so the pruned model is still ablated from cached inputs.
    again = ablate_json(run, str(pruned), "--data", FIXTURE_DATA, "--limit", "24")
    assert again["engine"] == "cached" and again["baseline"]["loss"] == pytest.approx(evaluated["loss"], abs=1e-6)



def test_cli_proxies_computed_equal_recorded(run, tmp_path):
    args = [FIXTURE_MODEL, "--data", FIXTURE_DATA, "--limit", "24"]
    computed = ablate_json(run, *args, "--proxies", "--unroll", "layer3.1:2:0.5")
    recording = tmp_path / "run.h5"
    run("record", *args, "--out", str(recording), "--device", "cpu", "--quiet")
    recorded = ablate_json(run, *args, "--recording", str(recording))
    assert computed["proxies"]["source"] == "computed" and recorded["proxies"]["source"] == str(recording)
    for a, b in zip(computed["proxies"]["blocks"], recorded["proxies"]["blocks"]):
        assert a["name"] == b["name"]
        for key in ("bi", "angular", "l2_ratio", "cos", "taylor"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7)
    assert set(computed["proxies"]["correlation"]) == {"bi", "angular", "l2_ratio", "cos", "taylor"}
    other = run("ablate", "tinymodels:timm_basic", "--input-size", "32", "--data", FIXTURE_DATA, "--limit", "8",
                "--recording", str(recording), "--device", "cpu", code=1)  # recorded on other blocks
    assert "other blocks" in other.stderr and len(other.stderr.strip().splitlines()) == 1
    deltas = [b["delta_loss"] for b in computed["blocks"]]
    taylor = [p["taylor"] for p in computed["proxies"]["blocks"]]
    assert computed["proxies"]["correlation"]["taylor"]["spearman"] == pytest.approx(stats.spearmanr(taylor, deltas)[0])
    unroll = computed["unroll"]
    assert unroll["block"] == "layer3.1" and unroll["k"] == 2 and unroll["scale"] == 0.5
    assert set(unroll["all"]) == {"loss", "acc"} and set(unroll["borderline"]) == {"n", "loss", "acc"}
    table = run("ablate", *args, "--proxies", "--one-shot", "2", "--device", "cpu").stdout
    assert "layer4.1" in table and "spearman" in table and "removal curve" in table
    csv_text = run("ablate", *args, "--proxies", "--device", "cpu", "-f", "csv").stdout
    header, *rows = csv_text.strip().splitlines()
    assert len(rows) == 7 and "delta_loss" in header and "taylor" in header


def test_save_pruned_never_replaces_a_file_without_overwrite(run, tmp_path):
    """--save-pruned naming the MODEL itself (or any existing file) is refused, the file untouched;
    with --overwrite the model file is replaced, atomically, by the pruned model."""
    import shutil

    model = tmp_path / "model.pt"
    shutil.copyfile(FIXTURE_MODEL, model)
    before = model.read_bytes()
    args = ("ablate", str(model), "--data", FIXTURE_DATA, "--limit", "16", "--device", "cpu", "--save-pruned",
            str(model), "--remove", "1")
    refused = run(*args, code=1)
    assert refused.stderr == f"error: --save-pruned {model} already exists; pass --overwrite to replace it\n"
    assert refused.stdout == "" and model.read_bytes() == before
    payload = json.loads(run(*args, "--overwrite", "-f", "json").stdout)
    assert payload["pruned"]["path"] == str(model) and len(payload["pruned"]["removed"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left
    evaluated = json.loads(run("eval", str(model), "--data", FIXTURE_DATA, "--limit", "16", "--device", "cpu",
                               "-f", "json").stdout)  # the file now holds the pruned model
    assert evaluated["loss"] == pytest.approx(payload["pruned"]["loss"], abs=1e-6)
    assert evaluated["acc"] == payload["pruned"]["acc"]
    alone = run("ablate", FIXTURE_MODEL, "--data", FIXTURE_DATA, "--limit", "8", "--device", "cpu", "--overwrite",
                code=1)
    assert alone.stderr == "error: --overwrite replaces an existing --save-pruned PATH: add --save-pruned\n"


def test_save_pruned_refuses_a_file_that_appeared_during_the_run(tmp_path):
    """The check before the model loads is repeated at the write: a file created meanwhile (another run)
    is not replaced without --overwrite (a hard link, not a rename, installs the new file)."""
    from resprobe.errors import BadValue
    from resprobe.probe import open_probe

    probe = open_probe(FIXTURE_MODEL, device="cpu")
    path = tmp_path / "p.pt"
    path.write_bytes(b"someone else's file")
    with pytest.raises(BadValue, match="already exists; pass --overwrite"):
        save_pruned(probe, ["layer1.1"], path)
    assert path.read_bytes() == b"someone else's file" and sorted(tmp_path.iterdir()) == [path]
    save_pruned(probe, ["layer1.1"], path, overwrite=True)
    assert torch.load(path, weights_only=True)["recipes"][-1] == {"kind": "prune", "removed": ["layer1.1"]}


@pytest.mark.parametrize("args", [
    ["--cumulative", "0"],
    ["--cumulative", "2", "--one-shot", "2"],
    ["--cumulative", "99"],
    ["--by", "speed"],
    ["--unroll", "nosuch:2"],
    ["--unroll", "layer2.0:1"],  # a transition
    ["--unroll", "layer1.1:x"],
    ["--unroll", "layer1.1:2:inf"],
    ["--remove", "2"],  # without --save-pruned
    ["--save-pruned", "PRUNED"],  # without --remove
    ["--save-pruned", "PRUNED", "--remove", "99"],
    ["--save-pruned", "PRUNED", "--remove", "3", "--cumulative", "2"],
    ["--save-pruned", "PRUNED", "--remove-blocks", "layer1.1,nosuch"],
    ["--save-pruned", "PRUNED", "--remove-blocks", "layer1.1,layer1.1"],
    ["--save-pruned", "/nonexistent/dir/p.pt", "--remove", "1"],
    ["--recording", "/nonexistent/run.h5"],
])
def test_cli_errors_are_one_line(run, tmp_path, args):
    args = [a.replace("PRUNED", str(tmp_path / "p.pt")) for a in args]
    result = run("ablate", FIXTURE_MODEL, "--data", FIXTURE_DATA, "--limit", "8", "--device", "cpu", *args, code=1)
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_cli_recording_of_another_random_initialization_is_refused(run, tmp_path):
    """A model without weights is seeded from --seed: a recording of the same seed is this network, one
    of another seed is not (before, every process drew its own network and both were accepted)."""
    kwargs = json.dumps({"layers": [2, 2, 1, 1], "channels": [8, 16, 16, 32], "stem_width": 4,
                         "zero_init_last": False})
    args = ["timm:resnet18", "--num-classes", "4", "--model-kwargs", kwargs, "--input-size", "32",
            "--data", FIXTURE_DATA, "--limit", "16", "--device", "cpu"]
    recording = tmp_path / "run.h5"
    run("record", *args, "--seed", "0", "--out", str(recording), "--quiet")
    same = ablate_json(run, *args, "--seed", "0", "--recording", str(recording))
    from resprobe.recording.reader import open_recording

    recorded = open_recording(recording)
    assert same["weights_sha256"] == recorded.attrs["weights_sha256"]
    assert same["baseline"]["loss"] == pytest.approx(float(np.mean(recorded.loss)), abs=1e-5)
    other = tmp_path / "other.h5"
    run("record", *args, "--seed", "1", "--out", str(other), "--quiet")
    refused = run("ablate", *args, "--seed", "0", "--recording", str(other), "--quiet", code=1)
    assert "other weights" in refused.stderr and "weights_sha256" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
