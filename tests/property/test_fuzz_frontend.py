"""Fuzzing the front end: whatever the text, pbxc raises a PbxError or works; nothing else.

Programs come from the grammar itself (``hypothesis.extra.lark.from_lark``), from random
token-level mutations of the spec's and the examples' models, and from byte-level mutations of
the shipped examples (flips, NUL, invalid UTF-8, form feeds, U+2028, long numbers), each run with
the examples' real weights, and forward on a random batch when it still compiles.

A larger run, on demand::

    python tests/property/test_fuzz_frontend.py --programs 20000
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.lark import from_lark

import pbxc
from pbxc.parse.parser import _lark, parse_text
from pbxc.pipeline import frontend
from pbxc.runtime.model import Model

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|@"[^"\n]*"|@[A-Za-z0-9_.]+|[A-Za-z_][A-Za-z0-9_]*'
                   r'|\d+\.?\d*(?:[eE][+-]?\d+)?|\*\*|<=|>=|#[^\n]*|\S')
EXTRA_TOKENS = ["(", ")", ",", "=", "[", "]", "-1", "0", "1e308", "1e-320", "-0", "nan", "@",
                '"', "\\", "float16", "#", "\n", "true", "none", "output", "input", "model",
                "activation", "where", "z", "^", "/", "999999999999"]


def seed_programs() -> list[tuple[str, Path]]:
    """(text, folder its weight paths are relative to) for every spec block and example."""
    seeds = []
    spec = (REPO / "specs" / "language.md").read_text(encoding="utf-8")
    for block in re.findall(r"```pbx\n(.*?)```", spec, flags=re.S):
        seeds.append((block, REPO / "specs"))  # no weights there: exercises WeightError
    for path in sorted(EXAMPLES.glob("*.pbx")):
        seeds.append((path.read_text(encoding="utf-8"), EXAMPLES))
    return seeds


SEEDS = seed_programs()
VOCABULARY = sorted({t for text, _ in SEEDS for t in TOKEN.findall(text)} | set(EXTRA_TOKENS))


@st.composite
def mutated_programs(draw: st.DrawFn) -> tuple[str, Path]:
    text, folder = draw(st.sampled_from(SEEDS))
    tokens = TOKEN.findall(text)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, max(len(tokens) - 1, 0)))
        action = draw(st.sampled_from(["delete", "insert", "replace", "duplicate", "swap"]))
        if action == "delete" and tokens:
            del tokens[i]
        elif action == "insert":
            tokens.insert(i, draw(st.sampled_from(VOCABULARY)))
        elif action == "replace" and tokens:
            tokens[i] = draw(st.sampled_from(VOCABULARY))
        elif action == "duplicate" and tokens:
            tokens.insert(i, tokens[i])
        elif action == "swap" and len(tokens) > 1:
            j = draw(st.integers(0, len(tokens) - 1))
            tokens[i], tokens[j] = tokens[j], tokens[i]
    # comments run to the end of a line, so keep line structure around them
    return " ".join(t + "\n" if t.startswith("#") else t for t in tokens), folder


#: bytes that break parsers: NUL, invalid UTF-8, line breaks the grammar does not count as
#: such (form feed, NEL, U+2028), quotes, escapes, brackets, long and non-finite numbers
INTERESTING_BYTES = [b"\x00", b"\xff", b"\xc3", b"\xe2\x80", b"\x0c", b"\xc2\x85",
                     "\u2028".encode(), b"\r", b"\r\n", b"\t", b"\v", b'"', b"\\", b"#", b"(",
                     b")", b"[", b"]", b",", b"@", b"=", b"9" * 60, b"1e999", b"-", b"^", b"*",
                     b"relu(" * 30, b"\n", b" ", "\u00e9".encode(), b"\xef\xbb\xbf"]
EXAMPLE_SEEDS = [(text, folder) for text, folder in SEEDS if folder == EXAMPLES] or SEEDS


@st.composite
def byte_mutated_files(draw: st.DrawFn) -> tuple[bytes, Path]:
    """A shipped example with random byte edits: flips, inserted bytes, deletions, splices."""
    text, folder = draw(st.sampled_from(EXAMPLE_SEEDS))
    data = bytearray(text.encode("utf-8"))
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "insert", "delete", "splice"]))
        if action == "flip" and data:
            data[min(i, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif action == "insert":
            data[i:i] = draw(st.sampled_from(INTERESTING_BYTES))
        elif action == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        elif action == "splice" and data:
            j = draw(st.integers(0, len(data) - 1))
            data[i:i] = data[j:j + draw(st.integers(1, 64))]
    return bytes(data), folder


def parse_bytes_and_run(data: bytes, folder: Path) -> None:
    """The bytes as a file (the decoding path of ``parse_file``), then the whole front end."""
    import tempfile

    from pbxc.parse.parser import parse_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzzed.pbx"
        path.write_bytes(data)
        try:
            parse_file(path)
        except pbxc.PbxError as err:
            assert err.diagnostics
            err.render()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    compile_and_run(text, folder)


def compile_and_run(text: str, folder: Path) -> None:
    """The whole front end, then a forward pass; only PbxError may escape."""
    try:
        graph, store = frontend(parse_text(text, str(folder / "fuzzed.pbx")))
        model = Model(graph, store)
        rng = np.random.default_rng(0)
        model.forward({i.name: rng.normal(size=(2, *i.shape)) for i in graph.inputs})
    except pbxc.PbxError as err:
        assert err.diagnostics, "a PbxError must carry at least one diagnostic"
        err.render()


@settings(max_examples=150)
@given(from_lark(_lark(), start="start"))
def test_grammar_generated_programs(text: str) -> None:
    compile_and_run(text, EXAMPLES)


@settings(max_examples=300)
@given(mutated_programs())
def test_mutated_programs(program: tuple[str, Path]) -> None:
    compile_and_run(*program)


@settings(max_examples=120)
@given(byte_mutated_files())
def test_byte_mutated_examples(program: tuple[bytes, Path]) -> None:
    parse_bytes_and_run(*program)


def test_seeds_compile_unmutated() -> None:
    # the mutation seeds that have weights must be valid, or the fuzzer only tests errors
    compiled = 0
    for text, folder in SEEDS:
        try:
            graph, store = frontend(parse_text(text, str(folder / "seed.pbx")))
        except pbxc.WeightError:
            continue
        Model(graph, store)
        compiled += 1
    assert compiled >= 1 or not list(EXAMPLES.glob("*.pbx"))


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--programs", type=int, default=5000)
    args = parser.parse_args(argv)
    counts = {"generated": 0, "pbx_errors": 0, "compiled": 0}

    def one(text: str, folder: Path) -> None:
        counts["generated"] += 1
        try:
            graph, store = frontend(parse_text(text, str(folder / "fuzzed.pbx")))
            Model(graph, store).forward(
                {i.name: np.ones((2, *i.shape)) for i in graph.inputs})
            counts["compiled"] += 1
        except pbxc.PbxError:
            counts["pbx_errors"] += 1

    def one_bytes(data: bytes, folder: Path) -> None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            counts["generated"] += 1
            counts["not_utf8"] = counts.get("not_utf8", 0) + 1
            parse_bytes_and_run(data, folder)  # the decoding error path
            return
        one(text, folder)

    import time

    start = time.monotonic()
    third = args.programs // 3
    settings_ = settings(max_examples=third, derandomize=False, database=None, deadline=None)
    given(from_lark(_lark(), start="start"))(settings_(lambda text: one(text, EXAMPLES)))()
    given(mutated_programs())(settings_(lambda program: one(*program)))()
    given(byte_mutated_files())(settings_(lambda program: one_bytes(*program)))()
    print(f"{counts['generated']} programs in {time.monotonic() - start:.0f} s: "
          f"{counts['pbx_errors']} PbxError, {counts.get('not_utf8', 0)} refused as not UTF-8, "
          f"{counts['compiled']} compiled and ran, 0 uncaught exceptions")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
