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

# One intra-op thread for the whole suite. The tensors are tiny, so a second thread gains little, and
# on a shared, busy machine OpenMP threads spinning for a core cost far more: on 2 busy cores a
# recording test took 90 s with two threads and 11 s with one (2026-12-01). Subprocesses get
# OMP_NUM_THREADS=1 for the same reason. Tests that need several threads say so themselves
# (``@pytest.mark.default_threads``).
DEFAULT_THREADS = torch.get_num_threads()  # the CPU's default, as at interpreter start
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "default_threads: the test runs with the CPU's default thread count "
                                       "(at least 2, so that threaded code paths are taken)")


@pytest.fixture(autouse=True)
def _single_thread(request):
    """Every test starts with one thread, whatever an earlier test left behind; a test marked
    ``default_threads`` with the CPU's default (at least 2: on one core the threaded paths are still
    taken)."""
    marked = request.node.get_closest_marker("default_threads") is not None
    torch.set_num_threads(max(2, DEFAULT_THREADS) if marked else 1)
    yield
    torch.set_num_threads(1)


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
    busy machine (two threads on two busy cores run ~100× slower). The whole suite now runs with one
    thread; modules keep saying so where their arithmetic depends on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fixture_run(tmp_path_factory) -> tuple[Path, dict]:
    """One recording of the shipped model, made once per test run and shared: 64 samples with the
    last-stage readout (``align --readout --out``), and that align JSON. Read it or copy it; never
    change it in place."""
    out = tmp_path_factory.mktemp("fixture_run") / "run.h5"
    payload = json.loads(invoke("align", MODEL, "--data", DATA, "--limit", "64", "--readout", "--out", str(out),
                                "-f", "json", "-q").stdout)
    return out, payload
