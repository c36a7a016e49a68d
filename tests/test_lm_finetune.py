"""``finetune`` on language models (DESIGN §8): the loss goes down, resume equals an uninterrupted run,
the validation perplexity equals ``resprobe eval`` of the saved folder (and a plain transformers loop),
a config folder without weights trains from a seeded initialization, the folder loads with plain
transformers, and two torchrun processes equal one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from conftest import invoke  # noqa: E402
from test_bad_inputs import fails  # noqa: E402
from test_lm_cli import lm_dir, text  # noqa: E402,F401 - the tiny Llama folder and its text (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = ["--seq-len", 16, "-b", 4, "--device", "cpu", "--lr", 3e-3, "--warmup-steps", 2, "-q", "-f", "json"]


def finetune(model, text, out, *more) -> dict:
    return json.loads(invoke("finetune", model, "--data", f"text:{text}", "--out", out, *TRAIN, *more).stdout)


def weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def plain_nll(folder, text, seq_len: int) -> float:
    """Mean next-token NLL over non-overlapping full windows, by transformers' own loss (labels = inputs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = AutoTokenizer.from_pretrained(folder)(text.read_text())["input_ids"]
    windows = torch.tensor(ids[:len(ids) // seq_len * seq_len]).view(-1, seq_len)
    with torch.no_grad():  # every window scores seq_len − 1 tokens: the mean of the means is the token mean
        return float(torch.stack([model(w[None], labels=w[None]).loss for w in windows]).mean())


def test_finetune_lowers_the_loss_and_val_equals_eval_and_plain_transformers(lm_dir, text, tmp_path):
    out = tmp_path / "ft"
    result = finetune(lm_dir, text, out, "--val-data", f"text:{text}", "--epochs", 3, "--limit", 24)
    history = result["history"]
    assert [h["step"] for h in history] == [0, 6, 12, 18]  # --limit 24 windows, batches of 4: 6 steps an epoch
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.3
    assert result["val"]["perplexity"] == pytest.approx(history[-1]["val_perplexity"])
    assert result["protocol"]["seq_len"] == 16 and result["world_size"] == 1
    # The saved folder is the last state: resprobe eval of it gives the validation figures again ...
    evaluated = json.loads(invoke("eval", out, "--data", f"text:{text}", "--seq-len", 16, "--device", "cpu", "-q",
                                  "-f", "json").stdout)
    assert evaluated["loss"] == pytest.approx(result["val"]["loss"], rel=1e-6)
    assert evaluated["n_tokens"] == result["val"]["n_tokens"]
    # ... and so does transformers' own loss, in a loop that does not use resprobe.
    assert plain_nll(out, text, 16) == pytest.approx(result["val"]["loss"], rel=1e-5)
    assert (tmp_path / "ft.best" / "model.safetensors").is_file()  # the best (here the last) by val loss
    assert (out / "resprobe_training.pt").is_file()


def test_resume_equals_an_uninterrupted_run(lm_dir, text, tmp_path):
    from resprobe.lm_probe import open_lm_probe
    from resprobe.train import FinetuneOptions
    from resprobe.train_lm import finetune_lm

    def run(out, stop=None, resume=False):
        probe = open_lm_probe(str(lm_dir), device="cpu", seq_len=16)
        options = FinetuneOptions(out, epochs=2, lr=3e-3, optimizer="adamw", augment="none", batch_size=4,
                                  warmup_steps=2, val_every=4, resume=resume)
        return finetune_lm(probe, probe.data(f"text:{text}", limit=24), probe.data(f"text:{text}", limit=5), options, stop=stop)

    whole = run(tmp_path / "whole")
    stopped = run(tmp_path / "parts", stop=lambda s: s.step == 5)  # mid-epoch, after a --val-every row
    assert not stopped.complete and stopped.steps == 5
    resumed = run(tmp_path / "parts", resume=True)
    assert resumed.complete and resumed.steps == whole.steps == 12
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "parts")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.history == whole.history  # rows at steps 0, 4, 6 (epoch), 8, 12 (epoch)
    assert [h["step"] for h in whole.history] == [0, 4, 6, 8, 12]


def test_a_config_folder_without_weights_trains_from_a_seeded_initialization(lm_dir, text, tmp_path):
    config_only = tmp_path / "config"
    config_only.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(lm_dir / name, config_only / name)
    for seed, out in ((0, "a"), (0, "b"), (1, "c")):
        finetune(config_only, text, tmp_path / out, "--max-steps", 2, "--seed", seed)
    warned = invoke("eval", config_only, "--data", f"text:{text}", "--seq-len", 16, "--limit", 1, "--device", "cpu")
    assert "holds no weights: the model is randomly initialized (seed 0)" in warned.stderr
    a, b, c = (weights(tmp_path / name) for name in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "a")  # a transformers folder, no resprobe needed
    assert json.loads(invoke("blocks", tmp_path / "a", "-f", "json").stdout)["layers"] == "model.layers"


def test_bad_finetune_inputs_are_one_line(lm_dir, text, tmp_path):
    data = ["--data", f"text:{text}", "--seq-len", 16, "--device", "cpu"]
    fails("finetune", lm_dir, *data, "--out", tmp_path / "x", "--augment", "light", expect="not augmented")
    afile = tmp_path / "file.pt"
    afile.write_bytes(b"x")
    fails("finetune", lm_dir, *data, "--out", afile, expect="already exists")
    fails("finetune", lm_dir, *data, "--out", afile, "--overwrite", expect="is a file")
    fails("finetune", lm_dir, *data, "--out", lm_dir, "--overwrite", expect="MODEL itself")
    fails("finetune", lm_dir, *data, "--out", tmp_path / "y", "--resume", expect="does not exist")


@pytest.mark.slow
def test_two_processes_equal_one(lm_dir, text, tmp_path):
    from test_distributed import run_jobs

    args = ["--data", f"text:{text}", *TRAIN, "--max-steps", 4, "--val-data", f"text:{text}"]
    two = tmp_path / "two"
    # Two processes × 2 windows a batch = one process × 4.
    two_args = [a if a != 4 else 2 for a in args[:args.index("--max-steps")]] + args[args.index("--max-steps"):]
    run_jobs([("ft", ["finetune", str(lm_dir), *[str(a) for a in two_args], "--out", str(two)])], tmp_path)
    one = tmp_path / "one"
    result = json.loads(invoke("finetune", lm_dir, *args, "--out", one).stdout)
    a, b = weights(one), weights(two)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert result["val"]["loss"] < result["history"][0]["val_loss"]


def test_finetune_of_a_shared_model_writes_a_checkpoint_that_eval_reads(lm_dir, text, tmp_path):
    shared = tmp_path / "shared.pt"
    invoke("share", lm_dir, "--span", "0:2", "--out", shared, "--device", "cpu", "-q")
    out = tmp_path / "ft.pt"
    result = finetune(shared, text, out, "--val-data", f"text:{text}", "--epochs", 2, "--limit", 24)
    assert result["history"][-1]["val_loss"] < result["history"][0]["val_loss"] - 0.3
    assert (tmp_path / "ft.best.pt").is_file()
    evaluated = json.loads(invoke("eval", out, "--data", f"text:{text}", "--seq-len", 16, "--device", "cpu", "-q",
                                  "-f", "json").stdout)
    assert evaluated["loss"] == pytest.approx(result["val"]["loss"], rel=1e-6)
    saved = torch.load(out, map_location="cpu", weights_only=True)
    assert [r["kind"] for r in saved["recipes"]] == ["share_lm"]  # still the shared model
    assert saved["training"]["complete"]  # with its resume state, as a vision checkpoint
