"""Every stage a job can report is in one list, worker.engine.types.STAGES, and README.md documents that list."""

from __future__ import annotations

import ast
import re

from tests.conftest import ROOT
from worker.engine.types import STAGES


def _stage_literals() -> dict[str, list[str]]:
    """stage -> where: progress("<stage>", ...) calls, stage="<stage>" keywords, and `x.stage, ... = "<stage>", ...`."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "worker").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            literals: list[ast.expr] = []
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name == "progress" and len(node.args) >= 2:
                    literals.append(node.args[0])
                literals += [k.value for k in node.keywords if k.arg == "stage"]
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
                for target in node.targets:
                    if isinstance(target, ast.Tuple):
                        literals += [v for t, v in zip(target.elts, node.value.elts, strict=False)
                                     if isinstance(t, ast.Attribute) and t.attr == "stage"]
            for literal in literals:
                if isinstance(literal, ast.Constant) and isinstance(literal.value, str):
                    where = f"{path.relative_to(ROOT)}:{literal.lineno}"
                    found.setdefault(literal.value, []).append(where)
    return found


def test_every_reported_stage_is_in_STAGES() -> None:
    found = _stage_literals()
    assert {"loading", "quantizing", "packaging"} <= set(found), "the scan found no stages: is it still looking?"
    unknown = {stage: where for stage, where in found.items() if stage not in STAGES}
    assert not unknown, f"stages not in worker.engine.types.STAGES (add them, and to README.md): {unknown}"


def test_every_stage_in_STAGES_is_reported_somewhere() -> None:
    assert set(STAGES) <= set(_stage_literals()), "STAGES lists a stage nothing reports: remove it (and from README)"


def test_readme_lists_exactly_STAGES_in_order() -> None:
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"<!-- stages:start -->(.*?)<!-- stages:end -->", readme, re.S)
    assert section, "README.md has no stages table between <!-- stages:start --> and <!-- stages:end -->"
    listed = re.findall(r"^\| `([a-z_]+)` \|", section.group(1), re.M)
    assert tuple(listed) == STAGES
