"""The fused statistics kernel's arithmetic, run in Triton's CPU interpreter.

Not collected by the suite's default run (the name does not start with ``test_``):
``test_fused_stats.py`` runs this file with pytest in a process of its own, with TRITON_INTERPRET=1 set
before Triton is first imported, which is when Triton decides how to run kernels. Every figure is
checked against an independent computation: float64 sums of the same tensors, or autograd on the
model split by hand (``test_recorder.reference_stats``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import tinymodels
from resprobe.recording import fused_stats
from resprobe.recording._triton_kernels import _round_like
from resprobe.models.blocks import discover_blocks
from resprobe.recording.recorder import STAT_NAMES, Recorder
from resprobe.runtime import make_runtime
from test_fused_stats import float64_sums
from test_recorder import FAMILIES, reference_stats, split

pytestmark = pytest.mark.skipif(not fused_stats.interpreting(), reason="needs TRITON_INTERPRET=1 (test_fused_stats)")

CL = torch.channels_last


def five(shape, dtype, seed, layout=torch.contiguous_format):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype).contiguous(memory_format=layout) for _ in range(5)]


@pytest.mark.parametrize("shape", [(3, 16, 8, 8), (2, 5, 7, 9), (4, fused_stats.CHUNK + 3), (1, 32, 16, 16),
                                   (2, 3, 2 * fused_stats.CHUNK)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("has_branch", [True, False])
@pytest.mark.parametrize("has_g_out", [True, False])
def test_sums_equal_float64_sums(shape, dtype, has_branch, has_g_out):
    h, out, g, g_out, branch = five(shape, dtype, seed=len(shape) + shape[-1])
    g_out = g_out if has_g_out else None
    branch = branch if has_branch else None
    got = fused_stats.identity_sums(h, out, g, g_out, branch)
    assert got.dtype == torch.float32 and got.shape == (7, shape[0])
    want = float64_sums(h, out, g, g_out, branch)
    # float32 accumulation of up to 2·CHUNK terms of size ~1: a few float32 ulps of the sum of |terms|
    scale = float64_sums(h.abs(), out.abs() + h.abs(), g.abs(), None if g_out is None else g_out.abs(),
                         None if branch is None else branch.abs())
    assert ((got.double() - want).abs() <= 1e-5 * scale + 1e-6).all(), (got.double() - want).abs().max()


@pytest.mark.parametrize("layouts", ["all channels_last", "g contiguous", "branch and g_out contiguous"])
def test_sums_follow_h_layout(layouts):
    h, out, g, g_out, branch = five((2, 6, 5, 7), torch.float32, seed=3, layout=CL)
    if layouts == "g contiguous":
        g = g.contiguous()
    elif layouts != "all channels_last":
        g_out, branch = g_out.contiguous(), branch.contiguous()
    got = fused_stats.identity_sums(h, out, g, g_out, branch).double()
    torch.testing.assert_close(got, float64_sums(h, out, g, g_out, branch), rtol=1e-5, atol=1e-5)


def batchnorm(channels: int, seed: int) -> torch.nn.BatchNorm2d:
    """An eval-mode BatchNorm with running statistics and affine parameters far from the defaults."""
    generator = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm2d(channels).eval()
    bn.running_mean.copy_(torch.randn(channels, generator=generator))
    bn.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
    bn.weight.data.copy_(torch.randn(channels, generator=generator))
    bn.bias.data.copy_(torch.randn(channels, generator=generator))
    return bn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
@pytest.mark.parametrize("shape", [(3, 6, 5, 7), (2, 4, 33, 33)])
def test_branch_recomputed_from_batchnorm_input(dtype, layout, shape):
    """F = BatchNorm(x) recomputed in the kernel from x equals the module's own output, rounded to its
    dtype like the module rounds it; sums against float64 sums of the module's output."""
    x, h, out, g, g_out = five(shape, dtype, seed=shape[-1], layout=layout)
    bn = batchnorm(shape[1], seed=1)
    with torch.no_grad():
        f = bn(x) if dtype != torch.float16 else bn.half()(x)  # the module itself, no resprobe code
        bn.float()
    affine = fused_stats.AffineBranch.of(bn, x)
    assert affine is not None
    got = fused_stats.identity_sums(h, out, g, g_out, affine).double()
    torch.testing.assert_close(got, float64_sums(h, out, g, g_out, f), rtol=2e-5, atol=1e-4)
    if dtype == torch.bfloat16:  # F rounded to bf16 exactly as the module rounds it: the same sums, bit for bit
        torch.testing.assert_close(got, fused_stats.identity_sums(h, out, g, g_out, f).double(), rtol=0, atol=0)


@triton.jit
def _round_to_bf16_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets, _round_like(tl.load(x_ptr + offsets, mask=mask), tl.bfloat16), mask=mask)


def test_bf16_rounding_to_nearest_even_keeps_nan_and_infinity():
    # NaN as NVIDIA GPUs produce it (0x7FFFFFFF), other NaNs, ±inf, the largest float32, ties
    bits = torch.tensor([0x7FFFFFFF, 0x7FC00000, -1, 0x7F800000, -0x800000, 0x7F7FFFFF], dtype=torch.int32)
    x = torch.cat([bits.view(torch.float32), torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.14159, -2e-39])])
    y = torch.empty_like(x)
    _round_to_bf16_kernel[(1,)](x, y, len(x), BLOCK=16)
    nan = x.isnan()
    assert y[nan].isnan().all() and nan.sum() == 3
    torch.testing.assert_close(y[~nan], x[~nan].bfloat16().float(), rtol=0, atol=0)  # torch rounds to even


def test_unsupported_layouts_are_refused():
    h = torch.randn(2, 3, 4, 5).transpose(2, 3)
    assert not fused_stats.supported(h)
    assert not fused_stats.supported(torch.randn(2, 3, 4, 5, dtype=torch.float64))
    assert not fused_stats.supported(torch.randn(0, 3, 4, 5))
    with pytest.raises(ValueError, match="dense NCHW or channels_last"):
        fused_stats.identity_sums(h, h, h, None, None)
    h = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="shaped like h"):  # never read past a smaller tensor's end
        fused_stats.identity_sums(h, h, h[:, :2], None, None)


def record(model, x, y, precision="fp32", fused=True, affine_blocks=None):
    """The recorder's statistics; ``affine_blocks`` (a list) receives how many blocks kept a BatchNorm
    input instead of a copy of F."""
    anatomy = discover_blocks(model, (3, 32, 32))
    if affine_blocks is not None:
        original = fused_stats.AffineBranch.of

        def counted(module, x):
            affine = original(module, x)
            affine_blocks.append(affine is not None)
            return affine

        fused_stats.AffineBranch.of = staticmethod(counted)
    try:
        return _record(anatomy, x, y, precision, fused)
    finally:
        if affine_blocks is not None:
            fused_stats.AffineBranch.of = staticmethod(original)


def _record(anatomy, x, y, precision, fused):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to torch operations would warn: fail instead
        with Recorder(anatomy, make_runtime("cpu", precision), fused=fused) as recorder:
            got = recorder.run_batch(x, y, torch.arange(len(y)))
            assert recorder.identity_stats.fused == fused
    return got.stats


@pytest.mark.parametrize("make", FAMILIES, ids=lambda f: f.__name__)
def test_recorder_with_fused_kernel_matches_hand_split_autograd(make):
    model = make().requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 32, 32, generator=generator)
    y = torch.randint(0, 5, (8,), generator=generator)
    affine: list[bool] = []
    got = record(model, x, y, affine_blocks=affine)
    want = reference_stats(model, x, y)
    assert len(split(model)[1]) == got["cos"].shape[1]
    # post-activation blocks ending in a BatchNorm recompute F from its input; SE blocks copy F
    assert any(affine) == (make.__name__ in ("timm_basic", "torchvision_tiny", "torchvision_bottleneck"))
    for name in STAT_NAMES:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-4, atol=1e-5, err_msg=name, equal_nan=True)


def test_recorder_with_fused_kernel_on_channels_last():
    model = tinymodels.torchvision_bottleneck().requires_grad_(False)
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 32, 32, generator=generator)
    y = torch.randint(0, 5, (4,), generator=generator)
    want = reference_stats(model, x, y)
    model.to(memory_format=CL)
    affine: list[bool] = []
    got = record(model, x.contiguous(memory_format=CL), y, affine_blocks=affine)
    assert any(affine)
    for name in STAT_NAMES:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-4, atol=1e-5, err_msg=name, equal_nan=True)


@pytest.mark.parametrize("make", [tinymodels.torchvision_tiny, tinymodels.timm_resnetv2], ids=lambda f: f.__name__)
def test_bf16_fused_equals_bf16_torch_operations(make):
    """Same bf16 activations, statistics in float32 both ways: equal up to float32 summation order."""
    model = make().requires_grad_(False)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    y = torch.zeros(4, dtype=torch.long)
    fused = record(model, x, y, "bf16", fused=True)
    plain = record(model, x, y, "bf16", fused=False)
    for name in STAT_NAMES:
        scale = np.nanmax(np.abs(plain[name]))
        np.testing.assert_allclose(fused[name], plain[name], rtol=1e-4, atol=1e-5 * scale, err_msg=name,
                                   equal_nan=True)
