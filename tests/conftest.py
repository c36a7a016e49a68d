from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIXTURES = ROOT / "fixtures"
CIFAR10 = ROOT.parent / "shared" / "cifar10"

sys.path.insert(0, str(HERE))  # tinymodels importable, also as MODEL "tinymodels:timm_basic"

torch.set_num_threads(2)


@pytest.fixture
def arrays_file(tmp_path):
    """A 32×32 uint8 NHWC arrays file with 5 classes and 24 samples."""

    def make(n: int = 24, size: int = 32, classes: int = 5, seed: int = 0, name: str = "data.npz") -> Path:
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
        labels = rng.integers(0, classes, size=n)
        path = tmp_path / name
        np.savez(path, images=images, labels=labels)
        return path

    return make


def save_state_dict(model: torch.nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


requires_cifar = pytest.mark.skipif(not CIFAR10.is_dir(), reason="../shared/cifar10 is not present")


@pytest.fixture
def run():
    """Invoke the CLI in-process; asserts the exit status (0 unless ``code=`` says otherwise)."""
    from typer.testing import CliRunner

    from resprobe.cli import app

    runner = CliRunner()

    def invoke(*args: str, code: int = 0):
        result = runner.invoke(app, list(args))
        assert result.exit_code == code, (result.stdout, result.stderr)
        return result

    return invoke
