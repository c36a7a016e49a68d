"""The Python API (DESIGN.md §2b) on an in-memory torchvision ResNet-18 and the user's own batches:
figures equal to the command line on the same checkpoint and data, and to plain autograd on the model
split by hand; custom per-sample losses; the user's model left exactly as it was."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import resprobe as rp
from conftest import invoke, save_state_dict
from resprobe.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from resprobe.errors import BadValue

CLASSES = 10
IDENTITY = ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=CLASSES)
    with torch.no_grad():  # BatchNorm statistics that are not the identity, as a trained model has
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def setup(arrays_file, tmp_path):
    """A ResNet-18 saved as a state dict, the same model loaded from it, an arrays file and a DataLoader
    that prepares it as the command line does (uint8 → [0, 1], ImageNet mean and std, no resize)."""
    data = arrays_file(n=16, classes=CLASSES)
    checkpoint = save_state_dict(make_model(), tmp_path / "resnet18.pt")
    model = torchvision.models.resnet18(num_classes=CLASSES)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    model.eval()
    with np.load(data) as f:
        images = torch.from_numpy(f["images"]).permute(0, 3, 1, 2).float() / 255.0
        labels = torch.from_numpy(f["labels"]).long()
    images = (images - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    return model, loader, checkpoint, data, images, labels


def cli_json(*args) -> dict:
    return json.loads(invoke(*args, "--device", "cpu", "-f", "json", "-q").stdout)


def by_name(rows: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in rows}


# --------------------------------------------------------------------------------------------------
# Independent references: the model split by hand


def hand_cosines(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, loss_fn) -> dict[str, float]:
    """Per identity block, mean over samples of cos(F, ∂ℓ/∂h): F is bn2's output (copied at once, the
    block adds the shortcut into it in place), h the block's input."""
    model = copy.deepcopy(model).eval()
    inputs, branches, handles = {}, {}, []
    for name in IDENTITY:
        block = model.get_submodule(name)
        handles.append(block.register_forward_pre_hook(lambda _m, a, n=name: inputs.__setitem__(n, a[0])))
        handles.append(block.bn2.register_forward_hook(lambda _m, _a, o, n=name: branches.__setitem__(n, o.clone())))
    x = images.clone().requires_grad_(True)
    losses = loss_fn(model(x), targets)
    grads = torch.autograd.grad(losses.sum(), [inputs[n] for n in IDENTITY])
    out = {}
    for name, g in zip(IDENTITY, grads):
        f = branches[name].flatten(1).double()
        g = g.flatten(1).double()
        out[name] = float(F.cosine_similarity(f.detach(), g, dim=1).mean())
    for h in handles:
        h.remove()
    return out


def hand_delta_loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, loss_fn) -> dict[str, float]:
    """Per identity block, mean loss with the block replaced by the identity (a post-activation
    BasicBlock without its branch is relu(h) = h: its input is already non-negative) minus the intact
    model's."""
    with torch.no_grad():
        base = float(loss_fn(model(images), targets).double().mean())
        out = {}
        for name in IDENTITY:
            lesioned = copy.deepcopy(model)
            parent, _, child = name.rpartition(".")
            setattr(lesioned.get_submodule(parent), child, nn.ReLU())
            out[name] = float(loss_fn(lesioned(images), targets).double().mean()) - base
    return out


def ce(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def smoothed(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none", label_smoothing=0.2)


# --------------------------------------------------------------------------------------------------
# Equal to the command line and to autograd


def test_align_equals_the_cli_and_autograd_by_hand(setup):
    model, loader, checkpoint, data, images, labels = setup
    result = rp.align(model, loader)
    cli = cli_json("align", "torchvision:resnet18", "--checkpoint", checkpoint, "--num-classes", CLASSES,
                   "--data", data)
    ours, theirs = by_name(result.to_json()["blocks"]), by_name(cli["blocks"])
    assert list(ours) == list(theirs)
    assert set(result.to_json()) == set(cli)  # the same JSON fields
    hand = hand_cosines(model, images, labels, ce)
    for name in IDENTITY:
        assert ours[name]["cos_mean"] == pytest.approx(theirs[name]["cos_mean"], abs=1e-5)
        assert ours[name]["cos_mean"] == pytest.approx(hand[name], abs=1e-5)
        assert ours[name]["l2_ratio_mean"] == pytest.approx(theirs[name]["l2_ratio_mean"], rel=1e-5)
    assert result.to_json()["loss"] == pytest.approx(cli["loss"], rel=1e-6)
    assert result.to_json()["acc"] == cli["acc"]


def test_ablate_delta_loss_equals_the_cli_and_a_naive_reevaluation(setup):
    model, loader, checkpoint, data, images, labels = setup
    result = rp.ablate(model, loader)
    cli = cli_json("ablate", "torchvision:resnet18", "--checkpoint", checkpoint, "--num-classes", CLASSES,
                   "--data", data)
    ours, theirs = by_name(result.to_json()["blocks"]), by_name(cli["blocks"])
    naive = hand_delta_loss(model, images, labels, ce)
    assert set(result.to_json()) == set(cli)
    for name in IDENTITY:
        assert ours[name]["delta_loss"] == pytest.approx(theirs[name]["delta_loss"], abs=1e-5)
        assert ours[name]["delta_loss"] == pytest.approx(naive[name], abs=1e-5)
        assert ours[name]["rank"] == theirs[name]["rank"]
    evaluated = rp.evaluate(model, loader)
    assert evaluated["loss"] == pytest.approx(result.to_json()["baseline"]["loss"], rel=1e-6)
    assert evaluated["n"] == 16


def test_a_custom_per_sample_loss_changes_the_figures_as_computed_by_hand(setup):
    model, loader, _, _, images, labels = setup
    aligned = by_name(rp.align(model, loader, loss=smoothed).to_json()["blocks"])
    default = by_name(rp.align(model, loader).to_json()["blocks"])
    hand = hand_cosines(model, images, labels, smoothed)
    for name in IDENTITY:
        assert aligned[name]["cos_mean"] == pytest.approx(hand[name], abs=1e-5)
    assert any(abs(aligned[n]["cos_mean"] - default[n]["cos_mean"]) > 1e-4 for n in IDENTITY)
    ablated = by_name(rp.ablate(model, loader, loss=smoothed).to_json()["blocks"])
    naive = hand_delta_loss(model, images, labels, smoothed)
    for name in IDENTITY:
        assert ablated[name]["delta_loss"] == pytest.approx(naive[name], abs=1e-5)
    with torch.no_grad():
        expected = float(smoothed(model(images), labels).double().mean())
    assert rp.evaluate(model, loader, loss=smoothed)["loss"] == pytest.approx(expected, rel=1e-6)


def test_distillation_to_a_teachers_logits_needs_no_classes(setup):
    """MSE to a teacher's logits: targets are [B, 10] floats, accuracy is undefined (None)."""
    model, _, _, _, images, _ = setup
    teacher = make_model(seed=1)
    with torch.no_grad():
        soft = teacher(images)
    batches = [(images[:8], soft[:8]), (images[8:], soft[8:])]  # an iterable of batches

    def mse(outputs, targets):
        return ((outputs - targets) ** 2).mean(1)

    result = rp.align(model, batches, loss=mse)
    hand = hand_cosines(model, images, soft, mse)
    for name in IDENTITY:
        assert by_name(result.to_json()["blocks"])[name]["cos_mean"] == pytest.approx(hand[name], abs=1e-5)
    assert result.to_json()["acc"] is None
    with torch.no_grad():
        expected = float(mse(model(images), soft).double().mean())
    evaluated = rp.evaluate(model, batches, loss=mse)
    assert evaluated["loss"] == pytest.approx(expected, rel=1e-6)
    assert evaluated["acc"] is None and evaluated["top5"] is None
    naive = hand_delta_loss(model, images, soft, mse)
    ablated = by_name(rp.ablate(model, batches, loss=mse).to_json()["blocks"])
    for name in IDENTITY:
        assert ablated[name]["delta_loss"] == pytest.approx(naive[name], abs=1e-5)


def test_a_scalar_loss_is_refused_with_one_clear_error(setup):
    model, loader, *_ = setup
    with pytest.raises(BadValue, match="one loss per sample"):
        rp.align(model, loader, loss=lambda o, t: F.cross_entropy(o, t))


# --------------------------------------------------------------------------------------------------
# Batches, wrappers, results


def test_dict_batches_datasets_and_wrapped_models_give_the_same_figures(setup):
    model, loader, _, _, images, labels = setup
    expected = rp.align(model, loader).to_json()["blocks"]
    dicts = [{"pixel_values": x, "labels": y} for x, y in loader]
    for model_, data in ((model, dicts), (nn.DataParallel(model), loader.dataset), (torch.compile(model), loader)):
        blocks = rp.align(model_, data).to_json()["blocks"]
        for a, b in zip(blocks, expected):
            assert a["name"] == b["name"]
            assert a["cos_mean"] == pytest.approx(b["cos_mean"], abs=1e-6) if b["cos_mean"] is not None else True
    with pytest.raises(BadValue, match="labels"):
        rp.align(model, [{"pixel_values": images}])


def test_dataframes_have_the_json_fields_as_columns(setup):
    model, loader, *_ = setup
    aligned = rp.align(model, loader)
    report = aligned.to_json()
    assert list(aligned.to_pandas().columns) == list(report["blocks"][0])
    assert list(aligned.stages_frame().columns) == list(report["stages"][0])
    samples = aligned.samples()
    assert len(samples) == 16 * len(report["blocks"])
    layer = samples[samples.block == "layer1.1"]
    assert layer.cos.mean() == pytest.approx(by_name(report["blocks"])["layer1.1"]["cos_mean"], abs=1e-6)
    ablated = rp.ablate(model, loader, cumulative=2, proxies=True)
    report = ablated.to_json()
    assert list(ablated.to_pandas().columns) == list(report["blocks"][0])
    assert list(ablated.cumulative_frame().columns) == list(report["cumulative"][0])
    assert list(ablated.proxies_frame().columns) == list(report["proxies"]["blocks"][0])
    assert "AlignResult" in repr(aligned) and "<table>" in aligned._repr_html_()
    assert "AblateResult" in repr(ablated) and "<table>" in ablated._repr_html_()
    anatomy = rp.blocks(model, next(iter(loader))[0])
    assert list(anatomy.to_pandas().columns) == ["name", "stage", "index", "kind", "in_shape", "out_shape", "params"]
    assert anatomy.names[:2] == ["layer1.0", "layer1.1"]


def test_plots_are_figures(setup):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    model, loader, *_ = setup
    assert rp.align(model, loader).plot().axes
    assert rp.ablate(model, loader, cumulative=1).plot().axes


# --------------------------------------------------------------------------------------------------
# The user's model is never left changed


def state_of(model: nn.Module) -> dict:
    return {
        "weights": {k: (v.clone(), v.device, v.dtype, v.stride()) for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for m in model.modules()],
        "children": [id(m) for m in model.modules()],
    }


def assert_same_state(model: nn.Module, before: dict, weights: bool = True) -> None:
    after = state_of(model)
    for key in ("training", "requires_grad", "hooks", "children"):
        assert after[key] == before[key], key
    if weights:
        for k, (value, device, dtype, stride) in before["weights"].items():
            now = after["weights"][k]
            assert torch.equal(now[0], value) and now[1:] == (device, dtype, stride), k


@pytest.fixture
def user_model(setup):
    """The user's model as a notebook leaves it: in train mode, one layer frozen, a hook of its own."""
    model = setup[0]
    model.train()
    model.layer1.requires_grad_(False)
    model.layer2.register_forward_hook(lambda *_: None)
    return model


class Interrupting:
    """A loader that is interrupted (Ctrl-C) at its second batch."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == 1:
                raise KeyboardInterrupt
            yield batch


def test_every_call_leaves_the_model_as_it_was(setup, user_model):
    _, loader, *_ = setup
    example = next(iter(loader))[0]
    before = state_of(user_model)
    calls = [lambda: rp.align(user_model, loader), lambda: rp.ablate(user_model, loader, cumulative=2, proxies=True),
             lambda: rp.evaluate(user_model, loader), lambda: rp.blocks(user_model, example),
             lambda: rp.share(user_model, example=example, recalibrate=8, train_data=loader),
             lambda: rp.ablate(user_model, loader).pruned(2)]
    for call in calls:
        call()
        assert_same_state(user_model, before)


@pytest.mark.parametrize("call", ["align", "ablate", "evaluate", "finetune"])
def test_an_interrupted_call_leaves_the_model_as_it_was(setup, user_model, call):
    _, loader, *_ = setup
    before = state_of(user_model)
    run = {"align": lambda d: rp.align(user_model, d), "ablate": lambda d: rp.ablate(user_model, d, cumulative=2),
           "evaluate": lambda d: rp.evaluate(user_model, d),
           "finetune": lambda d: rp.finetune(user_model, d, max_steps=5)}[call]
    with pytest.raises(KeyboardInterrupt):
        run(Interrupting(loader))
    assert_same_state(user_model, before, weights=call != "finetune")  # finetune trains in place, by contract


def test_an_exception_in_a_hook_leaves_the_model_as_it_was(setup):
    model, loader, *_ = setup

    def fail(*_):
        raise KeyboardInterrupt

    handle = model.layer3.register_forward_hook(fail)
    before = state_of(model)
    with pytest.raises(KeyboardInterrupt):
        rp.align(model, loader)
    assert_same_state(model, before)
    handle.remove()


def test_pruned_and_share_return_new_modules(setup):
    model, loader, checkpoint, data, *_ = setup
    original = copy.deepcopy(model.state_dict())
    ablated = rp.ablate(model, loader, cumulative=2)
    pruned = ablated.pruned(2)
    assert pruned is not model
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    removed = ablated.to_json()["cumulative"][2]
    assert rp.evaluate(pruned, loader)["loss"] == pytest.approx(removed["loss"], rel=1e-6)
    assert {b for b in removed["removed"]}.isdisjoint(rp.blocks(pruned, next(iter(loader))[0]).names)
    shared = rp.share(model, example=next(iter(loader))[0])
    assert shared is not model and sum(p.numel() for p in shared.parameters()) < sum(p.numel() for p in model.parameters())
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    history = rp.finetune(shared, loader, val_data=loader, max_steps=2, log_every=1)
    assert [r["step"] for r in history if "loss" in r] == [1, 2] and history.val is not None


def test_saved_models_load_in_every_command(setup, tmp_path):
    model, loader, checkpoint, data, *_ = setup
    pruned = rp.ablate(model, loader).pruned(blocks=["layer4.1"])
    path = rp.save(pruned, tmp_path / "pruned.pt", arch="torchvision:resnet18", num_classes=CLASSES)
    expected = rp.evaluate(pruned, loader)["loss"]
    assert rp.evaluate(rp.load(path), loader)["loss"] == pytest.approx(expected, rel=1e-6)
    assert cli_json("eval", path, "--data", data)["loss"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(BadValue, match="arch="):
        rp.save(model, tmp_path / "plain.pt")
    # nothing the user had is overwritten: an existing file is refused, and a failed save leaves it intact
    with pytest.raises(BadValue, match="overwrite=True"):
        rp.save(pruned, path, arch="torchvision:resnet18", num_classes=CLASSES)
    before = path.read_bytes()
    with pytest.raises(BadValue, match="arch="):
        rp.save(model, path, overwrite=True)
    with pytest.raises(BadValue, match="would not load back"):
        rp.save(pruned, path, arch="torchvision:resnet34", num_classes=CLASSES, overwrite=True)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))== []


def test_record_of_an_in_memory_model_resumes_and_aligns_as_align(setup, tmp_path):
    model, loader, *_ = setup
    expected = by_name(rp.align(model, loader).to_json()["blocks"])
    out = tmp_path / "run.h5"
    before = state_of(model)
    with pytest.raises(BadValue, match="DataLoader"):
        rp.record(model, Interrupting(loader), out)  # not a DataLoader: refused before anything runs
    assert not out.exists()

    class Stop(DataLoader):  # a DataLoader interrupted at its second batch, once
        armed = True

        def __iter__(self):
            for i, batch in enumerate(super().__iter__()):
                if i == 1 and Stop.armed:
                    Stop.armed = False
                    raise KeyboardInterrupt
                yield batch

    stopping = Stop(loader.dataset, batch_size=8)
    with pytest.raises(KeyboardInterrupt):
        rp.record(model, stopping, out)
    assert_same_state(model, before)
    run = rp.record(model, stopping, out, resume=True)
    assert run.complete and run.n_samples == 16
    for name, row in by_name(rp.open_recording(out).align().to_json()["blocks"]).items():
        if row["cos_mean"] is not None:
            assert row["cos_mean"] == pytest.approx(expected[name]["cos_mean"], abs=1e-6)


def test_without_pandas_to_pandas_says_how_to_get_it(setup, monkeypatch):
    import sys

    model, loader, *_ = setup
    result = rp.align(model, loader, precision="bf16")  # --precision as on the command line
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(BadValue, match="pip install pandas"):
        result.to_pandas()
    assert result.to_json()["blocks"]  # the dict needs nothing
