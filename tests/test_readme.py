"""The README's Python example runs as written (issue 23: moved modules must not leave it stale)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import CIFAR10, ROOT

README = ROOT / "README.md"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


@pytest.mark.skipif(not CIFAR10.is_dir(), reason="../shared/cifar10 is not present")
@pytest.mark.parametrize("index", range(len(python_blocks(README))))
def test_readme_python_example_runs(index, monkeypatch):
    monkeypatch.chdir(ROOT)  # the example's paths are relative to the repository root
    code = python_blocks(README)[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "readme"})


def test_readme_has_a_python_example():
    assert python_blocks(README)
