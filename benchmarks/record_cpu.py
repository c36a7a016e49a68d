"""``resprobe record`` against its floor, whole process, on the CPU (issue 3's benchmark).

torchvision ResNet-50 (random weights, 10 classes), 1000 CIFAR-10 test images as a 32×32 arrays file
(never resized), batch 100. Both processes run alternately ``--repeats`` times; the ratio of the
medians is reported with each process's peak resident memory. Targets: time ≤ 1.15×, memory ≤ 1.2×.

    python benchmarks/record_cpu.py [--n 1000] [--repeats 3] [--checkpoint]

--checkpoint: both processes load the same 94 MB state dict (issue 22's setup: the checkpoint's
sha256 and the weights fingerprint are then part of record's cost).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from common import CIFAR_MEAN, CIFAR_STD, cifar_arrays, measure, python

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", action="store_true", help="both load a saved ResNet-50 state dict")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = cifar_arrays(Path(tmp) / "cifar.npz", args.n)
        out = Path(tmp) / "run.h5"
        record = [python(), "-m", "resprobe", "record", "torchvision:resnet50", "--num-classes", "10", "--data",
                  str(data), "--mean", CIFAR_MEAN, "--std", CIFAR_STD, "--batch-size", str(args.batch_size),
                  "--device", "cpu", "--out", str(out), "--overwrite", "--quiet"]
        floor = [python(), str(HERE / "floor_record.py"), str(data), "--batch-size", str(args.batch_size)]
        if args.checkpoint:
            from torchvision.models import resnet50

            weights = Path(tmp) / "resnet50.pt"
            torch.save(resnet50(num_classes=10).state_dict(), weights)
            record += ["--checkpoint", str(weights)]
            floor += ["--checkpoint", str(weights)]
        runs: dict[str, list] = {"floor": [], "record": []}
        for _ in range(args.repeats):
            runs["floor"].append(measure(floor))
            runs["record"].append(measure(record))
    med = {k: statistics.median(m.seconds for m in v) for k, v in runs.items()}
    # CPU time (user + system) is far less sensitive than wall time to other load on the machine
    cpu = {k: statistics.median(m.cpu_seconds for m in v) for k, v in runs.items()}
    rss = {k: max(m.max_rss_mb for m in v) for k, v in runs.items()}
    print(json.dumps({
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "torch": torch.__version__, "checkpoint": args.checkpoint, "n": args.n, "batch_size": args.batch_size, "repeats": args.repeats,
        "floor_seconds": round(med["floor"], 2), "record_seconds": round(med["record"], 2),
        "time_ratio": round(med["record"] / med["floor"], 3), "target_time_ratio": 1.15,
        "floor_cpu_seconds": round(cpu["floor"], 2), "record_cpu_seconds": round(cpu["record"], 2),
        "cpu_time_ratio": round(cpu["record"] / cpu["floor"], 3),
        "single_runs_seconds": {k: [round(m.seconds, 2) for m in v] for k, v in runs.items()},
        "floor_max_rss_mb": round(rss["floor"], 1), "record_max_rss_mb": round(rss["record"], 1),
        "memory_ratio": round(rss["record"] / rss["floor"], 3), "target_memory_ratio": 1.2,
    }, indent=2))


if __name__ == "__main__":
    main()
