"""Language models through the command line (DESIGN §8): eval's perplexity against a plain
transformers loop, record/align, text formats, --limit, and bad inputs as one line each."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from conftest import invoke  # noqa: E402
from test_bad_inputs import fails  # noqa: E402
from tinylms import TEXT, save_model, write_text  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("lm") / "tiny-llama", "llama")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "doc.txt", repeats=2)


def hf_loop(model_dir, text_path, seq_len: int, stride: int) -> tuple[float, int]:
    """Hugging Face's perplexity recipe (docs "Perplexity of fixed-length models"), full windows only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("\n\n".join([text_path.read_text()]), return_tensors="pt").input_ids
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = begin + seq_len
        if end > ids.size(1):
            break
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target).loss  # mean over the shifted, scored labels
        n = int((target[:, 1:] != -100).sum())
        nll_sum += float(loss) * n
        n_tokens += n
        prev_end = end
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize("stride", [None, 8])
def test_eval_perplexity_equals_a_plain_transformers_loop(lm_dir, text, stride):
    args = ["eval", lm_dir, "--data", f"text:{text}", "--seq-len", 24, "--device", "cpu", "-f", "json", "-q", "-b", 5]
    if stride:
        args += ["--stride", stride]
    report = json.loads(invoke(*args).stdout)
    loss, n = hf_loop(lm_dir, text, 24, stride or 24)
    assert report["n_tokens"] == n
    assert report["loss"] == pytest.approx(loss, rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    protocol = report["protocol"]
    assert {k: protocol[k] for k in ("seq_len", "stride", "join", "add_bos", "skip_tokens")} == \
        {"seq_len": 24, "stride": stride or 24, "join": "\n\n", "add_bos": True, "skip_tokens": 0}
    assert protocol["n_windows"] == report["n"]


def test_record_then_align_of_the_recording_equals_align_in_memory(lm_dir, text, tmp_path):
    common = ["--data", f"text:{text}", "--seq-len", 16, "--limit", 7, "--device", "cpu", "-q", "-b", 3,
              "--skip-tokens", 1, "--granularity", "sublayer"]
    out = tmp_path / "run.h5"
    invoke("record", f"transformers:{lm_dir}", *common, "--out", out, "-f", "json")
    from_file = json.loads(invoke("align", out, "-f", "json").stdout)
    in_memory = json.loads(invoke("align", f"transformers:{lm_dir}", *common, "-f", "json").stdout)
    assert [b["name"] for b in from_file["blocks"]] == [f"model.layers.{i}:{p}" for i in range(3) for p in ("attn", "mlp")]
    for a, b in zip(from_file["blocks"], in_memory["blocks"]):
        for key in ("cos_mean", "token_cos_mean", "token_update_cos_mean", "removal_estimate_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
    assert from_file["protocol"] == in_memory["protocol"]
    assert from_file["protocol"]["n_windows"] == 7 and from_file["protocol"]["skip_tokens"] == 1
    assert from_file["n_tokens"] == 7 * 15
    # --limit: the seeded rule of §2 on the window list
    from resprobe.recording.reader import open_recording

    rec = open_recording(out)
    n_total = from_file["protocol"]["n_windows_total"]
    expected = sorted(int(i) for i in torch.randperm(n_total, generator=torch.Generator().manual_seed(0))[:7])
    assert list(rec.index) == expected
    assert "token_cos" in rec.stats and rec.stats["token_cos"].shape == (7, 6)
    assert from_file["loss"] == pytest.approx(float(rec.loss.sum() / rec.label.sum()))


def test_jsonl_parquet_and_folder_give_the_same_tokens_as_the_joined_text(lm_dir, tmp_path):
    docs = [TEXT[:300], TEXT[300:700], TEXT[700:]]
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs[:2]) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs[2:]}), folder / "b.parquet")
    joined = tmp_path / "joined.txt"
    joined.write_text("\n\n".join(docs))
    args = ["--seq-len", 16, "--device", "cpu", "-f", "json", "-q"]
    a = json.loads(invoke("eval", lm_dir, "--data", f"text:{folder}", "--text-column", "body", *args).stdout)
    b = json.loads(invoke("eval", lm_dir, "--data", f"text:{joined}", *args).stdout)
    assert a["loss"] == b["loss"] and a["n_tokens"] == b["n_tokens"]
    assert a["protocol"]["n_documents"] == 3


def test_blocks_of_a_language_model(lm_dir):
    report = json.loads(invoke("blocks", lm_dir, "-f", "json").stdout)
    assert [b["name"] for b in report["blocks"]] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert report["blocks"][0]["in_shape"] == [128, 32] and report["layers"] == "model.layers"


def test_bad_inputs_are_one_line(lm_dir, text, tmp_path):
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    fails("eval", f"transformers:{empty_dir}", "--data", f"text:{text}", expect="config.json")
    remote = tmp_path / "remote"
    remote.mkdir()
    config = json.loads((lm_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (remote / "config.json").write_text(json.dumps(config))
    fails("eval", f"transformers:{remote}", "--data", f"text:{text}", expect="--trust-remote-code")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    fails("eval", lm_dir, "--data", f"text:{empty}", "--device", "cpu", expect="no text")
    fails("eval", lm_dir, "--data", f"text:{text}", "--seq-len", 129, "--device", "cpu", expect="maximum of 128")
    fails("eval", lm_dir, "--data", f"text:{tmp_path / 'missing.txt'}", "--device", "cpu", expect="does not exist")
    fails("align", lm_dir, "--data", f"text:{text}", "--granularity", "head", "--device", "cpu", expect="granularity")
    fails("record", lm_dir, "--data", f"text:{text}", "--out", tmp_path / "r.h5", "--save-tensors", 2,
          "--seq-len", 16, "--device", "cpu", expect="save-tensors")
    short = tmp_path / "short.txt"
    short.write_text("the fox")
    fails("eval", lm_dir, "--data", f"text:{short}", "--seq-len", 64, "--device", "cpu", expect="fewer than one window")
