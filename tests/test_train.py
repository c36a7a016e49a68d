"""Fine-tuning: schedule, augmentation, loss goes down, exact resume, checkpoints, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import DATA, MODEL
from resprobe.errors import BadValue
from resprobe.evaluate import evaluate
from resprobe.models.loading import load_model
from resprobe.probe import open_probe
from resprobe.train import (
    FinetuneOptions,
    best_path,
    compiled_forward,
    epoch_order,
    finetune,
    light_augment_samples,
    lr_factor,
    make_optimizer,
)


def tiny_probe():
    return open_probe("tinymodels:timm_basic", input_size="32", device="cpu")


def sources(probe, n_train: int = 24, n_val: int = 16):
    return probe.data("synthetic:64", limit=n_train, seed=0), probe.data("synthetic:64", limit=n_val, seed=1)


# --------------------------------------------------------------------------------------------------
# Pieces


def test_schedule_is_cosine_to_zero_after_warmup():
    assert [lr_factor(s, 10, 0) for s in (0, 5)] == [1.0, pytest.approx(0.5)]
    assert lr_factor(10, 10, 0) == pytest.approx(0.0)
    assert [lr_factor(s, 12, 2) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_factor(7, 12, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))


def test_no_weight_decay_on_norms_and_biases():
    model = tiny_probe().model
    groups = make_optimizer(model, FinetuneOptions(out="x")).param_groups
    assert groups[0]["weight_decay"] == 5e-4 and all(p.ndim > 1 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0 and all(p.ndim == 1 for p in groups[1]["params"])
    assert groups[0]["nesterov"] and groups[0]["momentum"] == 0.9


def test_light_augment_flips_and_shifts_with_zero_padding():
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    out = light_augment_samples(images, 0, 0, torch.arange(2))
    assert out.shape == images.shape
    again = light_augment_samples(images, 0, 0, torch.arange(2))
    assert torch.equal(out, again)
    for b in range(2):  # each output is a window of the (maybe flipped) image padded by 2 zeros
        padded = [torch.nn.functional.pad(img, (2, 2, 2, 2)) for img in (images[b], images[b].flip(2))]
        windows = [p[:, y:y + 16, x:x + 16] for p in padded for y in range(5) for x in range(5)]
        assert any(torch.equal(out[b], w) for w in windows)


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert epoch_order(10, 0, 1) == epoch_order(10, 0, 1)
    assert epoch_order(10, 0, 1) != epoch_order(10, 0, 2) and sorted(epoch_order(10, 3, 0)) == list(range(10))


def test_best_path():
    assert str(best_path("run/ft.pt")) == "run/ft.best.pt" and str(best_path("ft")) == "ft.best.pt"


# --------------------------------------------------------------------------------------------------
# Training


def test_finetuning_lowers_the_training_loss(tmp_path):
    probe = tiny_probe()
    train, val = sources(probe, 32)
    loader = probe.loader(train, 32)
    before = evaluate(probe.model, loader, probe.runtime).loss
    # lr 0.02: the eval-mode loss falls by ~0.7 with one thread or two; at 0.05 the running statistics
    # lag so far behind that it fell with two threads (1.64 → 1.37) and rose with one (→ 1.68).
    result = finetune(probe, train, val, FinetuneOptions(out=tmp_path / "ft.pt", epochs=6, batch_size=8, lr=0.02,
                                                         augment="none"))
    after = evaluate(probe.model, loader, probe.runtime).loss
    assert after < before - 0.1
    assert result.complete and result.steps == 24 and result.epochs == 6 and len(result.history) == 7
    assert result.history[0]["step"] == 0 and result.history[0]["train_loss"] is None  # the start
    assert result.history[-1]["train_loss"] < result.history[1]["train_loss"]
    assert result.val is not None and result.best == str(tmp_path / "ft.best.pt")
    assert result.best_val["loss"] == min(h["val_loss"] for h in result.history)


def test_step_zero_is_evaluated_and_is_the_best_when_training_makes_things_worse(tmp_path):
    """history[0] is the starting model on --val-data (checked against evaluating it before training);
    a fine-tune that only hurts (lr far too high) leaves the start as best, and PATH.best.pt is it."""
    import copy

    probe = tiny_probe()
    train, val = sources(probe)
    start = copy.deepcopy(probe.model)
    expected = evaluate(start, probe.loader(val, 8), probe.runtime)
    result = finetune(probe, train, val, FinetuneOptions(out=tmp_path / "ft.pt", epochs=2, batch_size=8, lr=1.0,
                                                         augment="none"))
    first = result.history[0]
    assert first == {"epoch": 0, "step": 0, "train_loss": None, "lr": None, "val_loss": pytest.approx(expected.loss),
                     "val_acc": expected.acc}
    assert all(h["val_loss"] > first["val_loss"] for h in result.history[1:])  # training made it worse
    assert result.best_val == {"epoch": 0, "step": 0, "loss": first["val_loss"], "acc": first["val_acc"]}
    best = load_model(result.best).model
    for key, value in start.state_dict().items():
        assert torch.equal(best.state_dict()[key], value), key
    assert evaluate(best, probe.loader(val, 8), probe.runtime).loss == pytest.approx(expected.loss, abs=1e-6)


def _run(tmp_path, name: str, augment: str, stop_at: tuple[int, ...] = ()):
    """A 2-epoch run (3 steps an epoch), stopped after each step in ``stop_at`` and resumed."""
    results = []
    for i in range(len(stop_at) + 1):
        probe = tiny_probe()
        train, val = sources(probe)
        options = FinetuneOptions(out=tmp_path / name, epochs=2, batch_size=8, augment=augment, recalibrate=8,
                                  warmup_steps=1, resume=i > 0)
        stop = (lambda s, at=stop_at[i]: s.step == at) if i < len(stop_at) else None
        results.append(finetune(probe, train, val, options, stop=stop))
    return probe.model, results


@pytest.mark.parametrize("augment,stops", [("light", (2, 3)), ("timm", (4,))])
def test_resume_equals_an_uninterrupted_run(tmp_path, augment, stops):
    model, (whole,) = _run(tmp_path, "whole.pt", augment)
    resumed_model, parts = _run(tmp_path, "parts.pt", augment, stops)
    assert [p.complete for p in parts] == [False] * len(stops) + [True]
    assert [p.steps for p in parts[:-1]] == list(stops)
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    final = parts[-1]
    assert final.history == whole.history and final.best_val == whole.best_val and final.steps == whole.steps == 6
    a = torch.load(tmp_path / "whole.pt", weights_only=True)["training"]
    b = torch.load(tmp_path / "parts.pt", weights_only=True)["training"]
    for group_a, group_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(group_a["momentum_buffer"], group_b["momentum_buffer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 6


def test_a_resume_file_of_version_1_still_resumes(tmp_path):
    """Version 1 of the resume state carried a batch-augmentation generator (unused since augmentation
    is drawn per sample): such a file resumes to the uninterrupted run; a newer version is refused."""
    model, (whole,) = _run(tmp_path, "whole.pt", "light")
    _run(tmp_path, "old.pt", "light", (2,))  # stopped after step 2
    raw = torch.load(tmp_path / "old.pt", weights_only=True)
    training = raw["training"]
    assert training["version"] == 2 and "augment" not in training["rng"] and training["ranks"] is None
    del training["ranks"]
    training["version"], training["rng"]["augment"] = 1, torch.Generator().manual_seed(0).get_state()
    torch.save(raw, tmp_path / "old.pt")
    probe = tiny_probe()
    train, val = sources(probe)
    final = finetune(probe, train, val, FinetuneOptions(out=tmp_path / "old.pt", epochs=2, batch_size=8,
                                                        augment="light", recalibrate=8, warmup_steps=1, resume=True))
    assert final.history == whole.history and final.steps == 6
    for key, value in model.state_dict().items():
        assert torch.equal(value, probe.model.state_dict()[key]), key
    training["version"] = 3
    torch.save(raw, tmp_path / "new.pt")
    with pytest.raises(BadValue, match="newer resprobe"):
        finetune(tiny_probe(), train, val, FinetuneOptions(out=tmp_path / "new.pt", epochs=2, batch_size=8,
                                                           augment="light", recalibrate=8, warmup_steps=1, resume=True))


def test_checkpoint_round_trip_and_resume_of_a_finished_run(tmp_path):
    probe = tiny_probe()
    train, val = sources(probe)
    out = tmp_path / "ft.pt"
    result = finetune(probe, train, None, FinetuneOptions(out=out, max_steps=2, batch_size=8))
    raw = torch.load(out, weights_only=True)  # tensors and plain containers only
    assert raw["format"] == "resprobe-checkpoint" and raw["training"]["complete"] and raw["training"]["step"] == 2
    loaded = load_model(str(out))
    for key, value in probe.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key
    assert result.best is None and result.val is None and not best_path(out).exists()
    again = finetune(tiny_probe(), train, None, FinetuneOptions(out=out, max_steps=2, batch_size=8, resume=True))
    assert again.to_dict() == result.to_dict()


def test_resume_refuses_other_options_and_missing_files(tmp_path):
    probe = tiny_probe()
    train, _ = sources(probe)
    out = tmp_path / "ft.pt"
    with pytest.raises(BadValue, match="does not exist"):
        finetune(probe, train, None, FinetuneOptions(out=out, max_steps=1, batch_size=8, resume=True))
    finetune(probe, train, None, FinetuneOptions(out=out, max_steps=2, batch_size=8), stop=lambda s: True)
    with pytest.raises(BadValue, match="lr"):
        finetune(tiny_probe(), train, None, FinetuneOptions(out=out, max_steps=2, batch_size=8, lr=0.5, resume=True))
    with pytest.raises(BadValue, match="--overwrite"):
        finetune(tiny_probe(), train, None, FinetuneOptions(out=out, max_steps=2, batch_size=8))
    with pytest.raises(BadValue, match="not both"):
        FinetuneOptions(out=out, epochs=1, max_steps=2).validate()


def _weights_after(tmp_path, name: str, **options) -> dict[str, torch.Tensor]:
    probe = tiny_probe()
    train, _ = sources(probe)
    finetune(probe, train, None, FinetuneOptions(out=tmp_path / name, max_steps=2, batch_size=8, **options))
    return probe.model.state_dict()


def test_compile_that_fails_falls_back_to_the_eager_run(tmp_path, monkeypatch):
    eager = _weights_after(tmp_path, "eager.pt")

    def broken_compile(model, **_kwargs):
        def call(*_args):
            raise RuntimeError("inductor: no working C++ compiler\nsecond line")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match=r"--compile: torch.compile failed \(RuntimeError: inductor: no working C\+\+ "
                                         r"compiler\); training continues eagerly"):
        fallback = _weights_after(tmp_path, "fallback.pt", compile=True)
    for key, value in eager.items():
        assert torch.equal(value, fallback[key]), key


def test_compile_errors_after_the_first_step_are_not_hidden(monkeypatch):
    calls = []

    def flaky_compile(model, **_kwargs):
        def call(x):
            calls.append(x)
            if len(calls) > 1:
                raise RuntimeError("CUDA out of memory")
            return model(x)
        return call

    monkeypatch.setattr(torch, "compile", flaky_compile)
    model = torch.nn.Linear(3, 2)
    forward = compiled_forward(model)
    x = torch.randn(4, 3)
    assert torch.equal(forward(x), model(x)) and forward.compiled
    with pytest.raises(RuntimeError, match="out of memory"):
        forward(x)


@pytest.mark.slow  # a real inductor compile: ~30 s on 2 busy cores
def test_compiled_training_step_matches_eager():
    """A real torch.compile (inductor) of a tiny block: same logits and gradients as eager."""
    pytest.importorskip("torch._inductor")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).train()
    x = torch.randn(4, 3, 8, 8)
    eager_logits = model(x)
    eager_grads = torch.autograd.grad(eager_logits.square().sum(), list(model.parameters()))
    forward = compiled_forward(model, warn=lambda message: pytest.fail(message))
    logits = forward(x)
    grads = torch.autograd.grad(logits.square().sum(), list(model.parameters()))
    assert forward.compiled
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Command line


def test_cli_share_then_finetune(tmp_path, run):
    shared = tmp_path / "shared.pt"
    run("share", MODEL, "--out", shared, "--stages", "0", "--device", "cpu", "-q")
    out = tmp_path / "ft.pt"
    payload = json.loads(run("finetune", shared, "--data", DATA, "--limit", 32, "--val-data", DATA, "--val-limit",
                             16, "--out", out, "--max-steps", 3, "-b", 8, "--recalibrate", 16, "--lr", 0.01,
                             "--device", "cpu", "-f", "json").stdout)
    assert {"steps", "epochs", "train_loss", "val", "out", "best"} <= set(payload)
    assert payload["steps"] == 3 and payload["epochs"] == 1 and set(payload["val"]) == {"loss", "acc"}
    assert payload["out"] == str(out) and payload["best"] == str(tmp_path / "ft.best.pt")
    listed = json.loads(run("blocks", out, "-f", "json").stdout)
    assert listed["blocks"][0]["name"] == "layer1.0"
    evaluated = json.loads(run("eval", payload["best"], "--data", DATA, "--limit", 16, "-f", "json",
                               "--device", "cpu").stdout)
    assert evaluated["loss"] == pytest.approx(payload["best_val"]["loss"], abs=1e-6)
    args = ("finetune", shared, "--data", DATA, "--limit", 32, "--val-data", DATA, "--val-limit", 16, "--out", out,
            "-b", 8, "--recalibrate", 16, "--lr", 0.01, "--device", "cpu", "--resume")
    assert "ft.best.pt" in run(*args, "--max-steps", 3).stdout  # a finished run: --resume reports it again
    assert "used 3" in run(*args, "--max-steps", 4, code=1).stderr


def test_overwrite_never_removes_the_model_being_fine_tuned(tmp_path, run):
    """`finetune ft.best.pt --out ft.pt --overwrite`: --overwrite removes a stale ft.best.pt at the start,
    which here is MODEL itself (gone for good without --val-data): refused, the file untouched."""
    import shutil

    model = tmp_path / "ft.best.pt"
    shutil.copyfile(MODEL, model)
    before = model.read_bytes()
    result = run("finetune", model, "--data", DATA, "--limit", 16, "--out", tmp_path / "ft.pt", "--overwrite",
                 "--max-steps", 1, "-b", 8, "--device", "cpu", code=1)
    assert result.stderr == (f"error: --out {tmp_path / 'ft.pt'}: its best checkpoint {model} is MODEL itself, which "
                             "--overwrite would remove; choose another --out\n")
    assert model.read_bytes() == before and not (tmp_path / "ft.pt").exists()


@pytest.mark.parametrize("args,message", [
    (("--epochs", "1", "--max-steps", "2"), "not both"),
    (("--lr", "-1"), "--lr"),
    (("--augment", "heavy"), "--augment"),
    (("--optimizer", "lamb"), "--optimizer"),
    (("--resume",), "does not exist"),
])
def test_cli_errors_are_one_line(tmp_path, run, args, message):
    result = run("finetune", MODEL, "--data", DATA, "--out", tmp_path / "ft.pt", "--device", "cpu", *args, code=1)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_cli_out_directory_must_exist(tmp_path, run):
    result = run("finetune", MODEL, "--data", DATA, "--out", tmp_path / "no" / "ft.pt", code=1)
    assert "does not exist" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_resume_from_another_directory_with_relative_data_paths(tmp_path, monkeypatch, arrays_file):
    """The interrupted run named its data relative to its directory; resumed from another directory with
    the same file named from there, it continues (and equals an uninterrupted run)."""
    first, other = tmp_path / "first", tmp_path / "other"
    first.mkdir()
    other.mkdir()
    arrays_file(24, name="first/data.npz")

    def run(data: str, stop=None, resume: bool = False, out: str = "ft.pt"):
        probe = tiny_probe()
        options = FinetuneOptions(out=tmp_path / out, epochs=1, batch_size=8, augment="none", resume=resume)
        return probe, finetune(probe, probe.data(data), None, options, stop=stop)

    monkeypatch.chdir(first)
    whole_probe, _ = run("data.npz", out="whole.pt")
    _, part = run("data.npz", stop=lambda s: s.step == 1)
    assert not part.complete
    monkeypatch.chdir(other)
    probe, result = run("../first/data.npz", resume=True)
    assert result.complete and result.steps == 3
    for key, value in whole_probe.model.state_dict().items():
        assert torch.equal(value, probe.model.state_dict()[key]), key


def test_ctrl_c_names_the_resume_command_and_an_existing_out_names_resume(tmp_path, run, monkeypatch):
    """Ctrl-C during finetune: the state is saved and stderr gives the command that continues it (as
    `record` does); an existing --out names --resume as well as --overwrite."""
    import contextlib
    import sys

    import resprobe.train as train

    @contextlib.contextmanager
    def pressed_at_once():  # Ctrl-C during the first step: the loop stops after it
        yield lambda: True

    monkeypatch.setattr(train, "_deferred_interrupt", pressed_at_once)
    out = tmp_path / "ft.pt"
    args = ["finetune", MODEL, "--data", DATA, "--limit", "32", "--out", str(out), "--max-steps", "3", "-b", "8",
            "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", ["resprobe", *args])
    result = run(*args, code=130)
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (f"interrupted at step 1 of 3: the state is saved in {out}; continue with `resprobe "
                         f"{' '.join(args)} --resume`"), result.stderr
    assert "interrupted" not in "\n".join(lines[:-1])
    monkeypatch.undo()
    again = run(*args, code=1).stderr
    assert again.strip() == (f"error: --out {out} already exists; continue the interrupted run with --resume, or "
                             "pass --overwrite to replace it")
    assert json.loads(run(*args, "--resume", "-f", "json").stdout)["steps"] == 3


def test_the_table_numbers_epochs_from_1_and_says_which_step_a_partial_epoch_and_the_best_reached(run, tmp_path):
    """32 samples in batches of 8: 4 steps an epoch; --max-steps 6 ends the 2nd epoch after 2 of its 4
    steps. Rows: start, 1, 2 (2 of 4 steps); the best is named by its step, never "epoch 0"."""
    args = ["finetune", MODEL, "--data", DATA, "--limit", "32", "--val-data", DATA, "--val-limit", "16", "-b", "8",
            "--max-steps", "6", "--lr", "0.001", "--device", "cpu", "--out", tmp_path / "ft.pt"]
    payload = json.loads(run(*args, "-f", "json").stdout)
    assert payload["steps_per_epoch"] == 4 and [h["step"] for h in payload["history"]] == [0, 4, 6]
    table = run(*args, "--overwrite").stdout
    cells = [[c for c in line.split() if c != "│"] for line in table.splitlines()]
    rows = [c[:5] for c in cells if c[:1] in (["start"], ["1"], ["2"])]
    assert rows == [["start", "0", "—", "—", rows[0][4]], ["1", "4", *rows[1][2:]], ["2", "(2", "of", "4", "steps)"]]
    step = payload["best_val"]["step"]
    best = [line for line in table.splitlines() if line.lstrip().startswith("best")]
    assert best and best[0].lstrip().startswith("best (the start)" if step == 0 else f"best (step {step})")
    assert "epoch 0" not in table
    # a best model after 6 steps (in the partial 2nd epoch) is named by its step
    from resprobe.render.report import emit, finetune_table

    payload["best_val"] = {**payload["best_val"], "epoch": 1, "step": 6}
    import io

    text = io.StringIO()
    emit(payload, "table", finetune_table, out=text)
    assert "best (step 6)" in text.getvalue()
