"""Run several resprobe commands in one process of a torchrun run, as the command line would, so a
test pays for one launch (one torch import per process) instead of one per command.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py JOBS.json

JOBS.json: ``{"dir": OUTDIR, "jobs": [[name, [args...], {settings}], ...]}``. Each job's stdout goes to
``OUTDIR/NAME.rankR.out`` and its exit status to ``OUTDIR/NAME.rankR.code``. Settings (optional):
``stop_after_step`` K stops a ``finetune`` after step K as a ``stop`` callback of the library would
(the run saves its state; ``--resume`` continues it); ``count_recalibration`` writes the number of
images each rank recalibrated on to ``OUTDIR/NAME.rankR.recalibrated``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from pathlib import Path


@contextlib.contextmanager
def instrumented(settings: dict, recalibrated: Path):
    """The job's settings applied to resprobe.train for the duration of the job."""
    import resprobe.train as train

    saved = train.finetune, train.recalibrate
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
    try:
        yield
    finally:
        train.finetune, train.recalibrate = saved


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
                instrumented(settings, out / f"{name}.rank{rank}.recalibrated"):
            try:
                code = app(args, standalone_mode=False, prog_name="resprobe")
            except SystemExit as exc:  # usage errors
                code = exc.code
        (out / f"{name}.rank{rank}.code").write_text(str(code or 0))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
