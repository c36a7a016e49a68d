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

Errors: the rank that fails prints its one line and exits 1; ``torchrun`` then ends the other ranks
(within its monitor interval, 0.1 s by default). A rank that finds a peer gone in a collective
(:class:`PeerFailed`) exits 1 without a line of its own, unless it is rank 0 and no one ended it
within :data:`PEER_GRACE_SECONDS`. The process group's :data:`TIMEOUT` bounds any wait for a rank
that hangs without exiting.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
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
    """This process's place: from the process group when one is up, else a run of one."""
    if _group_is_up():
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


def all_reduce_tensor_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (float64 on the CPU; results copied back)."""
    if not is_distributed():
        return tensor
    import torch
    import torch.distributed as dist

    work = tensor.detach().to("cpu", torch.float64)
    with _collective("a sum over processes"):
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
    tensor.copy_(work.to(tensor.device, tensor.dtype))
    return tensor


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


def agree(ok: bool, message: str = "") -> tuple[bool, str]:
    """Whether every rank is ``ok``; when not, the first failing rank's ``message``. Use it where a
    check can fail on one rank only (a file, an option) so that all ranks stop together."""
    if not is_distributed():
        return ok, message
    results = all_gather((ok, message))
    for good, text in results:
        if not good:
            return False, text
    return True, ""


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


def shard_source(source: Any, batch_size: int) -> Any:
    """``source`` (a :class:`resprobe.data.DataSource`) restricted to this rank's batches."""
    if not is_distributed():
        return source
    from dataclasses import replace

    from torch.utils.data import Subset

    return replace(source, dataset=Subset(source.dataset, shard_positions(len(source), batch_size)))


def merge_in_order(parts: Sequence[Sequence[T]], n_batches: int) -> list[T]:
    """Per-rank lists of per-batch results (rank r holds batches r, r+N, ...) back in batch order."""
    size = len(parts)
    merged: list[T] = []
    for k in range(n_batches):
        part = parts[k % size]
        merged.append(part[k // size])
    return merged
