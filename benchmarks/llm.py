"""``record`` on a small causal LM against its floor (forward + backward to the input embeddings,
no weight gradients, nothing else), in the same process and run, alternating to share the machine's
noise. Time per batch; peak memory on CUDA (max_memory_allocated above the weights).

    python benchmarks/llm.py [--device cpu|cuda] [--seq-len 256] [--batch-size 4] [--reps 5] [--out FILE]

``--mode ablate``: every single-layer removal's exact loss, resprobe's prefix cache (ablate_lm) against
a naive re-evaluation per layer (SLEB's way: the model run whole without that layer), and Block
Influence the way ShortGPT's code computes it (``output_hidden_states=True``, then per layer a
tokens×tokens cosine matrix read on its diagonal) against resprobe's ``--proxies`` observer (per-token
cosines reduced on the fly). Each method runs in its own process (peak memory: ru_maxrss above the
built model on the CPU, max_memory_allocated on CUDA); values compared.

    python benchmarks/llm.py --mode ablate [--layers 16] [--vocab 8192] [--seq-len 128] [--batch-size 2]

The model is a Llama-shaped decoder built offline (hidden 512, 8 layers, vocab 32000: ~58M parameters),
random weights: the ratio depends on shapes, not on what the weights learned.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.nn import functional as F


def build(device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
    model = AutoModelForCausalLM.from_config(config).to(device).eval().requires_grad_(False)
    return model


def floor(model, ids: torch.Tensor) -> None:
    captured = {}

    def hook(_m, _a, out):
        out = out.detach().requires_grad_(True)
        captured["e"] = out
        return out

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        logits = model(input_ids=ids, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                              reduction="sum")
        torch.autograd.grad(nll, captured["e"])
    finally:
        handle.remove()


def timed(fn, device: str) -> tuple[float, int]:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    return time.perf_counter() - start, peak


def build_ablate(device: str, layers: int, vocab: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1376, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
    return AutoModelForCausalLM.from_config(config).to(device).eval().requires_grad_(False)


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                          reduction="sum")
    return float(nll), ids[:, 1:].numel()


@torch.no_grad()
def naive_removals(model, batches) -> list[float]:
    """SLEB's way: for each layer, the whole model without it (a shorter layer list), every window."""
    layers = model.model.layers
    out = []
    for j in range(len(layers)):
        model.model.layers = torch.nn.ModuleList([m for i, m in enumerate(layers) if i != j])
        try:
            total = count = 0
            for ids in batches:
                t, c = window_nll(model(input_ids=ids, use_cache=False).logits, ids)
                total, count = total + t, count + c
        finally:
            model.model.layers = layers
        out.append(total / count)
    return out


def resprobe_removals(model, batches) -> list[float]:
    from resprobe.ablate_lm import LMAblationEngine, evaluate_removals, unit_removal
    from resprobe.models.causal_lm import lm_anatomy

    anatomy = lm_anatomy(model, batches[0].shape[1])
    windows = [(ids, torch.zeros(len(ids), dtype=torch.long, device=ids.device), None, {}) for ids in batches]
    _, tallies = evaluate_removals(LMAblationEngine(anatomy), windows, [unit_removal([u]) for u in anatomy.blocks])
    return [t.loss for t in tallies]


def shortgpt_style_bi(h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Block influence per token computed as the public ShortGPT implementations do: every token of the
    batch flattened, the full tokens×tokens matrix of cosines built, its diagonal read (NaN read as
    0.5), 1 − that. Written here for the benchmark; the arithmetic and the memory are theirs."""
    a, b = h.reshape(-1, h.shape[-1]), out.reshape(-1, out.shape[-1])
    matrix = (a @ b.T) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True))
    return 1 - matrix.diagonal().nan_to_num(nan=0.5)


@torch.no_grad()
def shortgpt_bi(model, batches) -> list[float]:
    """Mean over tokens of ShortGPT's BI per layer (their code sums; the mean ranks the same), read from
    ``output_hidden_states``."""
    n = model.config.num_hidden_layers
    sums, count = [0.0] * n, 0
    for ids in batches:
        hiddens = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        for i in range(n):
            sums[i] += float(shortgpt_style_bi(hiddens[i], hiddens[i + 1]).sum())
        count += ids.numel()
    return [s / count for s in sums]


def resprobe_bi(model, batches) -> list[float]:
    from resprobe.ablate_lm import AngleProxies, LMAblationEngine, evaluate_removals
    from resprobe.models.causal_lm import lm_anatomy

    anatomy = lm_anatomy(model, batches[0].shape[1])
    windows = [(ids, torch.zeros(len(ids), dtype=torch.long, device=ids.device), None, {}) for ids in batches]
    angles = AngleProxies(anatomy, 0)
    evaluate_removals(LMAblationEngine(anatomy), windows, [], observer=angles)
    return [m[0] for m in angles.means()]


METHODS = {"naive": naive_removals, "resprobe": resprobe_removals, "shortgpt_bi": shortgpt_bi,
           "resprobe_bi": resprobe_bi}


def ablate_worker(args) -> None:
    """One method in this process: its values, its time per rep, its peak memory above the model."""
    import resource

    model = build_ablate(args.device, args.layers, args.vocab)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g).to(args.device)
               for _ in range(args.batches)]
    fn = METHODS[args.worker]
    if args.device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, values = [], []
    fn(model, batches)  # warm-up (counted in the peak, not in the times)
    for _ in range(args.reps):
        seconds, _ = timed(lambda: values.append(fn(model, batches)), args.device)
        times.append(seconds)
    peak = (torch.cuda.max_memory_allocated() - base if args.device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_base)
    print(json.dumps({"values": values[-1], "seconds_all": times, "peak_bytes_above_model": peak}))


def ablate_main(args) -> None:
    import subprocess
    import sys

    runs = {}
    for name in METHODS:  # each in its own process: peak memory is its own
        cmd = [sys.executable, __file__, "--mode", "ablate", "--worker", name, "--device", args.device,
               "--layers", str(args.layers), "--vocab", str(args.vocab), "--seq-len", str(args.seq_len),
               "--batch-size", str(args.batch_size), "--batches", str(args.batches), "--reps", str(args.reps)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
    median = {k: statistics.median(v["seconds_all"]) for k, v in runs.items()}
    n = args.layers
    bi_same = max(abs(a - b) for a, b in zip(runs["shortgpt_bi"]["values"], runs["resprobe_bi"]["values"]))
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "layers": n, "vocab": args.vocab, "hidden": 512,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "batches": args.batches, "reps": args.reps,
        "note": "machine shared with other sessions; each method in its own process, run one after another",
        "seconds_median": median, "seconds_all": {k: v["seconds_all"] for k, v in runs.items()},
        "peak_bytes_above_model": {k: v["peak_bytes_above_model"] for k, v in runs.items()},
        "ablate_time_ratio": median["resprobe"] / median["naive"],
        "ablate_max_abs_loss_difference": max(abs(a - b) for a, b in zip(runs["naive"]["values"],
                                                                         runs["resprobe"]["values"])),
        "bi_time_ratio": median["resprobe_bi"] / median["shortgpt_bi"],
        "bi_max_abs_difference": bi_same,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


def main() -> None:
    from resprobe.models.causal_lm import lm_anatomy
    from resprobe.recording.lm_recorder import LMRecorder
    from resprobe.runtime import make_runtime

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out")
    parser.add_argument("--mode", default="record", choices=("record", "ablate"))
    parser.add_argument("--worker", choices=tuple(METHODS))
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batches", type=int, default=2)
    args = parser.parse_args()
    if args.mode == "ablate":
        return ablate_worker(args) if args.worker else ablate_main(args)
    model = build(args.device)
    ids = torch.randint(0, 32000, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    first = torch.zeros(args.batch_size, dtype=torch.long)
    recorder = LMRecorder(lm_anatomy(model, args.seq_len), make_runtime(args.device))
    base = torch.cuda.memory_allocated() if args.device == "cuda" else 0
    floor(model, ids), recorder.run_batch(ids, first, torch.arange(args.batch_size))  # warm-up
    times: dict[str, list[float]] = {"floor": [], "record": []}
    peaks: dict[str, int] = {"floor": 0, "record": 0}
    for _ in range(args.reps):  # alternating: both see the same machine load
        for name, fn in (("floor", lambda: floor(model, ids)),
                         ("record", lambda: recorder.run_batch(ids, first, torch.arange(args.batch_size)))):
            seconds, peak = timed(fn, args.device)
            times[name].append(seconds)
            peaks[name] = max(peaks[name], peak - base)
    recorder.close()
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "params": sum(p.numel() for p in model.parameters()),
        "seq_len": args.seq_len, "batch_size": args.batch_size, "reps": args.reps,
        "seconds_median": median, "seconds_all": times,
        "time_ratio": median["record"] / median["floor"],
        "peak_bytes_above_weights": peaks if args.device == "cuda" else None,
        "memory_ratio": peaks["record"] / peaks["floor"] if args.device == "cuda" and peaks["floor"] else None,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
