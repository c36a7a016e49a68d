"""``resprobe ablate`` against the naive way, whole process, on the CPU (issue 4's benchmark).

torchvision ResNet-50 (random weights, 10 classes, 12 identity blocks), N CIFAR-10 test images as a
32×32 uint8 arrays file (never resized), batch 100, same weights file for both. Both processes run
alternately ``--repeats`` times; the ratio of the median wall times is reported (target ≤ 0.65), with
the largest difference between their per-block figures (they must agree).

    python benchmarks/ablate_cpu.py [--n 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from common import CIFAR_MEAN, CIFAR_STD, cifar_arrays, measure, python

HERE = Path(__file__).resolve().parent
TARGET = 0.65


def largest_difference(resprobe: dict, naive: dict) -> float:
    pairs = [(resprobe["baseline"], naive["baseline"])]
    ours = {b["name"]: b for b in resprobe["blocks"]}
    if set(ours) != {b["name"] for b in naive["blocks"]}:
        raise SystemExit(f"different blocks: {sorted(ours)} vs {[b['name'] for b in naive['blocks']]}")
    pairs += [(ours[b["name"]], b) for b in naive["blocks"]]
    return max(max(abs(a["loss"] - b["loss"]), abs(a["acc"] - b["acc"])) for a, b in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = cifar_arrays(Path(tmp) / "cifar.npz", args.n)
        weights = Path(tmp) / "resnet50.pt"
        torch.manual_seed(0)
        from torchvision.models import resnet50

        torch.save(resnet50(num_classes=10).state_dict(), weights)
        ablate = [python(), "-m", "resprobe", "ablate", "torchvision:resnet50", "--num-classes", "10",
                  "--checkpoint", str(weights), "--data", str(data), "--mean", CIFAR_MEAN, "--std", CIFAR_STD,
                  "--batch-size", str(args.batch_size), "--device", "cpu", "--format", "json", "--quiet"]
        naive = [python(), str(HERE / "naive_ablate.py"), str(data), str(weights), "--batch-size",
                 str(args.batch_size), "--mean", CIFAR_MEAN, "--std", CIFAR_STD]
        times: dict[str, list[float]] = {"naive": [], "resprobe": []}
        cpu: dict[str, list[float]] = {"naive": [], "resprobe": []}
        outputs: dict[str, dict] = {}
        for _ in range(args.repeats):
            for name, cmd in (("naive", naive), ("resprobe", ablate)):
                run = measure(cmd)
                times[name].append(run.seconds)
                cpu[name].append(run.cpu_seconds)
                outputs[name] = json.loads(run.stdout)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    ratio = med["resprobe"] / med["naive"]
    print(json.dumps({
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus "
                   f"{torch.get_num_threads()} threads".strip(),
        "torch": torch.__version__, "n": args.n, "batch_size": args.batch_size, "repeats": args.repeats,
        "identity_blocks": len(outputs["naive"]["blocks"]),
        "naive_seconds": round(med["naive"], 2), "resprobe_seconds": round(med["resprobe"], 2),
        "naive_runs": [round(t, 2) for t in times["naive"]], "resprobe_runs": [round(t, 2) for t in times["resprobe"]],
        "time_ratio": round(ratio, 3), "target_time_ratio": TARGET, "within_target": ratio <= TARGET,
        "naive_cpu_seconds": round(med_cpu["naive"], 2), "resprobe_cpu_seconds": round(med_cpu["resprobe"], 2),
        "cpu_time_ratio": round(med_cpu["resprobe"] / med_cpu["naive"], 3),
        "max_abs_difference": largest_difference(outputs["resprobe"], outputs["naive"]),
    }, indent=2))


if __name__ == "__main__":
    main()
