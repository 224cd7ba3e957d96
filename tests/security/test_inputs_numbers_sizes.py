"""Issue #10, numbers, nesting, sizes and source lines: refused by ``pbxc check`` with an error
at the offending position, before anything is allocated; diagnostics quote the right line.

Each case asserts the exit code, the error text and position, that no canary file appeared and
that nothing was left in the folder (specs/security.md, Inputs).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest

import pbxc
from pbxc.cli import main
from pbxc.parse.parser import MAX_NESTING, MAX_NUMBER_LENGTH


def check(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
          weights: dict[str, np.ndarray] | None = None) -> tuple[int, str, Path]:
    """``pbxc check`` of ``text``; returns (exit code, stderr, path) and asserts no leftovers."""
    if weights is not None:
        np.savez(tmp_path / "w.npz", **weights)  # type: ignore[arg-type]
    before = sorted(p.name for p in tmp_path.iterdir())
    path = tmp_path / "m.pbx"
    path.write_text(text, encoding="utf-8")
    start = time.monotonic()
    code = main(["check", str(path)])
    _, err = capsys.readouterr()
    assert time.monotonic() - start < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "m.pbx"])
    assert "Traceback" not in err
    return code, err, path


@pytest.mark.parametrize(("call", "column"), [("leaky_relu(x, 1e999)", 26),
                                              ("leaky_relu(x, alpha=-1e999)", 33)])
def test_non_finite_parameter_refused_at_its_position(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], call: str, column: int) -> None:
    code, err, path = check(tmp_path, capsys, f"model m\ninput x: float64[4]\noutput y = {call}\n")
    assert code == 1
    assert err.startswith(f"{path}:3:{column}: error: number 1e999 is not finite in float64")


def test_non_finite_default_refused_at_its_position(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, err, path = check(tmp_path, capsys, "model m\ninput x: float64[4]\n"
                            "activation f(z, a = 1e999) = a * z\noutput y = f(x)\n")
    assert code == 1
    assert err.startswith(f"{path}:3:21: error: number 1e999 is not finite in float64")


def test_underflowing_number_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err, path = check(tmp_path, capsys, "model m\ninput x: float64[4]\n"
                            "output y = leaky_relu(x, 1e-400)\n")
    assert code == 1
    assert err.startswith(f"{path}:3:26: error: number 1e-400 underflows to 0 in float64")


def test_4301_digit_integer_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err, path = check(tmp_path, capsys, "model m\ninput x: float64[4]\n"
                            f"output y = leaky_relu(x, {'1' * 4301})\n")
    assert code == 1
    assert err.startswith(f"{path}:3:26: error: number of 4301 characters; at most "
                          f"{MAX_NUMBER_LENGTH} are allowed")


def test_250_nested_calls_refused_with_the_nesting_limit(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = "relu(" * 250 + "x" + ")" * 250
    code, err, path = check(tmp_path, capsys, f"model m\ninput x: float64[4]\noutput y = {body}\n")
    assert code == 1
    assert re.match(rf"{re.escape(str(path))}:3:\d+: error: expression nested more than "
                    rf"{MAX_NESTING} levels deep", err)


def test_1000_term_minus_chain_refused_with_the_nesting_limit(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chain = " - ".join(["z"] * 1000)
    code, err, path = check(tmp_path, capsys, "model m\ninput x: float64[4]\n"
                            f"activation f(z) = {chain}\noutput y = f(x)\n")
    assert code == 1
    assert re.match(rf"{re.escape(str(path))}:3:\d+: error: expression nested more than "
                    rf"{MAX_NESTING} levels deep", err)


def test_nesting_within_the_limit_still_works() -> None:
    body = "relu(" * 40 + "x" + ")" * 40
    model = pbxc.loads(f"model m\ninput x: float64[3]\noutput y = {body}\n", "n.pbx")
    np.testing.assert_array_equal(model.forward(np.array([[-1.0, 0.5, 2.0]])), [[0, 0.5, 2.0]])


def test_huge_input_refused_before_allocating(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, err, path = check(tmp_path, capsys, "model m\ninput x: float64[100000000000]\n"
                            "output y = relu(x)\n")
    assert code == 1
    assert err.startswith(f"{path}:2:7: error: one sample needs 1.5 TiB of values in float64, "
                          "over the limit of 2.0 GiB (PBXC_MAX_SAMPLE_BYTES); the largest is "
                          "input 'x' of shape [100000000000]")


def test_huge_padding_refused_naming_the_node(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    weights = {"c.weight": np.ones((2, 1, 3, 3)), "c.bias": np.zeros(2)}
    code, err, path = check(tmp_path, capsys, 'model m\nweights "w.npz"\n'
                            "input x: float64[1, 8, 8]\n"
                            "output y = conv2d(x, @c, padding=1000000000)\n", weights)
    assert code == 1
    assert err.startswith(f"{path}:4:12: error: one sample needs ")
    assert "the largest is conv2d 'y' of shape [2, 2000000006, 2000000006]" in err


def test_sample_memory_limit_is_configurable(write_model: object,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    text = "model m\ninput x: float64[1000]\noutput y = relu(x)\n"
    assert pbxc.loads(text, "ok.pbx").forward(np.ones((1, 1000))).shape == (1, 1000)
    monkeypatch.setenv("PBXC_MAX_SAMPLE_BYTES", "8000")
    with pytest.raises(pbxc.PbxError, match=r"one sample needs 15.6 KiB .* limit of 7.8 KiB"):
        pbxc.loads(text, "small.pbx")


@pytest.mark.parametrize("separator", ["\f", "\u2028", "\x85", "\v", "\u2029", "\x1c"])
def test_diagnostics_quote_the_right_line_after_odd_line_breaks(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], separator: str) -> None:
    text = (f"model m\n# a comment{separator}with a break the grammar does not see\n"
            f'# and "a string{separator}in" another\ninput x: float64[4]\noutput y = lineer(x)\n')
    code, err, path = check(tmp_path, capsys, text)
    assert code == 1
    lines = err.splitlines()
    assert lines[0] == f"{path}:5:12: error: unknown op 'lineer'; did you mean 'linear'?"
    assert lines[1] == "    5 | output y = lineer(x)"
