from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIXTURES = ROOT / "fixtures"
CIFAR10 = ROOT.parent / "shared" / "cifar10"
MODEL = str(FIXTURES / "tiny_resnet.pt")  # the shipped tiny trained ResNet (a resprobe checkpoint)
DATA = str(FIXTURES / "shapes_test.npz")  # 256 of its "shapes" images
# The fixture's timm architecture, for its weights given with --checkpoint.
MODEL_KWARGS = json.dumps({"layers": [3, 3, 2, 2], "channels": [16, 24, 32, 48], "stem_width": 8,
                           "stem_type": "deep"})

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


def invoke(*args: object, code: int | None = 0, stdin: str | None = None):
    """Invoke the CLI in-process; asserts the exit status (0 unless ``code=`` says otherwise; None: any)."""
    from typer.testing import CliRunner

    from resprobe.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], input=stdin)
    if code is not None:
        assert result.exit_code == code, (result.stdout, result.stderr)
    return result


@pytest.fixture
def run():
    """:func:`invoke`, as a fixture."""
    return invoke


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): the
    same arithmetic as subprocesses run with one thread, and no OpenMP threads spinning on a shared,
    busy machine (two threads on two busy cores run ~100× slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
