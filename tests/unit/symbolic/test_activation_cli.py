"""``pbxc activation``: the derivation report of built-in and user activations."""

from __future__ import annotations

import re

import pytest

from pbxc.cli import main

WINE = "examples/wine_swish_mlp.pbx"


def test_builtin_with_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["activation", "leaky_relu(alpha=0.2)", "--no-accuracy"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("activation leaky_relu(alpha=0.2)")
    assert "z = 0: f'(z-) = 1/5, f'(z+) = 1, owner left; f'(0) := 1/5" in out


def test_convention_changes_the_slope_at_the_kink(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["activation", "relu", "--kinks", "mean", "--no-accuracy"]) == 0
    assert "f'(0) := 1/2" in capsys.readouterr().out


def test_user_activation_from_a_model_with_accuracy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["activation", "swish", "--model", WINE]) == 0
    out = capsys.readouterr().out
    assert "defined at examples/wine_swish_mlp.pbx:15:12" in out
    assert "f(z)   = z*Sigmoid(3*z/2)" in out
    assert "float64: multiplier" in out and "meets the bar 1e-14" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["activation", "gelu2"], "unknown activation 'gelu2'.*did you mean 'gelu'"),
    (["activation", "swish"], "give --model FILE"),
    (["activation", "elu(1, 2)"], "unknown parameter '2'; parameters: alpha"),
    (["activation", "elu(__import__)"], "is not a number"),
    (["activation", "elu(1"], "expected NAME or NAME"),
])
def test_bad_names_are_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str],
                                    message: str) -> None:
    assert main([*argv, "--no-accuracy"]) == 2
    assert re.search(message, capsys.readouterr().err)
