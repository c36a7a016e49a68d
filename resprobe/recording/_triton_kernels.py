"""Triton kernels, imported only where Triton is installed and a kernel is asked for.

With TRITON_INTERPRET=1 in the environment before Triton is first imported, ``triton.jit`` builds
them for Triton's CPU interpreter instead of the GPU: the tests check their arithmetic that way, in a
process of their own.
"""

import triton
import triton.language as tl


@triton.jit
def _round_like(x, dtype: tl.constexpr):
    """float32 ``x`` rounded to ``dtype`` (round to nearest even), as float32. bf16 by bit arithmetic:
    it is exact in Triton's CPU interpreter too, whose float32→bf16 cast does not round to even. NaN
    stays NaN: the GPU's NaN (0x7FFFFFFF) would otherwise carry into the sign bit and become −0.0."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        x = tl.where(x != x, x, rounded)
    elif dtype == tl.float16:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def identity_sums_kernel(h_ptr, out_ptr, g_ptr, g_out_ptr, branch_ptr, scale_ptr, shift_ptr, partial_ptr,
                         n, chunks, channels, plane,
                         HAS_BRANCH: tl.constexpr, AFFINE_BRANCH: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                         HAS_G_OUT: tl.constexpr, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """Seven per-sample partial sums of one identity block over one chunk of BLOCK·STEPS elements.

    Program (chunk, sample) reads elements [chunk·BLOCK·STEPS, …) of sample ``sample`` of each tensor
    (all laid out alike, ``n`` elements per sample) and writes partial_ptr[sample, chunk, 0:7]:
    ‖h‖², ‖F‖², ‖U‖², ‖g‖², F·g, U·g, U·g_out with U = out − h, all in float32.

    F is read from ``branch_ptr`` (HAS_BRANCH), or recomputed from the input x of an eval-mode
    BatchNorm, F = x·scale[c] + shift[c] rounded to x's dtype as the BatchNorm rounds its output
    (AFFINE_BRANCH; c is the channel of the element: ``channels`` channels of ``plane`` elements,
    channels_last or not), or is U (neither).
    """
    chunk = tl.program_id(0)
    sample = tl.program_id(1)
    base = sample.to(tl.int64) * n  # 64-bit: a batch can hold more than 2**31 elements
    start = chunk * (BLOCK * STEPS)  # 32-bit within a sample (the caller checks n < 2**31 - BLOCK·STEPS)
    input_sq = tl.zeros([BLOCK], dtype=tl.float32)
    update_sq = tl.zeros([BLOCK], dtype=tl.float32)
    grad_sq = tl.zeros([BLOCK], dtype=tl.float32)
    update_dot = tl.zeros([BLOCK], dtype=tl.float32)
    branch_sq = tl.zeros([BLOCK], dtype=tl.float32)
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    out_dot = tl.zeros([BLOCK], dtype=tl.float32)
    for step in range(STEPS):
        offsets = start + step * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        at = base + offsets
        h = tl.load(h_ptr + at, mask=mask, other=0.0).to(tl.float32)
        out = tl.load(out_ptr + at, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + at, mask=mask, other=0.0).to(tl.float32)
        update = out - h  # in float32, as the torch path forms it
        input_sq += h * h
        update_sq += update * update
        grad_sq += g * g
        update_dot += update * g
        if HAS_BRANCH:
            branch_raw = tl.load(branch_ptr + at, mask=mask, other=0.0)
            branch = branch_raw.to(tl.float32)
            if AFFINE_BRANCH:
                if CHANNELS_LAST:
                    channel = offsets % channels
                else:
                    channel = (offsets // plane) % channels
                scale = tl.load(scale_ptr + channel, mask=mask, other=0.0)
                shift = tl.load(shift_ptr + channel, mask=mask, other=0.0)
                branch = _round_like(branch * scale + shift, branch_raw.dtype)
            branch_sq += branch * branch
            dot += branch * g
        if HAS_G_OUT:
            g_out = tl.load(g_out_ptr + at, mask=mask, other=0.0).to(tl.float32)
            out_dot += update * g_out
    row = partial_ptr + (sample.to(tl.int64) * chunks + chunk) * 7
    tl.store(row + 0, tl.sum(input_sq, axis=0))
    tl.store(row + 1, tl.sum(branch_sq, axis=0))
    tl.store(row + 2, tl.sum(update_sq, axis=0))
    tl.store(row + 3, tl.sum(grad_sq, axis=0))
    tl.store(row + 4, tl.sum(dot, axis=0))
    tl.store(row + 5, tl.sum(update_dot, axis=0))
    tl.store(row + 6, tl.sum(out_dot, axis=0))
