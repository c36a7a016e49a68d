"""Triton kernels, imported only where Triton is installed and a kernel is asked for.

With TRITON_INTERPRET=1 in the environment before Triton is first imported, ``triton.jit`` builds
them for Triton's CPU interpreter instead of the GPU: the tests check their arithmetic that way, in a
process of their own.
"""

import triton
import triton.language as tl


@triton.jit
def identity_sums_kernel(h_ptr, out_ptr, g_ptr, g_out_ptr, branch_ptr, partial_ptr, n, chunks,
                         HAS_BRANCH: tl.constexpr, HAS_G_OUT: tl.constexpr,
                         BLOCK: tl.constexpr, STEPS: tl.constexpr):
    chunk = tl.program_id(0)
    sample = tl.program_id(1)
    base = sample.to(tl.int64) * n  # 64-bit: a batch can hold more than 2**31 elements
    start = chunk.to(tl.int64) * (BLOCK * STEPS)
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
            branch = tl.load(branch_ptr + at, mask=mask, other=0.0).to(tl.float32)
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
