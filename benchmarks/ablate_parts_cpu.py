"""The two measures behind ``ablate``'s whole-process figure on the CPU, each timed in one process.

1. Suffix runs side by side: one batch of N CIFAR-10 test images (32×32), torchvision ResNet-50
   (random weights, 10 classes); every identity block's removal evaluated from the cached block
   inputs by ``AblationEngine``, with the suffixes in threads (the default on the CPU) and one
   after another (``MAX_SUFFIX_THREADS = 1``). The base forward pass is timed alone and subtracted.
2. Loading a checkpoint: ``build_with_weights`` (built on the meta device) against building with
   random initialization and then loading the same state dict.

Medians of ``--repeats`` after one warm-up; the two ways of running the suffixes alternate. Prints one JSON document.

    python benchmarks/ablate_parts_cpu.py [--batch-size 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import CIFAR_MEAN, CIFAR_STD, cifar_arrays

ablate = importlib.import_module("resprobe.ablate")  # `resprobe.ablate` is rp.ablate, the function
from resprobe.ablate_engine import AblationEngine, lesion_variant
from resprobe.models.blocks import discover_blocks
from resprobe.models.build import build_architecture, build_with_weights, load_weights
from resprobe.runtime import make_runtime


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cifar_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp, np.load(cifar_arrays(Path(tmp) / "cifar.npz", n)) as f:
        images = torch.from_numpy(f["images"]).permute(0, 3, 1, 2).float().div(255)
        labels = torch.from_numpy(f["labels"].astype(np.int64))
    mean = torch.tensor([float(v) for v in CIFAR_MEAN.split(",")]).view(1, 3, 1, 1)
    std = torch.tensor([float(v) for v in CIFAR_STD.split(",")]).view(1, 3, 1, 1)
    return ((images - mean) / std).contiguous(), labels


def suffixes(args: argparse.Namespace, arch: dict) -> dict:
    model, _ = build_architecture(arch)
    model.eval().requires_grad_(False)
    anatomy = discover_blocks(model, (3, 32, 32))
    images, labels = cifar_batch(args.batch_size)
    variants = [lesion_variant(anatomy, [i]) for i, b in enumerate(anatomy.blocks) if b.is_identity]
    engine = AblationEngine(model, anatomy, make_runtime("cpu"), [(images, labels)])
    with torch.no_grad():
        base = median_seconds(lambda: model(images), args.repeats)
    results = {"removals": len(variants), "base_forward_seconds": round(base, 4)}
    saved = ablate.MAX_SUFFIX_THREADS
    times: dict[str, list[float]] = {"threads": [], "sequential": []}

    def batch(threads: int) -> float:
        ablate.MAX_SUFFIX_THREADS = threads
        try:
            start = time.perf_counter()
            list(engine.run(variants))
            return time.perf_counter() - start
        finally:
            ablate.MAX_SUFFIX_THREADS = saved

    batch(saved), batch(1)  # warm-up
    for _ in range(args.repeats):  # alternately: this machine's speed drifts
        times["threads"].append(batch(saved))
        times["sequential"].append(batch(1))
    for name, values in times.items():
        results[f"suffixes_{name}_seconds"] = round(statistics.median(values) - base, 4)
    results["suffix_time_ratio"] = round(results["suffixes_threads_seconds"]
                                         / results["suffixes_sequential_seconds"], 3)
    return results


def loading(args: argparse.Namespace, arch: dict) -> dict:
    torch.manual_seed(0)
    state = build_architecture(arch)[0].state_dict()

    def initialized_then_loaded() -> None:
        model, _ = build_architecture(arch)
        load_weights(model, state, "benchmark")

    meta = median_seconds(lambda: build_with_weights(arch, state, "benchmark"), args.repeats)
    ordinary = median_seconds(initialized_then_loaded, args.repeats)
    return {"build_with_weights_seconds": round(meta, 4), "init_then_load_seconds": round(ordinary, 4),
            "saved_seconds": round(ordinary - meta, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    arch = {"source": "torchvision", "name": "resnet50", "num_classes": 10, "kwargs": {}}
    print(json.dumps({
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads", "torch": torch.__version__,
        "batch_size": args.batch_size, "repeats": args.repeats,
        "suffixes": suffixes(args, arch), "loading": loading(args, arch),
    }, indent=2))


if __name__ == "__main__":
    main()
