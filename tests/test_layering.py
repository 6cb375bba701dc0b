"""Layering contract (DESIGN.md): imports point down only.

- genvis never imports train/, serve/ or data_pipelines/.
- inside genvis: layers <- encoders/vae/models <- pipelines; models never import data/training/pipelines/tasks.
- train/, serve/ and data_pipelines/ never import each other.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "genvis": ("train", "serve", "data_pipelines"),
    "genvis/layers": (
        "genvis.encoders",
        "genvis.models",
        "genvis.pipelines",
        "genvis.training",
        "genvis.data",
        "genvis.vae",
        "genvis.tasks",
        "genvis.diffusion",
    ),
    "genvis/models": ("genvis.pipelines", "genvis.training", "genvis.data", "genvis.tasks"),
    "genvis/encoders": ("genvis.pipelines", "genvis.training", "genvis.data", "genvis.tasks", "genvis.models"),
    "genvis/pipelines": ("genvis.training",),
    "train": ("serve",),
    "serve": ("train", "data_pipelines"),
    "data_pipelines": ("train", "serve"),
}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down(package):
    violations = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in _imports(path):
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[package]):
                violations.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not violations, "layering violations:\n" + "\n".join(violations)
