"""One-GPU benchmark: ``record``, ``ablate``'s engine and a ``finetune`` step against the floor (issue 7).

On synthetic 224×224 data, torchvision ResNet-50 (random weights, 1000 classes), batch 128, for fp32
(TF32 off) and bf16 autocast, in one process:

* floor: forward + backward to the input, parameters frozen (no weight gradients);
* record: the same pass with resprobe's hooks and per-sample reductions (``Recorder.run_batch``,
  including its device→host transfer at the end of the batch; the HDF5 writer runs in a background
  thread in ``resprobe record`` and is not part of this figure), as ``resprobe record`` runs it (the
  fused Triton statistics kernel on CUDA, each batch launched before the previous one's results are
  awaited), with torch operations only (``record_torch``), and awaiting every batch (``record_sync``);
* stats_kernel: one block's statistics at the widest activation, the fused kernel (reading a copy
  of F, or recomputing F from the last BatchNorm's input) against torch operations, with the
  kernel's achieved read bandwidth;
* ablate: every identity block removed in turn, resprobe's prefix-cache engine against the naive
  way (a full forward per removal), both from ``resprobe.ablate_engine.AblationEngine``;
* finetune: one training step as ``resprobe finetune`` takes it (``light`` augmentation on the
  device, forward, backward, SGD with Nesterov momentum and decoupled weight decay groups), eager and
  with ``--compile`` (``torch.compile``; its compile time is reported separately).

A correctness section compares CUDA fp32 against the CPU on a few images (record statistics, ablate
figures). Each figure is timed over ``--iters`` batches after ``--warmup`` batches, with the device
synchronized, its peak allocated GPU memory measured from a reset. One JSON document goes to stdout
(and, section by section, to ``--out`` so a run cut short keeps what it measured). Targets (not
asserted): record ≤ 1.10× the floor's time and ≤ 1.2× its peak memory; ablate ≤ 0.6× naive.

    python benchmarks/device.py                         # on a GPU, about 2–4 minutes
    python benchmarks/device.py --device cpu --size 32 --batch-size 8 --iters 1 --warmup 0 --no-compile  # smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from resprobe.ablate_engine import AblationEngine, lesion_variant
from resprobe.models.blocks import Anatomy, discover_blocks
from resprobe.recording import fused_stats
from resprobe.recording.fused_stats import AffineBranch
from resprobe.recording.recorder import STAT_NAMES, IdentityStats, Recorder, identity_block_stats
from resprobe.runtime import Runtime, make_runtime
from resprobe.train import (
    FinetuneOptions,
    compiled_forward,
    light_augment_samples,
    make_optimizer,
    make_scheduler,
    train_step,
)


def log(message: str) -> None:
    print(f"[device.py {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


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


def resnet50(runtime: Runtime, size: int, classes: int = 1000) -> tuple[torch.nn.Module, Anatomy]:
    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet50", num_classes=classes).eval()
    anatomy = discover_blocks(model, (3, size, size))
    model.requires_grad_(False)
    runtime.prepare(model)
    return model, anatomy


def synthetic_batch(runtime: Runtime, batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = runtime.batch(torch.randn(batch, 3, size, size, generator=g))
    labels = torch.randint(0, 1000, (batch,), generator=g).to(runtime.device)
    return images, labels


def ratio(results: dict[str, Any], a: str, b: str, key: str = "seconds_per_batch") -> float | None:
    if a not in results or b not in results:
        return None
    x, y = results[a][key], results[b][key]
    return round(x / y, 3) if x is not None and y else None


def pipelined_record(recorder: Recorder, images: torch.Tensor, labels: torch.Tensor,
                     indices: torch.Tensor) -> Callable[[], None]:
    """One step of ``recorder.iterate``: launch this batch, then await the previous one's results."""
    pending: list[Any] = []

    def step() -> None:
        pending.append(recorder.launch_batch(images, labels, indices))
        if len(pending) > 1:
            pending.pop(0).result()

    return step


def bench_analysis(args: argparse.Namespace, precision: str) -> dict[str, Any]:
    """floor, record and ablate (engine and naive) with frozen weights."""
    runtime = make_runtime(args.device, precision)
    model, anatomy = resnet50(runtime, args.size)
    images, labels = synthetic_batch(runtime, args.batch_size, args.size)
    indices = torch.arange(args.batch_size)

    def floor() -> None:
        x = images.detach().requires_grad_(True)
        with runtime.numerics():
            with runtime.autocast():
                logits = model(x)
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")
            torch.autograd.grad(loss, x)

    results: dict[str, Any] = {"floor": measure(floor, runtime, args.iters, args.warmup, args.batch_size)}
    # record as `resprobe record` runs it: the fused kernel where it runs, each batch launched before
    # the previous one's results are awaited; then with torch operations only; then awaiting each batch
    for name, fused, pipelined in (("record", None, True), ("record_torch", False, True), ("record_sync", None, False)):
        messages: list[str] = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with Recorder(anatomy, runtime, fused=fused) as recorder:
                step = pipelined_record(recorder, images, labels, indices) if pipelined else (
                    lambda recorder=recorder: recorder.run_batch(images, labels, indices))
                results[name] = measure(step, runtime, args.iters, args.warmup, args.batch_size)
                results[name]["fused_kernel"] = recorder.identity_stats.fused
        messages += [str(w.message) for w in caught]
        if messages:
            results[name]["warnings"] = messages
    identity = [i for i, b in enumerate(anatomy.blocks) if b.is_identity]
    variants = [lesion_variant(anatomy, [i]) for i in identity]
    for name, fast in (("ablate_engine", True), ("ablate_naive", False)):
        engine = AblationEngine(model, anatomy, runtime, [(images, labels)], fast=fast)
        results[name] = measure(lambda engine=engine: list(engine.run(variants)), runtime, args.iters, args.warmup,
                                args.batch_size)
        results[name]["removals"] = len(variants)
    results["ratios"] = {
        "record_time_vs_floor": ratio(results, "record", "floor"), "record_time_target": 1.10,
        "record_memory_vs_floor": ratio(results, "record", "floor", "peak_gib"), "record_memory_target": 1.2,
        "record_torch_time_vs_floor": ratio(results, "record_torch", "floor"),
        "record_sync_time_vs_floor": ratio(results, "record_sync", "floor"),
        "record_torch_memory_vs_floor": ratio(results, "record_torch", "floor", "peak_gib"),
        "ablate_engine_time_vs_naive": ratio(results, "ablate_engine", "ablate_naive"), "ablate_target": 0.6,
    }
    return results


def bench_finetune(args: argparse.Namespace, precision: str, compiled: bool) -> dict[str, Any]:
    """One training step as ``resprobe finetune`` takes it, eager or through ``torch.compile`` (``--compile``)."""
    runtime = make_runtime(args.device, precision)
    model, _ = resnet50(runtime, args.size)
    model.requires_grad_(True).train()
    images, labels = synthetic_batch(runtime, args.batch_size, args.size)
    options = FinetuneOptions(out="unused")  # the defaults of `resprobe finetune`
    optimizer = make_optimizer(model, options)
    scheduler = make_scheduler(optimizer, 10**6, 0)
    index = torch.arange(args.batch_size)
    epochs = iter(range(10**9))  # new augmentation draws every step, as in training
    warnings: list[str] = []
    forward = compiled_forward(model, warn=warnings.append) if compiled else model

    def step() -> None:
        augmented = light_augment_samples(images, 0, next(epochs), index)
        train_step(forward, [(augmented, labels)], runtime, optimizer, scheduler, None)

    result: dict[str, Any] = {}
    if compiled:
        start = time.perf_counter()
        step()  # the compile
        synchronize(runtime.device)
        result["compile_seconds"] = round(time.perf_counter() - start, 1)
        result["compiled"] = forward.compiled  # type: ignore[union-attr]
        result["warnings"] = warnings
    result.update(measure(step, runtime, args.iters, args.warmup, args.batch_size))
    return result


def bench_stats_kernel(args: argparse.Namespace) -> dict[str, Any]:
    """One post-activation identity block's statistics at ResNet-50's widest activation ([B, 256, 56, 56]
    at 224×224): the fused kernel reading a copy of F, the fused kernel recomputing F from the last
    BatchNorm's input (``record``'s way for such blocks), and torch operations on the copy. Medians,
    achieved read bandwidth of the kernel, and the largest differences from the torch operations."""
    device = make_runtime(args.device).device
    shape = (args.batch_size, 256, args.size // 4, args.size // 4)
    out: dict[str, Any] = {"shape": list(shape)}
    bn = torch.nn.BatchNorm2d(shape[1]).eval().to(device)
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator(device=device).manual_seed(0)
        h, o, grad, g_out, x = (torch.randn(shape, generator=g, device=device).to(dtype)
                                .contiguous(memory_format=torch.channels_last) for _ in range(5))
        affine = AffineBranch.of(bn, x)
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            branch = bn(x)
        fused = IdentityStats(fused=True)
        ways = {"fused": (fused, branch), "fused_affine": (fused, affine), "torch": (identity_block_stats, branch)}
        row: dict[str, Any] = {}
        results = {}
        for name, (fn, f) in ways.items():
            seconds = []
            for i in range(args.warmup + args.iters):
                synchronize(device)
                t0 = time.perf_counter()
                results[name] = fn(h, o, grad, g_out, f)
                synchronize(device)
                if i >= args.warmup:
                    seconds.append(time.perf_counter() - t0)
            row[f"{name}_ms"] = round(1000 * float(np.median(seconds)), 3)
        reference = results["torch"].cpu().numpy()
        for name in ("fused", "fused_affine"):
            row[f"{name}_max_rel_diff"] = max_relative_difference(results[name].cpu().numpy(), reference)
            row[f"{name}_speedup"] = round(row["torch_ms"] / row[f"{name}_ms"], 2)
            row[f"{name}_read_gb_per_s"] = round(5 * h.numel() * h.element_size() / (row[f"{name}_ms"] / 1000) / 1e9, 1)
        row["fused_kernel_ran"] = fused.fused  # False: it fell back to torch operations (see the warning)
        out[str(dtype).removeprefix("torch.")] = row
    return out


def max_relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    both = np.isfinite(a) & np.isfinite(b)
    if not np.array_equal(np.isfinite(a), np.isfinite(b)):
        return float("inf")
    # relative to each value, floored at 1e-3 of the statistic's largest magnitude (cosines near 0)
    scale = np.maximum(np.abs(b[both]), 1e-3 * max(np.abs(b[both]).max(initial=0.0), 1e-30))
    return float((np.abs(a[both] - b[both]) / scale).max(initial=0.0))


def check_against_cpu(args: argparse.Namespace) -> dict[str, Any]:
    """fp32 on the device against the CPU: record statistics and ablate figures on a few images."""
    n, size = args.check_images, 64
    out: dict[str, Any] = {"images": n, "size": size}
    stats = {}
    figures = {}
    for name in ("cpu", args.device):
        runtime = make_runtime(name, "fp32")
        model, anatomy = resnet50(runtime, size, classes=10)
        g = torch.Generator().manual_seed(1)
        images = torch.randn(n, 3, size, size, generator=g)
        labels = torch.randint(0, 10, (n,), generator=g)
        with Recorder(anatomy, runtime) as recorder:
            stats[name] = recorder.run_batch(images, labels, torch.arange(n))
            out[f"{name}_fused_kernel"] = recorder.identity_stats.fused
        if name == args.device:
            with Recorder(anatomy, runtime, fused=False) as recorder:
                stats[f"{name}_torch"] = recorder.run_batch(images, labels, torch.arange(n))
        variants = [lesion_variant(anatomy, [i]) for i, b in enumerate(anatomy.blocks) if b.is_identity]
        batch = [(runtime.batch(images), labels.to(runtime.device))]
        outcome = next(AblationEngine(model, anatomy, runtime, batch).run(variants))
        figures[name] = torch.stack([outcome.logits, *outcome.variants]).float().cpu().numpy()
    device = args.device
    out["record_max_rel_diff"] = {k: max_relative_difference(stats[device].stats[k], stats["cpu"].stats[k])
                                  for k in STAT_NAMES}
    out["cos_max_abs_diff"] = {k: float(np.nanmax(np.abs(stats[device].stats[k] - stats["cpu"].stats[k])))
                               for k in ("cos", "update_cos")}
    torch_path = f"{device}_torch"  # the device's torch-operation statistics, for comparison
    out["record_torch_max_rel_diff"] = {k: max_relative_difference(stats[torch_path].stats[k], stats["cpu"].stats[k])
                                        for k in STAT_NAMES}
    out["cos_torch_max_abs_diff"] = {k: float(np.nanmax(np.abs(stats[torch_path].stats[k] - stats["cpu"].stats[k])))
                                     for k in ("cos", "update_cos")}
    out["loss_max_rel_diff"] = max_relative_difference(stats[device].loss, stats["cpu"].loss)
    out["ablate_logits_max_abs_diff"] = float(np.abs(figures[device] - figures["cpu"]).max())
    out["ablate_logits_scale"] = float(np.abs(figures["cpu"]).max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the finetune step through torch.compile (compiles once per precision)")
    parser.add_argument("--check-images", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here after every section")
    args = parser.parse_args()
    device = make_runtime(args.device).device
    started = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "torchvision": torchvision.__version__, "model": "torchvision resnet50",
        "input": [3, args.size, args.size], "batch_size": args.batch_size, "iters": args.iters,
        "warmup": args.warmup, "errors": {},
    }

    def section(key: str, fn: Callable[[], dict[str, Any]]) -> None:
        """Run one section; a failure is reported in the JSON and the other sections still run."""
        log(f"{key} ...")
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:  # a benchmark report with a hole beats no report
            report["errors"][key] = f"{type(exc).__name__}: {exc}"[:2000]
            traceback.print_exc()
        else:
            path = key.split("/")
            node = report
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
        log(f"{key} done in {time.perf_counter() - t0:.1f} s")
        report["total_seconds"] = round(time.perf_counter() - started, 1)
        if args.out is not None:
            args.out.write_text(json.dumps(report, indent=2))

    precisions = args.precisions.split(",")
    if fused_stats.triton_available() and (device.type == "cuda" or fused_stats.interpreting()):
        section("stats_kernel", lambda: bench_stats_kernel(args))
    for precision in precisions:
        section(f"{precision}/analysis", lambda p=precision: bench_analysis(args, p))
        section(f"{precision}/finetune_step", lambda p=precision: bench_finetune(args, p, compiled=False))
    section("check_against_cpu", lambda: check_against_cpu(args))  # trivially 0 on the CPU: a smoke test there
    if args.compile:
        for precision in reversed(precisions):  # bf16 first: where compiling matters most
            section(f"{precision}/finetune_step_compiled", lambda p=precision: bench_finetune(args, p, compiled=True))
    for precision in precisions:
        node = report.get(precision, {})
        if "finetune_step" in node and "finetune_step_compiled" in node:
            node["finetune_compiled_speedup"] = round(node["finetune_step"]["seconds_per_batch"]
                                                      / node["finetune_step_compiled"]["seconds_per_batch"], 3)
        analysis = node.get("analysis", {})
        if "finetune_step" in node and "floor" in analysis and analysis["floor"]["peak_gib"]:
            node["finetune_step_memory_vs_floor"] = round(node["finetune_step"]["peak_gib"]
                                                          / analysis["floor"]["peak_gib"], 3)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
