"""The hooked pass: per-sample block statistics, reduced on the device (docs/reference.md).

One forward and one backward (to the input images; parameters frozen, so no weight gradient is ever
computed) per batch. Hooks keep references to what each block sees and reduce it to per-sample
numbers as soon as the block's last ingredient arrives:

* block forward pre-hook: ``h`` (a reference; blocks never modify their input); a tensor hook on
  ``h`` delivers ``g = ∂ℓ/∂h`` during the backward pass;
* branch-end forward hook (post-activation blocks): ``F`` is copied at once, because the block's
  ``x += shortcut`` and in-place ReLU overwrite it a moment later (transitions: only ``‖F‖``). With
  the fused kernel, where the branch ends in an eval-mode BatchNorm, its input is kept instead (a
  reference to what autograd keeps anyway) and the kernel recomputes F from it: no copy;
* block forward hook: ``out``; a tensor hook on ``out`` keeps ``g_out = ∂ℓ/∂out``;
* when ``g`` arrives, every statistic of the block is computed at once (float32, U = out − h) and
  the block's references are dropped: on CUDA by a fused Triton kernel that reads each tensor once
  (:mod:`resprobe.recording.fused_stats`), elsewhere by :func:`identity_block_stats`'s torch operations.

In pre-activation and transformer blocks ``F = U = out − h`` (identity blocks; the family's
``f_is_u``), so nothing needs copying. Token tensors [B, N, C] and channels-last [B, H, W, C] blocks
(ViT, Swin, ConvNeXt) need nothing special: every statistic is over the flattened tensor. Tensors
that are only referenced are checked with their version counters, so an in-place change after the
hook is an error, never a silent wrong number. Only [B]-sized results leave the device, once per
batch.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from resprobe.errors import BadValue
from resprobe.losses import LossFn, is_class_labels
from resprobe.models.blocks import Anatomy, Block
from resprobe.recording import fused_stats
from resprobe.recording.fused_stats import AffineBranch
from resprobe.runtime import FirstCallFallback, Runtime

STAT_NAMES = ("input_norm", "branch_norm", "update_norm", "grad_norm", "dot", "update_dot", "out_dot", "cos",
              "update_cos")
TENSOR_KINDS = ("input", "branch", "update", "grad")
TARGETS = ("label", "pred")
TOKEN_STATS = ("token_cos", "token_update_cos")  # extra columns of language-model recordings (DESIGN §8)


def _dims(t: Tensor) -> tuple[int, ...]:
    return tuple(range(1, t.dim()))


def _norm(t: Tensor) -> Tensor:
    # ``dtype`` makes the reduction accumulate and return float32 without a float32 copy of ``t``.
    return torch.linalg.vector_norm(t, dim=_dims(t), dtype=torch.float32)


def _flat(t: Tensor) -> Tensor:
    """[B, -1] as a view where the layout allows (NCHW or channels_last), elements in memory order."""
    if t.is_contiguous():
        return t.view(len(t), -1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).view(len(t), -1)
    return t.reshape(len(t), -1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample dot products in float32, one fused pass when both are float32 and laid out alike."""
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        a, b = a.float(), b.float()
    if a.stride() != b.stride():  # the same element order is needed in both
        a, b = a.contiguous(), b.contiguous()
    return torch.linalg.vecdot(_flat(a), _flat(b))


def _cos(dot: Tensor, na: Tensor, nb: Tensor) -> Tensor:
    # A zero norm makes the cosine undefined: NaN, excluded from means and counted (n_invalid).
    denom = na * nb
    return torch.where(denom > 0, dot / denom, torch.full_like(dot, math.nan))


def identity_block_stats(h: Tensor, out: Tensor, g: Tensor, g_out: Tensor | None, branch: Tensor | None) -> Tensor:
    """Every statistic of an identity block, [len(STAT_NAMES), B] float32 (docs/reference.md).

    ``branch`` is the copy of F (post-activation blocks) or None where F = U = out − h. Each tensor is
    read as few times as the formulas allow and converted to float32 at most once (bf16/fp16 runs).
    On CUDA the fused kernel (:class:`IdentityStats`) replaces it. It is not compiled: on an H200,
    torch.compile(dynamic=True) of it made ``record`` slower (1.38× the floor against 1.13× in fp32)
    and disagreed with the CPU on U·g (docs/gpu.md).
    """
    if out.dtype == torch.float32:
        update = out - h
    else:  # float32 from the start: U is often much smaller than h, and fp16/bf16 would round it
        update = out.float()
        update.sub_(h)  # mixed dtypes computed in float32 inside the kernel, no float32 copy of h
    g32 = g.float()
    input_norm, update_norm, grad_norm = _norm(h), _norm(update), _norm(g)
    update_dot = _dot(update, g32)
    if branch is None:
        branch_norm, dot = update_norm, update_dot
    else:
        branch_norm, dot = _norm(branch), _dot(branch.float(), g32)
    out_dot = _dot(update, g_out.float()) if g_out is not None else torch.full_like(input_norm, math.nan)
    return torch.stack([input_norm, branch_norm, update_norm, grad_norm, dot, update_dot, out_dot,
                        _cos(dot, branch_norm, grad_norm), _cos(update_dot, update_norm, grad_norm)])


def stats_from_sums(sums: Tensor, has_out_grad: bool) -> Tensor:
    """:func:`identity_block_stats`'s [len(STAT_NAMES), B] result from the fused kernel's seven sums
    (a handful of [B]-sized operations: the batch's tensors are not read again)."""
    norms = sums[:4].sqrt()  # input, branch, update, grad
    dots = sums[4:].clone()  # dot, update_dot, out_dot
    if not has_out_grad:
        dots[2] = math.nan
    cosines = _cos(dots[:2], norms[1:3], norms[3])  # cos(F, g) and cos(U, g)
    return torch.cat([norms, dots, cosines])


def fused_by_default(runtime: Runtime) -> bool:
    """The fused kernel where it can run: CUDA with Triton, unless RESPROBE_FUSED_STATS=0."""
    return (runtime.device.type == "cuda" and os.environ.get("RESPROBE_FUSED_STATS", "1") != "0"
            and fused_stats.triton_available())


class IdentityStats:
    """:func:`identity_block_stats` through the fused Triton kernel (:mod:`resprobe.recording.fused_stats`) or
    torch operations; both give the same statistics up to float32 summation order.

    Triton compiles the kernel at the first call for each variant of input
    (:func:`fused_stats.kernel_variant`), so exactly those calls may fail (no compiler, an unsupported
    GPU): one warning says why and torch operations take over (:class:`FirstCallFallback`). A ValueError
    (inputs the kernel refuses: a bug in resprobe) always propagates. A fault inside a running kernel
    is reported by CUDA later, asynchronously, at the batch's transfer to the host: an error, never a
    silent number.
    """

    def __init__(self, fused: bool, warn: Callable[[str], None] | None = None):
        self.fallback = FirstCallFallback("record: the fused statistics kernel",
                                          "computing the statistics with torch operations instead", warn,
                                          errors=(ValueError,))
        self.fallback.active = fused

    @property
    def fused(self) -> bool:
        return self.fallback.active

    def __call__(self, h: Tensor, out: Tensor, g: Tensor, g_out: Tensor | None,
                 branch: Tensor | AffineBranch | None) -> Tensor:
        if self.fused and fused_stats.supported(h):
            ran, sums = self.fallback.run(fused_stats.kernel_variant(h, out, g, g_out, branch),
                                          fused_stats.identity_sums, h, out, g, g_out, branch)
            if ran:
                return stats_from_sums(sums, g_out is not None)
        if isinstance(branch, AffineBranch):
            branch = branch.materialize()
        return identity_block_stats(h, out, g, g_out, branch)


class _Stale(RuntimeError):
    pass


def _check_version(t: Tensor, version: int, what: str, block: str) -> None:
    if t._version != version:
        raise _Stale(f"{what} of block {block} was modified in place after the block ran; "
                     "resprobe cannot read it safely (report this model to the resprobe developers)")


@dataclass
class _Slot:
    """What one block holds between its forward and its backward within a batch (references only,
    checked with their version counters, except ``branch`` when it is a copy)."""

    h: Tensor | None = None
    h_version: int = 0
    out: Tensor | None = None
    out_version: int = 0
    branch: Tensor | AffineBranch | None = None  # copy of F, or what F is recomputed from (post-activation)
    branch_version: int = 0  # of an AffineBranch's input
    g_out: Tensor | None = None  # ∂ℓ/∂out, kept from its arrival until g's
    g_out_version: int = 0


@dataclass
class BatchStats:
    """Per-sample results of one batch, on the CPU."""

    index: np.ndarray  # [B] int64 dataset indices
    label: np.ndarray  # [B] int64
    pred: np.ndarray  # [B] int64
    loss: np.ndarray  # [B] float32, cross-entropy against the label
    stats: dict[str, np.ndarray]  # name -> [B, n_blocks] float32
    tensors: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # block -> kind -> [k, C, H, W]
    readout: dict[str, np.ndarray] = field(default_factory=dict)  # block -> [B, classes] float32 logits

    def __len__(self) -> int:
        return len(self.index)


class Recorder:
    """Hooks on every block of ``anatomy``; :meth:`run_batch` does one forward + backward.

    ``save_tensors`` keeps input/branch/update/grad of the first K samples the recorder sees
    (``samples_seen`` lets a resumed run continue the count). ``readout`` lists blocks after which
    the model's own head is applied (paper §4.3). ``fused`` computes identity blocks' statistics with
    the fused Triton kernel; None (the default) does where it can run (:func:`fused_by_default`).
    """

    def __init__(
        self,
        anatomy: Anatomy,
        runtime: Runtime,
        target: str = "label",
        save_tensors: int = 0,
        tensor_dtype: torch.dtype = torch.float32,
        readout: Iterable[str] = (),
        samples_seen: int = 0,
        fused: bool | None = None,
        loss_fn: LossFn | None = None,
    ):
        if target not in TARGETS:
            raise BadValue(f"--target {target!r}: choose label or pred")
        if save_tensors < 0:
            raise BadValue(f"--save-tensors must be 0 or more, got {save_tensors}")
        self.anatomy = anatomy
        self.blocks = anatomy.blocks
        self.runtime = runtime
        self.target = target
        self.save_tensors = save_tensors
        self.tensor_dtype = tensor_dtype
        self.readout = [anatomy[name] for name in readout]
        if self.readout and anatomy.head is None:
            raise BadValue("--readout needs the model's head, which resprobe does not know for this model")
        self.samples_seen = samples_seen
        self.loss_fn = loss_fn  # per-sample losses (outputs, targets) -> [B]; None: cross-entropy
        self.identity_stats = IdentityStats(fused_by_default(runtime) if fused is None else fused)
        self._handles: list[Any] = []
        self._active: int | None = None
        self._recording = False
        self._slots: list[_Slot] = []
        self._stats: Tensor | None = None  # [n_stats, B, n_blocks] on the device
        self._tensors: dict[str, dict[str, Tensor]] = {}
        self._readout_logits: dict[str, Tensor] = {}
        self._keep = 0  # samples of this batch whose tensors are kept
        self._install()

    # -- hooks ---------------------------------------------------------------------------------

    def _install(self) -> None:
        branch_owners: dict[int, nn.Module] = {}
        for j, block in enumerate(self.blocks):
            self._handles.append(block.module.register_forward_pre_hook(self._pre_hook(j)))
            self._handles.append(block.module.register_forward_hook(self._post_hook(j)))
            end = block.family.branch_end_module(block.module)
            if end is not None and id(end) not in branch_owners:
                # One hook per module: a shared block's branch end serves all its iterations.
                branch_owners[id(end)] = end
                self._handles.append(end.register_forward_hook(self._branch_hook(end)))
        self._branch_ends = [b.family.branch_end_module(b.module) for b in self.blocks]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _put(self, name: str, j: int, value: Tensor) -> None:
        assert self._stats is not None
        self._stats[STAT_NAMES.index(name), :, j] = value.detach().float()

    def _keep_tensor(self, j: int, kind: str, value: Tensor) -> None:
        if self._keep:
            # A copy, never a view: in-place ops overwrite some of these tensors right after.
            kept = value[: self._keep].detach().to(self.tensor_dtype, copy=True)
            self._tensors.setdefault(self.blocks[j].name, {})[kind] = kept.cpu()

    def _pre_hook(self, j: int) -> Callable:
        block = self.blocks[j]

        def hook(_module: nn.Module, args: tuple) -> None:
            if not self._recording or not args or not isinstance(args[0], Tensor):
                return
            h = args[0]
            self._active = j
            slot = self._slots[j] = _Slot(h=h, h_version=h._version)
            self._keep_tensor(j, "input", h)
            if h.requires_grad:
                h.register_hook(self._grad_hook(j, block, slot))
            else:  # no backward will reach this block's input: what can be read is read now
                self._put("input_norm", j, _norm(h))

        return hook

    def _branch_hook(self, module: nn.Module) -> Callable:
        def hook(_module: nn.Module, args: tuple, output: Any) -> None:
            j = self._active
            if not self._recording or j is None or self._branch_ends[j] is not module or not isinstance(output, Tensor):
                return
            block = self.blocks[j]
            self._keep_tensor(j, "branch", output)
            if block.is_identity and not block.family.f_is_u:
                # Post-activation: ``x += shortcut`` and the in-place ReLU will overwrite F. The fused
                # kernel can recompute F from an eval-mode BatchNorm's input; otherwise F is copied.
                slot = self._slots[j]
                affine = (AffineBranch.of(module, args[0].detach())
                          if self.identity_stats.fused and args and isinstance(args[0], Tensor) else None)
                if affine is not None and affine.x.shape == output.shape and affine.x.dtype == output.dtype:
                    slot.branch, slot.branch_version = affine, affine.x._version
                else:
                    slot.branch = output.detach().clone()
            elif not block.is_identity:  # transitions: ‖F‖ is all that is recorded of F
                scale = block.family.branch_scale  # a factor the block applies after this point (NFNet)
                norm = _norm(output)
                self._put("branch_norm", j, norm * abs(scale(block.module)) if scale is not None else norm)

        return hook

    def _post_hook(self, j: int) -> Callable:
        block = self.blocks[j]

        def hook(_module: nn.Module, _args: tuple, out: Any) -> None:
            if not self._recording or not isinstance(out, Tensor):
                return
            self._active = None
            slot = self._slots[j]
            slot.out, slot.out_version = out, out._version
            if block in self.readout:
                with torch.no_grad():
                    assert self.anatomy.head is not None
                    self._readout_logits[block.name] = self.anatomy.head(out.detach()).float()
            if not block.is_identity:
                return
            if self._keep and slot.h is not None:
                self._keep_update(j, block, slot)
            if out.requires_grad:
                out.register_hook(self._out_grad_hook(slot))

        return hook

    def _keep_update(self, j: int, block: Block, slot: _Slot) -> None:
        assert slot.h is not None and slot.out is not None
        k = self._keep
        update = slot.out[:k].detach().float() - slot.h[:k].detach().float()
        self._keep_tensor(j, "update", update)
        if block.family.f_is_u or slot.branch is None and self._branch_ends[j] is None:
            self._keep_tensor(j, "branch", update)  # F = U

    @staticmethod
    def _out_grad_hook(slot: _Slot) -> Callable:
        def hook(g_out: Tensor) -> None:
            # Only kept: every statistic is computed when g = ∂ℓ/∂h arrives, in one go.
            slot.g_out, slot.g_out_version = g_out, g_out._version

        return hook

    def _grad_hook(self, j: int, block: Block, slot: _Slot) -> Callable:
        def hook(g: Tensor) -> None:
            assert slot.h is not None
            self._keep_tensor(j, "grad", g)
            _check_version(slot.h, slot.h_version, "the input", block.name)
            if block.is_identity and slot.out is not None:
                _check_version(slot.out, slot.out_version, "the output", block.name)
                if slot.g_out is not None:
                    _check_version(slot.g_out, slot.g_out_version, "the output's gradient", block.name)
                if isinstance(slot.branch, AffineBranch):
                    _check_version(slot.branch.x, slot.branch_version, "the branch's last BatchNorm input", block.name)
                stats = self.identity_stats(slot.h.detach(), slot.out.detach(), g, slot.g_out, slot.branch)
                assert self._stats is not None
                self._stats[:, :, j] = stats
            else:
                self._put("input_norm", j, _norm(slot.h))
                self._put("grad_norm", j, _norm(g))
            # Free what this block held as soon as its gradient has been consumed.
            slot.h = slot.out = slot.branch = slot.g_out = None

        return hook

    # -- one batch -----------------------------------------------------------------------------

    def run_batch(self, images: Tensor, labels: Tensor, indices: Tensor) -> BatchStats:
        """Forward, per-sample cross-entropy, backward to the input; statistics of every block."""
        return self.launch_batch(images, labels, indices).result()

    @property
    def launches_ahead(self) -> bool:
        """Whether callers should launch the next batch before awaiting this one's results: on CUDA,
        where a launch returns before the device is done. On the CPU a launch computes everything, so
        awaiting at once costs nothing and keeps a recording's batches durable one by one."""
        return self.runtime.device.type == "cuda"

    def _losses(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.loss_fn is None:
            return F.cross_entropy(logits, target, reduction="none")
        return self.loss_fn(logits, target).float()

    def launch_batch(self, images: Tensor, labels: Tensor, indices: Tensor) -> PendingBatch:
        """:meth:`run_batch` without waiting for the device: the results come with
        :meth:`PendingBatch.result`. Launching the next batch first keeps a GPU busy while the host
        waits for this one (:func:`iterate`); waiting after every batch would leave the GPU idle
        while Python launches the next forward pass."""
        model = self.anatomy.model
        model.eval()
        batch = len(labels)
        device = self.runtime.device
        images = self.runtime.batch(images).requires_grad_(True)
        labels = labels.to(device, non_blocking=True)
        self._stats = torch.full((len(STAT_NAMES), batch, len(self.blocks)), math.nan, device=device)
        self._slots = [_Slot() for _ in self.blocks]
        self._tensors, self._readout_logits = {}, {}
        self._keep = max(0, min(batch, self.save_tensors - self.samples_seen))
        self._recording = True
        try:
            with self.runtime.numerics():  # the backward pass too: fp32 means no TF32 there either
                with torch.enable_grad(), self.runtime.autocast():
                    logits = model(images)
                logits = logits.float()
                pred = logits.argmax(1) if logits.dim() > 1 else torch.full((batch,), -1, dtype=torch.long, device=device)
                target = labels if self.target == "label" else pred
                losses = self._losses(logits, target)
                # Samples are independent in eval mode: the gradient of the summed loss w.r.t. sample
                # n's activations is exactly ∂ℓ_n/∂h_n.
                torch.autograd.grad(losses.sum(), images)
            label_losses = losses if self.target == "label" else self._losses(logits, labels)
        except _Stale as exc:
            raise RuntimeError(str(exc)) from None
        finally:
            self._recording = False
            self._active = None
            self._slots = []
        stats, self._stats = self._stats, None
        self.samples_seen += batch
        if self.loss_fn is not None and not is_class_labels(labels, logits):
            labels = torch.full((batch,), -1, dtype=torch.long, device=device)  # no class: label -1
        device_tensors = {"stats": stats, "index": indices, "label": labels, "pred": pred.detach(),
                          "loss": label_losses.detach(),
                          **{f"readout/{b}": v for b, v in self._readout_logits.items()}}
        return PendingBatch(*_to_host(device_tensors), self._tensors)


def _to_host(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], Any]:
    """Copies on the host, and a CUDA event that marks their arrival (None where they are there
    already): one batch's [B]-sized results, copied into pinned memory without waiting. Host tensors
    are copied too, so that a caller may reuse its own tensors at once."""
    devices = {t.device for t in tensors.values() if t.is_cuda}
    if not devices:
        return {k: t.clone() for k, t in tensors.items()}, None
    (device,) = devices  # one batch lives on one device
    host = {}
    with torch.cuda.device(device):  # the event must mark that device's stream, not cuda:0's
        for key, t in tensors.items():
            if t.is_cuda:
                host[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host[key].copy_(t, non_blocking=True)
            else:
                host[key] = t.clone()
        event = torch.cuda.Event()
        event.record()
    return host, event


@dataclass
class PendingBatch:
    """A batch whose passes have been launched; :meth:`result` waits for its numbers to reach the host."""

    host: dict[str, Tensor]  # [B]-sized results on the host (pinned and still arriving, on CUDA)
    event: Any  # the CUDA event that marks their arrival; None where they are there already
    tensors: dict[str, dict[str, Tensor]]  # the kept full tensors (save_tensors), already on the host

    def result(self) -> BatchStats:
        if self.event is not None:
            self.event.synchronize()
        # Out of pinned memory, which PyTorch keeps page-locked for reuse: [B]-sized, a cheap copy.
        arrays = {key: t.numpy().copy() if self.event is not None else t.numpy() for key, t in self.host.items()}
        stats = arrays["stats"]
        return BatchStats(
            index=arrays["index"].astype(np.int64),
            label=arrays["label"].astype(np.int64),
            pred=arrays["pred"].astype(np.int64),
            loss=arrays["loss"].astype(np.float32),
            stats={name: stats[i] for i, name in enumerate(STAT_NAMES)},
            tensors={b: {k: v.numpy() for k, v in kinds.items()} for b, kinds in self.tensors.items()},
            readout={key.removeprefix("readout/"): v for key, v in arrays.items() if key.startswith("readout/")},
        )


class NonfiniteTally:
    """Where NaN or inf appeared in the activations or gradients, over a whole run.

    Not an error (docs/reliability.md): the statistics of the affected samples are NaN and left out of the
    means; one warning names the blocks where the values first went bad and the samples affected.
    """

    def __init__(self, names: list[str], identity: list[bool] | None = None):
        self.names = names
        # U = out − h exists for identity blocks only (transitions record NaN there by design).
        self.identity = np.array(identity if identity is not None else [False] * len(names), dtype=bool)
        self.first: dict[str, int] = {}  # where a sample's activations first went bad -> samples
        self.blocks: set[int] = set()  # every affected block
        self.samples: list[int] = []  # dataset indices of affected samples, in order seen
        self.gradient_only = 0

    def add(self, batch: BatchStats) -> None:
        forward = (~np.isfinite(batch.stats["input_norm"]) | np.isinf(batch.stats["branch_norm"])
                   | (~np.isfinite(batch.stats["update_norm"]) & self.identity[None, :]))
        backward = ~np.isfinite(batch.stats["grad_norm"])
        bad = forward | backward
        for row in np.flatnonzero(bad.any(axis=1)):
            self.samples.append(int(batch.index[row]))
            self.blocks.update(int(j) for j in np.flatnonzero(bad[row]))
            if forward[row].any():
                j = int(np.argmax(forward[row]))
                name = self.names[j]
                where = f"the input of block {name}" if not np.isfinite(batch.stats["input_norm"][row, j]) else \
                    f"block {name}"
                self.first[where] = self.first.get(where, 0) + 1
            else:
                self.gradient_only += 1

    def merge(self, other: NonfiniteTally) -> None:
        """Add ``other``'s batches after this tally's (the same as having added them here in order)."""
        self.samples.extend(other.samples)
        self.blocks.update(other.blocks)
        for where, count in other.first.items():
            self.first[where] = self.first.get(where, 0) + count
        self.gradient_only += other.gradient_only

    def messages(self) -> list[str]:
        if not self.samples:
            return []
        n = len(self.samples)
        shown = ", ".join(str(i) for i in self.samples[:5]) + (f" and {n - 5} more" if n > 5 else "")
        origins = [f"{where} ({k} sample{'s' if k != 1 else ''})" for where, k in self.first.items()]
        if self.gradient_only:
            origins.append(f"the gradients only ({self.gradient_only} sample{'s' if self.gradient_only != 1 else ''})")
        affected = [self.names[j] for j in sorted(self.blocks)]
        listed = ", ".join(affected[:6]) + (f" and {len(affected) - 6} more" if len(affected) > 6 else "")
        return [f"NaN or inf in the activations of {n} sample{'s' if n != 1 else ''} (dataset indices {shown}), "
                f"starting at {', '.join(origins)}; affected blocks: {listed}; their statistics are NaN and left "
                "out of the means"]


def iterate(recorder: Recorder, loader: Iterable, progress: Callable[[int], None] | None = None) -> Iterator[BatchStats]:
    """Every batch's results, in order. On a GPU each batch is launched before the previous one's
    results are awaited (:meth:`Recorder.launch_batch`), so the GPU never waits for the host between
    batches; on the CPU, where a launch computes the whole batch, each result comes at once."""
    pending: PendingBatch | None = None
    for images, labels, indices in loader:
        launched = recorder.launch_batch(images, labels, indices)
        if pending is not None:
            yield _finished(pending, progress)
        pending = launched
        if not recorder.launches_ahead:
            pending = None
            yield _finished(launched, progress)
    if pending is not None:
        yield _finished(pending, progress)


def _finished(pending: PendingBatch, progress: Callable[[int], None] | None) -> BatchStats:
    result = pending.result()
    if progress:
        progress(len(result))
    return result


@dataclass
class Recorded:
    """A whole recording in memory: what ``store.open_recording`` also returns."""

    block_names: list[str]
    blocks: list[dict[str, Any]]
    index: np.ndarray
    label: np.ndarray
    pred: np.ndarray
    loss: np.ndarray
    stats: dict[str, np.ndarray]  # name -> [N, n_blocks]
    attrs: dict[str, Any] = field(default_factory=dict)
    complete: bool = True
    n_planned: int | None = None
    readout: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return len(self.index)


def concat_batches(batches: list[BatchStats], blocks: list[dict[str, Any]], **kwargs: Any) -> Recorded:
    """Stack per-batch results into one :class:`Recorded`."""
    names = [b["name"] for b in blocks]
    n_blocks = len(names)

    def cat(arrays: list[np.ndarray], dtype: Any, shape: tuple[int, ...] = ()) -> np.ndarray:
        return np.concatenate(arrays).astype(dtype) if arrays else np.zeros((0, *shape), dtype)

    readout_names = sorted({name for b in batches for name in b.readout})
    return Recorded(
        block_names=names,
        blocks=blocks,
        index=cat([b.index for b in batches], np.int64),
        label=cat([b.label for b in batches], np.int64),
        pred=cat([b.pred for b in batches], np.int64),
        loss=cat([b.loss for b in batches], np.float32),
        # §3's statistics and any extra columns the batches hold (language models' token cosines)
        stats={s: cat([b.stats[s] for b in batches], np.float32, (n_blocks,))
               for s in (list(batches[0].stats) if batches else STAT_NAMES)},
        readout={r: np.concatenate([b.readout[r] for b in batches]) for r in readout_names},
        **kwargs,
    )


def collect(probe: Any, loader: Iterable, target: str = "label", readout: Iterable[str] = (),
            progress: Callable[[int], None] | None = None, warn_nonfinite: bool = False) -> Recorded:
    """Record every batch of ``loader`` in memory (no file): ``align MODEL``, ``ablate --proxies`` and
    ``rp.align``. The loss is ``probe.loss_fn`` (None: cross-entropy). ``warn_nonfinite``: one warning
    for NaN or inf in the activations (:class:`NonfiniteTally`)."""
    with Recorder(probe.anatomy, probe.runtime, target=target, readout=readout,
                  loss_fn=getattr(probe, "loss_fn", None)) as recorder:
        batches = gather_batches(list(iterate(recorder, loader, progress)))
    blocks = [b.to_dict() for b in probe.anatomy.blocks]
    if warn_nonfinite:
        tally = NonfiniteTally([b["name"] for b in blocks], [b["kind"] == "identity" for b in blocks])
        for batch in batches:
            tally.add(batch)
        for message in tally.messages():
            warnings.warn(message, stacklevel=3)
    return concat_batches(batches, blocks)


def gather_batches(batches: list[BatchStats]) -> list[BatchStats]:
    """Under torchrun, every rank's batches (rank r recorded batches r, r+N, ... of a sharded loader,
    :func:`resprobe.distributed.shard_source`) in one-process order; ``batches`` in a run of one."""
    from resprobe.distributed import all_gather, is_distributed, merge_in_order

    if not is_distributed():
        return batches
    parts = all_gather(batches)
    return merge_in_order(parts, sum(len(p) for p in parts))
