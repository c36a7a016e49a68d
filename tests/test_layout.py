"""The package's layout (docs/architecture.md): imports flow one way, and no module imports in a cycle.

Layers, highest first; a module may import from its own layer's siblings only as the rules below allow,
and from any lower layer:

    __init__ (the public API, lazy), cli
    render/                                  tables, JSON/CSV, figures
    the analyses and probe                   align, ablate*, share, train, evaluate, readout, record, probe
    models/, data/, recording/               loading and blocks, data, the hooked pass and its store
    runtime, distributed, errors             foundations
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "resprobe"

FOUNDATIONS = {"runtime", "distributed", "errors", "losses", "dataframes"}
LAYERS = {"__init__": 6, "cli": 5, "__main__": 5, "render": 4, "api": 4.5, "results": 4.5, "models": 2, "data": 2, "recording": 2}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts) or "__init__"


def layer(module: str) -> float:
    top = module.split(".")[0]
    if top in LAYERS:
        return LAYERS[top]
    if top in FOUNDATIONS:
        return 1
    return 3  # the analyses and probe


def imports_of(path: Path) -> set[str]:
    """Every resprobe module imported anywhere in the file (also inside functions: a lazy import is still a
    dependency), TYPE_CHECKING-only imports left out."""
    tree = ast.parse(path.read_text())
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only |= {id(n) for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "resprobe":
                found |= {a.name for a in node.names if (PACKAGE / a.name).exists()
                          or (PACKAGE / f"{a.name}.py").exists()}
            elif node.module.startswith("resprobe."):
                found.add(node.module[len("resprobe."):])
        elif isinstance(node, ast.Import):
            found |= {a.name[len("resprobe."):] for a in node.names if a.name.startswith("resprobe.")}
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_from_a_higher_layer(module: str) -> None:
    upward = [dep for dep in imports_of(MODULES[module]) if layer(dep) > layer(module)]
    assert not upward, f"resprobe.{module} (layer {layer(module)}) imports from higher layers: {upward}"


def test_no_import_cycles_at_module_level() -> None:
    """Module-level imports form no cycle (a cycle breaks `import` in one order or the other)."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        deps: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("resprobe."):
                deps.add(node.module[len("resprobe."):])
        graph[name] = {d for d in deps if d in MODULES}
    seen: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for dep in graph[node]:
            if seen.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in seen:
                visit(dep, stack + [dep])
        seen[node] = 2

    for name in graph:
        if name not in seen:
            visit(name, [name])


def test_the_package_folders_are_the_documented_ones() -> None:
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == ["data", "models", "recording", "render"]


def test_the_zoos_old_module_path_still_builds_the_same_network():
    """Checkpoints written before the move record `resprobe.zoo:cifar_resnet` (fixtures/resnet20 does)."""
    import torch

    from resprobe.models.loading import LoadOptions, load_model

    old, new = (load_model(spec, LoadOptions(num_classes=10, model_kwargs={"depth": 8}, seed=0)).model
                for spec in ("resprobe.zoo:cifar_resnet", "resprobe.models.zoo:cifar_resnet"))
    assert type(old) is type(new)
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))


def test_every_module_is_in_the_architecture_page():
    """docs/architecture.md lists every module with one line: a new module that is not there fails."""
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    missing = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
               if p.name != "__init__.py" and p.name not in page]
    assert not missing, f"add these to docs/architecture.md: {missing}"
