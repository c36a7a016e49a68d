"""One-GPU benchmark: ``record``, ``ablate``'s engine and a ``finetune`` step against the floor (issue 7).

On synthetic 224×224 data, torchvision ResNet-50 (random weights, 1000 classes), batch 128, for fp32
(TF32 off) and bf16 autocast, in one process:

* floor: forward + backward to the input, parameters frozen (no weight gradients);
* record: the same pass with resprobe's hooks and per-sample reductions (``Recorder.run_batch``,
  including its one device→host transfer per batch);
* ablate: every identity block removed in turn, resprobe's prefix-cache engine against the naive
  way (a full forward per removal), both from ``resprobe.ablate.AblationEngine``;
* finetune: one training step as ``resprobe finetune`` takes it (light augmentation, forward,
  backward, SGD with Nesterov momentum and decoupled weight decay groups).

Each is timed over ``--iters`` batches after ``--warmup`` batches, with the device synchronized, and
its peak allocated GPU memory measured from a reset. One JSON document goes to stdout. Targets (not
asserted): record ≤ 1.10× the floor's time and ≤ 1.2× its peak memory; ablate ≤ 0.6× naive.

    python benchmarks/device.py                         # on a GPU, about 2–3 minutes
    python benchmarks/device.py --device cpu --size 32 --batch-size 8 --iters 1 --warmup 0   # smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torchvision

from resprobe.ablate import AblationEngine, lesion_variant
from resprobe.blocks import discover_blocks
from resprobe.recorder import Recorder
from resprobe.runtime import Runtime, make_runtime
from resprobe.train import FinetuneOptions, light_augment, make_optimizer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable[[], Any], runtime: Runtime, iters: int, warmup: int, batch: int) -> dict[str, Any]:
    """Images per second and peak allocated memory (GiB, CUDA only) of ``step``."""
    device = runtime.device
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"seconds_per_batch": round(seconds, 5), "images_per_s": round(batch / seconds, 1),
            "peak_gib": round(peak, 3) if peak is not None else None}


def bench_precision(args: argparse.Namespace, precision: str) -> dict[str, Any]:
    runtime = make_runtime(args.device, precision)
    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet50", num_classes=1000).eval()
    anatomy = discover_blocks(model, (3, args.size, args.size))
    model.requires_grad_(False)
    runtime.prepare(model)
    images = runtime.batch(torch.randn(args.batch_size, 3, args.size, args.size))
    labels = torch.randint(0, 1000, (args.batch_size,), device=runtime.device)
    indices = torch.arange(args.batch_size)

    def floor() -> None:
        x = images.detach().requires_grad_(True)
        with runtime.compute():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        torch.autograd.grad(loss, x)

    results: dict[str, Any] = {"floor": measure(floor, runtime, args.iters, args.warmup, args.batch_size)}
    with Recorder(anatomy, runtime) as recorder:
        results["record"] = measure(lambda: recorder.run_batch(images, labels, indices), runtime, args.iters,
                                    args.warmup, args.batch_size)

    identity = [i for i, b in enumerate(anatomy.blocks) if b.is_identity]
    variants = [lesion_variant(anatomy, [i]) for i in identity]
    batches = [(images, labels)]
    for name, fast in (("ablate_engine", True), ("ablate_naive", False)):
        engine = AblationEngine(model, anatomy, runtime, batches, fast=fast)
        results[name] = measure(lambda engine=engine: list(engine.run(variants)), runtime, args.iters, args.warmup,
                                args.batch_size)
        results[name]["removals"] = len(variants)

    model.requires_grad_(True).train()
    options = FinetuneOptions(out="unused")  # the defaults of `resprobe finetune`
    optimizer = make_optimizer(model, options)
    generator = torch.Generator().manual_seed(0)

    def train_step() -> None:
        x = light_augment(images.cpu() if runtime.device.type != "cpu" else images, generator).to(images.device)
        with runtime.compute():
            loss = F.cross_entropy(model(x).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    results["finetune_step"] = measure(train_step, runtime, args.iters, args.warmup, args.batch_size)

    def ratio(a: str, b: str, key: str = "seconds_per_batch") -> float | None:
        x, y = results[a][key], results[b][key]
        return round(x / y, 3) if x is not None and y else None

    results["ratios"] = {
        "record_time_vs_floor": ratio("record", "floor"), "record_time_target": 1.10,
        "record_memory_vs_floor": ratio("record", "floor", "peak_gib"), "record_memory_target": 1.2,
        "ablate_engine_time_vs_naive": ratio("ablate_engine", "ablate_naive"), "ablate_target": 0.6,
        "finetune_step_memory_vs_floor": ratio("finetune_step", "floor", "peak_gib"),
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()
    device = make_runtime(args.device).device
    started = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "model": "torchvision resnet50", "input": [3, args.size, args.size],
        "batch_size": args.batch_size, "iters": args.iters, "warmup": args.warmup,
    }
    for precision in args.precisions.split(","):
        report[precision] = bench_precision(args, precision)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
