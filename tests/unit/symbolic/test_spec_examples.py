"""specs/activations.md is executable: its python blocks run and their assertions hold."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

SPEC = Path(__file__).resolve().parents[3] / "specs" / "activations.md"
BLOCKS = re.findall(r"```python\n(.*?)```", SPEC.read_text(encoding="utf-8"), flags=re.S)


def test_spec_has_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_python_blocks_run(block: str) -> None:
    exec(compile(block, str(SPEC), "exec"), {})
