"""Where ``record``'s time goes on the CPU, per batch, in one process (beside ``record_cpu.py``'s
whole-process figure).

One batch of N CIFAR-10 test images (32×32, normalized as ``record_cpu.py`` does), torchvision
ResNet-50 (random weights, 10 classes), timed three ways, alternating, medians of ``--repeats``
after one warm-up each:

* floor: forward + backward to the input, parameters frozen;
* record: ``Recorder.run_batch`` (hooks, copies of F, statistics, the transfer);
* record without statistics: the same with the identity blocks' statistics replaced by zeros, so
  the difference to ``record`` is the statistics and the difference to the floor is the rest.

Prints one JSON document.

    python benchmarks/record_parts_cpu.py [--batch-size 100] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from common import CIFAR_MEAN, CIFAR_STD, cifar_arrays

import resprobe.recording.recorder as recorder
from resprobe.models.blocks import discover_blocks
from resprobe.runtime import make_runtime


def cifar_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        with np.load(cifar_arrays(Path(tmp) / "cifar.npz", n)) as f:
            images, labels = f["images"], f["labels"]
    mean, std = (torch.tensor([float(v) for v in s.split(",")]).view(1, 3, 1, 1) for s in (CIFAR_MEAN, CIFAR_STD))
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    return x.contiguous(), torch.from_numpy(labels).long()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet50", num_classes=10).eval().requires_grad_(False)
    anatomy = discover_blocks(model, (3, 32, 32))
    x, y = cifar_batch(args.batch_size)
    indices = torch.arange(len(y))

    def floor() -> None:
        images = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(images), y, reduction="sum"), images)

    with recorder.Recorder(anatomy, make_runtime("cpu")) as rec:
        def record() -> None:
            rec.run_batch(x, y, indices)

        class Zeros(recorder.IdentityStats):
            def __call__(self, h: torch.Tensor, *_: object) -> torch.Tensor:  # type: ignore[override]
                return torch.zeros(len(recorder.STAT_NAMES), len(h))

        zeros = Zeros(fused=False)

        def record_without_statistics() -> None:
            rec.identity_stats, saved = zeros, rec.identity_stats
            try:
                rec.run_batch(x, y, indices)
            finally:
                rec.identity_stats = saved

        ways: dict[str, Callable[[], None]] = {"floor": floor, "record": record,
                                                "record_without_statistics": record_without_statistics}
        times: dict[str, list[float]] = {name: [] for name in ways}
        for fn in ways.values():
            fn()
        for _ in range(args.repeats):
            for name, fn in ways.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    ms = {name: round(1000 * statistics.median(t), 1) for name, t in times.items()}
    print(json.dumps({
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads", "torch": torch.__version__,
        "batch_size": args.batch_size, "repeats": args.repeats, "median_ms": ms,
        "record_vs_floor": round(ms["record"] / ms["floor"], 3),
        "statistics_ms": round(ms["record"] - ms["record_without_statistics"], 1),
        "hooks_and_copies_ms": round(ms["record_without_statistics"] - ms["floor"], 1),
    }, indent=2))


if __name__ == "__main__":
    main()
