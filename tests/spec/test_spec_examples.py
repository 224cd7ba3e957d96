"""Every ```python block of specs/*.md runs as written, from the repository root."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SPECS = sorted(p for p in (REPO / "specs").glob("*.md")
               if re.search(r"```python\n", p.read_text(encoding="utf-8")))


def test_specs_have_examples() -> None:
    assert {p.name for p in SPECS} >= {"jacobian.md", "dfd.md", "lrp.md"}


@pytest.mark.parametrize("spec", SPECS, ids=[p.name for p in SPECS])
def test_python_examples_run(spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                             ) -> None:
    blocks = re.findall(r"```python\n(.*?)```", spec.read_text(encoding="utf-8"), re.S)
    script = tmp_path / f"{spec.stem}_examples.py"
    script.write_text("\n".join(blocks), encoding="utf-8")
    monkeypatch.chdir(REPO)
    runpy.run_path(str(script), run_name="__spec__")
