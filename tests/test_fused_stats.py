"""The fused statistics kernel (resprobe.recording.fused_stats): its arithmetic in Triton's interpreter, its
compilation for real GPUs, and how ``record`` chooses it and falls back from it.

CI has no GPU. The kernel's arithmetic runs in Triton's CPU interpreter (``fused_interpreted.py``, in
a process of its own); its compilation to machine code for NVIDIA GPUs runs without one, with the
compiler Triton ships.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from conftest import HERE, ROOT
from resprobe.recording import fused_stats
from resprobe.recording import recorder
from resprobe.recording.recorder import IdentityStats, fused_by_default, identity_block_stats
from resprobe.runtime import Runtime, make_runtime

pytestmark = pytest.mark.usefixtures("one_thread")


def block_tensors(seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, 5, 6, generator=g).to(dtype) for _ in range(5)]


def float64_sums(h, out, g, g_out, branch) -> torch.Tensor:
    """The seven sums the kernel computes, in float64 with plain torch (the last is 0 without g_out)."""
    h, out, g = h.double(), out.double(), g.double()
    update = out - h
    f = update if branch is None else branch.double()
    dot = lambda a, b: (a * b).flatten(1).sum(1)  # noqa: E731
    last = dot(update, g_out.double()) if g_out is not None else torch.zeros(len(h), dtype=torch.float64)
    return torch.stack([dot(h, h), dot(f, f), dot(update, update), dot(g, g), dot(f, g), dot(update, g), last])


def stand_in_kernel(*tensors) -> torch.Tensor:
    """float32 sums from float64 arithmetic: a stand-in for the kernel on machines without a GPU."""
    return float64_sums(*tensors).float()


@pytest.mark.slow  # a subprocess running the kernel in Triton's interpreter: ~30 s on 2 busy cores
def test_kernel_arithmetic_in_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "fused_interpreted.py")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("affine", [False, True], ids=["copied F", "F from BatchNorm input"])
def test_kernel_compiles_for_gpus_with_wide_loads(capability, dtype, affine, tmp_path, monkeypatch):
    """Compiled for A100 (sm_80) and H100 (sm_90) class GPUs: every tensor is read with 16-byte loads
    when the batch's pointers and per-sample size are 16-aligned, as Triton's launcher finds them for
    ResNet activations."""
    pytest.importorskip("triton")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # an older Triton without these names
        pytest.skip(f"this Triton cannot compile ahead of time: {exc}")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    from resprobe.recording._triton_kernels import identity_sums_kernel

    pointers = ["h_ptr", "out_ptr", "g_ptr", "g_out_ptr", "branch_ptr"]
    signature = {**{p: f"*{dtype}" for p in pointers}, "scale_ptr": "*fp32", "shift_ptr": "*fp32",
                 "partial_ptr": "*fp32", "n": "i32", "chunks": "i32", "channels": "i32", "plane": "i32",
                 **{flag: "constexpr" for flag in ("HAS_BRANCH", "AFFINE_BRANCH", "CHANNELS_LAST", "HAS_G_OUT",
                                                   "BLOCK", "STEPS")}}
    constants = {"HAS_BRANCH": True, "AFFINE_BRANCH": affine, "CHANNELS_LAST": True, "HAS_G_OUT": True,
                 "BLOCK": fused_stats.BLOCK, "STEPS": fused_stats.STEPS}
    aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 7, 8)}  # the tensors, the partials, n
    try:
        source = ASTSource(fn=identity_sums_kernel, signature=signature, constexprs=constants, attrs=aligned)
    except TypeError as exc:
        pytest.skip(f"this Triton's ahead-of-time API differs: {exc}")
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4})
    assert compiled.asm["cubin"]  # machine code for the GPU, not just PTX
    loads = [line for line in compiled.asm["ptx"].splitlines() if "ld.global" in line]
    # 1024 elements per step over 128 threads: 8 per thread, in 16-byte loads (v4.b32) from each tensor;
    # the per-channel scale and shift are gathered element by element
    wide = [line for line in loads if ".v4.b32" in line]
    assert len(wide) >= 5, loads
    assert len(loads) - len(wide) == (16 if affine else 0), loads


def test_record_uses_the_kernel_on_cuda_only(monkeypatch):
    monkeypatch.delenv("RESPROBE_FUSED_STATS", raising=False)
    assert not fused_by_default(make_runtime("cpu"))
    cuda = Runtime(torch.device("cuda"))  # not run: only the choice is tested
    assert fused_by_default(cuda) == fused_stats.triton_available()
    monkeypatch.setenv("RESPROBE_FUSED_STATS", "0")
    assert not fused_by_default(cuda)


@pytest.mark.parametrize("has_branch", [True, False])
@pytest.mark.parametrize("has_g_out", [True, False])
def test_statistics_from_the_kernel_sums_equal_torch_operations(has_branch, has_g_out, monkeypatch):
    """Norms, cosines and the missing ∂ℓ/∂out (NaN) composed from the seven sums, here from a float64
    stand-in for the kernel, equal the torch-operation statistics."""
    monkeypatch.setattr(fused_stats, "supported", lambda h: True)
    monkeypatch.setattr(fused_stats, "identity_sums", stand_in_kernel)
    h, out, g, g_out, branch = block_tensors(1)
    g_out = g_out if has_g_out else None
    branch = branch if has_branch else None
    stats = IdentityStats(fused=True)
    got = stats(h, out, g, g_out, branch)
    assert stats.fused
    torch.testing.assert_close(got, identity_block_stats(h, out, g, g_out, branch), rtol=1e-5, atol=1e-6,
                               equal_nan=True)
    assert got[6].isnan().all() == (not has_g_out)


def test_a_kernel_that_cannot_compile_warns_once_and_torch_takes_over(monkeypatch):
    """The statistics still come, once warned, from torch operations."""

    def cannot_compile(*args):
        raise RuntimeError("ptxas fatal: Value 'sm_120' is not defined for option 'gpu-name'")

    monkeypatch.setattr(fused_stats, "supported", lambda h: True)
    monkeypatch.setattr(fused_stats, "identity_sums", cannot_compile)
    messages: list[str] = []
    stats = IdentityStats(fused=True, warn=messages.append)
    tensors = block_tensors(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = stats(*tensors)
        second = stats(*tensors)
    assert not stats.fused and len(messages) == 1
    assert "fused statistics kernel failed" in messages[0] and "torch operations" in messages[0]
    torch.testing.assert_close(first, identity_block_stats(*tensors), equal_nan=True)
    torch.testing.assert_close(second, first, equal_nan=True)


def test_a_kernel_failure_after_it_ran_is_an_error(monkeypatch):
    calls = []

    def works_once(*args):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return stand_in_kernel(*args)

    monkeypatch.setattr(fused_stats, "supported", lambda h: True)
    monkeypatch.setattr(fused_stats, "identity_sums", works_once)
    stats = IdentityStats(fused=True, warn=pytest.fail)
    tensors = block_tensors(3)
    stats(*tensors)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        stats(*tensors)
    # a new variant of input (here bf16) may still fail the first time: Triton compiles it anew
    messages: list[str] = []
    stats.fallback.warn = messages.append
    stats(*block_tensors(3, torch.bfloat16))
    assert len(messages) == 1 and not stats.fused


def test_batchnorm_branch_is_recognised_and_materialised_exactly():
    generator = torch.Generator().manual_seed(5)
    bn = torch.nn.BatchNorm2d(4).eval()
    for t in (bn.running_mean, bn.running_var, bn.weight.data, bn.bias.data):
        t.copy_(torch.rand(4, generator=generator) + 0.5)
    x = torch.randn(2, 4, 3, 3, generator=generator)
    for dtype in (torch.float32, torch.bfloat16):
        affine = fused_stats.AffineBranch.of(bn, x.to(dtype))
        assert affine is not None
        with torch.no_grad():
            # float32: up to an FMA's rounding; bf16: bit for bit after rounding
            tolerance = 2e-6 if dtype == torch.float32 else 0.0
            torch.testing.assert_close(affine.materialize(), bn(x.to(dtype)), rtol=tolerance, atol=tolerance)
    no_affine = torch.nn.BatchNorm2d(4, affine=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(fused_stats.AffineBranch.of(no_affine, x).materialize(), no_affine(x))
    assert fused_stats.AffineBranch.of(bn.train(), x) is None  # batch statistics: not a fixed affine map
    assert fused_stats.AffineBranch.of(torch.nn.BatchNorm2d(4, track_running_stats=False).eval(), x) is None
    assert fused_stats.AffineBranch.of(torch.nn.Identity(), x) is None
    assert fused_stats.AffineBranch.of(torch.nn.BatchNorm1d(4).eval(), x[:, :, 0]) is None

    class NormAct(torch.nn.BatchNorm2d):  # as timm's BatchNormAct2d: more than the affine map
        def forward(self, x):
            return torch.relu(super().forward(x))

    assert fused_stats.AffineBranch.of(NormAct(4).eval(), x) is None


def test_torch_operations_take_over_a_batchnorm_branch():
    """Where the kernel does not run, F kept as a BatchNorm input is materialised for the torch operations."""
    h, out, g, g_out, x = block_tensors(6)
    bn = torch.nn.BatchNorm2d(4).eval()
    bn.running_var.fill_(2.0)
    stats = IdentityStats(fused=True, warn=pytest.fail)  # CPU tensors: not for the kernel, no warning
    got = stats(h, out, g, g_out, fused_stats.AffineBranch.of(bn, x))
    with torch.no_grad():
        want = identity_block_stats(h, out, g, g_out, bn(x))
    torch.testing.assert_close(got, want, equal_nan=True)


def test_unsupported_layouts_use_torch_operations(monkeypatch):
    monkeypatch.setattr(fused_stats, "identity_sums", pytest.fail)  # must not be called
    monkeypatch.setattr(fused_stats, "interpreting", lambda: True)  # as if the kernel could run on the CPU
    h, out, g, g_out, branch = (t.transpose(2, 3) for t in block_tensors(4))
    got = IdentityStats(fused=True, warn=pytest.fail)(h, out, g, g_out, branch)
    np.testing.assert_allclose(got.numpy(), identity_block_stats(h, out, g, g_out, branch).numpy())


def test_recorder_module_keeps_the_kernel_optional():
    """resprobe imports without Triton: the kernel module is imported only when it runs."""
    assert "resprobe.recording._triton_kernels" not in recorder.__dict__
    code = ("import sys; sys.modules['triton'] = None; import resprobe.recording.recorder, resprobe.recording.fused_stats as f; "
            "assert not f.triton_available(); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr


def test_batchnorm_map_is_cached_until_the_module_changes():
    bn = torch.nn.BatchNorm2d(3).eval()
    x = torch.randn(2, 3, 4, 4)
    first = fused_stats.AffineBranch.of(bn, x)
    again = fused_stats.AffineBranch.of(bn, x)
    assert again.scale is first.scale  # no recomputation for an unchanged module
    with torch.no_grad():
        bn.running_var.mul_(4)  # in place: a new version of the buffer
        bn.bias.add_(1)
    changed = fused_stats.AffineBranch.of(bn, x)
    with torch.no_grad():
        torch.testing.assert_close(changed.materialize(), bn(x))
    torch.testing.assert_close(changed.scale, first.scale / 2)


def test_inputs_the_kernel_refuses_are_an_error_not_a_fallback(monkeypatch):
    def refuses(*args):
        raise ValueError("fused statistics need tensors shaped like h")

    monkeypatch.setattr(fused_stats, "supported", lambda h: True)
    monkeypatch.setattr(fused_stats, "identity_sums", refuses)
    stats = IdentityStats(fused=True, warn=pytest.fail)
    with pytest.raises(ValueError, match="shaped like h"):
        stats(*block_tensors(7))
    assert stats.fused
