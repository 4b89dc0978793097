"""The notebooks as committed: valid nbformat 4.5 (cell ids), outputs stripped, and thin."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks() -> None:
    assert len(NOTEBOOKS) >= 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_stripped_and_thin(path: Path) -> None:
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert (nb["nbformat"], nb["nbformat_minor"]) >= (4, 5)
    ids = [c.get("id") for c in nb["cells"]]
    missing = [i for i, c in enumerate(ids) if not c]
    assert not missing, f"{path.name}: cells {missing} have no id (nbformat 4.5 requires one)"
    assert len(set(ids)) == len(ids), f"{path.name}: duplicate cell ids"
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        assert cell["outputs"] == [], f"{path.name} cell {i}: outputs not stripped"
        assert cell["execution_count"] is None, f"{path.name} cell {i}: execution count kept"
        tree = ast.parse("".join(cell["source"]))
        defs = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)]
        assert not defs, f"{path.name} cell {i} defines {defs}: logic belongs in scoring_kit"
