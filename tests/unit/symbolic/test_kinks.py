"""Pieces, kinks and the kink conventions; the owner convention is PyTorch's."""

from __future__ import annotations

import numpy as np
import pytest
import sympy

from pbxc.parse.parser import parse_text
from pbxc.symbolic import derive
from pbxc.symbolic.activations import Z
from pbxc.symbolic.calculus import derive_calculus
from pbxc.symbolic.evaluate import run_routine
from pbxc.symbolic.pieces import decompose

# activation -> {kink: (f'(c-), f'(c+), PyTorch's f'(c))}
KINKS = {
    "relu": {0: (0, 1, 0)},
    "leaky_relu": {0: (sympy.Rational(1, 100), 1, sympy.Rational(1, 100))},
    "hardtanh": {-1: (0, 1, 0), 1: (1, 0, 0)},
    "hardsigmoid": {-3: (0, sympy.Rational(1, 6), 0), 3: (sympy.Rational(1, 6), 0, 0)},
    "abs": {0: (-1, 1, 0)},
    "relu6": {0: (0, 1, 0), 6: (1, 0, 0)},
    "clip": {-1: (0, 1, 0), 1: (1, 0, 0)},
    "hardswish": {-3: (0, -sympy.Rational(1, 2), 0), 3: (sympy.Rational(3, 2), 1, 1)},
}


@pytest.mark.parametrize("name", sorted(KINKS))
def test_kinks_and_one_sided_derivatives(name: str) -> None:
    calc = derive(name)
    found = {int(k.point): (k.left, k.right, k.slope()) for k in calc.kinks}
    assert found == KINKS[name]


@pytest.mark.parametrize("name", ["identity", "gelu", "silu", "mish", "softplus", "sigmoid",
                                  "tanh", "exp", "log_sigmoid", "elu", "gelu_tanh"])
def test_smooth_activations_have_no_kinks(name: str) -> None:
    assert derive(name).kinks == ()  # elu with alpha = 1 is continuously differentiable


def test_conventions_are_selectable() -> None:
    for convention, expected in (("left", 0), ("right", 1), ("mean", sympy.S.Half),
                                 ("owner", 0)):
        calc = derive("relu", convention=convention)
        at_zero = run_routine(calc.derivative, [np.array([0.0])])
        assert at_zero[0] == float(expected)
        m = run_routine(calc.multiplier, [np.array([0.0]), np.array([0.0])])
        assert m[0] == float(expected)  # m(c, c) is the same convention
    with pytest.raises(ValueError, match="unknown kink convention"):
        derive_calculus(Z, "middle")


def test_owner_convention_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    cases = {
        "relu": (torch.relu, [0.0]),
        "leaky_relu": (lambda x: torch.nn.functional.leaky_relu(x, 0.01), [0.0]),
        "hardtanh": (torch.nn.functional.hardtanh, [-1.0, 1.0]),
        "hardsigmoid": (torch.nn.functional.hardsigmoid, [-3.0, 3.0]),
        "abs": (torch.abs, [0.0]),
        "relu6": (torch.nn.functional.relu6, [0.0, 6.0]),
        "clip": (lambda x: torch.clamp(x, -1.0, 1.0), [-1.0, 1.0]),
        "hardswish": (torch.nn.functional.hardswish, [-3.0, 3.0]),
    }
    for name, (fn, points) in cases.items():
        x = torch.tensor(points, dtype=torch.float64, requires_grad=True)
        fn(x).sum().backward()
        ours = run_routine(derive(name).derivative, [np.array(points)])
        assert np.array_equal(ours, x.grad.numpy()), name
    # elu with alpha != 1 has a kink; PyTorch takes the negative branch at 0
    x = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
    torch.nn.functional.elu(x, alpha=0.5).backward()
    calc = derive(derive("elu").key.__class__("elu", (("alpha", 0.5),)))
    assert run_routine(calc.derivative, [np.array([0.0])])[0] == float(x.grad[0])


def test_hardtanh_pieces_and_owners() -> None:
    pieces, breakpoints = decompose(derive("hardtanh").f)
    assert [p.expr for p in pieces] == [-1, Z, 1]
    assert [(b.point, b.owner) for b in breakpoints] == [(-1, "left"), (1, "right")]


def test_user_piecewise_activation() -> None:
    program = parse_text(
        "model m\ninput x: float64[1]\n"
        "activation bent(z) = where(z > 0.5, z * z, max(z, -1) + abs(z))\n"
        "output y = bent(x)\n", "bent.pbx")
    defs = {d.name: d for d in program.activations}
    calc = derive("bent", defs)
    assert {k.point: (k.left, k.right) for k in calc.kinks} == {
        -1: (-1, 0), 0: (0, 2), sympy.Rational(1, 2): (2, 1)}
    # across the kinks the multiplier is the exact secant
    z0 = np.array([-3.0, -0.5, 0.25, 2.0])
    z = np.array([2.0, 0.75, -2.0, -0.9])
    f = sympy.lambdify(Z, calc.f, "mpmath")
    import mpmath
    expected = [float((f(mpmath.mpf(b)) - f(mpmath.mpf(a))) / (mpmath.mpf(b) - mpmath.mpf(a)))
                for a, b in zip(z0, z)]
    np.testing.assert_allclose(run_routine(calc.multiplier, [z0, z]), expected, rtol=1e-15)


def test_jumps_enter_the_multiplier() -> None:
    calc = derive_calculus(sympy.Piecewise((2, Z > 1), (0, True)))  # a step of 2 at z = 1
    assert [(k.point, k.jump) for k in calc.kinks] == [(1, 2)]
    m = run_routine(calc.multiplier, [np.array([0.0, 1.0, 1.0, 2.0]),
                                      np.array([4.0, 1.5, 0.5, 3.0])])
    np.testing.assert_allclose(m, [0.5, 4.0, 0.0, 0.0])


def test_point_pieces_that_are_smooth_are_not_kinks() -> None:
    calc = derive_calculus(Z / (1 + sympy.Abs(Z)))  # softsign is continuously differentiable
    assert calc.kinks == ()
    assert run_routine(calc.derivative, [np.array([0.0])])[0] == 1.0
    assert run_routine(calc.multiplier, [np.array([0.0]), np.array([0.0])])[0] == 1.0


@pytest.mark.parametrize("name", ["relu6", "clip", "hardswish", "hardsigmoid", "gelu_tanh",
                                  "silu", "mish", "gelu"])
def test_exported_activations_match_torch_values_and_gradients(name: str) -> None:
    """The activations torch exports (MobileNet, EfficientNet, ViT): value and derivative
    against torch's own backward on a grid that includes every kink."""
    torch = pytest.importorskip("torch")
    fns = {"relu6": torch.nn.functional.relu6, "clip": lambda x: torch.clamp(x, -1.0, 1.0),
           "hardswish": torch.nn.functional.hardswish,
           "hardsigmoid": torch.nn.functional.hardsigmoid,
           "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
           "silu": torch.nn.functional.silu, "mish": torch.nn.functional.mish,
           "gelu": torch.nn.functional.gelu}
    z = np.concatenate([np.linspace(-9, 9, 181), [-3.0, -1.0, 0.0, 1.0, 3.0, 6.0]])
    x = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    y = fns[name](x)
    y.sum().backward()
    calc = derive(name)
    np.testing.assert_allclose(run_routine(calc.value, [z]), y.detach().numpy(), rtol=1e-14,
                               atol=1e-13)   # torch's 1 + tanh(...) cancels in the far tail
    # torch's float64 hardsigmoid backward multiplies by a float32 1/6 (off by 5e-9); ours is
    # the exact slope, checked against the formula
    rtol = 1e-7 if name == "hardsigmoid" else 1e-13
    np.testing.assert_allclose(run_routine(calc.derivative, [z]), x.grad.numpy(), rtol=rtol,
                               atol=1e-13)
    if name == "hardsigmoid":
        assert np.array_equal(run_routine(calc.derivative, [z]),
                              np.where(np.abs(z) < 3, 1 / 6, 0.0))
    # the DFD multiplier is the exact secant, and f' where z0 == z (seed 004, eq. 16-17)
    z0 = np.roll(z, 7)
    m = run_routine(calc.multiplier, [z0, z])
    f = y.detach().numpy()
    step = z != z0
    np.testing.assert_allclose(m[step] * (z - z0)[step], (f - np.roll(f, 7))[step],
                               rtol=1e-12, atol=1e-14)
