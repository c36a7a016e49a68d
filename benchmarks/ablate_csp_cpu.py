"""ablate on a CSPNet: the prefix cache (CSP stages as segments) against the full forward per removal.

timm ``cspresnet50`` (random weights, 10 classes) on N CIFAR-10 test images upsampled to 64×64, one
intra-op thread. Both engines evaluate every identity block's removal over the same batch in the same
process, alternating, ``--repeats`` times after one warm-up; the figure is the ratio of median CPU
seconds (``time.process_time``, far less sensitive than wall time to other processes). The removals'
losses of the two engines are compared too. Prints one JSON document.

    python benchmarks/ablate_csp_cpu.py [--model cspresnet50] [--batch-size 32] [--size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from ablate_parts_cpu import cifar_batch

from resprobe.ablate_engine import AblationEngine, evaluate_pass, lesion_variant
from resprobe.models.blocks import discover_blocks
from resprobe.runtime import make_runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="cspresnet50")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import timm

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10).eval().requires_grad_(False)
    anatomy = discover_blocks(model, (3, args.size, args.size))
    images, labels = cifar_batch(args.batch_size)
    images = F.interpolate(images, size=(args.size, args.size), mode="bilinear", align_corners=False)
    runtime = make_runtime("cpu")
    variants = [lesion_variant(anatomy, [p]) for p, b in enumerate(anatomy.blocks) if b.is_identity]
    engines = {"prefix_cache": AblationEngine(model, anatomy, runtime, [(images, labels)]),
               "full_forward": AblationEngine(model, anatomy, runtime, [(images, labels)], fast=False)}
    assert engines["prefix_cache"].fast and not engines["full_forward"].fast
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    losses: dict[str, list[float]] = {}
    for repeat in range(args.repeats + 1):
        for name, engine in engines.items():
            start = time.process_time()
            result = evaluate_pass(engine, variants)
            if repeat:  # the first round warms up
                seconds[name].append(time.process_time() - start)
            losses[name] = [r.loss for r in result.variants]
    median = {name: statistics.median(times) for name, times in seconds.items()}
    print(json.dumps({
        "model": args.model, "input": [3, args.size, args.size], "batch_size": args.batch_size,
        "blocks": len(anatomy.blocks), "identity_removals": len(variants), "segments": len(anatomy.segments),
        "cpu_seconds": median, "all_cpu_seconds": seconds,
        "speedup_cpu": median["full_forward"] / median["prefix_cache"],
        "max_abs_loss_difference": max(abs(a - b) for a, b in zip(losses["prefix_cache"], losses["full_forward"])),
        "torch": torch.__version__, "timm": timm.__version__, "machine": platform.platform(),
        "threads": torch.get_num_threads(),
    }, indent=2))


if __name__ == "__main__":
    main()
