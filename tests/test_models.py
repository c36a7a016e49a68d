"""Every checkpoint form loads the same tensors; specs parse; failures explain themselves."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

import tinymodels
from resprobe.errors import ModelError
from resprobe.models import LoadOptions, clean_state_dict, load_model, parse_model_spec

ARCH = "timm:resnet18"
KWARGS = {"layers": [1, 1, 1, 1], "channels": [8, 16, 16, 32], "stem_width": 4, "stem_type": "deep"}


def reference_state() -> dict[str, torch.Tensor]:
    model = tinymodels.randomize_norms(load_model(ARCH, LoadOptions(num_classes=7, model_kwargs=KWARGS)).model, 9)
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model: torch.nn.Module, state: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    got = model.state_dict()
    assert set(got) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(got[key].float(), value.float(), rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize("form", ["raw", "safetensors", "state_dict", "model", "module_prefix", "orig_mod_prefix",
                                  "fp16", "bf16"])
def test_checkpoint_forms(tmp_path, form):
    state = reference_state()
    path = tmp_path / ("w.safetensors" if form == "safetensors" else "w.pt")
    if form == "raw":
        torch.save(state, path)
    elif form == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif form in ("state_dict", "model"):
        torch.save({form: state, "epoch": 3}, path)
    elif form == "module_prefix":
        torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    elif form == "orig_mod_prefix":
        torch.save({"module._orig_mod." + k: v for k, v in state.items()}, path)
    else:
        dtype = torch.float16 if form == "fp16" else torch.bfloat16
        torch.save({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, path)
    loaded = load_model(ARCH, LoadOptions(checkpoint=path, model_kwargs=KWARGS))
    assert loaded.num_classes == 7  # inferred from the classifier's weight
    assert_same(loaded.model, state, atol=0.0 if form not in ("fp16", "bf16") else 1e-1)
    assert loaded.checkpoint_sha256 and len(loaded.checkpoint_sha256) == 64


def test_ema_weights_and_timm_train_checkpoint(tmp_path):
    state = reference_state()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    path = tmp_path / "train.pth.tar"
    torch.save({"arch": "resnet18", "state_dict": state, "state_dict_ema": ema, "epoch": 1,
                "args": argparse.Namespace(model="resnet18", lr=0.1)}, path)
    plain = load_model(str(path), LoadOptions(model_kwargs=KWARGS))
    assert_same(plain.model, state)
    with_ema = load_model(str(path), LoadOptions(model_kwargs=KWARGS, ema=True))
    assert_same(with_ema.model, ema)


def test_torchvision_reference_checkpoint_with_averaged_model(tmp_path):
    """torchvision's references save {model, model_ema (AveragedModel: n_averaged + module.*), args}."""
    from torchvision.models import resnet18

    state = tinymodels.randomize_norms(resnet18(num_classes=3), 6).state_dict()
    doubled = {k: v * 2 if v.is_floating_point() else v for k, v in state.items()}
    ema = {"n_averaged": torch.tensor(5), **{"module." + k: v for k, v in doubled.items()}}
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "model_ema": ema, "optimizer": {}, "epoch": 2,
                "args": argparse.Namespace(model="resnet18", lr=0.5)}, path)
    plain = load_model(str(path))
    assert plain.arch["source"] == "torchvision" and plain.num_classes == 3
    assert_same(plain.model, state)
    assert_same(load_model(str(path), LoadOptions(ema=True)).model, doubled)


def test_wrong_architecture_names_keys(tmp_path):
    path = tmp_path / "tv.pt"
    torch.save(tinymodels.torchvision_tiny().state_dict(), path)
    with pytest.raises(ModelError, match="do not fit") as err:
        load_model(ARCH, LoadOptions(checkpoint=path, model_kwargs=KWARGS))
    assert "\n" not in str(err.value)


def test_other_num_classes_is_explained(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(reference_state(), path)
    with pytest.raises(ModelError, match="num-classes"):
        load_model(ARCH, LoadOptions(checkpoint=path, model_kwargs=KWARGS, num_classes=10))


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ModelError, match="did you mean .*resnet50"):
        load_model("timm:resnet5O")
    with pytest.raises(ModelError, match="did you mean .*resnet18"):
        load_model("torchvision:resnet1")


def test_pretrained_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ModelError, match="local cache"):
        load_model("torchvision:resnet18", LoadOptions(pretrained=True))


def test_model_kwargs_reach_timm():
    loaded = load_model(ARCH, LoadOptions(num_classes=4, model_kwargs={"layers": [1, 1, 1, 1]}))
    assert len(loaded.model.layer1) == 1


def test_spec_parsing():
    assert parse_model_spec("resnet18").source == "timm"
    assert parse_model_spec("timm:resnet18").name == "resnet18"
    spec = parse_model_spec("torchvision:resnet50:IMAGENET1K_V2")
    assert (spec.source, spec.name, spec.weights) == ("torchvision", "resnet50", "IMAGENET1K_V2")
    assert parse_model_spec("hf-hub:timm/resnet18.a1_in1k").source == "hf-hub"
    assert parse_model_spec("./model.pt").source == "path"
    assert parse_model_spec("mypkg.models:build").source == "callable"


def test_callable_models(monkeypatch):
    loaded = load_model("tinymodels:custom_net", LoadOptions(num_classes=3))
    assert loaded.model.fc.out_features == 3


def test_clean_state_dict_strips_prefixes():
    t = torch.zeros(1)
    assert list(clean_state_dict({"module._orig_mod.a.b": t, "n_averaged": t, "_orig_mod.c": t})) == ["a.b", "c"]
