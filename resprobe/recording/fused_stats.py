"""One-pass per-sample sums of an identity block, as a Triton kernel (the GPU fast path of ``record``).

:func:`resprobe.recording.recorder.identity_block_stats` needs seven per-sample sums of the block's tensors:
‖h‖², ‖F‖², ‖U‖², ‖g‖², F·g, U·g and U·(∂ℓ/∂out), where U = out − h. Written with torch operations,
each of them is a separate pass over an activation, plus the passes that form U and convert bf16/fp16
tensors to float32: about 15 reads and writes of an activation-sized tensor per block. This kernel
reads each input once, in its own dtype, forms U and every product in float32 registers, and writes
one float32 partial sum per chunk of a sample; torch adds the few partials of each sample. Each
sample's chunks are summed in a fixed order, so results are deterministic. Where a post-activation
block's branch ends in an eval-mode BatchNorm, F is recomputed from that BatchNorm's input
(:class:`AffineBranch`) instead of being copied in the forward pass.

It runs where Triton runs: CUDA GPUs. CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 set
before Triton is imported), which is slow and meant for tests: it checks the kernel's arithmetic on
machines without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

SUMS = ("input_sq", "branch_sq", "update_sq", "grad_sq", "dot", "update_dot", "out_dot")

# 1024 elements per step (4 warps, 8 per thread: 16-byte loads in float32) and 4 steps per program:
# enough work per program to hide memory latency, and enough programs (over 100 per sample at
# ResNet-50's widest activation) to fill a GPU.
BLOCK = 1024
STEPS = 4
CHUNK = BLOCK * STEPS
_BATCHNORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)
# module -> (what the map was computed from, scale, shift): a forward pass would otherwise launch six
# small kernels per block to recompute the same map.
_AFFINE_MAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _batchnorm_affine(module: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """(α, β) of an eval-mode BatchNorm, float32, cached until its buffers or parameters change."""
    tensors = [t for t in (module.running_mean, module.running_var, module.weight, module.bias) if t is not None]
    key = (module.eps, tuple((t.data_ptr(), t._version, t.dtype) for t in tensors))
    cached = _AFFINE_MAPS.get(module)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    assert module.running_mean is not None and module.running_var is not None
    with torch.no_grad():
        # As torch's own inference kernels: α = w / sqrt(var + eps), β = b − mean·α.
        scale = 1 / torch.sqrt(module.running_var.float() + module.eps)
        if module.weight is not None:
            scale = scale * module.weight.float()
        shift = -module.running_mean.float() * scale
        if module.bias is not None:
            shift = shift + module.bias.float()
    _AFFINE_MAPS[module] = (key, scale.contiguous(), shift.contiguous())
    return _AFFINE_MAPS[module][1], _AFFINE_MAPS[module][2]


@dataclass(frozen=True)
class AffineBranch:
    """F as an eval-mode BatchNorm computes it from its input x: x·scale[c] + shift[c] per channel,
    rounded to x's dtype. ``record`` keeps x, which autograd saves for the BatchNorm's backward pass
    anyway, instead of a copy of F (post-activation blocks overwrite F in place): the fused kernel
    recomputes F on the fly, so the copy's memory and its write in the forward pass are saved."""

    x: Tensor
    scale: Tensor  # [C] float32
    shift: Tensor  # [C] float32

    @staticmethod
    def of(module: nn.Module, x: Tensor) -> AffineBranch | None:
        """The affine map of ``module`` applied to ``x``, if ``module`` is an eval-mode 2-d BatchNorm
        with running statistics, None otherwise. Only torch's own BatchNorm classes: a subclass may do
        more in its forward (timm's BatchNormAct2d adds an activation)."""
        if (type(module) not in _BATCHNORMS or module.training or x.dim() != 4
                or module.running_mean is None or module.running_var is None or not x.is_floating_point()):
            return None
        scale, shift = _batchnorm_affine(module)
        return AffineBranch(x, scale, shift)

    def materialize(self) -> Tensor:
        """F itself (for torch operations)."""
        shape = (1, -1) + (1,) * (self.x.dim() - 2)
        return (self.x.float() * self.scale.view(shape) + self.shift.view(shape)).to(self.x.dtype)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # not installed, or a broken install: the torch path does the work
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _memory_order(t: Tensor) -> torch.memory_format | None:
    """The layout whose element order the kernel can walk as one flat run per sample, if any."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _like(t: Tensor, reference: Tensor, layout: torch.memory_format) -> Tensor:
    """``t`` with ``reference``'s element order (a copy only when the strides differ)."""
    return t if t.stride() == reference.stride() else t.contiguous(memory_format=layout)


MAX_BATCH = 65535  # CUDA's limit on a grid's second dimension, one sample per row of programs


def supported(h: Tensor) -> bool:
    """Whether the kernel can read ``h``: a dense NCHW or channels_last float tensor on a CUDA device
    (or any, in Triton's interpreter), whose samples the kernel's 32-bit sizes and grid can address."""
    return ((h.is_cuda or interpreting()) and h.dim() >= 2 and h.numel() > 0 and _memory_order(h) is not None
            and h.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and len(h) <= MAX_BATCH and h.numel() // len(h) < 2**31 - CHUNK)


def kernel_variant(*tensors: Tensor | AffineBranch | None) -> tuple[object, ...]:
    """What Triton compiles a separate kernel for, given :func:`identity_sums`'s arguments: dtypes,
    which tensors are there, the layout, and 16-byte alignment of each pointer and of the per-sample
    size."""
    def one(t: Tensor | AffineBranch | None) -> object:
        if isinstance(t, AffineBranch):
            return ("affine", one(t.x))
        return None if t is None else (t.dtype, t.data_ptr() % 16 == 0)

    h = tensors[0]
    assert isinstance(h, Tensor)
    return (tuple(one(t) for t in tensors), h.is_contiguous(), (h.numel() // max(len(h), 1)) % 16 == 0)


def identity_sums(h: Tensor, out: Tensor, g: Tensor, g_out: Tensor | None,
                  branch: Tensor | AffineBranch | None) -> Tensor:
    """[7, B] float32 per-sample sums, in the order of :data:`SUMS`, in one read of each tensor.

    ``branch`` is F, or the BatchNorm input F is recomputed from (:class:`AffineBranch`), or None where
    F = U: then F's rows repeat U's. Where ``g_out`` is None, the last row is 0 (the caller knows it is
    undefined). ``h`` must be :func:`supported`; other tensors are brought to its layout if theirs
    differs.
    """
    if not supported(h):
        raise ValueError(f"fused statistics need a dense NCHW or channels_last float tensor on a CUDA device "
                         f"(CPU tensors only in Triton's interpreter, TRITON_INTERPRET=1), not {h.dtype} of "
                         f"shape {tuple(h.shape)} and strides {h.stride()} on {h.device}")
    affine = branch if isinstance(branch, AffineBranch) else None
    if affine is not None:
        branch = affine.x
        if affine.scale.shape != (h.shape[1],) or affine.shift.shape != (h.shape[1],):
            raise ValueError(f"an affine branch needs {h.shape[1]} channels of scale and shift")
    for t in (out, g, g_out, branch):  # the kernel reads each as h's shape: anything else reads out of bounds
        if t is not None and (t.shape != h.shape or t.device != h.device or not t.is_floating_point()):
            raise ValueError(f"fused statistics need tensors shaped like h {tuple(h.shape)} on {h.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    layout = _memory_order(h)
    assert layout is not None
    out, g = _like(out, h, layout), _like(g, h, layout)
    g_out = _like(g_out, h, layout) if g_out is not None else None
    branch = _like(branch, h, layout) if branch is not None else None
    batch = len(h)
    n = h.numel() // batch
    chunks = -(-n // CHUNK)
    partial = torch.empty((batch, chunks, 7), dtype=torch.float32, device=h.device)
    from resprobe.recording._triton_kernels import identity_sums_kernel as kernel

    channels, plane = (h.shape[1], h[0, 0].numel()) if h.dim() > 2 else (1, 1)
    scale, shift = (affine.scale.to(h.device), affine.shift.to(h.device)) if affine is not None else (partial, partial)
    # Unused pointers get ``h`` or ``partial``: the constexpr flags compile their loads away. Triton
    # launches on the current device: make it h's (cuda:N), whichever thread runs this.
    with torch.cuda.device(h.device) if h.is_cuda else contextlib.nullcontext():
        kernel[(chunks, batch)](h, out, g, g_out if g_out is not None else h, branch if branch is not None else h,
                                scale, shift, partial, n, chunks, channels, plane,
                                HAS_BRANCH=branch is not None, AFFINE_BRANCH=affine is not None,
                                CHANNELS_LAST=layout == torch.channels_last, HAS_G_OUT=g_out is not None,
                                BLOCK=BLOCK, STEPS=STEPS, num_warps=4)
    sums = partial.sum(1).T.contiguous()
    if branch is None:  # F = U
        sums[[1, 4]] = sums[[2, 5]]
    return sums
