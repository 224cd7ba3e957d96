"""specs/language.md is executable: its `pbx` blocks build, its `pbx-error` blocks fail as stated."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pbxc.errors import PbxError
from pbxc.graph.build import build_graph
from pbxc.parse.parser import parse_text

SPEC = Path(__file__).resolve().parents[2] / "specs" / "language.md"
TEXT = SPEC.read_text(encoding="utf-8")
GOOD = re.findall(r"```pbx\n(.*?)```", TEXT, flags=re.S)
BAD = re.findall(r"```pbx-error\n(.*?)```", TEXT, flags=re.S)


def test_spec_has_examples() -> None:
    assert len(GOOD) >= 5 and len(BAD) >= 3


@pytest.mark.parametrize("block", GOOD, ids=[f"good{i}" for i in range(len(GOOD))])
def test_good_blocks_build(block: str) -> None:
    graph = build_graph(parse_text(block, str(SPEC)))
    assert graph.outputs and graph.inputs


@pytest.mark.parametrize("block", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_error_blocks_fail_as_stated(block: str) -> None:
    first = block.splitlines()[0]
    assert first.startswith("# error: ")
    expected = first[len("# error: "):]
    with pytest.raises(PbxError) as info:
        build_graph(parse_text(block, str(SPEC)))
    assert any(expected in d.message for d in info.value.diagnostics), info.value.render()
