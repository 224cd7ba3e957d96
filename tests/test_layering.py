"""The data flows one way: a module imports only from pipeline stages to its left."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pbxc"

# parse -> weights -> graph -> symbolic -> lower -> codegen -> runtime -> verify -> interop/evaluate
STAGES = ["parse", "weights", "graph", "symbolic", "lower", "codegen", "runtime", "verify",
          "interop", "evaluate"]
RANK = {name: i for i, name in enumerate(STAGES)}
RANK["evaluate"] = RANK["interop"]
LEAVES = {"errors", "ops"}
#: modules every stage may import that import nothing but the leaves (pbxc.outputs writes
#: every file pbxc writes; specs/security.md)
FOUNDATIONS = {"outputs"}
TOP = {"pipeline", "cli", "__init__", "__main__", "dask"}  # pbxc.dask: the data-set API


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "pbxc" or len(parts) < 2:
        return None
    if parts[1].startswith("cli_"):  # pbxc/cli_<name>.py: more commands, top level
        return "cli"
    return parts[1]


def imports_of(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
    return [(m, line) for m, line in found if m == "pbxc" or m.startswith("pbxc.")]


def test_no_import_points_backwards() -> None:
    problems = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    for path in files:
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        own = stage_of(".".join(rel.parts))
        if own in TOP:
            continue
        for module, line in imports_of(path):
            target = stage_of(module)
            if own in LEAVES:
                problems.append(f"{rel}:{line}: leaf module imports {module}")
            elif own in FOUNDATIONS and target not in LEAVES:
                problems.append(f"{rel}:{line}: foundation module imports {module}")
            elif target is None or target in LEAVES or target in FOUNDATIONS:
                continue
            elif target in TOP:
                problems.append(f"{rel}:{line}: stage '{own}' imports top-level {module}")
            elif own in RANK and target in RANK and RANK[target] > RANK[own]:
                problems.append(f"{rel}:{line}: stage '{own}' imports later stage {module}")
            elif own not in RANK:
                problems.append(f"{rel}:{line}: module in unknown stage '{own}'")
    assert not problems, "\n".join(problems)


def test_layering_check_catches_a_backward_import(tmp_path: Path) -> None:
    fake = tmp_path / "x.py"
    fake.write_text("from pbxc.runtime.model import Model\n")
    assert imports_of(fake) == [("pbxc.runtime.model", 1)]
    assert RANK[stage_of("pbxc.runtime.model") or ""] > RANK["graph"]
