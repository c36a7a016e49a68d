"""resprobe beside the libraries people would otherwise use: nnsight, TorchLens, Captum and a plain
PyTorch hook cache (TransformerLens-style ``run_with_cache``), on the same model and images, in one run.

Each tool computes, per sample and per identity block, the statistics ``align`` reports:
cos(U, g), ‖U‖/‖h‖ and cos(F, g), with h the block's input, U = out − h, F the residual branch's
output (read before the block's in-place ``+=`` and ReLU), g = ∂ℓ/∂h and ℓ the per-sample
cross-entropy against the label (model in eval mode, gradient of the summed loss). Every tool is
used the way its documentation teaches; the statistics are then computed from what it captured with
the same few lines of torch (float64), never with resprobe's code. resprobe runs as ``resprobe
record`` (the HDF5 file included).

Every tool gets the same model (a checkpoint written once: seeded random weights, BatchNorm
statistics from the data, randomized BatchNorm affine parameters so that F ≠ 0), the same images,
the same batches and thread count, and its own process, so that peak memory is its own (``ru_maxrss``
on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA). Parameters are frozen and the input
requires grad for everyone, so nobody pays for weight gradients. A tool that fails or runs past
``--time-limit`` is tried again on fewer samples, down to one batch, and reported at the largest
size it managed, beside resprobe at that size.

    pip install -e '.[peers]'
    python benchmarks/peers.py                      # CPU: ResNet-50, 1000 CIFAR-10 test images at 32×32, batch 100
    python benchmarks/peers.py --device cuda        # GPU: ResNet-50 at 224×224, synthetic, batch 128
    python benchmarks/peers.py --device cuda --model vit_b_16

Prints one JSON document (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from common import CIFAR_MEAN, CIFAR_STD, cifar_arrays, measure, python

HERE = Path(__file__).resolve().parent
TOOLS = ("resprobe", "hooks", "nnsight", "torchlens", "captum")
STATS = ("update_cos", "update_ratio", "cos")  # cos(U, g), ‖U‖/‖h‖, cos(F, g)
IMAGENET_MEAN = "0.485,0.456,0.406"
IMAGENET_STD = "0.229,0.224,0.225"


@dataclass(frozen=True)
class ModelSpec:
    """What the tools need to know of a model: its identity blocks, each block's branch end (the
    module whose output is F; None where F = U) and the module whose output is each block's input."""

    name: str
    blocks: tuple[str, ...]
    branch_ends: tuple[str | None, ...]
    previous: tuple[str, ...]  # for each block, the module whose output is its input (TorchLens reads h there)


def model_spec(name: str) -> ModelSpec:
    if name == "resnet50":
        chain = [f"layer{s + 1}.{i}" for s, n in enumerate((3, 4, 6, 3)) for i in range(n)]
        previous = ["maxpool", *chain[:-1]]
        pairs = [(b, p) for b, p in zip(chain, previous) if not b.endswith(".0")]  # transitions change shape
        return ModelSpec(name, tuple(b for b, _ in pairs), tuple(f"{b}.bn3" for b, _ in pairs),
                         tuple(p for _, p in pairs))
    if name == "vit_b_16":
        chain = [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
        return ModelSpec(name, tuple(chain), (None,) * 12, ("encoder.dropout", *chain[:-1]))
    raise SystemExit(f"unknown model {name}: resnet50 or vit_b_16")


# --------------------------------------------------------------------------------------------------
# Inside each tool's process


def load_model(spec: ModelSpec, checkpoint: Path, device: str):
    import torch
    import torchvision

    model = torchvision.models.get_model(spec.name, num_classes=10)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    # Frozen parameters and an input that requires grad, for every tool alike (resprobe freezes them
    # too): nobody computes weight gradients.
    return model.eval().requires_grad_(False).to(device)


def batches(data: Path, mean: str, std: str, batch_size: int, device: str) -> Iterator:
    import torch

    with np.load(data) as f:
        images, labels = f["images"], f["labels"]
    m = torch.tensor([float(v) for v in mean.split(",")]).view(1, 3, 1, 1)
    s = torch.tensor([float(v) for v in std.split(",")]).view(1, 3, 1, 1)
    for start in range(0, len(labels), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).float().div(255)
        x = ((x - m) / s).contiguous().to(device)
        yield x.requires_grad_(True), torch.from_numpy(labels[start : start + batch_size]).long().to(device)


def submodule(root, name: str):
    """``root.a.0.b`` for name ``a.0.b``; works on nnsight's envoys too (integers index)."""
    for part in name.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


@dataclass
class Captured:
    """What a tool captured for one block of one batch: h, out, g = ∂ℓ/∂h and F (None where not
    reached; equal to U in blocks without a branch end)."""

    h: object
    out: object
    g: object
    branch: object | None


def per_sample_stats(c: Captured, has_branch_end: bool) -> dict:
    """The three statistics, [B] each, float64, from one block's captured tensors."""
    h, out, g = (t.detach().flatten(1).double() for t in (c.h, c.out, c.g))
    u = out - h
    gn = g.norm(dim=1)
    stats = {"update_cos": (u * g).sum(1) / (u.norm(dim=1) * gn), "update_ratio": u.norm(dim=1) / h.norm(dim=1)}
    if not has_branch_end:
        stats["cos"] = stats["update_cos"]  # F = U
    elif c.branch is not None:
        f = c.branch.detach().flatten(1).double()
        stats["cos"] = (f * g).sum(1) / (f.norm(dim=1) * gn)
    return {k: v.cpu().numpy() for k, v in stats.items()}


def loss_of(logits, labels):
    import torch.nn.functional as F

    return F.cross_entropy(logits.float(), labels, reduction="none")


def capture_hooks(model, spec: ModelSpec, x, y) -> tuple[list[Captured], dict]:
    """A plain PyTorch hook cache, as TransformerLens's ``run_with_cache`` keeps one: forward hooks
    store each block's input and output detached and a clone of F (the block overwrites F in place),
    tensor hooks store the gradients.

    The detach matters for memory, not for values: a cache that keeps ``h`` itself holds ``h``'s
    autograd node, which holds the gradient hook, whose closure holds the cache. That cycle runs
    through C++ objects Python's garbage collector cannot see, so every batch's cache would stay
    alive to the end of the process (measured: +107 MB a batch here, a peak twice resprobe's).
    TransformerLens stores ``tensor.detach()`` for the same reason."""
    cache: dict[str, object] = {}
    handles = []
    for j, name in enumerate(spec.blocks):
        block = submodule(model, name)

        def pre(_m, args, j=j):
            cache[f"h{j}"] = args[0].detach()
            args[0].register_hook(lambda g, j=j: cache.__setitem__(f"g{j}", g))

        handles.append(block.register_forward_pre_hook(pre))
        handles.append(block.register_forward_hook(lambda _m, _a, out, j=j: cache.__setitem__(f"out{j}", out.detach())))
        if spec.branch_ends[j]:
            end = submodule(model, spec.branch_ends[j])
            handles.append(end.register_forward_hook(
                lambda _m, _a, out, j=j: cache.__setitem__(f"F{j}", out.detach().clone())))
    try:
        loss_of(model(x), y).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    return [Captured(cache[f"h{j}"], cache[f"out{j}"], cache[f"g{j}"], cache.get(f"F{j}"))
            for j in range(len(spec.blocks))], {}


def capture_nnsight(model, spec: ModelSpec, x, y) -> tuple[list[Captured], dict]:
    """nnsight 0.8: read ``.input``/``.output`` in execution order inside ``model.trace``, gradients
    with ``.grad`` inside ``with loss.backward():`` in reverse order, values kept through
    ``nnsight.save`` containers. F must be cloned: a saved ``bn3.output`` is the very tensor the
    block's ``+=`` and ReLU overwrite (measured here too: ``naive_branch``)."""
    import nnsight

    with model.trace(x):
        hs = []
        h_saved, outs, branches, naive = nnsight.save([]), nnsight.save([]), nnsight.save([]), nnsight.save([])
        grads = nnsight.save([])
        for j, name in enumerate(spec.blocks):
            block = submodule(model, name)
            h = block.input
            hs.append(h)
            h_saved.append(h)
            if spec.branch_ends[j]:
                f = submodule(model, spec.branch_ends[j]).output
                branches.append(f.clone())
                naive.append(f)
            outs.append(block.output)
        loss = loss_of(model.output, y).sum()
        with loss.backward():
            for h in reversed(hs):
                grads.append(h.grad)
    grads = list(reversed(grads))
    captured = [Captured(h_saved[j], outs[j], grads[j], branches[j] if branches else None)
                for j in range(len(spec.blocks))]
    extra = {}
    if naive:  # what a plain ``.save()`` of the branch end gives: the tensor after += and ReLU
        extra["naive_branch_cos"] = [per_sample_stats(Captured(c.h, c.out, c.g, f), True)["cos"]
                                     for c, f in zip(captured, naive)]
    return captured, extra


def capture_torchlens(model, spec: ModelSpec, x, y) -> tuple[list[Captured], dict]:
    """TorchLens 2.x: ``tl.trace`` with the modules' outputs saved and ``save_grads=True``, then
    ``trace.log_backward(loss)``. Gradients must be kept for every op: selecting them by module
    address or op label (``save_grads=[...]``) leaves out the blocks' outputs, which end in an
    in-place ReLU, and those are the next blocks' h."""
    import torchlens as tl

    names = sorted({*spec.blocks, *spec.previous, *(e for e in spec.branch_ends if e)})
    trace = tl.trace(model, x, capture=tl.options.CaptureOptions(layers_to_save=names, save_grads=True))
    trace.log_backward(loss_of(trace[trace.output_layers[0]].out, y).sum())
    captured = []
    for j, name in enumerate(spec.blocks):
        source = trace[spec.previous[j]]
        end = spec.branch_ends[j]
        captured.append(Captured(source.out, trace[name].out, source.grad, trace[end].out if end else None))
    return captured, {}


def capture_captum(model, spec: ModelSpec, x, y) -> tuple[list[Captured], dict]:
    """Captum 0.9's public layer API, one call per direction it reads: ``LayerGradientXActivation``
    with ``multiply_by_inputs=False`` (the layer gradient) at the blocks' inputs, ``LayerActivation``
    at their inputs, and ``LayerActivation`` at the blocks' and branch ends' outputs (Captum stores
    clones, so F survives the in-place ops). The forward function returns the per-sample loss, so
    the gradient is that of the summed loss."""
    from captum.attr import LayerActivation, LayerGradientXActivation

    def forward(images, labels):
        return loss_of(model(images), labels)

    blocks = [submodule(model, name) for name in spec.blocks]
    ends = [submodule(model, e) for e in spec.branch_ends if e]
    grads = LayerGradientXActivation(forward, blocks, multiply_by_inputs=False).attribute(
        x, additional_forward_args=(y,), attribute_to_layer_input=True)
    hs = LayerActivation(forward, blocks).attribute(x, additional_forward_args=(y,), attribute_to_layer_input=True)
    outputs = LayerActivation(forward, blocks + ends).attribute(x, additional_forward_args=(y,))
    outs, branches = outputs[: len(blocks)], outputs[len(blocks) :]
    return [Captured(hs[j], outs[j], grads[j], branches[j] if branches else None) for j in range(len(blocks))], {}


CAPTURE: dict[str, Callable] = {"hooks": capture_hooks, "nnsight": capture_nnsight,
                                "torchlens": capture_torchlens, "captum": capture_captum}


def run_peer(args: argparse.Namespace) -> None:
    """One tool, one process: the statistics of every sample into ``--result`` (.npz), and a JSON line
    on stdout (the loop's own time; CUDA peak memory)."""
    import torch

    torch.set_num_threads(args.threads)
    spec = model_spec(args.model)
    model = load_model(spec, Path(args.workdir) / "model.pt", args.device)
    if args.tool == "nnsight":
        from nnsight import NNsight

        model = NNsight(model)
    capture = CAPTURE[args.tool]
    has_end = [e is not None for e in spec.branch_ends]
    per_batch: dict[str, list] = {}
    start = time.perf_counter()
    for x, y in batches(Path(args.data), args.mean, args.std, args.batch_size, args.device):
        captured, extra = capture(model, spec, x, y)
        rows = [per_sample_stats(c, has_end[j]) for j, c in enumerate(captured)]
        for stat in STATS:
            per_batch.setdefault(stat, []).append(
                np.stack([r.get(stat, np.full(len(y), np.nan)) for r in rows], axis=1))
        for key, values in extra.items():
            per_batch.setdefault(key, []).append(np.stack(values, axis=1))
        del captured, extra
    seconds = time.perf_counter() - start
    np.savez(args.result, **{k: np.concatenate(v) for k, v in per_batch.items()})
    cuda = args.device.startswith("cuda")
    print(json.dumps({"loop_seconds": seconds,
                      "cuda_max_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}))


def run_resprobe(args: argparse.Namespace) -> None:
    """``resprobe record`` (the command itself, in this process so that CUDA memory can be read),
    then its statistics into ``--result`` in the peers' layout."""
    import torch

    from resprobe.cli import app
    from resprobe.recording.reader import open_recording

    torch.set_num_threads(args.threads)
    spec = model_spec(args.model)
    out = Path(args.result).with_suffix(".h5")
    start = time.perf_counter()
    app(["record", f"torchvision:{args.model}", "--checkpoint", str(Path(args.workdir) / "model.pt"),
         "--num-classes", "10", "--data", args.data,
         "--mean", args.mean, "--std", args.std, "--batch-size", str(args.batch_size), "--device", args.device,
         "--out", str(out), "--overwrite", "--quiet"], standalone_mode=False)
    seconds = time.perf_counter() - start
    rec = open_recording(out)
    order = np.argsort(rec.index)  # in the arrays file's order, as the peers see them
    columns = [rec.block_names.index(b) for b in spec.blocks]
    s = {k: v[order][:, columns] for k, v in rec.stats.items()}
    np.savez(args.result, update_cos=s["update_cos"], update_ratio=s["update_norm"] / s["input_norm"], cos=s["cos"],
             index=rec.index[order])
    cuda = args.device.startswith("cuda")
    print(json.dumps({"loop_seconds": seconds,
                      "cuda_max_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}))


def prepare(args: argparse.Namespace) -> None:
    """The shared checkpoint and images: seeded weights, BatchNorm running statistics from 200 of
    the images (train-mode passes with cumulative averages), then randomized BatchNorm affine
    parameters so that no branch is trivially the identity's."""
    import torch

    workdir = Path(args.workdir)
    torch.manual_seed(0)
    if args.device == "cpu" and args.model == "resnet50":
        cifar_arrays(workdir / "data.npz", args.n)
    else:  # synthetic 224×224 images (timings do not depend on pixel values)
        rng = np.random.default_rng(0)
        np.savez(workdir / "data.npz", images=rng.integers(0, 256, (args.n, 224, 224, 3), dtype=np.uint8),
                 labels=rng.integers(0, 10, args.n))
    import torchvision

    model = torchvision.models.get_model(args.model, num_classes=10)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration passes
    if norms:
        with torch.no_grad():
            for i, (x, _) in enumerate(batches(workdir / "data.npz", args.mean, args.std, 100, "cpu")):
                if i == 2:
                    break
                model.train()(x.detach())
        for m in norms:
            m.momentum = 0.1
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0.0, 0.1)
    torch.save(model.state_dict(), workdir / "model.pt")


# --------------------------------------------------------------------------------------------------
# The parent: no torch imported here, so that children's peak memory is their own.


@dataclass
class Attempt:
    tool: str
    n: int
    status: str  # ok | timeout | failed
    seconds: float = math.nan
    cpu_seconds: float = math.nan
    max_rss_mb: float = math.nan
    loop_seconds: float = math.nan
    cuda_max_memory_mb: float | None = None
    error: str = ""


def first_images(workdir: Path, n: int) -> Path:
    """The arrays file of the first n images (every tool reads the same file)."""
    path = workdir / f"data-{n}.npz"
    if not path.exists():
        with np.load(workdir / "data.npz") as f:
            np.savez(path, images=f["images"][:n], labels=f["labels"][:n])
    return path


def attempt(tool: str, n: int, args: argparse.Namespace, workdir: Path) -> Attempt:
    result = workdir / f"{tool}-{n}.npz"
    cmd = [python(), str(Path(__file__).resolve()), "_resprobe" if tool == "resprobe" else "_peer",
           "--tool", tool, "--workdir", str(workdir), "--result", str(result), "--data", str(first_images(workdir, n)),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--device", args.device,
           "--model", args.model, "--mean", args.mean, "--std", args.std]
    try:
        m = measure(cmd, timeout=args.time_limit)
    except SystemExit as exc:  # failed, killed or timed out: report it, never abort the others
        status = "timeout" if getattr(exc, "timed_out", False) else "failed"
        return Attempt(tool, n, status, error=str(exc)[-600:])
    report = json.loads(m.stdout.strip().splitlines()[-1])
    return Attempt(tool, n, "ok", m.seconds, m.cpu_seconds, m.max_rss_mb, report["loop_seconds"],
                   report["cuda_max_memory_mb"])


def sizes(n: int, batch_size: int) -> list[int]:
    """n, then smaller sizes (whole batches) for a tool that failed at n."""
    out = [n]
    for fraction in (2, 5, 10):
        k = max(batch_size, n // fraction // batch_size * batch_size)
        if k < out[-1]:
            out.append(k)
    return out


def agreement(tool_file: Path, ref_file: Path) -> dict:
    """Largest absolute difference of each statistic from resprobe's, over samples and identity blocks."""
    with np.load(tool_file) as a, np.load(ref_file) as r:
        out = {}
        for stat in (*STATS, "naive_branch_cos"):
            if stat not in a:
                continue
            ref = r["cos" if stat == "naive_branch_cos" else stat]
            got = a[stat]
            if np.isnan(got).all():
                out[stat] = None  # the tool could not compute it
                continue
            both = np.isfinite(got) & np.isfinite(ref)
            out[stat] = float(np.abs(got[both] - ref[both]).max())
            if (np.isfinite(got) != np.isfinite(ref)).any():
                out[f"{stat}_nan_mismatches"] = int((np.isfinite(got) != np.isfinite(ref)).sum())
        return out


LIMITS = {  # what each tool could not do here (F, per-sample values, files, resuming)
    "resprobe": [],
    "hooks": ["writes no files and cannot resume: everything lives in memory until the process ends",
              "F needs a clone in the hook (the block's += and in-place ReLU overwrite it)"],
    "nnsight": ["writes no files and cannot resume",
                "F only as bn3.output.clone(): the documented .save() keeps the tensor the block then overwrites "
                "(naive_branch_cos shows by how much)",
                "the gradients must be requested in reverse order of the forward pass"],
    "torchlens": ["cannot resume; its bundles on disk (tl.to_disk) were not used for the statistics",
                  "gradients had to be kept for every op (save_grads=True): selecting them by module or op label "
                  "drops the blocks' outputs, which end in an in-place ReLU"],
    "captum": ["writes no files and cannot resume",
               "one forward pass per direction read (layer inputs or outputs) plus the gradient's: three forwards "
               "and one backward per batch"],
}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_peer", "_resprobe", "_prepare"):
        mode = sys.argv.pop(1)
        parser = argparse.ArgumentParser()
        for flag in ("--tool", "--workdir", "--result", "--data", "--device", "--model", "--mean", "--std"):
            parser.add_argument(flag)
        for flag in ("--n", "--batch-size", "--threads"):
            parser.add_argument(flag, type=int)
        args = parser.parse_args()
        {"_peer": run_peer, "_resprobe": run_resprobe, "_prepare": prepare}[mode](args)
        return

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default="resnet50", help="resnet50 or vit_b_16 (torchvision, random weights)")
    parser.add_argument("--n", type=int, help="images (default 1000 on the CPU, 1280 on CUDA)")
    parser.add_argument("--batch-size", type=int, help="default 100 on the CPU, 128 on CUDA")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every process")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated, resprobe always included")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each tool, alternating")
    parser.add_argument("--time-limit", type=float, default=1800, help="seconds per process")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.n = args.n or (1280 if cuda else 1000)
    args.batch_size = args.batch_size or (128 if cuda else 100)
    cifar = args.model == "resnet50" and not cuda
    args.mean, args.std = (CIFAR_MEAN, CIFAR_STD) if cifar else (IMAGENET_MEAN, IMAGENET_STD)
    tools = ["resprobe", *(t for t in args.tools.split(",") if t and t != "resprobe")]
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        subprocess.run([python(), str(Path(__file__).resolve()), "_prepare", "--workdir", tmp, "--n", str(args.n),
                        "--device", args.device, "--model", args.model, "--mean", args.mean, "--std", args.std],
                       check=True)
        attempts: dict[str, list[Attempt]] = {t: [] for t in tools}
        managed: dict[str, int] = {}
        for _ in range(args.repeats):  # alternating, so that a change of load hits every tool alike
            for tool in tools:
                for n in sizes(managed.get(tool, args.n), args.batch_size):
                    a = attempt(tool, n, args, workdir)
                    attempts[tool].append(a)
                    print(f"{tool} n={n}: {a.status} {a.seconds:.1f} s {a.max_rss_mb:.0f} MB", file=sys.stderr)
                    if a.status == "ok":
                        managed[tool] = n
                        break
        # resprobe at every smaller size a peer fell back to, for the ratios
        for n in sorted({m for m in managed.values() if m != args.n}):
            attempts["resprobe"].append(attempt("resprobe", n, args, workdir))
        report = summarize(args, tools, attempts, managed, workdir)
    report["load_average_before_after"] = [round(v, 1) for v in (*load_before[:1], *os.getloadavg()[:1])]
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "nnsight", "torchlens", "captum", "resprobe"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def summarize(args, tools, attempts, managed, workdir: Path) -> dict:
    def ok(tool: str, n: int) -> list[Attempt]:
        return [a for a in attempts[tool] if a.status == "ok" and a.n == n]

    def median(values: list[float]) -> float:
        return statistics.median(values) if values else math.nan

    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
                   f"{args.threads} torch threads per process".strip(),
        "versions": versions(), "device": args.device, "model": f"torchvision {args.model}",
        "data": "CIFAR-10 test, 32x32 arrays" if args.model == "resnet50" and args.device == "cpu"
        else "synthetic 224x224", "n": args.n, "batch_size": args.batch_size, "repeats": args.repeats,
        "time_limit_s": args.time_limit,
        "notes": "seconds, cpu_seconds and max_rss_mb are whole processes (imports and model loading included); "
                 "loop_seconds is the peers' batches only, but resprobe's whole record command (model loading, block "
                 "discovery, the HDF5 file), so it is not a ratio",
        "tools": {},
    }
    for tool in tools:
        entry: dict = {"failures": [{"n": a.n, "status": a.status, "error": a.error}
                                    for a in attempts[tool] if a.status != "ok"]}
        n = managed.get(tool)
        if n is None:
            entry["status"] = "failed at every size"
            report["tools"][tool] = entry
            continue
        mine, ref = ok(tool, n), ok("resprobe", n)
        entry.update({
            "status": "ok" if n == args.n else f"only {n} samples", "n": n,
            "seconds": [round(a.seconds, 2) for a in mine], "cpu_seconds": [round(a.cpu_seconds, 2) for a in mine],
            "loop_seconds": [round(a.loop_seconds, 2) for a in mine],
            "max_rss_mb": [round(a.max_rss_mb, 1) for a in mine],
        })
        if args.device.startswith("cuda"):
            entry["cuda_max_memory_mb"] = [round(a.cuda_max_memory_mb, 1) for a in mine]
        if tool != "resprobe" and ref:
            entry["time_ratio"] = round(median([a.seconds for a in mine]) / median([a.seconds for a in ref]), 3)
            entry["cpu_time_ratio"] = round(median([a.cpu_seconds for a in mine]) / median([a.cpu_seconds for a in ref]), 3)
            entry["memory_ratio"] = round(max(a.max_rss_mb for a in mine) / max(a.max_rss_mb for a in ref), 3)
            if args.device.startswith("cuda"):
                entry["cuda_memory_ratio"] = round(max(a.cuda_max_memory_mb for a in mine)
                                                   / max(a.cuda_max_memory_mb for a in ref), 3)
            entry["max_abs_diff_vs_resprobe"] = agreement(workdir / f"{tool}-{n}.npz", workdir / f"resprobe-{n}.npz")
        entry["could_not"] = LIMITS[tool]
        report["tools"][tool] = entry
    report["resprobe_statistics"] = describe_statistics(workdir / f"resprobe-{args.n}.npz")
    return report


def describe_statistics(path: Path) -> dict:
    """What the compared numbers look like (so that agreement is not that of zeros): means, spreads,
    and how far cos(F, g) is from cos(U, g), i.e. that F ≠ U in these post-activation blocks."""
    if not path.exists():
        return {}
    with np.load(path) as r:
        out = {f"{stat}_mean": float(np.nanmean(r[stat])) for stat in STATS}
        out.update({f"{stat}_std": float(np.nanstd(r[stat])) for stat in STATS})
        out["max_abs_cos_minus_update_cos"] = float(np.nanmax(np.abs(r["cos"] - r["update_cos"])))
    return out


if __name__ == "__main__":
    main()
