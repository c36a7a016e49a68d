"""``record`` on a small causal LM against its floor (forward + backward to the input embeddings,
no weight gradients, nothing else), in the same process and run, alternating to share the machine's
noise. Time per batch; peak memory on CUDA (max_memory_allocated above the weights).

    python benchmarks/llm.py [--device cpu|cuda] [--seq-len 256] [--batch-size 4] [--reps 5] [--out FILE]

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
    args = parser.parse_args()
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
