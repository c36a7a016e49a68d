"""Device and precision: where a pass runs and in which number format.

Default: fp32 with TF32 disabled, so results on a GPU match a CPU reference. Statistics are always
accumulated in float32 or better whatever the compute precision.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from resprobe.errors import BadValue

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; an unavailable device is a clear error."""
    from resprobe.distributed import local_device  # under torchrun, `cuda` is cuda:LOCAL_RANK

    name = (name or "auto").strip()
    if name == "auto":
        if torch.cuda.is_available():
            return local_device(torch.device("cuda"))
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
    return local_device(device)


def tf32_controls(backends: Any = None) -> list[tuple[Any, str, Any, Any]]:
    """The switches that decide whether float32 convolutions and matrix products may use TF32, as
    ``(owner, attribute, value allowing TF32, value forbidding it)``.

    torch >= 2.9 has per-operator ``fp32_precision`` settings ("tf32"/"ieee"; "none" defers to the
    backend's) and refuses to read the legacy ``allow_tf32`` flags once they disagree with them, so the
    new controls are used wherever they exist (cuDNN RNNs included) and the legacy flags otherwise.
    """
    backends = torch.backends if backends is None else backends
    cudnn, matmul = backends.cudnn, backends.cuda.matmul
    if hasattr(matmul, "fp32_precision") and hasattr(cudnn, "conv"):
        rnn = getattr(cudnn, "rnn", None)
        owners = [matmul, cudnn.conv] + ([rnn] if hasattr(rnn, "fp32_precision") else [])
        return [(owner, "fp32_precision", "tf32", "ieee") for owner in owners]
    return [(matmul, "allow_tf32", True, False), (cudnn, "allow_tf32", True, False)]


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str = "fp32"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @contextlib.contextmanager
    def numerics(self) -> Iterator[None]:
        """TF32 only when asked. Unlike autocast this also covers backward passes, whose convolutions
        and matrix products read the flags when they run (cuDNN's default would otherwise be TF32).
        The flags are process-wide; whatever they were is restored on exit."""
        tf32 = self.precision == "tf32"
        controls = tf32_controls()
        saved = [getattr(owner, name) for owner, name, _, _ in controls]
        try:
            for owner, name, on, off in controls:
                setattr(owner, name, on if tf32 else off)
            yield
        finally:
            for (owner, name, _, _), value in zip(controls, saved):
                setattr(owner, name, value)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast for bf16/fp16, nothing otherwise. Thread-local, unlike :meth:`numerics`'s flags."""
        dtype = self.autocast_dtype
        if dtype is None:
            yield
        else:
            with torch.autocast(device_type=self.device.type, dtype=dtype):
                yield

    @contextlib.contextmanager
    def compute(self) -> Iterator[None]:
        """The context a forward pass runs in: :meth:`numerics` and :meth:`autocast`."""
        with self.numerics(), self.autocast():
            yield

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


def _signature(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((tuple(a.shape), a.dtype, a.device, a.stride()) if isinstance(a, torch.Tensor) else a is None
                 for a in args)


class FirstCallFallback:
    """Run a fast path that compiles lazily, falling back for good, with one warning, if compiling fails.

    Compilers (torch.compile, Triton) build code at the first call with inputs of a new kind, so
    exactly those calls are allowed to fail (no C compiler, an unsupported operation, an old GPU):
    ``warn`` says why (``"{what} failed (...); {fallback}"``) and :attr:`active` turns False, so the
    caller takes its slow path from then on. An error in a call with a kind of input that already ran
    is a real error and propagates, and so is always an error of a type in ``errors`` (failures that
    no fallback should hide).
    """

    def __init__(self, what: str, fallback: str, warn: Callable[[str], None] | None = None,
                 errors: tuple[type[BaseException], ...] = ()):
        self.what = what
        self.fallback = fallback
        self.errors = errors
        self.warn = warn or (lambda message: warnings.warn(message, stacklevel=4))
        self.active = True
        self._ran: set[Any] = set()

    def give_up(self, exc: BaseException) -> None:
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        self.warn(f"{self.what} failed ({type(exc).__name__}: {reason}); {self.fallback}")
        self.active = False

    def run(self, kind: Any, fast: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        """``(True, fast(*args))``, or ``(False, None)`` once a first call with ``kind`` has failed."""
        if kind in self._ran:
            return True, fast(*args)
        try:
            result = fast(*args)
        except self.errors:
            raise
        except Exception as exc:
            self.give_up(exc)
            return False, None
        self._ran.add(kind)
        return True, result


class CompiledOrEager:
    """``fn`` through ``torch.compile``, or eagerly, with one warning, if compiling it fails
    (:class:`FirstCallFallback`; a new kind of input is new shapes, dtypes, devices, layouts, or which
    arguments are None)."""

    def __init__(self, fn: Callable[..., Any], what: str, fallback: str, warn: Callable[[str], None] | None = None,
                 **compile_options: Any):
        self.fn = fn
        self._guard = FirstCallFallback(f"{what}: torch.compile", fallback, warn)
        self._compiled: Callable[..., Any] | None = None
        try:
            self._compiled = torch.compile(fn, **compile_options)
        except Exception as exc:  # e.g. torch.compile unsupported on this Python
            self._guard.give_up(exc)

    @property
    def compiled(self) -> bool:
        return self._guard.active

    def __call__(self, *args: Any) -> Any:
        if self._guard.active:
            ran, result = self._guard.run(_signature(args), self._compiled, *args)
            if ran:
                return result
        return self.fn(*args)
