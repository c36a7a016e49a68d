"""Run several resprobe commands in one process of a torchrun run, as the command line would, so a
test pays for one launch (one torch import per process) instead of one per command.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py JOBS.json

JOBS.json: ``{"dir": OUTDIR, "jobs": [[name, [args...], {settings}], ...]}``. Each job's stdout goes to
``OUTDIR/NAME.rankR.out`` and its exit status to ``OUTDIR/NAME.rankR.code``. Settings (optional):
``stop_after_step`` K stops a ``finetune`` after step K as a ``stop`` callback of the library would
(the run saves its state; ``--resume`` continues it); ``count_recalibration`` writes the number of
images each rank recalibrated on to ``OUTDIR/NAME.rankR.recalibrated``; ``count_hdf5_probes`` writes
the number of HDF5 files each rank read through in a child process to ``OUTDIR/NAME.rankR.probes``;
``delay_rank_0`` S makes rank 0 start the job S seconds late (a slow rank 0); ``fail_open_on_rank`` R
makes loading the model fail on rank R alone (an error only that rank hits); ``exit_on_error`` ends the
process with the job's exit status when it fails, as the command line does (torchrun then ends the others).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from pathlib import Path


@contextlib.contextmanager
def instrumented(settings: dict, stem: Path):
    """The job's settings applied to resprobe for the duration of the job."""
    import resprobe.recording.hdf5_probe as hdf5_probe
    import resprobe.train as train

    import resprobe.probe as probe

    saved = train.finetune, train.recalibrate, hdf5_probe.crash_reason
    open_probe = probe.open_probe
    rank = int(os.environ.get("RANK", "0"))
    if settings.get("delay_rank_0") and rank == 0:
        time.sleep(float(settings["delay_rank_0"]))
    if settings.get("fail_open_on_rank") == rank:
        from resprobe.errors import ModelError

        def failing(*args, **kwargs):
            raise ModelError(f"cannot load the model on rank {rank}")

        probe.open_probe = failing
    recalibrated, probes = Path(f"{stem}.recalibrated"), Path(f"{stem}.probes")
    stop_after = settings.get("stop_after_step")
    if stop_after is not None:
        train.finetune = functools.partial(saved[0], stop=lambda state: state.step >= stop_after)
    if settings.get("count_recalibration"):
        recalibrated.write_text("0")

        def counted(*args, **kwargs):
            seen = saved[1](*args, **kwargs)
            recalibrated.write_text(str(int(recalibrated.read_text()) + seen))
            return seen

        train.recalibrate = counted
    if settings.get("count_hdf5_probes"):
        probes.write_text("0")

        def probed(path):
            probes.write_text(str(int(probes.read_text()) + 1))
            return saved[2](path)

        hdf5_probe.crash_reason = probed
    try:
        yield
    finally:
        train.finetune, train.recalibrate, hdf5_probe.crash_reason = saved
        probe.open_probe = open_probe


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["dir"])
    rank = os.environ.get("RANK", "0")

    import torch.distributed as dist

    from resprobe.cli import app

    # One process group for every job (resprobe uses a group that is already up as it is).
    dist.init_process_group("gloo")
    for name, args, *more in spec["jobs"]:
        settings = more[0] if more else {}
        with open(out / f"{name}.rank{rank}.out", "w") as fh, contextlib.redirect_stdout(fh), \
                instrumented(settings, out / f"{name}.rank{rank}"):
            try:
                code = app(args, standalone_mode=False, prog_name="resprobe")
            except SystemExit as exc:  # usage errors
                code = exc.code
        (out / f"{name}.rank{rank}.code").write_text(str(code or 0))
        if code and settings.get("exit_on_error"):
            sys.stderr.flush()
            os._exit(code)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
