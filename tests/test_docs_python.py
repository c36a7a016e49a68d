"""docs/python.md runs as it is: every ```python block, in order, in one namespace (a notebook's),
on the few CIFAR-10 images the page itself uses. Skipped where ../shared/cifar10 is absent."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision

from conftest import CIFAR10, ROOT, requires_cifar

DOC = ROOT / "docs" / "python.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_page_has_code_for_every_step():
    code = "\n".join(python_blocks(DOC.read_text()))
    for call in ("rp.align(", "rp.ablate(", ".pruned(", "rp.evaluate(", "rp.share(", "rp.finetune(", ".plot()",
                 ".to_pandas()", "rp.save(", "rp.load("):
        assert call in code, call


@requires_cifar
def test_every_python_block_of_docs_python_md_runs(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)  # the page writes align.png and shared.pt where it runs
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "resnet18_cifar10.pt")
    namespace: dict = {}
    blocks = python_blocks(DOC.read_text())
    assert blocks
    for i, block in enumerate(blocks):
        # The page names the data relative to the project's root; here it runs in a temporary folder.
        block = block.replace('CIFAR10 = "../shared/cifar10"', f'CIFAR10 = "{CIFAR10}"')
        exec(compile(block, f"docs/python.md block {i + 1}", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "align.png").is_file() and (tmp_path / "shared.pt").is_file()
    assert len(namespace["test_loader"].dataset) == 64
