"""The data path at ImageNet sizes: end-to-end ``record`` and ``eval`` on a folder of JPEGs against the
model-only floor on synthetic tensors, all in one run (docs/gpu.md: ratios, not absolute times).

    python benchmarks/data_path.py --device cpu --model timm:resnet18 --n 64 --batch-size 16 --workers 1
    python benchmarks/data_path.py --device cuda --model timm:resnet50 --n 4096 --batch-size 256 --workers 14

The folder: ``--n`` JPEGs (quality 90) whose sides are drawn from 224–500 px, in 10 class folders:
CIFAR-10 test images upscaled when ../shared/cifar10 is present, smooth random images otherwise.
Measured, each after one warm-up batch:

- ``floor_record`` / ``floor_eval``: the model alone on tensors already on the device (forward +
  backward to the input, parameters frozen / forward only), the best any data path can do;
- ``record_synthetic``: ``resprobe record`` on ``synthetic:N`` at the input size (no decoding, no
  resizing): resprobe's own cost over the floor;
- ``record_images`` / ``eval_images``: the same on the JPEG folder, end to end (loader, decode,
  resize, transfer, hooks, statistics, HDF5 writes);
- ``loader_only``: the data path alone (batches produced, no model).

Wall and CPU seconds (this process and its reaped loader workers) are both reported: on a shared,
busy machine the CPU seconds are the steadier measure. ``--repeats R`` alternates R record passes of
each kind and keeps the fastest.

``data_path_share`` = (record_images − record_synthetic) / record_images: the part of record's time the
data path costs (target on the CPU: ≤ 5 %), in wall and in CPU seconds; ``loader_share_cpu`` = the
data path's own CPU seconds over record_images'; ``record_vs_floor`` = record_images images/s over the
floor's (target on one H100/H200 with 16 cores: ≥ 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CIFAR10_TEST = ROOT.parent / "shared" / "cifar10" / "test"


def make_jpeg_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEGs of 224–500 px sides in 10 class folders (CIFAR-10 upscaled, or smooth noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    cifar = sorted(p for c in sorted(CIFAR10_TEST.iterdir()) for p in sorted(c.iterdir()))[:n * 3] \
        if CIFAR10_TEST.is_dir() else []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(224, 501, 2))
        if cifar:
            image = Image.open(cifar[int(rng.integers(len(cifar)))]).convert("RGB").resize((w, h), Image.BICUBIC)
        else:
            y, x = np.mgrid[0:h, 0:w]
            pixels = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], -1) + rng.normal(0, 25, (h, w, 3))
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:06d}.jpg", quality=90)
    return root


def cpu_seconds() -> float:
    """User + system time of this process and its finished children (the loader's worker processes,
    reaped when each pass ends): far steadier than wall time on a shared machine."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Clock:
    """Wall and CPU seconds of one phase."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def floor(probe, n: int, batch_size: int, backward: bool) -> float:
    """Images/s of the model alone on random tensors already on the device."""
    model, runtime = probe.model, probe.runtime
    shape = probe.preprocessing.input_size
    batch = runtime.batch(torch.randn(batch_size, *shape))
    labels = torch.randint(0, probe.num_classes or 10, (batch_size,), device=runtime.device)

    def step() -> None:
        x = batch.detach().requires_grad_(backward)
        with runtime.compute(), torch.set_grad_enabled(backward):
            logits = model(x)
            if backward:
                loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
                torch.autograd.grad(loss, x)

    step()  # warm-up
    sync(runtime.device)
    steps = max(1, n // batch_size)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(runtime.device)
    return steps * batch_size / (time.perf_counter() - start)


def timed_record(args, data: str, out: Path, decode: str, workers: int | None) -> Clock:
    """The whole ``record`` call (the model is loaded again: a second or two of the CPU phase's total)."""
    from resprobe.record import RecordOptions, record

    options = RecordOptions(model=args.model, data=data, batch_size=args.batch_size, input_size=args.input_size,
                            pretrained=None, decode=decode)
    with Clock() as clock:
        record(options, out, overwrite=True, device=args.device, workers=workers)
    return clock


def best(clocks: list[Clock]) -> Clock:
    """The fastest of repeated runs: other processes only ever add time."""
    return min(clocks, key=lambda c: c.cpu if c.cpu > 0 else c.wall)


def timed_eval(probe, source, args) -> Clock:
    from resprobe.evaluate import evaluate

    loader = probe.loader(source, args.batch_size, args.workers)
    with Clock() as clock:
        evaluate(probe.model, loader, probe.runtime)
        sync(probe.runtime.device)
    return clock


def timed_loader(probe, source, args) -> Clock:
    loader = probe.loader(source, args.batch_size, args.workers)
    with Clock() as clock:
        for images, _labels, _index in loader:
            probe.runtime.batch(images)
        sync(probe.runtime.device)
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timm:resnet50")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--decode", default="auto", help="auto, cpu or device")
    parser.add_argument("--input-size", default=None)
    parser.add_argument("--folder", default=None, help="reuse this JPEG folder instead of generating one")
    parser.add_argument("--repeats", type=int, default=1, help="record passes of each kind; the best is kept")
    parser.add_argument("--out", default=None, help="also write the results here (JSON)")
    args = parser.parse_args()

    from resprobe.probe import open_probe

    work = Path(tempfile.mkdtemp(prefix="resprobe-data-path-"))
    start = time.perf_counter()
    folder = Path(args.folder) if args.folder else make_jpeg_folder(work / "jpegs", args.n)
    made = time.perf_counter() - start
    probe = open_probe(args.model, input_size=args.input_size, device=args.device)
    probe.decode = args.decode
    args.device = str(probe.runtime.device)
    source = probe.data(str(folder))
    results = {
        "model": args.model, "device": args.device, "decode": args.decode, "n": len(source),
        "batch_size": args.batch_size, "workers": args.workers, "input_size": list(probe.preprocessing.input_size),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if probe.runtime.device.type == "cuda" else None,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "folder_seconds": round(made, 1),
        "device_decoding": type(probe.loader(source, args.batch_size, 0)).__name__ == "DeviceDecodedLoader",
    }
    n = len(source)
    ips: dict[str, float] = {}
    ips["floor_record"] = floor(probe, n, args.batch_size, backward=True)
    ips["floor_eval"] = floor(probe, n, args.batch_size, backward=False)
    clocks = {"loader_only": timed_loader(probe, source, args), "eval_images": timed_eval(probe, source, args)}
    synthetic, images = [], []
    for _ in range(args.repeats):  # alternated, so that a change in the machine's load hits both alike
        # in-memory synthetic tensors need no workers (resprobe's default for them is 0)
        synthetic.append(timed_record(args, f"synthetic:{n}", work / "synthetic.h5", args.decode, None))
        images.append(timed_record(args, str(folder), work / "images.h5", args.decode, args.workers))
    clocks["record_synthetic"], clocks["record_images"] = best(synthetic), best(images)
    ips.update({k: n / c.wall for k, c in clocks.items()})
    results["images_per_second"] = {k: round(v, 2) for k, v in ips.items()}
    results["cpu_seconds"] = {k: round(c.cpu, 2) for k, c in clocks.items()}
    # (t_images - t_synthetic) / t_images: the part of record's time the data path costs
    results["data_path_share"] = round(1 - ips["record_images"] / ips["record_synthetic"], 4)
    results["data_path_share_cpu"] = round(1 - clocks["record_synthetic"].cpu / clocks["record_images"].cpu, 4)
    results["loader_share_cpu"] = round(clocks["loader_only"].cpu / clocks["record_images"].cpu, 4)
    results["record_vs_floor"] = round(ips["record_images"] / ips["floor_record"], 3)
    results["eval_vs_floor"] = round(ips["eval_images"] / ips["floor_eval"], 3)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
