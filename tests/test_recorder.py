"""The recorder's per-sample statistics against an independent computation.

The reference splits each model by hand: the stem and the blocks before block j give h; F is
recomputed from the block's own layers with out-of-place functions; out = post(h + F) (identity
blocks); the rest of the network and the head give the per-sample losses; plain autograd gives
g = ∂ℓ/∂h and g_out = ∂ℓ/∂out. No hook is involved.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tinymodels
from resprobe.models.blocks import discover_blocks
from resprobe.recording.recorder import STAT_NAMES, Recorder, collect
from resprobe.runtime import make_runtime

# -- the model split by hand -------------------------------------------------------------------------


def tv_branch(b: nn.Module, h: torch.Tensor) -> torch.Tensor:
    if hasattr(b, "bn3"):
        x = F.relu(b.bn1(b.conv1(h)))
        x = F.relu(b.bn2(b.conv2(x)))
        return b.bn3(b.conv3(x))
    return b.bn2(b.conv2(F.relu(b.bn1(b.conv1(h)))))


def timm_branch(b: nn.Module, h: torch.Tensor) -> torch.Tensor:
    if hasattr(b, "bn3"):  # Bottleneck (SE-ResNeXt)
        x = F.relu(b.bn1(b.conv1(h)))
        x = F.relu(b.bn2(b.conv2(x)))
        x = b.bn3(b.conv3(x))
    else:
        x = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(h)))))
    if b.se is not None:
        x = b.se(x)
    return x


def v2_branch(b: nn.Module, h: torch.Tensor) -> torch.Tensor:
    x = b.conv1(b.norm1(h))
    x = b.conv2(b.norm2(x))
    return b.conv3(b.norm3(x))


def split(model: nn.Module):
    """(stem, [(name, block)], head, branch_fn, preact) for the three families."""
    import timm.models.resnetv2 as v2

    if isinstance(model, v2.ResNetV2):
        blocks = [(f"stages.{i}.blocks.{k}", blk) for i, s in enumerate(model.stages) for k, blk in enumerate(s.blocks)]
        return model.stem, blocks, lambda x: model.forward_head(model.norm(x)), v2_branch, True
    blocks = [(f"layer{i}.{k}", blk) for i in range(1, 5) for k, blk in enumerate(getattr(model, f"layer{i}"))]
    if hasattr(model, "act1"):  # timm ResNet
        stem = lambda x: model.maxpool(F.relu(model.bn1(model.conv1(x))))  # noqa: E731
        return stem, blocks, model.forward_head, timm_branch, False
    stem = lambda x: model.maxpool(F.relu(model.bn1(model.conv1(x))))  # noqa: E731
    head = lambda x: model.fc(torch.flatten(model.avgpool(x), 1))  # noqa: E731
    return stem, blocks, head, tv_branch, False


def reference_stats(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    stem, blocks, head, branch_fn, preact = split(model)
    out_stats = {name: np.full((len(x), len(blocks)), np.nan) for name in STAT_NAMES}
    with torch.no_grad():
        inputs = [stem(x)]
        for _, block in blocks:
            inputs.append(block(inputs[-1].clone()))
    for j, (_, block) in enumerate(blocks):
        h = inputs[j].clone().requires_grad_(True)
        identity = inputs[j].shape == inputs[j + 1].shape
        f = branch_fn(block, h)  # transitions too: their branch starts from h as well
        if identity:
            out = f + h if preact else F.relu(f + h)
        else:
            out = block(h.clone())
        z = out
        for _, later in blocks[j + 1 :]:
            z = later(z)
        losses = F.cross_entropy(head(z), y, reduction="none")
        g, g_out = torch.autograd.grad(losses.sum(), [h, out])
        flat = lambda t: t.detach().double().flatten(1).numpy()  # noqa: E731
        hn, gn, fn = (np.linalg.norm(flat(t), axis=1) for t in (h, g, f))
        out_stats["input_norm"][:, j] = hn
        out_stats["grad_norm"][:, j] = gn
        out_stats["branch_norm"][:, j] = fn
        if identity:
            u = out - h
            un = np.linalg.norm(flat(u), axis=1)
            out_stats["update_norm"][:, j] = un
            out_stats["dot"][:, j] = (flat(f) * flat(g)).sum(1)
            out_stats["update_dot"][:, j] = (flat(u) * flat(g)).sum(1)
            out_stats["out_dot"][:, j] = (flat(u) * flat(g_out)).sum(1)
            out_stats["cos"][:, j] = out_stats["dot"][:, j] / (fn * gn)
            out_stats["update_cos"][:, j] = out_stats["update_dot"][:, j] / (un * gn)
    return out_stats


FAMILIES = [tinymodels.timm_basic, tinymodels.timm_seresnext, tinymodels.timm_resnetv2, tinymodels.torchvision_tiny,
            tinymodels.torchvision_bottleneck]


@pytest.mark.parametrize("make", FAMILIES, ids=lambda f: f.__name__)
def test_statistics_match_hand_split_autograd(make):
    model = make().requires_grad_(False)
    anatomy = discover_blocks(model, (3, 32, 32))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 32, 32, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    with Recorder(anatomy, make_runtime("cpu")) as recorder:
        got = recorder.run_batch(x, y, torch.arange(8))
    want = reference_stats(model, x, y)
    _, blocks, *_ = split(model)
    assert anatomy.names == [name for name, _ in blocks]
    for name in STAT_NAMES:
        np.testing.assert_allclose(got.stats[name], want[name], rtol=2e-4, atol=1e-5, err_msg=name, equal_nan=True)
    # every identity block produced numbers, transitions only norms
    for j, block in enumerate(anatomy.blocks):
        assert np.isfinite(got.stats["grad_norm"][:, j]).all()
        assert np.isfinite(got.stats["cos"][:, j]).all() == block.is_identity


def test_post_activation_branch_differs_from_update():
    """In post-activation blocks the ReLU after the sum clips: F and U are different readings."""
    model = tinymodels.torchvision_tiny().requires_grad_(False)
    anatomy = discover_blocks(model, (3, 32, 32))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with Recorder(anatomy, make_runtime("cpu")) as recorder:
        got = recorder.run_batch(x, torch.zeros(4, dtype=torch.long), torch.arange(4))
    assert not np.allclose(got.stats["cos"][:, 0], got.stats["update_cos"][:, 0])


def test_target_pred_uses_model_prediction():
    model = tinymodels.timm_basic().requires_grad_(False)
    anatomy = discover_blocks(model, (3, 32, 32))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        pred = model(x).argmax(1)
    with Recorder(anatomy, make_runtime("cpu"), target="pred") as recorder:
        by_pred = recorder.run_batch(x, (pred + 1) % 5, torch.arange(4))
    with Recorder(anatomy, make_runtime("cpu")) as recorder:
        by_label = recorder.run_batch(x, pred, torch.arange(4))
    np.testing.assert_allclose(by_pred.stats["cos"], by_label.stats["cos"], rtol=1e-6, equal_nan=True)
    assert not np.allclose(by_pred.loss, by_label.loss)  # `loss` stays against the label


def test_no_weight_gradients_and_hooks_removed():
    model = tinymodels.timm_basic().requires_grad_(False)
    anatomy = discover_blocks(model, (3, 32, 32))
    with Recorder(anatomy, make_runtime("cpu")) as recorder:
        recorder.run_batch(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long), torch.arange(2))
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_save_tensors_keeps_first_samples():
    model = tinymodels.torchvision_tiny().requires_grad_(False)
    anatomy = discover_blocks(model, (3, 32, 32))
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    y = torch.zeros(6, dtype=torch.long)
    with Recorder(anatomy, make_runtime("cpu"), save_tensors=3) as recorder:
        first = recorder.run_batch(x[:2], y[:2], torch.arange(2))
        second = recorder.run_batch(x[2:], y[2:], torch.arange(2, 6))
    block = anatomy.blocks[0]
    assert first.tensors[block.name]["input"].shape == (2, *block.in_shape)
    assert second.tensors[block.name]["grad"].shape == (1, *block.in_shape)
    # the kept tensors reproduce the recorded statistics
    f, g = first.tensors[block.name]["branch"], first.tensors[block.name]["grad"]
    cos = (f * g).sum((1, 2, 3)) / (np.linalg.norm(f.reshape(2, -1), axis=1) * np.linalg.norm(g.reshape(2, -1), axis=1))
    np.testing.assert_allclose(cos, first.stats["cos"][:, 0], rtol=1e-4)


def test_custom_blocks_named_by_glob():
    model = tinymodels.custom_net().requires_grad_(False)
    anatomy = discover_blocks(model, (3, 16, 16), ["body.*"])
    assert anatomy.names == ["body.0", "body.1", "body.2"]
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    y = torch.zeros(4, dtype=torch.long)
    with Recorder(anatomy, make_runtime("cpu")) as recorder:
        got = recorder.run_batch(x, y, torch.arange(4))
    # generic blocks: out = h + F, so F = U
    np.testing.assert_allclose(got.stats["cos"], got.stats["update_cos"], rtol=1e-6)
    # reference for the middle block
    with torch.no_grad():
        h = model.body[0](model.stem(x))
    h.requires_grad_(True)
    out = model.body[1](h)
    losses = F.cross_entropy(model.fc(model.body[2](out).mean((2, 3))), y, reduction="none")
    (g,) = torch.autograd.grad(losses.sum(), [h])
    u = (out - h).detach()
    cos = (u * g).sum((1, 2, 3)) / (u.flatten(1).norm(dim=1) * g.flatten(1).norm(dim=1))
    np.testing.assert_allclose(got.stats["cos"][:, 1], cos.numpy(), rtol=1e-4)


def test_collect_concatenates_batches():
    model = tinymodels.timm_basic().requires_grad_(False)
    anatomy = discover_blocks(model, (3, 32, 32))

    class P:  # the part of a Probe that collect() needs
        pass

    probe = P()
    probe.anatomy, probe.runtime = anatomy, make_runtime("cpu")
    x = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    y = torch.randint(0, 5, (10,), generator=torch.Generator().manual_seed(7))
    loader = [(x[i : i + 4], y[i : i + 4], torch.arange(i, min(i + 4, 10))) for i in range(0, 10, 4)]
    recorded = collect(probe, loader)
    assert recorded.n_samples == 10
    np.testing.assert_array_equal(recorded.index, np.arange(10))
    with Recorder(anatomy, make_runtime("cpu")) as recorder:
        whole = recorder.run_batch(x, y, torch.arange(10))
    np.testing.assert_allclose(recorded.stats["cos"], whole.stats["cos"], rtol=1e-4, atol=1e-6)


def _precision_state():
    """The TF32 switches as torch >= 2.9 exposes them (read without the legacy getters, which raise
    once the new settings disagree with them)."""
    b = torch.backends
    return (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision)


@pytest.fixture
def restore_precision_settings():
    """Put torch's precision settings back whatever the test does (monkeypatch cannot: torch serves
    them through ``__getattr__``, so monkeypatch finds no attribute to restore)."""
    saved = _precision_state()
    yield
    b = torch.backends
    b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision = saved


@pytest.mark.parametrize("precision,tf32", [("fp32", False), ("tf32", True)])
def test_backward_runs_with_the_chosen_tf32_setting(precision, tf32, restore_precision_settings):
    """cuDNN allows TF32 by default; fp32 must turn it off in the backward pass too, then restore it."""
    b = torch.backends
    b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision, b.cuda.matmul.fp32_precision = "tf32", "tf32", "none"
    model = tinymodels.timm_basic().requires_grad_(False)
    anatomy = discover_blocks(model, (3, 32, 32))
    seen = []
    model.fc.register_full_backward_pre_hook(lambda *_: seen.append(_precision_state()))
    with Recorder(anatomy, make_runtime("cpu", precision)) as recorder:
        recorder.run_batch(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long), torch.arange(2))
    expected = "tf32" if tf32 else "ieee"
    assert seen == [(expected, expected, expected)]
    assert _precision_state() == ("none", "tf32", "tf32")


@pytest.mark.parametrize("precision,tf32", [("fp32", False), ("tf32", True)])
def test_numerics_uses_the_legacy_flags_where_torch_has_no_fp32_precision(precision, tf32, monkeypatch):
    """Older torch (< 2.9) has only ``allow_tf32``: those flags are set inside and restored after."""
    from types import SimpleNamespace

    from resprobe import runtime

    legacy = SimpleNamespace(cuda=SimpleNamespace(matmul=SimpleNamespace(allow_tf32=False)),
                             cudnn=SimpleNamespace(allow_tf32=True))
    assert runtime.tf32_controls(legacy) == [(legacy.cuda.matmul, "allow_tf32", True, False),
                                             (legacy.cudnn, "allow_tf32", True, False)]
    original = runtime.tf32_controls
    monkeypatch.setattr(runtime, "tf32_controls", lambda backends=None: original(legacy))
    with make_runtime("cpu", precision).numerics():
        assert (legacy.cuda.matmul.allow_tf32, legacy.cudnn.allow_tf32) == (tf32, tf32)
    assert (legacy.cuda.matmul.allow_tf32, legacy.cudnn.allow_tf32) == (False, True)


def test_bf16_autocast_statistics_are_float32_and_close_to_fp32():
    """bf16 activations, float32 statistics: close to the fp32 run at bf16's precision."""
    model = tinymodels.torchvision_tiny().requires_grad_(False)
    anatomy = discover_blocks(model, (3, 32, 32))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    y = torch.zeros(4, dtype=torch.long)
    got = {}
    for precision in ("fp32", "bf16"):
        with Recorder(anatomy, make_runtime("cpu", precision)) as recorder:
            got[precision] = recorder.run_batch(x, y, torch.arange(4)).stats
    for name in STAT_NAMES:
        assert got["bf16"][name].dtype == np.float32
        scale = np.nanmax(np.abs(got["fp32"][name]))
        tolerance = 0.02 if name.endswith("norm") else 0.15  # dot products of near-orthogonal vectors cancel
        np.testing.assert_allclose(got["bf16"][name], got["fp32"][name], atol=tolerance * scale, err_msg=name,
                                   equal_nan=True)
    assert not np.array_equal(got["bf16"]["update_norm"], got["fp32"]["update_norm"])  # bf16 really ran


def test_channels_last_statistics_match_hand_split_autograd():
    """The CUDA layout (channels_last model and batch) read on the CPU: per-sample reductions flatten
    channels_last tensors as views, and mixed layouts are aligned before a dot product."""
    model = tinymodels.torchvision_bottleneck().requires_grad_(False)
    anatomy = discover_blocks(model, (3, 32, 32))
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 32, 32, generator=g)
    y = torch.randint(0, 5, (4,), generator=g)
    want = reference_stats(model, x, y)
    model.to(memory_format=torch.channels_last)
    with Recorder(anatomy, make_runtime("cpu")) as recorder:
        got = recorder.run_batch(x.contiguous(memory_format=torch.channels_last), y, torch.arange(4))
    for name in STAT_NAMES:
        np.testing.assert_allclose(got.stats[name], want[name], rtol=2e-4, atol=1e-5, err_msg=name, equal_nan=True)


def test_per_sample_dot_products_whatever_the_layouts():
    from resprobe.recording.recorder import _dot, _norm

    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    want = (a.double() * b.double()).sum((1, 2, 3))
    cl = torch.channels_last
    for x, y in [(a, b), (a.contiguous(memory_format=cl), b.contiguous(memory_format=cl)),
                 (a.contiguous(memory_format=cl), b), (a, b.contiguous(memory_format=cl)),
                 (a.transpose(2, 3), b.transpose(2, 3)), (a.bfloat16(), b)]:
        tolerance = 1e-2 if x.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(_dot(x, y).double(), want if x.dtype != torch.bfloat16 else
                                   (x.double() * y.double()).sum((1, 2, 3)), rtol=tolerance, atol=tolerance)
        assert _dot(x, y).dtype == torch.float32
    torch.testing.assert_close(_norm(a.contiguous(memory_format=cl)).double(), a.double().flatten(1).norm(dim=1))


def test_iterate_launches_the_next_batch_before_awaiting_the_last():
    """A GPU stays busy: batch k+1 is launched before batch k's results are awaited; results keep
    their order, and the last batch is not lost. The CPU awaits each batch at once."""
    from resprobe.recording.recorder import iterate

    events: list[str] = []

    class Pending:
        def __init__(self, k: int):
            self.k = k

        def result(self):
            events.append(f"await {self.k}")
            return [self.k]

    class FakeRecorder:
        launches_ahead = True  # as on CUDA

        def launch_batch(self, images, labels, indices):
            events.append(f"launch {images}")
            return Pending(images)

    seen = []
    results = list(iterate(FakeRecorder(), [(k, None, None) for k in range(3)], progress=seen.append))
    assert results == [[0], [1], [2]] and seen == [1, 1, 1]
    assert events == ["launch 0", "launch 1", "await 0", "launch 2", "await 1", "await 2"]
    # on the CPU a launch computes the whole batch: its results are taken (and written) at once
    events.clear()
    FakeRecorder.launches_ahead = False
    assert list(iterate(FakeRecorder(), [(k, None, None) for k in range(2)])) == [[0], [1]]
    assert events == ["launch 0", "await 0", "launch 1", "await 1"]


def test_a_launched_batch_keeps_its_own_copy_of_the_indices():
    """The caller may reuse its tensors as soon as launch_batch returns."""
    model = tinymodels.torchvision_tiny().requires_grad_(False)
    anatomy = discover_blocks(model, (3, 32, 32))
    indices = torch.arange(10, 14)
    labels = torch.zeros(4, dtype=torch.long)
    with Recorder(anatomy, make_runtime("cpu")) as recorder:
        pending = recorder.launch_batch(torch.randn(4, 3, 32, 32), labels, indices)
        indices.zero_()
        labels.fill_(3)
        got = pending.result()
    np.testing.assert_array_equal(got.index, [10, 11, 12, 13])
    np.testing.assert_array_equal(got.label, [0, 0, 0, 0])
