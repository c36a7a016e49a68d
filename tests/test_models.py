"""Every checkpoint form loads the same tensors; specs parse; failures explain themselves."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

import tinymodels
from resprobe.errors import ModelError
from resprobe.models.loading import LoadOptions, load_model, parse_model_spec
from resprobe.models.checkpoints import clean_state_dict

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


def test_pretrained_offline_refuses_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ModelError, match="local cache"):
        load_model("torchvision:resnet18", LoadOptions(pretrained=True, offline=True))


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


class WithComputedBuffer(torch.nn.Module):
    """A model whose constructor computes a buffer that checkpoints do not hold (non-persistent)."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.fc = torch.nn.Linear(4, num_classes)
        self.register_buffer("scale", torch.arange(4.0) + 1, persistent=False)

    def forward(self, x):
        return self.fc(x * self.scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_build_with_weights_skips_random_init_and_keeps_model_dtypes(dtype, monkeypatch):
    import resprobe.models.build as models
    from resprobe.models.build import build_with_weights

    state = {k: v.to(dtype) for k, v in reference_state().items()}
    arch = {"source": "timm", "name": "resnet18", "num_classes": 7, "kwargs": KWARGS}
    loads = []
    load_weights = models.load_weights
    monkeypatch.setattr(models, "load_weights", lambda *a, **k: (loads.append(k.get("assign")), load_weights(*a, **k)))
    model, _ = build_with_weights(arch, state, "test")
    assert loads == [True]  # one load, into the model built on the meta device
    tensors = [*model.parameters(), *model.buffers()]
    assert not any(t.is_meta for t in tensors)
    assert all(t.dtype == (torch.int64 if t.dtype == torch.int64 else torch.float32) for t in tensors)
    assert_same(model, state)


def test_build_with_weights_falls_back_where_the_checkpoint_lacks_a_tensor(monkeypatch):
    """A buffer computed at construction is not in the checkpoint: built and loaded the ordinary way."""
    import resprobe.models.build as models
    from resprobe.models.build import build_with_weights

    monkeypatch.setattr(models, "build_architecture", lambda arch, pretrained=False, offline=False: (WithComputedBuffer(), None))
    state = {k: torch.randn_like(v) for k, v in WithComputedBuffer().state_dict().items()}
    model, _ = build_with_weights({"source": "callable", "name": "x"}, state, "test")
    assert torch.equal(model.scale, torch.arange(4.0) + 1) and not model.scale.is_meta
    assert torch.equal(model.fc.weight, state["fc.weight"])


# --------------------------------------------------------------------------------------------------
# Models built without weights: seeded from --seed; the weights fingerprint (issue 22, items 13-16)

RANDOM_KWARGS = {**KWARGS, "zero_init_last": False}


def _random(seed: int) -> dict[str, torch.Tensor]:
    model = load_model(ARCH, LoadOptions(num_classes=7, model_kwargs=RANDOM_KWARGS, seed=seed)).model
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_model_without_weights_is_seeded_and_the_global_rng_is_left_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, other = _random(0), _random(0), _random(1)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random stream is not disturbed
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc.weight"], other["fc.weight"])


def test_weights_sha256_covers_names_dtypes_shapes_and_values():
    from resprobe.models.fingerprint import state_dict_sha256

    state = {"a.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.zeros(2), "n": torch.tensor(3)}
    digest = state_dict_sha256(state)
    assert len(digest) == 64 and digest == state_dict_sha256(dict(reversed(list(state.items()))))  # key order
    assert digest == state_dict_sha256({k: v.clone() for k, v in state.items()})
    changed = [
        {**state, "a.weight": state["a.weight"].clone().index_put_((torch.tensor(1), torch.tensor(2)),
                                                                   torch.tensor(5.5))},  # one value
        {**state, "a.weight": state["a.weight"].reshape(3, 2)},  # same bytes, other shape
        {**state, "a.weight": state["a.weight"].view(torch.int32)},  # same bytes, other dtype
        {"b.weight" if k == "a.weight" else k: v for k, v in state.items()},  # other name
        {k: v for k, v in state.items() if k != "n"},
        {**state, "a.weight": state["a.weight"].t().contiguous().t()},  # a non-contiguous copy: equal values
    ]
    assert [state_dict_sha256(s) == digest for s in changed] == [False] * 5 + [True]
    # bfloat16 (no numpy dtype) and 0-dimensional tensors hash too
    assert state_dict_sha256({"x": torch.ones(3, dtype=torch.bfloat16)}) != state_dict_sha256({"x": torch.ones(3)})
    # a model hashes as its state dict
    model = torch.nn.Linear(2, 2)
    assert state_dict_sha256(model) == state_dict_sha256(model.state_dict())


def test_file_sha256_is_cached_by_path_size_and_times(tmp_path, monkeypatch):
    import hashlib
    import os

    import resprobe.models.fingerprint as models

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "w.pt"
    path.write_bytes(b"first")
    assert models.file_sha256(path) == hashlib.sha256(b"first").hexdigest()
    assert any((tmp_path / "cache").rglob("*.json"))  # under the user's cache dir, not beside the file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "w.pt"]
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: (reads.append(str(p)), real_open(p, *a, **k))[1])
    assert models.file_sha256(path) == hashlib.sha256(b"first").hexdigest()
    assert str(path) not in reads  # the unchanged file is not read again
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    stat = path.stat()
    path.write_bytes(b"other")  # same size, modification time put back: the change time still differs
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert models.file_sha256(path) == hashlib.sha256(b"other").hexdigest()


def test_cli_eval_of_a_model_without_weights_is_the_same_network_for_the_same_seed():
    import json

    from conftest import DATA, invoke

    args = ["eval", ARCH, "--num-classes", "4", "--model-kwargs", json.dumps(RANDOM_KWARGS), "--input-size", "32",
            "--data", DATA, "--limit", "16", "--device", "cpu", "-f", "json"]
    first, again = (json.loads(invoke(*args, "--seed", "2").stdout) for _ in range(2))
    assert first["loss"] == again["loss"] and len(first["weights_sha256"]) == 64
    assert first["weights_sha256"] == again["weights_sha256"] and first["checkpoint_sha256"] is None
    other = json.loads(invoke(*args, "--seed", "3").stdout)
    assert other["weights_sha256"] != first["weights_sha256"]


def test_weights_fingerprint_of_an_unchanged_checkpoint_is_remembered(tmp_path, monkeypatch):
    import resprobe.models.fingerprint as models

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "w.pt"
    torch.save(_random(0), path)
    opts = LoadOptions(checkpoint=str(path), num_classes=7, model_kwargs=RANDOM_KWARGS)
    first = load_model(ARCH, opts)
    assert models.weights_fingerprint(first) == models.state_dict_sha256(first.model)
    hashed = []
    real = models.state_dict_sha256
    monkeypatch.setattr(models, "state_dict_sha256", lambda m: (hashed.append(1), real(m))[1])
    again = load_model(ARCH, opts)
    assert models.weights_fingerprint(again) == real(again.model) and hashed == []  # remembered, not hashed
    torch.save(_random(1), path)  # other bytes under the same name: hashed anew
    changed = load_model(ARCH, opts)
    assert models.weights_fingerprint(changed) == real(changed.model) != real(first.model)
    assert hashed == [1]


def test_torchrun_ranks_with_different_weights_are_refused(monkeypatch):
    """A callable that draws its own randomness can still differ between ranks: one line, not mixed figures."""
    from resprobe import distributed, probe

    monkeypatch.setattr(distributed, "in_lockstep", lambda: True)
    monkeypatch.setattr(distributed, "all_gather", lambda value: [value, "f" * 64])
    with pytest.raises(ModelError, match="different weights") as refused:
        probe._check_same_weights_on_every_rank("a" * 64)
    assert "\n" not in str(refused.value)
    monkeypatch.setattr(distributed, "all_gather", lambda value: [value, value])
    probe._check_same_weights_on_every_rank("a" * 64)


# Small builds of families whose classifier is not ``fc`` (torchvision's last Linear, timm's
# pretrained_cfg["classifier"]); the checkpoints are 10-class, MODEL is given without --num-classes.
HEADS = [
    ("torchvision:mobilenet_v2", {"width_mult": 0.25}),  # classifier.1
    ("torchvision:efficientnet_b0", {}),  # classifier.1
    ("torchvision:regnet_x_400mf", {}),  # fc
    ("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2}),
    ("timm:convnext_atto", {"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]}),  # head.fc
]


@pytest.mark.parametrize("spec,kwargs", HEADS, ids=[s for s, _ in HEADS])
def test_class_count_comes_from_any_classifier(tmp_path, spec, kwargs):
    source, name = spec.split(":")
    torch.manual_seed(0)
    if source == "torchvision":
        from torchvision.models import get_model

        model = get_model(name, num_classes=10, **kwargs)
    else:
        import timm

        model = timm.create_model(name, num_classes=10, **kwargs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "w.pt"
    torch.save(state, path)
    loaded = load_model(spec, LoadOptions(checkpoint=path, model_kwargs=kwargs))
    assert loaded.num_classes == 10
    assert_same(loaded.model, state)


@pytest.mark.parametrize("name,head", [("vit_b_16", "heads.head"), ("swin_t", "head"), ("convnext_tiny", "classifier.2"),
                                       ("maxvit_t", "classifier.5"), ("mobilenet_v3_small", "classifier.3"),
                                       ("squeezenet1_0", "classifier.1"), ("inception_v3", "fc")])
def test_torchvision_classifier_is_found_without_a_name_list(name, head):
    from resprobe.models.build import _classifier_name

    assert _classifier_name({"source": "torchvision", "name": name, "kwargs": {}}) == head


def test_classifier_key_prefers_the_linear_with_the_class_count():
    from resprobe.models.build import classifier_key

    model = torch.nn.Sequential(torch.nn.Linear(4, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))
    assert classifier_key(model) == "2"
    assert classifier_key(model, num_classes=10) == "0"
