"""resprobe beside what people would otherwise run on a language model, on the shipped trained model
(fixtures/lm/kjv-llama-7m) and its held-out text (fixtures/lm/kjv_val.txt):

1. ShortGPT's Block Influence as its repository computes it (``output_hidden_states=True``; per layer
   the tokens×tokens cosine matrix between a layer's input and output, read on its diagonal) against
   ``resprobe ablate --proxies`` (its ``bi`` field). transformers' last ``hidden_states`` entry is
   the final norm's output, so ShortGPT's BI of the last layer measures layer + final norm; it is
   reported apart, and the 1e-4 check uses the last layer's own output (a forward hook).
2. A naive SLEB-style greedy removal (each step: the whole model re-run without each remaining layer,
   the least harmful removed) for 2 steps against ``resprobe ablate --cumulative 2``.
3. nnsight caching every decoder layer's input and output, and from that cache the per-window ℓ2 ratio
   ‖out − h‖/‖h‖ (``align``'s ``l2_ratio_mean``) and BI (``ablate --proxies``' ``bi``).

Every method runs in its own process (wall time, CPU time and peak RSS of the whole process, from
benchmarks/common.py's ``measure``) with ``OMP_NUM_THREADS=1``: the machine is shared by several
sessions on 2 cores. Every peer is fed the very windows resprobe cuts (resprobe.data.text.open_windows,
the same ``--limit``/``--seed`` rule), and the script asserts that the numbers agree to 1e-4.

    python benchmarks/llm_peers.py [--limit 32] [--seq-len 128] [--batch-size 8] [--out FILE]

The processes do different amounts of work, said beside each time: ``resprobe ablate`` always
measures every single-layer removal too, and ``resprobe align`` runs a backward pass (it measures
cos(F, g), which a forward cache cannot give).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, measure  # noqa: E402

MODEL = ROOT / "fixtures" / "lm" / "kjv-llama-7m"
TEXT = ROOT / "fixtures" / "lm" / "kjv_val.txt"
TOLERANCE = 1e-4
ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# --------------------------------------------------------------------------------------------------
# In a worker process: the model, the windows resprobe cuts, one method


def load(args: argparse.Namespace):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from resprobe.data.text import open_windows

    model = AutoModelForCausalLM.from_pretrained(MODEL, local_files_only=True).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(MODEL, local_files_only=True)
    source = open_windows(f"text:{TEXT}", tokenizer, str(MODEL), args.seq_len, None, limit=args.limit, seed=0)
    ids = torch.stack([source.dataset[i][0] for i in range(len(source.dataset))])
    return model, list(ids.split(args.batch_size))


def block_influence(input_hidden_state: torch.Tensor, output_hidden_state: torch.Tensor) -> torch.Tensor:
    """ShortGPT's BI per token, the arithmetic of sramshetty/ShortGPT short_gpt/metrics.py
    ``block_influence``: every token of the batch flattened, the full tokens×tokens matrix of cosines
    built, its diagonal read (NaN read as 0.5), 1 − that. Their memory cost (B·T)² is kept on purpose."""
    _, _, d = input_hidden_state.shape
    input_hidden_state = input_hidden_state.reshape(-1, d)
    output_hidden_state = output_hidden_state.reshape(-1, d)
    norm_input = input_hidden_state.norm(dim=-1, keepdim=True)
    norm_output = output_hidden_state.norm(dim=-1, keepdim=True)
    sim = (input_hidden_state @ output_hidden_state.T) / (norm_input * norm_output)
    return 1 - sim.diagonal().nan_to_num(nan=0.5)


@torch.no_grad()
def shortgpt(model, batches) -> dict:
    """Their ``compute_bi`` loop: hidden_states[i] → hidden_states[i + 1], BI summed over tokens (they
    keep the sum; divided here by the token count to compare with resprobe's mean)."""
    n = model.config.num_hidden_layers
    sums, count, last_raw = [0.0] * n, 0, 0.0
    seen: list[torch.Tensor] = []
    # transformers' hidden_states[-1] is the final norm's output, not the last layer's: ShortGPT's last
    # BI is read against it (theirs, kept); the last layer's own output, from a hook, gives the BI of
    # the layer itself, which is what resprobe reports.
    hook = model.model.layers[n - 1].register_forward_hook(
        lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        for ids in batches:
            seen.clear()
            hiddens = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
            for i in range(n):
                sums[i] += block_influence(hiddens[i], hiddens[i + 1]).sum().item()
            last_raw += block_influence(hiddens[n - 1], seen[0]).sum().item()
            count += ids.numel()
    finally:
        hook.remove()
    return {"bi": [s / count for s in sums], "bi_last_layer_own_output": last_raw / count}


def mean_nll(model, batches) -> float:
    total = count = 0.0
    for ids in batches:
        logits = model(input_ids=ids, use_cache=False).logits
        total += float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        count += ids[:, 1:].numel()
    return total / count


@torch.no_grad()
def sleb_greedy(model, batches, steps: int = 2) -> dict:
    """Naive greedy removal: at each step, the whole model re-run without each remaining layer (a
    shorter ModuleList; each kept layer's ``layer_idx`` renumbered so nothing indexes a missing
    layer), the removal with the lowest loss kept."""
    layers = list(model.model.layers)
    removed: list[int] = []
    curve = [{"k": 0, "removed": [], "loss": mean_nll(model, batches)}]
    try:
        for k in range(1, steps + 1):
            trials = {}
            for j in (j for j in range(len(layers)) if j not in removed):
                set_layers(model, [m for i, m in enumerate(layers) if i not in removed and i != j])
                trials[j] = mean_nll(model, batches)
            best = min(trials, key=trials.get)
            removed.append(best)
            curve.append({"k": k, "removed": list(removed), "loss": trials[best], "trials": trials})
    finally:
        set_layers(model, layers)
    return {"cumulative": curve}


def set_layers(model, kept: list) -> None:
    model.model.layers = torch.nn.ModuleList(kept)
    for new, layer in enumerate(kept):
        layer.self_attn.layer_idx = new


@torch.no_grad()
def nnsight_cache(model, batches) -> dict:
    """nnsight traces the model and saves each decoder layer's input and output; the statistics are
    computed from that cache afterwards (per window ‖out − h‖/‖h‖ over the window; BI per token)."""
    from nnsight import NNsight

    traced = NNsight(model)
    n = model.config.num_hidden_layers
    ratios: list[list[float]] = [[] for _ in range(n)]
    bi_sums, count = [0.0] * n, 0
    for ids in batches:
        cache = []  # filled inside the trace: nnsight 0.8 runs its body itself, a comprehension there is not seen
        with traced.trace(input_ids=ids, use_cache=False):
            for i in range(n):
                cache.append((traced.model.layers[i].input.save(), traced.model.layers[i].output.save()))
        for i, (h, out) in enumerate(cache):
            out = out[0] if isinstance(out, (tuple, list)) else out
            update = (out - h).double()
            ratios[i] += (update.flatten(1).norm(dim=1) / h.double().flatten(1).norm(dim=1)).tolist()
            bi_sums[i] += float((1 - F.cosine_similarity(h.double(), out.double(), dim=-1)).sum())
        count += ids.numel()
    return {"l2_ratio": [sum(r) / len(r) for r in ratios], "bi": [s / count for s in bi_sums]}


WORKERS = {"shortgpt": shortgpt, "sleb_greedy": sleb_greedy, "nnsight": nnsight_cache}


def worker(args: argparse.Namespace) -> None:
    model, batches = load(args)
    print(json.dumps(WORKERS[args.worker](model, batches)))


# --------------------------------------------------------------------------------------------------
# The driver: every method in its own process, then the comparisons


def resprobe_cmd(command: str, args: argparse.Namespace, *extra: str) -> list[str]:
    return [sys.executable, "-m", "resprobe", command, str(MODEL), "--data", f"text:{TEXT}", "--seq-len",
            str(args.seq_len), "--limit", str(args.limit), "-b", str(args.batch_size), "--device", "cpu", "-q",
            "-f", "json", *extra]


def run_all(args: argparse.Namespace) -> dict:
    own = [sys.executable, __file__, "--limit", str(args.limit), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size), "--worker"]
    commands = {
        "shortgpt_bi": own + ["shortgpt"],
        "resprobe_ablate_proxies": resprobe_cmd("ablate", args, "--proxies"),
        "sleb_greedy_2": own + ["sleb_greedy"],
        "resprobe_ablate_cumulative_2": resprobe_cmd("ablate", args, "--cumulative", "2"),
        "nnsight_cache": own + ["nnsight"],
        "resprobe_align": resprobe_cmd("align", args),
    }
    runs = {}
    for name, cmd in commands.items():
        m = measure(cmd, env=ENV, timeout=args.timeout)
        runs[name] = {"wall_s": m.seconds, "cpu_s": m.cpu_seconds, "peak_rss_mb": m.max_rss_mb,
                      "output": json.loads(m.stdout)}
        print(f"{name}: {m.seconds:.1f} s wall, {m.cpu_seconds:.1f} s CPU, {m.max_rss_mb:.0f} MB", file=sys.stderr)
    return runs


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (a, b)
    return max(abs(x - y) for x, y in zip(a, b))


def compare(runs: dict) -> dict:
    proxies = runs["resprobe_ablate_proxies"]["output"]
    names = [b["name"] for b in proxies["proxies"]["blocks"]]
    resprobe_bi = [b["bi"] for b in proxies["proxies"]["blocks"]]
    shortgpt_bi = runs["shortgpt_bi"]["output"]["bi"]
    # The last entry differs by design (ShortGPT reads the final norm's output): compared apart, and
    # the layer's own output in its place for the 1e-4 check.
    shortgpt_own = shortgpt_bi[:-1] + [runs["shortgpt_bi"]["output"]["bi_last_layer_own_output"]]

    greedy = runs["sleb_greedy_2"]["output"]["cumulative"]
    cumulative = runs["resprobe_ablate_cumulative_2"]["output"]["cumulative"]
    greedy_same_layers = all([names[i] for i in g["removed"]] == c["removed"] for g, c in zip(greedy, cumulative))
    greedy_loss_diff = max_diff([g["loss"] for g in greedy], [c["loss"] for c in cumulative])

    align = runs["resprobe_align"]["output"]["blocks"]
    cached = runs["nnsight_cache"]["output"]
    comparisons = {
        "bi_shortgpt_vs_resprobe": max_diff(shortgpt_own, resprobe_bi),
        "greedy_loss_sleb_vs_resprobe": greedy_loss_diff,
        "l2_ratio_nnsight_vs_resprobe_align": max_diff(cached["l2_ratio"], [b["l2_ratio_mean"] for b in align]),
        "bi_nnsight_vs_resprobe": max_diff(cached["bi"], resprobe_bi),
    }
    for what, diff in comparisons.items():
        assert math.isfinite(diff) and diff <= TOLERANCE, f"{what}: max abs difference {diff:.3g} > {TOLERANCE}"
    assert greedy_same_layers, (greedy, cumulative)
    return {"max_abs_difference": comparisons, "greedy_same_layers": greedy_same_layers,
            "shortgpt_last_layer_after_final_norm": {"shortgpt": shortgpt_bi[-1], "resprobe": resprobe_bi[-1]},
            "layers": names, "bi": {"resprobe": resprobe_bi, "shortgpt": shortgpt_bi, "nnsight": cached["bi"]},
            "l2_ratio": {"resprobe_align": [b["l2_ratio_mean"] for b in align], "nnsight": cached["l2_ratio"]},
            "greedy": {"sleb": [{"removed": [names[i] for i in g["removed"]], "loss": g["loss"]} for g in greedy],
                       "resprobe": [{"removed": c["removed"], "loss": c["loss"]} for c in cumulative]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=32, help="held-out windows (resprobe's --limit, seed 0)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per process")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu-llm-peers.json")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    runs = run_all(args)
    result = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} CPU, 2 cores shared with "
        "other sessions", "threads": "OMP_NUM_THREADS=1 in every process", "torch": torch.__version__,
        "model": str(MODEL.relative_to(ROOT)), "data": str(TEXT.relative_to(ROOT)), "limit": args.limit,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "tolerance": TOLERANCE,
        "processes": {k: {m: v[m] for m in ("wall_s", "cpu_s", "peak_rss_mb")} for k, v in runs.items()},
        **compare(runs),
    }
    text = json.dumps(result, indent=2)
    print(text)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
