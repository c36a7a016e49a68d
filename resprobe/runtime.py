"""Device and precision: where a pass runs and in which number format.

Default: fp32 with TF32 disabled, so results on a GPU match a CPU reference. Statistics are always
accumulated in float32 or better whatever the compute precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from resprobe.errors import BadValue

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; an unavailable device is a clear error."""
    name = (name or "auto").strip()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BadValue(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadValue(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise BadValue(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BadValue("--device mps: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise BadValue(f"--device {name}: expected auto, cpu, cuda, cuda:N or mps")
    return device


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str = "fp32"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @contextlib.contextmanager
    def compute(self) -> Iterator[None]:
        """The context a forward pass runs in: TF32 only when asked, autocast for bf16/fp16."""
        tf32 = self.precision == "tf32"
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        try:
            dtype = self.autocast_dtype
            if dtype is None:
                yield
            else:
                with torch.autocast(device_type=self.device.type, dtype=dtype):
                    yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move the model; channels_last on CUDA, where convolutions run faster in it."""
        model = model.to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return model

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        return images


def make_runtime(device: str = "auto", precision: str = "fp32") -> Runtime:
    if precision not in PRECISIONS:
        raise BadValue(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    resolved = resolve_device(device)
    if precision == "fp16" and resolved.type == "cpu":
        raise BadValue("--precision fp16 is not supported on the CPU; use bf16 or fp32")
    return Runtime(resolved, precision)
