"""The shipped CIFAR-10 ResNet-20 (fixtures/resnet20/resnet20.pt, docs/sharing.md): resprobe loads it
as the model its checkpoint's weights describe, checked against a plain zoo model built by hand."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES, ROOT
from resprobe.probe import open_probe
from resprobe.models.zoo import cifar_resnet

RESNET20 = FIXTURES / "resnet20" / "resnet20.pt"


def test_shipped_resnet20_is_the_checkpoints_weights():
    raw = torch.load(RESNET20, map_location="cpu", weights_only=True)
    assert "training" not in raw  # weights-only form: no optimizer state
    plain = cifar_resnet(num_classes=10)
    plain.load_state_dict(raw["state_dict"])
    plain.eval()
    assert sum(p.numel() for p in plain.parameters()) == 272_474
    probe = open_probe(str(RESNET20), device="cpu")
    assert [b.name for b in probe.anatomy.blocks] == [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(probe.model(x), plain(x), rtol=0, atol=0)


def test_strip_training_state_keeps_the_model(tmp_path: Path):
    full = {**torch.load(RESNET20, map_location="cpu", weights_only=True),
            "training": {"optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}}}, "step": 7}}
    torch.save(full, tmp_path / "full.pt")
    script = ROOT / "fixtures" / "resnet20" / "strip_training_state.py"
    subprocess.run([sys.executable, str(script), str(tmp_path / "full.pt"), str(tmp_path / "w.pt")], check=True)
    stripped = torch.load(tmp_path / "w.pt", map_location="cpu", weights_only=True)
    assert set(stripped) == set(full) - {"training"}
    for k, v in full["state_dict"].items():
        assert torch.equal(stripped["state_dict"][k], v)
    assert json.dumps(stripped["arch"]) == json.dumps(full["arch"])
    again = subprocess.run([sys.executable, str(script), str(tmp_path / "full.pt"), str(tmp_path / "w.pt")])
    assert again.returncode != 0  # never overwrites


def test_history_matches_the_docs():
    history = json.loads((FIXTURES / "resnet20" / "train.json").read_text())["history"]
    assert [round(h["val_acc"], 3) for h in history[1:]] == [0.324, 0.393, 0.525, 0.58, 0.627, 0.639, 0.656, 0.663]
