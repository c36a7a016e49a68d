"""Scale-out with torchrun: N processes against one, in the same run (issue 15's benchmark).

CPU mode (default): 2 processes × 1 thread (``torchrun --nproc-per-node 2``, gloo) against 1 process
× 2 threads, for ``record``, ``ablate --cumulative 2`` and ``finetune`` (``--sync-bn``, the same
global batch), on a timm ResNet-18 (random weights, 10 classes) and CIFAR-10 test images as a 32×32
arrays file. GPU mode (``--gpu``): every visible GPU, one process each, against one process on one
GPU, same commands and per-process batch.

Every figure is a whole process (start-up included: torch is imported once per process, and
torchrun adds its own), so each command also runs on a tiny workload (two batches or two steps) and
the report gives the ratio both raw and with that fixed cost taken off. Processes alternate,
``--repeats`` times; medians.

    python benchmarks/scaling.py [--n 1000] [--repeats 3] [--gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from common import CIFAR_MEAN, CIFAR_STD, cifar_arrays, measure, python

MODEL = ["timm:resnet18", "--num-classes", "10", "--mean", CIFAR_MEAN, "--std", CIFAR_STD]


def commands(data: Path, tmp: Path, n: int, batch: int, steps: int, device: str) -> dict[str, list[str]]:
    """Each workload's command line after ``resprobe`` (per-process batch ``batch``)."""
    common = ["--data", str(data), "--limit", str(n), "--device", device, "--quiet", "-f", "json"]
    return {
        "record": ["record", *MODEL, *common, "-b", str(batch), "--out", str(tmp / "run.h5"), "--overwrite"],
        "ablate": ["ablate", *MODEL, *common, "-b", str(batch), "--cumulative", "2"],
        "finetune": ["finetune", *MODEL, *common, "-b", str(batch), "--max-steps", str(steps), "--sync-bn",
                     "--out", str(tmp / "ft.pt"), "--overwrite"],
    }


def launch(args: list[str], procs: int, threads: int) -> list[str]:
    env_threads = ["env", f"OMP_NUM_THREADS={threads}"]
    if procs == 1:
        return [*env_threads, python(), "-m", "resprobe", *args]
    return [*env_threads, python(), "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
            "-m", "resprobe", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000, help="samples for record and ablate")
    parser.add_argument("--batch-size", type=int, default=50, help="per process (one process: × processes)")
    parser.add_argument("--steps", type=int, default=10, help="finetune steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="every visible GPU against one")
    args = parser.parse_args()
    procs = torch.cuda.device_count() if args.gpu else 2
    if procs < 2:
        sys.exit("scaling needs two or more processes: on a GPU machine, two or more GPUs")
    device = "cuda" if args.gpu else "cpu"
    threads_one, threads_each = (1, 1) if args.gpu else (procs, 1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = cifar_arrays(tmp / "cifar.npz", max(args.n, 2 * args.batch_size * procs))
        b = args.batch_size
        # One process takes the same global batch as N processes (finetune: the same steps).
        big = commands(data, tmp, args.n, b * procs, args.steps, device)
        small = commands(data, tmp, args.n, b, args.steps, device)
        big_fixed = commands(data, tmp, 2 * b * procs, b * procs, 2, device)
        small_fixed = commands(data, tmp, 2 * b * procs, b, 2, device)
        for name in big:
            runs: dict[str, list[float]] = {"one": [], "several": [], "one_fixed": [], "several_fixed": []}
            for _ in range(args.repeats):
                runs["one"].append(measure(launch(big[name], 1, threads_one)).seconds)
                runs["several"].append(measure(launch(small[name], procs, threads_each)).seconds)
                runs["one_fixed"].append(measure(launch(big_fixed[name], 1, threads_one)).seconds)
                runs["several_fixed"].append(measure(launch(small_fixed[name], procs, threads_each)).seconds)
            med = {k: statistics.median(v) for k, v in runs.items()}
            work_one = med["one"] - med["one_fixed"]
            work_several = med["several"] - med["several_fixed"]
            results[name] = {
                "one_seconds": round(med["one"], 2), "several_seconds": round(med["several"], 2),
                "speedup": round(med["one"] / med["several"], 3),
                "fixed_one_seconds": round(med["one_fixed"], 2), "fixed_several_seconds": round(med["several_fixed"], 2),
                # null when the small run took as long as the full one (too noisy to subtract)
                "speedup_without_fixed_cost": (round(work_one / work_several, 3)
                                               if work_one > 0 and work_several > 0 else None),
            }
    print(json.dumps({
        "machine": f"{platform.machine()} {os.cpu_count()} cores" + (f", {procs} × {torch.cuda.get_device_name(0)}"
                                                                      if args.gpu else ""),
        "torch": torch.__version__, "mode": "gpu" if args.gpu else "cpu",
        "one": f"1 process × {threads_one} thread(s)", "several": f"{procs} processes × {threads_each} thread(s)",
        "n": args.n, "batch_size_per_process": args.batch_size, "finetune_steps": args.steps,
        "repeats": args.repeats, "workloads": results,
    }, indent=2))


if __name__ == "__main__":
    main()
