"""specs/lrp.md's python example runs as written (from the repository root)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def test_spec_example_runs(monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    text = (REPO / "specs" / "lrp.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "specs/lrp.md has no python example"
    monkeypatch.chdir(REPO)
    exec(compile(blocks[0], "specs/lrp.md", "exec"), {})  # our own spec text, not user input
    assert "total: start" in capsys.readouterr().out
