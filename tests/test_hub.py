"""Pretrained weights from prepared hub caches on disk: never the network (a socket refuses it)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, invoke

from resprobe.errors import ModelError
from resprobe.models.loading import LoadOptions, load_model

pytestmark = pytest.mark.usefixtures("one_thread")

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to reach the network fails at once, loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    connect = socket.socket.connect

    def connect_locally(sock, address):  # Unix sockets (loader workers) are not the network
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            refuse(address)
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect_locally)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch hub caches under tmp_path (HF_HOME, TORCH_HOME)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def put_hf(cache_root: Path, repo: str, files: dict[str, object]) -> Path:
    """A hub cache entry as huggingface_hub writes it: snapshots/REV/FILE and refs/main."""
    from safetensors.torch import save_file

    repo_dir = cache_root / "hf" / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / REV
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(REV)
    for name, content in files.items():
        if name.endswith(".safetensors"):
            save_file({k: v.contiguous() for k, v in content.items()}, str(snapshot / name))
        elif name.endswith(".bin"):
            torch.save(content, snapshot / name)
        else:
            (snapshot / name).write_text(json.dumps(content))
    return snapshot


def random_weights(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A timm model's state dict with every tensor random (BN statistics too), unlike a fresh model's."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name)
    state = model.state_dict()
    out = {}
    for k, v in state.items():
        if v.is_floating_point():
            out[k] = torch.rand_like(v) * 0.5 + 0.5 if k.endswith("running_var") else torch.randn_like(v) * 0.05
        else:
            out[k] = v.clone()
    return out


def image_folder(root: Path, n: int = 2, size: int = 40) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("n01440764", "n01443537"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(root / cls / f"{i}.jpg")
    return root


@pytest.mark.slow
def test_import_changes_no_environment_variable():
    code = (
        "import os, pkgutil, importlib\n"
        "before = dict(os.environ)\n"
        "import resprobe\n"
        "for m in pkgutil.walk_packages(resprobe.__path__, 'resprobe.'):\n"
        "    try:\n"
        "        importlib.import_module(m.name)\n"
        "    except ImportError:\n"
        "        pass  # an optional dependency (triton)\n"
        "after = dict(os.environ)\n"
        "changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))\n"
        "print(changed)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_timm_pretrained_from_the_cache_equals_the_same_weights_as_checkpoint(caches, tmp_path, monkeypatch):
    """The issue's check: HF_HUB_OFFLINE=1 set by the caller, a prepared cache, eval --pretrained equals
    eval --checkpoint of the same file."""
    weights = random_weights("resnet18")
    snapshot = put_hf(caches, "timm/resnet18.a1_in1k", {"model.safetensors": weights})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = image_folder(tmp_path / "val")
    common = ["--data", data, "--device", "cpu", "--input-size", "40", "--workers", "0", "-f", "json"]
    pretrained = json.loads(invoke("eval", "timm:resnet18.a1_in1k", "--pretrained", *common).stdout)
    given = json.loads(invoke("eval", "timm:resnet18.a1_in1k", "--checkpoint", snapshot / "model.safetensors",
                              *common).stdout)
    for key in ("n", "loss", "acc", "top5"):
        assert pretrained[key] == given[key]
    loaded = load_model("timm:resnet18.a1_in1k", LoadOptions(pretrained=True))
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_pretrained_cfg_drives_preprocessing_and_classes(caches):
    from resprobe.data.preprocessing import default_preprocessing

    put_hf(caches, "timm/test_resnet.r160_in1k", {"model.safetensors": random_weights("test_resnet")})
    loaded = load_model("timm:test_resnet.r160_in1k", LoadOptions(pretrained=True, offline=True))
    pre = default_preprocessing(loaded)
    assert pre.input_size == (3, 160, 160) and pre.mean == (0.5, 0.5, 0.5) and pre.crop_pct == 0.95
    assert loaded.num_classes == 1000
    # a new head: timm keeps the pretrained body and initializes the classifier
    with pytest.warns(UserWarning, match=r"1000-class classifier \(fc\) is left out.* new 10-class classifier"):
        ten = load_model("timm:test_resnet.r160_in1k", LoadOptions(pretrained=True, offline=True, num_classes=10))
    assert ten.num_classes == 10
    assert torch.equal(ten.model.conv1[0].weight, loaded.model.conv1[0].weight)


def test_offline_with_an_empty_cache_is_one_line_at_once(caches):
    """"At once": no network attempt is made (no_network would turn one into another message), so
    there is nothing to wait for."""
    for model in ("timm:resnet18.a1_in1k", "torchvision:resnet18", "hf-hub:timm/resnet18.a1_in1k"):
        result = invoke("eval", model, "--pretrained", "--offline", "--data", "synthetic:2", "--device", "cpu", code=1)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: offline"), result.stderr
        where = str(caches / "torch") if model.startswith("torchvision") else str(caches / "hf" / "hub")
        assert where in lines[0]
        assert model.split(":", 1)[1].split(":")[0].replace("timm/", "") in lines[0]


def test_user_hf_hub_offline_counts_as_offline(caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="offline: .*resnet18.a1_in1k"):
        load_model("timm:resnet18.a1_in1k", LoadOptions(pretrained=True))


def test_online_pretrained_goes_through_timm_create_model(caches, monkeypatch):
    """Without --offline and not cached, the hub is asked once whether it answers, then timm loads (and
    downloads) the weights itself: no overlay, no cache_dir."""
    import timm

    from resprobe.models import hub

    calls = []
    real = timm.create_model
    asked = []
    monkeypatch.setattr(hub, "require_hub", lambda repo, filename, what: asked.append((repo, filename)))

    def spy(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, dict(kwargs)))
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    load_model("timm:test_resnet.r160_in1k", LoadOptions(pretrained=True))
    assert calls == [("test_resnet.r160_in1k", True, {})]
    assert asked == [("timm/test_resnet.r160_in1k", "model.safetensors")]


def test_hf_hub_name_offline_from_the_cached_snapshot(caches):
    import timm
    from timm.models import get_pretrained_cfg

    weights = random_weights("test_resnet", seed=1)
    cfg = {k: v for k, v in get_pretrained_cfg("test_resnet.r160_in1k").to_dict().items()
           if k not in ("hf_hub_id", "url", "file", "state_dict", "source", "architecture", "tag")}
    put_hf(caches, "someone/tiny", {"config.json": {"architecture": "test_resnet", "num_classes": 1000,
                                                    "pretrained_cfg": cfg},
                                    "model.safetensors": weights})
    loaded = load_model("hf-hub:someone/tiny", LoadOptions(pretrained=True, offline=True))
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert loaded.arch["source"] == "hf-hub" and loaded.arch["name"] == "someone/tiny"
    assert isinstance(loaded.model, type(timm.create_model("test_resnet")))


def _torchvision_file(caches: Path) -> Path:
    from torchvision.models import ResNet18_Weights

    return caches / "torch" / "hub" / "checkpoints" / os.path.basename(ResNet18_Weights.IMAGENET1K_V1.url)


def test_torchvision_weights_from_the_torch_hub_cache(caches):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    state = {k: (torch.randn_like(v) if v.is_floating_point() else v) for k, v in resnet18().state_dict().items()}
    path = _torchvision_file(caches)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    for spec, opts in (("torchvision:resnet18", LoadOptions(pretrained=True, offline=True)),
                       ("torchvision:resnet18:IMAGENET1K_V1", LoadOptions()),
                       ("torchvision:resnet18:DEFAULT", LoadOptions(offline=True))):
        loaded = load_model(spec, opts)
        for k, v in loaded.model.state_dict().items():
            assert torch.equal(v, state[k]), (spec, k)


def test_torchvision_downloads_what_is_not_cached(caches, monkeypatch):
    """Online and not cached: torch hub's download (progress bar, hash prefix), then the file is read."""
    from torchvision.models import ResNet18_Weights, resnet18

    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, Path(dst), hash_prefix, progress))
        torch.save(resnet18().state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    load_model("torchvision:resnet18", LoadOptions(pretrained=True))
    url = ResNet18_Weights.IMAGENET1K_V1.url
    assert calls == [(url, _torchvision_file(caches), "f37072fd", True)]
    calls.clear()
    load_model("torchvision:resnet18", LoadOptions(pretrained=True))  # cached now: no second download
    assert calls == []


def test_an_unknown_pretrained_tag_is_named_before_any_download(caches):
    for opts in (LoadOptions(pretrained=True), LoadOptions(pretrained=True, offline=True)):
        with pytest.raises(ModelError, match="no pretrained weights 'resnet18.foo'; its tags are .*resnet18.a1_in1k"):
            load_model("timm:resnet18.foo", opts)


def test_a_cached_pytorch_model_bin_is_used_when_there_is_no_safetensors(caches):
    weights = random_weights("test_resnet", seed=2)
    put_hf(caches, "timm/test_resnet.r160_in1k", {"pytorch_model.bin": weights})
    loaded = load_model("timm:test_resnet.r160_in1k", LoadOptions(pretrained=True, offline=True))
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, weights[k]), k


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0", "resnet18"])
def test_torchvision_pretrained_with_other_num_classes_gets_a_fresh_head(caches, name, run):
    """--pretrained --num-classes N: the cached body is loaded, the classifier (whatever its name) is a
    new N-class one, and stderr says so."""
    from torchvision.models import get_model, get_model_weights

    weights = get_model_weights(name).DEFAULT
    torch.manual_seed(0)
    state = {k: (torch.randn_like(v) if v.is_floating_point() else v) for k, v in get_model(name).state_dict().items()}
    path = caches / "torch" / "hub" / "checkpoints" / os.path.basename(weights.url)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    with pytest.warns(UserWarning, match=r"1000-class classifier .* new 10-class classifier"):
        loaded = load_model(f"torchvision:{name}", LoadOptions(pretrained=True, num_classes=10, offline=True))
    assert loaded.num_classes == 10
    own = loaded.model.state_dict()
    head = [k for k in state if own[k].shape != state[k].shape]
    assert len(head) == 2 and all(k.rsplit(".", 1)[0] == head[0].rsplit(".", 1)[0] for k in head)
    for key, value in state.items():
        if key not in head:
            assert torch.equal(own[key], value), key
    result = run("blocks", f"torchvision:{name}", "--pretrained", "--num-classes", 10, "--offline")
    assert "new 10-class classifier" in result.stderr


@pytest.fixture
def hub_unreachable(monkeypatch):
    """Every HTTP request of huggingface_hub fails as it does without a route to the hub (a
    ConnectError), and its backoff sleeps are recorded instead of slept: returns the list of sleeps."""
    import httpx2
    from huggingface_hub.utils import _http

    class Unreachable:
        def request(self, method, url, **kwargs):
            raise httpx2.ConnectError("[Errno -2] Name or service not known")

        def stream(self, method, url, **kwargs):
            raise httpx2.ConnectError("[Errno -2] Name or service not known")

    sleeps: list[float] = []
    monkeypatch.setattr(_http, "get_session", lambda: Unreachable())
    monkeypatch.setattr(_http.time, "sleep", sleeps.append)
    return sleeps


@pytest.mark.parametrize("model", ["timm:resnet18.a1_in1k", "hf-hub:timm/resnet18.a1_in1k"])
def test_pretrained_without_network_is_one_line_without_retries(caches, hub_unreachable, model, capfd):
    result = invoke("blocks", model, "--pretrained", code=1)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the Hugging Face hub"), result.stderr
    assert "--checkpoint" in lines[0] and "resnet18.a1_in1k" in lines[0]
    assert hub_unreachable == []  # no backoff: not one retry waited for
    assert "Retrying" not in capfd.readouterr().err  # nor logged by huggingface_hub's own handler


def test_pretrained_from_the_cache_needs_no_network(caches, hub_unreachable):
    """Online, but the weights are cached: they are used as they are, with no request at all."""
    weights = random_weights("test_resnet", seed=3)
    put_hf(caches, "timm/test_resnet.r160_in1k", {"model.safetensors": weights})
    loaded = load_model("timm:test_resnet.r160_in1k", LoadOptions(pretrained=True))
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert hub_unreachable == []


def test_quiet_retries_drops_only_huggingface_hubs_retry_lines(caplog):
    import logging

    from resprobe.models.hub import quiet_retries

    logger = logging.getLogger("huggingface_hub.utils._http")
    with caplog.at_level(logging.WARNING), quiet_retries():
        logger.warning("'[Errno -2] Name or service not known' thrown while requesting HEAD https://huggingface.co/x")
        logger.warning("Retrying in 1s [Retry 1/5].")
        logger.warning("something else")
    logger.warning("Retrying in 2s [Retry 2/5].")  # outside: the library's logging is as it was
    assert [r.getMessage() for r in caplog.records] == ["something else", "Retrying in 2s [Retry 2/5]."]
