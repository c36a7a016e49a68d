"""Untrusted checkpoints stay inert (docs/reliability.md, issue 6).

A pickle whose unpickling would run code (here: a ``__reduce__`` that calls ``exec`` to create a
marker file) is refused by default, and the code never runs; the refusal names ``--trust-checkpoint``
and the safe alternatives. With ``--trust-checkpoint`` it loads. The same holds for the file given as
``--checkpoint`` and as MODEL, in the zip and the legacy format, as a bare pickle, and under a
``.safetensors`` name (never unpickled at all). A resprobe checkpoint cannot make resprobe import and
call library code either (its recorded architecture is checked before anything is built).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tinymodels
from conftest import DATA, HERE, MODEL, MODEL_KWARGS, ROOT, invoke
from resprobe.errors import ModelError
from resprobe.models.loading import LoadOptions, load_model
from resprobe.models.checkpoints import read_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")


class RunsCode:
    """Unpickling this calls ``exec``: the marker file appears if and only if the code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "code-ran"


def fixture_checkpoint() -> dict:
    return torch.load(MODEL, weights_only=True)


def cli(*args: object):
    return invoke(*args, code=None)  # the tests below look at the exit status themselves


def assert_refused(result, marker: Path) -> str:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    assert not marker.exists(), "the pickled code ran"
    return lines[0]


def assert_names_the_way_out(message: str) -> None:
    assert "--trust-checkpoint" in message
    assert "state dict" in message and "safetensors" in message


@pytest.mark.parametrize("zipfile_format", [True, False])
def test_malicious_checkpoint_is_refused_then_trusted(tmp_path, marker, zipfile_format):
    evil = tmp_path / "weights.pt"
    state = fixture_checkpoint()["state_dict"]
    torch.save({"state_dict": state, "payload": RunsCode(marker)}, evil,
               _use_new_zipfile_serialization=zipfile_format)
    common = ["eval", "timm:resnet18", "--model-kwargs", MODEL_KWARGS, "--num-classes", "4", "--checkpoint", evil,
              "--data", DATA, "--limit", "8", "-f", "json"]
    message = assert_refused(cli(*common), marker)
    assert_names_the_way_out(message)
    assert "(exec)" in message  # what it would have run
    # Only the user's explicit choice unpickles it (and then, by design, its code runs).
    trusted = cli(*common, "--trust-checkpoint")
    assert trusted.exit_code == 0, trusted.stderr
    assert marker.exists()
    assert json.loads(trusted.stdout)["n"] == 8


def test_malicious_resprobe_checkpoint_as_model(tmp_path, marker):
    evil = tmp_path / "model.pt"
    torch.save({**fixture_checkpoint(), "payload": RunsCode(marker)}, evil)
    message = assert_refused(cli("blocks", evil), marker)
    assert_names_the_way_out(message)
    trusted = cli("blocks", evil, "--trust-checkpoint", "-f", "json")
    assert trusted.exit_code == 0 and len(json.loads(trusted.stdout)["blocks"]) == 10
    assert marker.exists()


def test_bare_pickle_is_refused(tmp_path, marker):
    evil = tmp_path / "model.pth"
    with open(evil, "wb") as fh:
        pickle.dump({"payload": RunsCode(marker)}, fh, protocol=2)
    assert_names_the_way_out(assert_refused(cli("blocks", evil), marker))


def test_disguised_as_safetensors_is_never_unpickled(tmp_path, marker):
    evil = tmp_path / "model.safetensors"
    torch.save({"state_dict": fixture_checkpoint()["state_dict"], "payload": RunsCode(marker)}, evil)
    for trust in ((), ("--trust-checkpoint",)):  # not even when trusted: the name says safetensors
        result = cli("eval", "timm:resnet18", "--model-kwargs", MODEL_KWARGS, "--checkpoint", evil, "--data", DATA,
                     "--limit", "8", *trust)
        message = assert_refused(result, marker)
        assert "safetensors" in message and "pickle" in message
    with pytest.raises(ModelError):
        read_checkpoint(evil, trust_checkpoint=True)
    assert not marker.exists()


def test_pickled_whole_module(tmp_path):
    whole = tmp_path / "whole_model.pt"
    torch.save(tinymodels.timm_basic(), whole)
    refused = cli("blocks", whole)
    assert refused.exit_code == 1 and "timm.models.resnet.ResNet" in refused.stderr
    assert "--trust-checkpoint" in refused.stderr
    trusted = cli("blocks", whole, "--trust-checkpoint", "-f", "json", "--input-size", "32")
    assert trusted.exit_code == 0, trusted.stderr
    assert len(json.loads(trusted.stdout)["blocks"]) == 6
    # as --checkpoint: its weights are taken
    as_weights = cli("blocks", "tinymodels:timm_basic", "--checkpoint", whole, "--trust-checkpoint", "-f", "json",
                     "--input-size", "32")
    assert as_weights.exit_code == 0, as_weights.stderr


def test_safe_forms_load_without_trust(tmp_path):
    from safetensors.torch import save_file

    state = fixture_checkpoint()["state_dict"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "weights.safetensors"))
    torch.save(state, tmp_path / "state_dict.pt")
    torch.save({"state_dict": state, "epoch": 3, "arch": "resnet18"}, tmp_path / "train_ckpt.pth.tar")
    for name in ("weights.safetensors", "state_dict.pt", "train_ckpt.pth.tar"):
        result = cli("eval", "timm:resnet18", "--model-kwargs", MODEL_KWARGS, "--checkpoint", tmp_path / name,
                     "--data", DATA, "--limit", "8", "-f", "json")
        assert result.exit_code == 0, (name, result.stderr)


def test_a_checkpoint_cannot_name_library_code_to_run(tmp_path, marker):
    """weights_only keeps the pickle inert, but a resprobe checkpoint also names its architecture:
    naming ``subprocess:getoutput`` with arguments must not make resprobe run a command."""
    checkpoint = fixture_checkpoint()
    checkpoint["arch"] = {"source": "callable", "name": "subprocess:getoutput", "num_classes": None,
                          "kwargs": {"cmd": f"touch {marker}"}}
    path = tmp_path / "callable.pt"
    torch.save(checkpoint, path)
    message = assert_refused(cli("blocks", path), marker)
    assert "subprocess:getoutput" in message and "--trust-checkpoint" in message
    with pytest.raises(ModelError, match="would run that code"):
        load_model(str(path))
    assert not marker.exists()
    # A timm architecture cannot smuggle a file to load through its arguments either.
    checkpoint["arch"] = {"source": "timm", "name": "resnet18", "num_classes": 4,
                          "kwargs": {**json.loads(MODEL_KWARGS), "checkpoint_path": str(tmp_path / "other.pt")}}
    torch.save(checkpoint, path)
    assert "checkpoint_path" in assert_refused(cli("blocks", path), marker)


def test_local_model_code_in_a_checkpoint_still_loads(tmp_path):
    """The user's own model code (here tests/tinymodels.py) is not a library: no flag needed."""
    from resprobe.models.checkpoints import save_resprobe_checkpoint

    loaded = load_model("tinymodels:timm_basic", LoadOptions())
    path = save_resprobe_checkpoint(tmp_path / "custom.pt", loaded)
    assert isinstance(load_model(str(path)).model, torch.nn.Module)


@pytest.mark.slow  # a real process
def test_real_process_never_runs_the_payload(tmp_path, marker):
    evil = tmp_path / "weights.pt"
    torch.save({"state_dict": fixture_checkpoint()["state_dict"], "payload": RunsCode(marker)}, evil)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "resprobe", "blocks", "timm:resnet18", "--model-kwargs", MODEL_KWARGS,
                           "--checkpoint", str(evil)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--trust-checkpoint" in lines[0] and "Traceback" not in proc.stderr
    assert not marker.exists()
