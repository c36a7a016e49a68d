"""The shipped language model (fixtures/lm/kjv-llama-7m, trained by fixtures/lm/train.sh): plain
transformers loads it, and resprobe's eval perplexity on the committed held-out text equals a plain
transformers loop on the same windows (a few windows: fast)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from conftest import invoke  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LM = Path(__file__).resolve().parents[1] / "fixtures" / "lm"
MODEL, HELD_OUT = LM / "kjv-llama-7m", LM / "kjv_val.txt"
SEQ_LEN, LIMIT = 128, 6

# Runs in a separate interpreter that never imports resprobe: the folder is plain transformers.
PLAIN = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
assert "resprobe" not in sys.modules
folder, text, seq_len, starts = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
torch.manual_seed(0)
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
tok = AutoTokenizer.from_pretrained(folder)
ids = torch.tensor(tok(open(text, encoding="utf-8").read())["input_ids"])
with torch.no_grad():
    losses = [float(model(ids[s:s + seq_len][None], labels=ids[s:s + seq_len][None]).loss) for s in starts]
    prompt = tok("And God said", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
print(json.dumps({"losses": losses, "n_params": sum(p.numel() for p in model.parameters()),
                  "layers": model.config.num_hidden_layers, "generated": tok.decode(out[0])}))
assert "resprobe" not in sys.modules
"""


def test_the_shipped_model_loads_in_plain_transformers_and_eval_equals_its_loop():
    import torch

    assert (MODEL / "model.safetensors").stat().st_size <= 25 * 2**20
    assert HELD_OUT.stat().st_size <= 2**20
    report = json.loads(invoke("eval", MODEL, "--data", f"text:{HELD_OUT}", "--seq-len", SEQ_LEN, "--limit", LIMIT,
                               "--device", "cpu", "-q", "-f", "json").stdout)
    n_windows = report["protocol"]["n_windows_total"]
    chosen = sorted(torch.randperm(n_windows, generator=torch.Generator().manual_seed(0))[:LIMIT].tolist())
    starts = [i * SEQ_LEN for i in chosen]  # --limit's windows (DESIGN §2's rule, seed 0)
    done = subprocess.run([sys.executable, "-c", PLAIN, str(MODEL), str(HELD_OUT), str(SEQ_LEN), json.dumps(starts)],
                          capture_output=True, text=True, check=True)
    plain = json.loads(done.stdout.strip().splitlines()[-1])
    # Every window scores seq_len − 1 tokens, so the mean of the windows' means is the token mean.
    loss = sum(plain["losses"]) / len(plain["losses"])
    assert report["loss"] == pytest.approx(loss, rel=1e-5)
    assert report["n_tokens"] == LIMIT * (SEQ_LEN - 1)
    assert report["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert 5e6 <= plain["n_params"] <= 15e6 and plain["layers"] == 8
    assert plain["generated"].startswith("<s>And God said") and len(plain["generated"]) > 20
    assert report["perplexity"] < 60  # far below the unigram model's 411.6 (fixtures/lm/unigram.py)
