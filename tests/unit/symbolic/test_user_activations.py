"""User-defined activations: the same bar where sympy finds a stable form, else a warning."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

from pbxc.errors import UnsupportedOp
from pbxc.parse.parser import parse_text
from pbxc.symbolic import AccuracyWarning, derive, describe_activation
from pbxc.symbolic.activations import ActivationKey
from pbxc.symbolic.derive import check_accuracy

SOURCE = """model m
input x: float64[2]
activation swish2(z, beta = 2) = z * sigmoid(beta * z)
activation zerf(z) = z * erf(z)
activation wave(z) = sin(z)
activation bent(z) = (sqrt(z * z + 1) - 1) / 2 + z
activation softsign(z) = z / (1 + abs(z))
activation fast(z) = sin(1000 * z)
activation periodic(z) = where(sin(z) > 0.5, z, 0)
output y = linear(x, @w)
"""


@pytest.fixture(scope="module")
def definitions() -> dict:
    program = parse_text(SOURCE, "m.pbx")
    return {d.name: d for d in program.activations}


@pytest.mark.parametrize("name", ["swish2", "zerf", "wave", "bent", "softsign"])
def test_stable_forms_meet_the_bar_without_a_warning(definitions: dict, name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", AccuracyWarning)
        calc = derive(name, definitions)
    assert [m.dtype for m in calc.check] == ["float64", "float32"]
    assert all(m.passed for m in calc.check), calc.check


def test_rewrites_that_make_it_stable(definitions: dict) -> None:
    # the even z erf(z) runs on |z0|, |z| (mirror pairs cancel otherwise); bent's
    # sqrt(z*z + 1) - 1 is rationalised; softsign's pieces are split into partial fractions
    assert derive("zerf", definitions).branches[0].name == "even"
    assert "sqrt" in str(derive("bent", definitions).f_stable.args)
    pieces = derive("softsign", definitions).pieces
    assert [str(p.expr) for p in pieces] == ["-1 - 1/(z - 1)", "1 - 1/(z + 1)"]


def test_a_form_that_misses_the_bar_compiles_with_a_warning(definitions: dict) -> None:
    with pytest.warns(AccuracyWarning) as record:
        calc = derive("fast", definitions)
    message = str(record[0].message)
    assert "activation 'fast' (m.pbx:8:12)" in message
    assert "float64" in message and "float32" in message
    assert not calc.check[1].passed
    m = calc.multiplier  # it still compiles: the routine is there
    assert m.args and m.result is not None


def test_unsolvable_conditions_are_unsupported_at_the_definition(definitions: dict) -> None:
    with pytest.raises(UnsupportedOp) as err:
        derive("periodic", definitions)
    assert "periodic" in err.value.message
    assert err.value.pos is not None and err.value.pos.line == 9


def test_describe_reports_everything(definitions: dict) -> None:
    text = describe_activation("relu", step=5.0)
    for needle in ("f(z)", "kinks (convention 'owner')", "f'(z-) = 0, f'(z+) = 1",
                   "f'(0) := 0", "[crossing]", "float64: multiplier", "float32: multiplier",
                   "meets the bar"):
        assert needle in text, needle
    text = describe_activation("swish2", definitions, step=5.0)
    for needle in ("defined at m.pbx:3:12", "f'(z)", "f''(z)", "[patch]", "[secant]",
                   "[difference]", "secant from (float64", "kinks: none"):
        assert needle in text, needle
    with pytest.raises(UnsupportedOp, match="unknown activation 'nope'"):
        describe_activation("nope")


def test_derivation_is_cached() -> None:
    names = ["relu", "gelu", "silu", "mish", "tanh", "sigmoid", "softplus", "elu", "hardtanh",
             "leaky_relu"]
    for name in names:
        derive(name)  # cold, or already warm from other tests
    start = time.perf_counter()
    first = [derive(name) for name in names]
    warm = time.perf_counter() - start
    assert warm < 0.1  # ten distinct activations, warm: well under a second
    assert all(a is b for a, b in zip(first, [derive(name) for name in names]))
    # a key with parameters is its own entry
    key = ActivationKey("leaky_relu", (("alpha", 0.2),))
    assert derive(key).kinks[0].left == pytest.approx(0.2)


def test_check_accuracy_measures_both_types() -> None:
    measures = check_accuracy(derive("tanh"), step=10.0)
    assert [m.dtype for m in measures] == ["float64", "float32"]
    assert all(m.passed and m.pairs > 100 for m in measures)
    assert np.isfinite([m.max_error for m in measures]).all()
