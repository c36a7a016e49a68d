"""Shared iterative stages: invariants, exact parameter counts, recalibration, files, CLI."""

from __future__ import annotations

import copy
import csv
import io
import json

import pytest
import torch
from torch import nn

import tinymodels
from conftest import DATA, MODEL, save_state_dict
from resprobe.models.blocks import count_params, discover_blocks
from resprobe.data.datasets import TensorImages
from resprobe.errors import BadValue, ModelError
from resprobe.models.loading import load_model
from resprobe.runtime import Runtime
from resprobe.share import (
    SHARED_ATTR,
    SharedIteration,
    ShareOptions,
    check_out_path,
    parse_stages,
    recalibrate,
    share_stages,
    shared_iterations,
)

CPU = Runtime(torch.device("cpu"))


def shared(model: nn.Module, **options) -> tuple[nn.Module, object]:
    """A shared copy of ``model`` (32×32 inputs) and the ShareResult."""
    model = copy.deepcopy(model)
    options.setdefault("allow_single_block", True)  # tiny models: one identity block a stage
    result = share_stages(model, discover_blocks(model, (3, 32, 32)), ShareOptions(**options))
    return model, result


def outputs(model: nn.Module, seed: int = 0) -> torch.Tensor:
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def identical_convs(model: nn.Module, stage: str = "layer1") -> nn.Module:
    """Every identity block of ``stage`` gets block 0's convolutions; the norms stay different."""
    blocks = list(model.get_submodule(stage))
    with torch.no_grad():
        for block in blocks[1:]:
            for name, module in block.named_modules():
                if isinstance(module, nn.Conv2d):
                    module.weight.copy_(blocks[0].get_submodule(name).weight)
    return model


# --------------------------------------------------------------------------------------------------
# Invariants


@pytest.mark.parametrize("factory", [tinymodels.timm_basic, tinymodels.torchvision_tiny])
def test_identical_convolutions_share_without_changing_outputs(factory):
    model = identical_convs(factory())
    before = outputs(model)
    after, _ = shared(model, stages=[0], init="average", norm="unshared")
    torch.testing.assert_close(outputs(after), before, rtol=0, atol=1e-5)
    norms = [it.get_submodule("bn1").weight for it in shared_iterations(after)]
    assert not torch.equal(norms[0], norms[1])  # the norms really differ: they are per iteration


@pytest.mark.parametrize("factory,stages", [(tinymodels.timm_basic, [0]), (tinymodels.timm_seresnext, [0, 1]),
                                            (tinymodels.timm_resnetv2, [1]), (tinymodels.torchvision_bottleneck, [0])])
def test_full_rank_lora_reproduces_the_original(factory, stages):
    model = factory()
    for init in ("average", "last"):
        after, _ = shared(model, stages=stages, init=init, lora_rank=10_000)
        torch.testing.assert_close(outputs(after), outputs(model), rtol=0, atol=1e-5)


def test_shared_norms_differ_from_unshared():
    model = tinymodels.timm_basic()
    unshared, r_unshared = shared(model, stages=[0], norm="unshared")
    naive, r_naive = shared(model, stages=[0], norm="shared")
    assert not torch.allclose(outputs(unshared), outputs(naive), atol=1e-4)
    assert r_naive.params_after == r_unshared.params_after - 32  # one set of norms instead of two
    shared_bn1 = naive.get_submodule(f"{SHARED_ATTR}.layer1.bn1")
    assert all(it.norm_modules()[0] is shared_bn1 for it in shared_iterations(naive))


def test_weights_start_from_the_init_rule():
    model = tinymodels.timm_basic()
    w0, w1 = model.layer1[0].conv1.weight, model.layer1[1].conv1.weight
    for init, expected in (("average", (w0 + w1) / 2), ("first", w0), ("last", w1)):
        after, _ = shared(model, stages=[0], init=init)
        torch.testing.assert_close(after.get_submodule(f"{SHARED_ATTR}.layer1.conv1").weight, expected)


def test_gamma_init_sets_every_norm_weight_and_keeps_the_rest():
    model = tinymodels.timm_basic()
    after, _ = shared(model, stages=[0], gamma_init="0.1")
    for t, it in enumerate(shared_iterations(after)):
        for name in ("bn1", "bn2"):
            norm, original = it.get_submodule(name), model.layer1[t].get_submodule(name)
            assert torch.all(norm.weight == 0.1)
            assert torch.equal(norm.bias, original.bias) and torch.equal(norm.running_var, original.running_var)


# --------------------------------------------------------------------------------------------------
# Structure, names, counts


def test_exact_parameter_counts():
    model = tinymodels.timm_basic()
    before = count_params(model)
    # layer1.0 and layer1.1: conv1, conv2 8×8×3×3 = 576 each; bn1, bn2 8 weights + 8 biases each.
    conv, norms = 2 * 576, 2 * 16
    cases = {
        (2, "unshared", None): before - 2 * (conv + norms) + conv + 2 * norms,
        (2, "shared", None): before - 2 * (conv + norms) + conv + norms,
        (3, "unshared", None): before - 2 * (conv + norms) + conv + 3 * norms,
        (1, "unshared", None): before - 2 * (conv + norms) + conv + norms,
        # W viewed as [8, 72]: per conv and iteration A [3, 72] + B [8, 3].
        (2, "unshared", 3): before - 2 * (conv + norms) + conv + 2 * norms + 2 * 2 * (3 * 72 + 8 * 3),
        # R capped at min(8, 72) = 8.
        (2, "unshared", 100): before - 2 * (conv + norms) + conv + 2 * norms + 2 * 2 * (8 * 72 + 8 * 8),
    }
    for (k, norm, rank), expected in cases.items():
        after, result = shared(model, stages=[0], iterations=k, norm=norm, lora_rank=rank)
        assert result.params_before == before
        assert result.params_after == expected == count_params(after), (k, norm, rank)


def test_grouped_conv_lora_shapes():
    model = tinymodels.timm_seresnext()  # conv2 has 4 groups
    after, _ = shared(model, stages=[1], lora_rank=2)
    it = shared_iterations(after)[0]
    conv2 = after.get_submodule(f"{SHARED_ATTR}.layer2.conv2")
    rest = conv2.weight[0].numel()  # (I / groups) · kh · kw
    assert rest == conv2.in_channels // conv2.groups * 9
    factors = it.lora.get_submodule("conv2")
    assert factors.A.shape == (2, rest) and factors.B.shape == (conv2.out_channels, 2)


def test_iterations_take_the_replaced_names_and_extra_ones_the_next_indices():
    model = tinymodels.timm_basic()
    after, result = shared(model, stages=[0, 1], iterations=3)
    names = [b.name for b in discover_blocks(after, (3, 32, 32)).blocks]
    assert names == ["layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1", "layer2.2", "layer2.3",
                     "layer3.0", "layer4.0"]
    assert [s.names for s in result.stages] == [["layer1.0", "layer1.1", "layer1.2"],
                                                ["layer2.1", "layer2.2", "layer2.3"]]
    # Beyond the replaced blocks, iterations start from the last replaced block's norms.
    torch.testing.assert_close(after.layer1[2].bn1.running_mean, model.layer1[1].bn1.running_mean)
    fewer, _ = shared(model, stages=[0], iterations=1)
    assert [b.name for b in discover_blocks(fewer, (3, 32, 32)).blocks][:2] == ["layer1.0", "layer2.0"]


def test_shared_block_is_stored_once_and_hidden():
    after, _ = shared(tinymodels.timm_basic(), stages=[0], lora_rank=2)
    keys = list(after.state_dict())
    assert sum(k.endswith("conv1.weight") and "layer1" in k for k in keys) == 1  # resprobe_shared.layer1.conv1.weight
    assert "layer1.1.bn1.running_mean" in keys and "layer1.1.lora.conv2.A" in keys
    assert [b.name for b in discover_blocks(after, (3, 32, 32)).blocks if SHARED_ATTR in b.name] == []


def test_each_iteration_has_its_own_branch_end_and_lesion():
    after, _ = shared(tinymodels.timm_basic(), stages=[0])
    anatomy = discover_blocks(after, (3, 32, 32))
    calls = []
    ends = [b.family.branch_end_module(b.module) for b in anatomy.blocks[:2]]
    assert ends[0] is not ends[1]
    handles = [m.register_forward_hook(lambda *_a, i=i: calls.append(i)) for i, m in enumerate(ends)]
    outputs(after)
    for h in handles:
        h.remove()
    assert calls == [0, 1]
    h = torch.randn(2, 8, 8, 8)
    assert torch.equal(anatomy.blocks[0].lesion(h), torch.relu(h))  # post(h): the block's ReLU after the sum


def test_sharing_a_shared_stage_again_is_refused():
    after, _ = shared(tinymodels.timm_basic(), stages=[0])
    with pytest.raises(ModelError, match="already shared"):
        share_stages(after, discover_blocks(after, (3, 32, 32)), ShareOptions(stages=[0], allow_single_block=True))


def test_bad_options():
    model = tinymodels.timm_basic()
    anatomy = discover_blocks(model, (3, 32, 32))
    for options, message in ((ShareOptions(stages=[7]), "no stage 7"), (ShareOptions(stages=[3]), "no identity"),
                             (ShareOptions(lora_rank=0), "at least 1"), (ShareOptions(iterations=0), "at least 1"),
                             (ShareOptions(init="mean"), "--init"), (ShareOptions(gamma_init="1"), "--gamma-init")):
        with pytest.raises(BadValue, match=message):
            share_stages(model, anatomy, options)
    with pytest.raises(BadValue, match="comma-separated"):
        parse_stages("a,b")
    assert parse_stages("0, 2") == [0, 2] and parse_stages(None) is None


# --------------------------------------------------------------------------------------------------
# Recalibration


@pytest.mark.parametrize("scope", ["shared", "all"])
def test_recalibration_changes_only_norm_statistics(scope):
    after, _ = shared(tinymodels.timm_basic(), stages=[0], lora_rank=2)
    before = {k: v.clone() for k, v in after.state_dict().items()}
    images = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(TensorImages(images, torch.zeros(20, dtype=torch.long)), batch_size=8)
    after.eval()
    assert recalibrate(after, loader, CPU, 16, scope) == 16
    assert not after.training and not any(m.training for m in after.modules())
    changed = {k for k, v in after.state_dict().items() if not torch.equal(v, before[k])}
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    assert changed and all(k.rsplit(".", 1)[1] in statistics for k in changed)
    in_shared_stage = {k for k in changed if k.startswith("layer1.")}
    assert in_shared_stage if scope == "shared" else changed > in_shared_stage
    if scope == "shared":
        assert changed == in_shared_stage
    assert all(m.momentum == 0.1 for m in after.modules() if isinstance(m, nn.BatchNorm2d))  # restored
    if scope == "shared":  # iteration 0's bn1 mean: over the 16 images (two equal batches)
        seen = []
        hook = after.layer1.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        with torch.no_grad():
            after(images[:16])
            hook.remove()
            weight = after.layer1[0].relaxed_weights()["conv1.weight"]  # W + B_0 A_0
            expected = nn.functional.conv2d(seen[0], weight, padding=1).mean((0, 2, 3))
        torch.testing.assert_close(after.layer1[0].bn1.running_mean, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("norm,lora_rank", [("shared", None), ("shared", 2), ("unshared", None)])
def test_recalibrated_statistics_average_every_call(norm, lora_rank):
    """Running statistics = the size-weighted average over EVERY call of the norm, by hand: a norm shared
    by K iterations runs K times per batch, and each call counts (unequal batches: 7, 7, 4)."""
    after, _ = shared(tinymodels.timm_basic(), stages=[0], norm=norm, lora_rank=lora_rank)
    images = torch.randn(18, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    loader = torch.utils.data.DataLoader(TensorImages(images, torch.zeros(18, dtype=torch.long)), batch_size=7)
    holder = after.get_submodule(SHARED_ATTR)
    norms = {id(m): m for it in after.layer1 for m in it.modules() if isinstance(m, nn.BatchNorm2d)}
    if norm == "shared":
        norms = {id(m): m for m in holder.modules() if isinstance(m, nn.BatchNorm2d)}
        assert not any(isinstance(m, nn.BatchNorm2d) for it in after.layer1 for m in it.modules())

    # By hand: each norm's inputs on every call, normalized with batch statistics (train mode), the
    # statistics of that input, and its size.
    reference = copy.deepcopy(after).eval()
    calls: dict[int, list] = {}
    name_of = {id(m): n for n, m in after.named_modules()}
    ref_modules = dict(reference.named_modules())
    hooks = []
    for key in norms:
        module = ref_modules[name_of[key]]
        module.train()
        module.momentum = 0.0  # batch statistics for the forward; running statistics left alone
        hooks.append(module.register_forward_pre_hook(
            lambda m, args, key=key: calls.setdefault(key, []).append(
                (args[0].shape[0], args[0].double().mean((0, 2, 3)), args[0].double().var((0, 2, 3), unbiased=True)))))
    with torch.no_grad():
        for x, _y, _i in loader:
            reference(x)
    for hook in hooks:
        hook.remove()

    assert recalibrate(after, loader, CPU, 18, "shared") == 18
    per_call = 2 if norm == "shared" else 1  # layer1 of timm_basic: two identity blocks share
    for key, module in norms.items():
        seen = calls[key]
        assert len(seen) == 3 * per_call
        total = sum(size for size, _, _ in seen)
        mean = sum(size * m for size, m, _ in seen) / total
        var = sum(size * v for size, _, v in seen) / total
        torch.testing.assert_close(module.running_mean.double(), mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(module.running_var.double(), var, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Files and the command line


def test_shared_checkpoint_round_trip(tmp_path, run):
    data = DATA
    out = tmp_path / "shared.pt"
    payload = json.loads(run("share", MODEL, "--out", out, "--lora-rank", 2, "--data", data, "--limit", 32,
                             "-f", "json", "--device", "cpu").stdout)
    assert [s["stage"] for s in payload["stages"]] == [0, 1]  # stages with two or more identity blocks
    assert payload["stages"][0] == {"stage": 0, "blocks": ["layer1.0", "layer1.1", "layer1.2"], "iterations": 3,
                                    "init": "average", "names": ["layer1.0", "layer1.1", "layer1.2"],
                                    "norm": "unshared", "lora_rank": 2}
    assert payload["eval_shared_recalibrated"] is None and set(payload["eval_original"]) == {"n", "loss", "acc", "top5"}
    raw = torch.load(out, weights_only=True)
    assert raw["recipes"][-1]["kind"] == "share" and raw["preprocessing"]["input_size"] == [3, 32, 32]
    loaded = load_model(str(out))
    assert count_params(loaded.model) == payload["params_after"]
    evaluated = json.loads(run("eval", out, "--data", data, "--limit", 32, "-f", "json", "--device", "cpu").stdout)
    assert evaluated["loss"] == pytest.approx(payload["eval_shared"]["loss"], abs=1e-6)
    listed = json.loads(run("blocks", out, "-f", "json").stdout)
    original = json.loads(run("blocks", MODEL, "-f", "json").stdout)
    assert [(b["name"], b["stage"], b["index"], b["kind"]) for b in listed["blocks"]] == \
        [(b["name"], b["stage"], b["index"], b["kind"]) for b in original["blocks"]]
    aligned = json.loads(run("align", out, "--data", data, "--limit", 16, "-f", "json", "--device", "cpu").stdout)
    assert [b["name"] for b in aligned["blocks"]] == [b["name"] for b in original["blocks"]]
    assert all(b["cos_mean"] is not None for b in aligned["blocks"] if b["kind"] == "identity")


def test_cli_identical_convolutions_then_eval(tmp_path, run, arrays_file):
    data = arrays_file(24)
    weights = save_state_dict(identical_convs(tinymodels.timm_basic()), tmp_path / "identical.pt")
    out = tmp_path / "shared.pt"
    common = ("--input-size", "32", "--device", "cpu")
    payload = json.loads(run("share", "tinymodels:timm_basic", "--checkpoint", weights, "--out", out, "--init",
                             "average", "--norm", "unshared", "--data", data, "-f", "json", *common).stdout)
    assert payload["eval_shared"]["loss"] == pytest.approx(payload["eval_original"]["loss"], abs=1e-5)
    evaluated = json.loads(run("eval", out, "--data", data, "-f", "json", "--device", "cpu").stdout)
    assert evaluated["loss"] == pytest.approx(payload["eval_original"]["loss"], abs=1e-5)
    assert evaluated["acc"] == payload["eval_original"]["acc"]


def test_cli_recalibrate_and_table(tmp_path, run):
    out = tmp_path / "shared.pt"
    payload = json.loads(run("share", MODEL, "--out", out, "--stages", "0", "--norm", "shared", "--data", DATA,
                             "--limit", 24, "--train-data", DATA, "--recalibrate", 16, "-f", "json",
                             "--device", "cpu").stdout)
    assert payload["recalibrated"] == 16 and payload["eval_shared_recalibrated"]["n"] == 24
    assert payload["eval_shared_recalibrated"]["loss"] != payload["eval_shared"]["loss"]
    table = run("share", MODEL, "--out", out, "--overwrite", "--iterations", 2, "--device", "cpu").stdout
    assert "layer1.0, layer1.1, layer1.2" in table
    rows = list(csv.DictReader(io.StringIO(run("share", MODEL, "--out", tmp_path / "csv.pt", "--stages", "0",
                                               "--device", "cpu", "-f", "csv").stdout)))
    assert [r["blocks"] for r in rows] == ["layer1.0;layer1.1;layer1.2"]  # a list of names, not a shape
    listed = json.loads(run("blocks", out, "-f", "json").stdout)
    assert [b["name"] for b in listed["blocks"]][:4] == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]


def test_cli_blocks_of_a_shared_model_count_each_parameter_once(tmp_path, run):
    """``blocks`` on a ``share`` output: each shared block once, each iteration's own parameters (norms,
    LoRA factors) in its row; with the parameters outside the blocks they add up to the model's count."""
    weights = save_state_dict(tinymodels.timm_basic(), tmp_path / "w.pt")
    out = tmp_path / "shared.pt"
    run("share", "tinymodels:timm_basic", "--checkpoint", weights, "--input-size", "32", "--stages", "0",
        "--norm", "unshared", "--lora-rank", 2, "--out", out, "--device", "cpu", "-q")
    payload = json.loads(run("blocks", out, "-f", "json").stdout)
    model = load_model(str(out)).model
    assert payload["params"] == count_params(model)
    (shared,) = payload["shared"]
    assert shared["stage"] == 0 and shared["iterations"] == ["layer1.0", "layer1.1"]
    c = 8  # layer1 of timm_basic: two 3×3 convolutions of 8 channels
    assert shared["params"] == 2 * c * c * 9  # the shared block: its convolutions (its norms are per iteration)
    own = {b["name"]: b["params"] for b in payload["blocks"]}
    assert own["layer1.0"] == own["layer1.1"] == 2 * (2 * 9 * c + c * 2) + 2 * 2 * c  # LoRA A, B + bn1, bn2
    names = [b["name"] for b in payload["blocks"]]
    outside = sum(p.numel() for n, p in model.named_parameters()
                  if not any(n.startswith(b + ".") for b in names) and not n.startswith("resprobe_shared."))
    assert sum(own.values()) + shared["params"] + outside == count_params(model)
    table = run("blocks", out).stdout
    assert "shared blocks (counted once)" in table and "layer1.0, layer1.1" in table


@pytest.mark.parametrize("args,message", [
    (("--stages", "x"), "--stages"),
    (("--stages", "9"), "no stage 9"),
    (("--lora-rank", "0"), "--lora-rank"),
    (("--iterations", "0"), "--iterations"),
    (("--recalibrate", "4"), "--train-data"),
    (("--norm", "half"), "--norm"),
])
def test_cli_errors_are_one_line(tmp_path, run, args, message):
    result = run("share", MODEL, "--out", tmp_path / "s.pt", *args, code=1)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_cli_out_errors(tmp_path, run):
    result = run("share", MODEL, "--out", tmp_path / "missing" / "s.pt", code=1)
    assert "does not exist" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    existing = tmp_path / "s.pt"
    existing.write_bytes(b"keep")
    result = run("share", MODEL, "--out", existing, code=1)
    assert "--overwrite" in result.stderr and existing.read_bytes() == b"keep"
    with pytest.raises(BadValue, match="directory"):
        check_out_path(tmp_path)


def test_iteration_modules_are_shared_iterations(tmp_path):
    after, result = shared(tinymodels.timm_basic(), stages=[0])
    assert all(isinstance(after.layer1[i], SharedIteration) for i in range(2))
    assert result.recipe["stages"][0]["container"] == "layer1"


# --------------------------------------------------------------------------------------------------
# Threads (issue 22 item 1): iterations of one shared block run side by side


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_iterations_run_side_by_side_in_threads_use_their_own_norms(lora_rank):
    """Two threads, each running another iteration of the same shared block, both inside it at once (a
    barrier in a hook on the shared conv holds them there): each must run its own norms, as alone."""
    import threading

    after, _ = shared(tinymodels.randomize_norms(tinymodels.timm_basic()), stages=[0], lora_rank=lora_rank)
    after.eval()
    iterations = [after.layer1[0], after.layer1[1]]
    h = torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        alone = [it(h) for it in iterations]
    assert not torch.allclose(alone[0], alone[1])  # the iterations differ by their norms
    barrier = threading.Barrier(2, timeout=20)
    conv = iterations[0].shared_block.conv1
    handle = conv.register_forward_hook(lambda *_a: [barrier.wait()] and None)  # None: the output stays
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            with torch.no_grad():
                results[i] = iterations[i](h)
        except Exception as exc:  # noqa: BLE001 - the failure is the finding
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        handle.remove()
    for i in range(2):
        assert isinstance(results[i], torch.Tensor), results[i]
        torch.testing.assert_close(results[i], alone[i], rtol=0, atol=0)


def test_an_iteration_started_inside_another_is_refused():
    """The shared block runs one iteration at a time in a thread: never silently another's norms."""
    after, _ = shared(tinymodels.timm_basic(), stages=[0])
    first, second = after.layer1[0], after.layer1[1]
    with first.running(), pytest.raises(RuntimeError, match="iteration"):
        with second.running():
            pass
