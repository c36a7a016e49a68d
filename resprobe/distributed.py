"""Several processes (``torchrun``): who this process is, the process group, and the few collective
operations resprobe needs so that a run on N processes gives what one process gives.

Started by ``torchrun --nproc-per-node N -m resprobe COMMAND ...`` (or ``srun torchrun ...``), a
process finds ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in its environment (read, never set). With
``WORLD_SIZE`` above 1 the command joins the process group (gloo for CPU tensors, NCCL for CUDA
tensors on ``cuda:LOCAL_RANK``); otherwise nothing here does anything: no process group, no
communication, no overhead.

How work is split: samples go to ranks by whole batches, batch k (samples ``k·B .. k·B+B-1`` of the
one-process order) to rank ``k mod N``, so every batch holds the same samples as in a one-process
run and merged results come back in one-process order. Sums (losses, hits, moments) are all-reduced
in float64; per-sample results are gathered and put back in that order.

Work done once for all (deciding, creating or merging a run, ``--recalibrate``, reading an HDF5
file through): :func:`on_main` runs it on rank 0 and broadcasts the result; while rank 0 works alone
(:func:`alone`) it is a run of one, so nothing there waits for the other ranks.

Errors: the rank that fails prints its one line and exits 1; ``torchrun`` then ends the other ranks
(within its monitor interval, 0.1 s by default). An error every rank hits is printed by rank 0 only
(:func:`error_channel`, :func:`should_speak`). A rank that finds a peer gone in a collective
(:class:`PeerFailed`) exits 1 without a line of its own, unless it is rank 0 and no one ended it
within :data:`PEER_GRACE_SECONDS`. The process group's :data:`TIMEOUT` bounds any wait for a rank
that hangs without exiting.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from resprobe.errors import ResprobeError

if TYPE_CHECKING:  # torch is imported where it is used: `resprobe --help` stays fast
    import torch

TIMEOUT = datetime.timedelta(minutes=30)  # the longest a rank waits for the others in a collective
PEER_GRACE_SECONDS = 10.0  # how long a rank that lost a peer waits to be ended by torchrun

T = TypeVar("T")


class PeerFailed(ResprobeError):
    """Another process of the run stopped (its own error is what it printed)."""


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env(environ: Any = None) -> World:
    """The run torchrun (or SLURM with torchrun, or any launcher that sets the same variables) started."""
    env = os.environ if environ is None else environ
    try:
        size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ResprobeError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun)") from None
    if size < 1 or not 0 <= rank < size:
        raise ResprobeError(f"RANK {rank} is outside WORLD_SIZE {size} (set by torchrun)")
    return World(rank, size, local)


def world() -> World:
    """This process's place: from the process group when one is up, else a run of one (also while
    rank 0 runs :func:`alone`: nothing it does there may wait for the other ranks)."""
    if _group_is_up() and not _Step.alone:
        import torch.distributed as dist

        return World(dist.get_rank(), dist.get_world_size(), world_from_env().local_rank)
    return World()


def _group_is_up() -> bool:
    import sys

    if "torch" not in sys.modules:  # no torch yet, so no process group either
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    return world().distributed


def is_main() -> bool:
    return world().main


def launched() -> World:
    """What the environment says, before the group is up (only rank 0 writes output from the start)."""
    try:
        return world_from_env()
    except ResprobeError:
        return World()


def backend() -> str:
    """gloo for CPU tensors; with CUDA also NCCL for CUDA tensors (float64 sums stay on the CPU)."""
    import torch

    if torch.cuda.is_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


@contextlib.contextmanager
def process_group() -> Iterator[World]:
    """Join the run's process group for the duration of a command (nothing outside torchrun)."""
    here = world_from_env()
    if not here.distributed:
        yield here
        return
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise ResprobeError("this PyTorch build has no torch.distributed: run resprobe without torchrun")
    if dist.is_initialized():  # set up by the caller (a script running several commands): used as it is
        yield world()
        return
    if torch.cuda.is_available():
        # NCCL and every `cuda` device of this process mean this process's own GPU.
        torch.cuda.set_device(here.local_rank % max(1, torch.cuda.device_count()))
    try:
        dist.init_process_group(backend(), timeout=TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - a rendezvous failure is one line
        raise ResprobeError(f"cannot join the torchrun process group ({type(exc).__name__}: "
                            f"{(str(exc).splitlines() or [''])[0]})") from None
    try:
        yield world()
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """``cuda`` (without an index) means this process's GPU, ``cuda:LOCAL_RANK``, in a run of several."""
    import torch

    here = launched()
    if device.type == "cuda" and device.index is None and here.distributed and torch.cuda.is_available():
        return torch.device("cuda", here.local_rank % torch.cuda.device_count())
    return device


# --------------------------------------------------------------------------------------------------
# Collectives (each a no-op in a run of one)


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """A peer that stopped makes a collective fail: that is :class:`PeerFailed`, not an error of ours."""
    advance()  # entering it: a rank that failed before it knows rank 0 got past that point
    try:
        yield
    except ResprobeError:
        raise
    except Exception as exc:  # noqa: BLE001 - gloo/NCCL raise RuntimeError and DistError subclasses
        raise PeerFailed(f"another process of the run stopped during {what} ({type(exc).__name__})") from exc


def barrier() -> None:
    if not is_distributed():
        return
    import torch.distributed as dist

    with _collective("a barrier"):
        dist.barrier()


def all_reduce_sums(values: Sequence[float]) -> list[float]:
    """Element-wise sums over all ranks, in float64 (on the CPU: gloo)."""
    if not is_distributed():
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
    with _collective("a sum over processes"):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_reduce_(tensor: torch.Tensor) -> None:
    """Sum ``tensor`` over all ranks, in place (a CPU tensor through gloo, a CUDA one through NCCL)."""
    if not is_distributed():
        return
    import torch.distributed as dist

    with _collective("a sum over processes"):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def all_gather(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a run of one."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    with _collective("a gather"):
        dist.all_gather_object(gathered, obj)
    return gathered


def broadcast(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    with _collective("a broadcast"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


class _Step:
    """Whether every rank is known to run the same code now (``lockstep``: a command that runs on
    every rank, see :func:`lockstep`) and whether rank 0 runs alone (:func:`alone`, :func:`on_main`)."""

    lockstep = False
    alone = False


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Code that rank 0 runs while the other ranks do something else (inside :func:`on_main`, or a
    command that is not split, in a script whose process group is up): there this process is a run
    of one, so every collective is a no-op instead of a wait for ranks that never come."""
    saved = _Step.alone
    _Step.alone = True
    try:
        yield
    finally:
        _Step.alone = saved


@contextlib.contextmanager
def lockstep() -> Iterator[None]:
    """Mark code that every rank runs in step (the command line's scale-out commands), so that
    :func:`in_lockstep` code may do its work once, on rank 0, with :func:`on_main`. A library caller
    that opens a file on one rank only is outside it: there nothing waits for the other ranks."""
    saved = _Step.lockstep
    _Step.lockstep = True
    try:
        yield
    finally:
        _Step.lockstep = saved


def in_lockstep() -> bool:
    return _Step.lockstep and is_distributed()


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 and its result on every rank (one broadcast); ``fn()`` in a run of one, and
    inside another ``on_main`` (rank 0 is alone there already). The other ranks wait. An error on
    rank 0 is raised there, and the others stop with :class:`PeerFailed` (rank 0's line is the run's
    one line)."""
    if not is_distributed():  # also inside another on_main: rank 0 is alone there already
        return fn()
    result: Any = None
    error: Exception | None = None
    if is_main():
        try:
            with alone():
                result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others know
            error = exc
    outcome = broadcast((error is None, result, str(error) if error is not None else ""))
    if error is not None:
        raise error
    ok, result, message = outcome
    if not ok:
        raise PeerFailed(f"rank 0 stopped: {message}")
    return result


def broadcast_tensors_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Rank ``src``'s values into ``tensors`` on every rank, in place (CPU tensors through gloo, CUDA
    tensors through NCCL); nothing in a run of one."""
    if not is_distributed():
        return
    import torch.distributed as dist

    with _collective("a broadcast"):
        for tensor in tensors:
            dist.broadcast(tensor, src=src)


# --------------------------------------------------------------------------------------------------
# Sharding: whole batches, batch k on rank k mod N


def batch_ranges(n: int, batch_size: int) -> list[range]:
    """The batches of a one-process pass over ``n`` samples, as position ranges."""
    return [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def my_batches(numbers: Sequence[int], here: World | None = None) -> list[int]:
    """This rank's share of batch ``numbers``: every N-th, starting at its rank."""
    here = here or world()
    return list(numbers)[here.rank::here.size]


def shard_positions(n: int, batch_size: int, here: World | None = None) -> list[int]:
    """The sample positions this rank takes in a pass over ``n`` samples in batches of ``batch_size``:
    batch k whole on rank k mod N (a loader with that batch size over them yields exactly those batches)."""
    here = here or world()
    if not here.distributed:
        return list(range(n))
    ranges = batch_ranges(n, batch_size)
    return [p for k in my_batches(range(len(ranges)), here) for p in ranges[k]]


@functools.lru_cache(maxsize=None)
def _shard_class() -> type:
    from torch.utils.data import Subset

    class Shard(Subset):
        """This rank's batches of a dataset (``.dataset``: the whole selection, as one process has it)."""

    return Shard


def shard_source(source: Any, batch_size: int) -> Any:
    """``source`` (a :class:`resprobe.data.datasets.DataSource`) restricted to this rank's batches."""
    if not is_distributed():
        return source
    from dataclasses import replace

    return replace(source, dataset=_shard_class()(source.dataset, shard_positions(len(source), batch_size)))


def whole_selection(dataset: Any) -> Any:
    """The dataset a run of one process has: under a :func:`shard_source` shard, the whole selection
    (what a check of the samples against a recording compares), else ``dataset`` itself."""
    return dataset.dataset if isinstance(dataset, _shard_class()) else dataset


def merge_in_order(parts: Sequence[Sequence[T]], n_batches: int) -> list[T]:
    """Per-rank lists of per-batch results (rank r holds batches r, r+N, ...) back in batch order."""
    size = len(parts)
    merged: list[T] = []
    for k in range(n_batches):
        part = parts[k % size]
        merged.append(part[k // size])
    return merged


# --------------------------------------------------------------------------------------------------
# BatchNorm over the global batch (finetune --sync-bn)


@functools.lru_cache(maxsize=None)
def _global_batch_norm_class() -> type:
    """BatchNorm whose training statistics are those of the global batch (every rank's samples),
    for the CPU, where ``torch.nn.SyncBatchNorm`` does not run. Sums and sums of squares are taken
    in float64 and all-reduced with autograd (``torch.distributed.nn.functional.all_reduce``), so
    the gradient flows through the global statistics exactly as in one process with the whole batch."""
    import torch
    from torch import nn
    from torch.distributed.nn.functional import all_reduce

    class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
        def _check_input_dim(self, input: torch.Tensor) -> None:
            if input.dim() < 2:
                raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            if not (self.training and is_distributed()):
                return super().forward(input)
            self._check_input_dim(input)
            dims = [0, *range(2, input.dim())]
            x = input.double()
            count = torch.full((1,), float(input.numel() // input.shape[1]), dtype=torch.float64,
                               device=input.device)
            sums = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
            c = input.shape[1]
            n = sums[-1]
            mean = sums[:c] / n
            var = (sums[c:2 * c] / n - mean * mean).clamp_min(0)  # biased, as BatchNorm normalizes
            shape = [1, c, *[1] * (input.dim() - 2)]
            out = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
            if self.affine:
                out = out * self.weight.double().view(shape) + self.bias.double().view(shape)
            if self.track_running_stats and self.running_mean is not None:
                with torch.no_grad():
                    self.num_batches_tracked.add_(1)
                    factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                    unbiased = var * n / (n - 1).clamp_min(1)
                    self.running_mean.mul_(1 - factor).add_(factor * mean.to(self.running_mean.dtype))
                    self.running_var.mul_(1 - factor).add_(factor * unbiased.to(self.running_var.dtype))
            return out.to(input.dtype)

    return GlobalBatchNorm


def convert_sync_batchnorm(model: Any, device: torch.device) -> Any:
    """``finetune --sync-bn``: BatchNorm statistics over the global batch. On CUDA timm's converter
    (``torch.nn.SyncBatchNorm``, and timm's BatchNorm+activation layers); on the CPU the torch
    BatchNorm1d/2d/3d layers become :func:`_global_batch_norm_class` layers with the same parameters
    and buffers (other BatchNorm variants are refused there)."""
    from torch import nn

    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm as timm_convert

        return timm_convert(model)
    plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    others = sorted({type(m).__name__ for m in model.modules()
                     if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m) not in plain})
    if others:
        raise ResprobeError(f"--sync-bn on the CPU converts torch BatchNorm layers only; this model also has "
                            f"{', '.join(others)} (run on CUDA, or without --sync-bn)")
    cls = _global_batch_norm_class()
    for module in model.modules():
        if type(module) in plain:
            module._resprobe_plain_class = type(module)
            module.__class__ = cls  # same parameters, buffers and hyper-parameters; training forward global
    return model


def revert_sync_batchnorm(model: Any) -> Any:
    """Undo :func:`convert_sync_batchnorm` on the CPU: the layers become their own classes again."""
    for module in model.modules():
        plain = module.__dict__.pop("_resprobe_plain_class", None)
        if plain is not None:
            module.__class__ = plain
    return model


# --------------------------------------------------------------------------------------------------
# One error line per run


ERROR_GRACE_SECONDS = 2.0  # how long a rank whose own batches failed waits for rank 0 to fail the same way
COMMON_WAIT_SECONDS = 120.0  # the longest a rank that failed before the ranks diverged waits for rank 0


class _Channel:
    """The command's error channel (:func:`error_channel`): the store, its key prefix, this rank's
    progress (collectives entered, and the ranks' divergence) and whether its own batches began."""

    store: Any = None
    prefix = ""
    progress = 0
    diverged = False
    commands = 0


@contextlib.contextmanager
def error_channel() -> Iterator[None]:
    """For a command that runs on every rank: a client of torchrun's key-value store (MASTER_ADDR,
    MASTER_PORT), through which rank 0 tells the others the error line it printed and how far it got,
    so that an error every rank hits is printed once (:func:`should_speak`). Without a store (another
    launcher) nothing is exchanged and a rank other than 0 speaks after :data:`ERROR_GRACE_SECONDS`.
    The channel stays readable after the block: the error is handled outside it."""
    reset_error_channel()
    _Channel.commands += 1  # the same on every rank: every rank runs the same commands
    if world().distributed:
        try:
            import torch.distributed as dist

            _Channel.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                           is_master=False, timeout=datetime.timedelta(seconds=10))
        except Exception:  # noqa: BLE001 - no store: the ranks do not exchange their errors
            _Channel.store = None
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun keeps its store over restarts
        _Channel.prefix = f"resprobe/{restart}/{_Channel.commands}/"
    yield


def reset_error_channel() -> None:
    """No channel (yet): a command's start, before its process group is up."""
    _Channel.progress, _Channel.diverged, _Channel.store = 0, False, None


def advance() -> None:
    """Count a step every rank takes in the same order (entering a collective, the ranks diverging);
    rank 0 publishes its count."""
    _Channel.progress += 1
    if _Channel.store is not None and world().main:
        with contextlib.suppress(Exception):
            _Channel.store.set(_Channel.prefix + "progress", str(_Channel.progress))


def diverge() -> None:
    """This rank starts on its own batches: from here on an error may be this rank's alone (a damaged
    image in its shard). Before it, ranks have done the same work on the same arguments, model and
    data description, so an error is every rank's."""
    if not _Channel.diverged and is_distributed():
        _Channel.diverged = True
        advance()


def should_speak(line: str, main: bool) -> bool:
    """Whether this rank prints the error ``line``: rank 0 always (after telling the others); another
    rank unless rank 0 printed the same line. Before the ranks diverged it waits (up to
    :data:`COMMON_WAIT_SECONDS`) until rank 0 failed or got past the point where this rank failed;
    after, its error is likely its own and it waits :data:`ERROR_GRACE_SECONDS` at most."""
    import time

    store = _Channel.store
    if main:
        if store is not None:
            with contextlib.suppress(Exception):
                store.set(_Channel.prefix + "error", line)
        return True
    if store is None:
        time.sleep(ERROR_GRACE_SECONDS)
        return True
    deadline = time.monotonic() + (ERROR_GRACE_SECONDS if _Channel.diverged else COMMON_WAIT_SECONDS)
    try:
        while time.monotonic() < deadline:
            if store.check([_Channel.prefix + "error"]):
                return store.get(_Channel.prefix + "error").decode() != line
            if store.check([_Channel.prefix + "progress"]) \
                    and int(store.get(_Channel.prefix + "progress")) > _Channel.progress:
                return True  # rank 0 got past this rank's failure without failing: this rank's own error
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 - the store is gone (rank 0 hosted it and ended): say it
        return True
    return True

