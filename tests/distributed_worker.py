"""Run several resprobe commands in one process of a torchrun run, as the command line would, so a
test pays for one launch (one torch import per process) instead of one per command.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py JOBS.json

JOBS.json: ``{"dir": OUTDIR, "jobs": [[name, [args...]], ...]}``. Each job's stdout goes to
``OUTDIR/NAME.rankR.out`` and its exit status to ``OUTDIR/NAME.rankR.code``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["dir"])
    rank = os.environ.get("RANK", "0")

    import torch.distributed as dist

    from resprobe.cli import app

    # One process group for every job (resprobe uses a group that is already up as it is).
    dist.init_process_group("gloo")
    for name, args in spec["jobs"]:
        with open(out / f"{name}.rank{rank}.out", "w") as fh, contextlib.redirect_stdout(fh):
            try:
                code = app(args, standalone_mode=False, prog_name="resprobe")
            except SystemExit as exc:  # usage errors
                code = exc.code
        (out / f"{name}.rank{rank}.code").write_text(str(code or 0))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
