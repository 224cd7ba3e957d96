"""Generated NumPy activation modules: standalone, faithful to the evaluator, at the bar."""

from __future__ import annotations

import builtins
import importlib.util
import re
import types
from collections.abc import Callable
from typing import Any

import mpmath
import numpy as np
import pytest
import sympy

from pbxc.codegen import numpy_printer
from pbxc.codegen.numpy_printer import (
    NUMPY_PRELUDE,
    PbxNumPyPrinter,
    protect_divisions,
    render_activation_functions,
    render_function,
)
from pbxc.errors import UnsupportedOp
from pbxc.ops import BUILTIN_ACTIVATIONS
from pbxc.parse.parser import parse_text
from pbxc.symbolic import derive, numeric
from pbxc.symbolic.accuracy import measure_multiplier, z0_grid
from pbxc.symbolic.activations import Z
from pbxc.symbolic.evaluate import run_routine

NAMES = sorted(BUILTIN_ACTIVATIONS)


def load(source: str, block_scipy: bool = False) -> types.ModuleType:
    """Execute generated source in a fresh module, as a standalone file would run."""
    module = types.ModuleType("generated")
    real_import = builtins.__import__

    def guarded(name: str, *args: Any, **kwargs: Any) -> Any:
        if block_scipy and name.startswith("scipy"):
            raise ImportError("no scipy here")
        return real_import(name, *args, **kwargs)

    builtins.__import__ = guarded
    try:
        import importlib
        real_module = importlib.import_module

        def guarded_module(name: str, package: str | None = None) -> Any:
            if block_scipy and name.startswith("scipy"):
                raise ImportError("no scipy here")
            return real_module(name, package)

        importlib.import_module = guarded_module  # type: ignore[assignment]
        exec(compile(source, "<generated>", "exec"), module.__dict__)
    finally:
        builtins.__import__ = real_import
        importlib.import_module = real_module  # type: ignore[assignment]
    return module


@pytest.fixture(scope="module")
def rendered() -> numpy_printer.RenderedActivations:
    return render_activation_functions(NAMES)


@pytest.fixture(scope="module")
def module(rendered: numpy_printer.RenderedActivations) -> types.ModuleType:
    return load(rendered.source)


def test_source_is_standalone(rendered: numpy_printer.RenderedActivations) -> None:
    assert not re.search(r"^\s*(import|from)\s+pbxc", rendered.source, re.MULTILINE)
    assert rendered.source.startswith(NUMPY_PRELUDE)
    for key, names in rendered.names.items():
        assert set(names) == {"f", "df", "d2f", "m"}, key


def _pairs(dtype: type) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    z0 = rng.uniform(-30, 30, 3000)
    z = z0 + rng.choice([-1, 1], 3000) * 10.0 ** rng.uniform(-20, 2, 3000)
    z[::9] = z0[::9]
    z0[:200] = rng.uniform(-2, 0.5, 200)  # around the critical points
    z[:200] = z0[:200] + rng.uniform(-1.5, 1.5, 200)
    return z0.astype(dtype), z.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_generated_code_agrees_with_the_evaluator(rendered: numpy_printer.RenderedActivations,
                                                  module: types.ModuleType,
                                                  dtype: type) -> None:
    z0, z = _pairs(dtype)
    eps = np.finfo(dtype).eps
    for key, names in rendered.names.items():
        calc = derive(key)
        for kind, routine in calc.routines().items():
            args = [z0, z] if kind == "m" else [z]
            got = getattr(module, names[kind])(*args)
            want = run_routine(routine, args, dtype)
            assert got.dtype == dtype and got.shape == z.shape, (key.name, kind)
            # the same operations, but CSE may reassociate a product or a sum, and where the
            # value is a small difference (f'' near its zeros) that shows: compare on the
            # bar's measure, |a - b| / (|b| + 1e-8 s_f), to a few units in the last place
            same = (np.isnan(got) & np.isnan(want)) | (got == want)
            with np.errstate(invalid="ignore"):
                gap = np.abs(got - want) / (np.abs(want) + 1e-8 * calc.slope_scale)
            # f'' carries no accuracy bar (it cancels near its zeros): a looser check
            close = same | (gap <= (1e5 if kind == "d2f" else 16) * eps)
            assert close.all(), (key.name, kind, z0[~close][:3], z[~close][:3])


@pytest.mark.parametrize("name", ["tanh", "gelu", "silu", "hardsigmoid", "softplus"])
def test_generated_multiplier_meets_the_bar(rendered: numpy_printer.RenderedActivations,
                                            module: types.ModuleType, name: str) -> None:
    calc = derive(name)
    fns: dict[str, Callable[..., np.ndarray]] = {
        k: getattr(module, v) for k, v in rendered.names[calc.key].items()}
    for dtype, bar in (("float64", 1e-14), ("float32", 1e-6)):
        measure = measure_multiplier(fns["m"], calc.reference(), calc.slope_scale, dtype,
                                     z0_grid(3.0), value=fns["f"])
        assert measure.max_error <= bar, (dtype, measure)


def test_numpy_only_fallback_without_scipy(rendered: numpy_printer.RenderedActivations,
                                           module: types.ModuleType) -> None:
    plain = load(rendered.source, block_scipy=True)
    assert plain._scipy_erfc is None
    assert (module._scipy_erfc is not None) == (importlib.util.find_spec("scipy") is not None)
    calc = derive("gelu")
    gelu = rendered.names[calc.key]
    # the NumPy-only erfc must still meet the multiplier bar against mpmath
    for dtype, bar in (("float64", 1e-14), ("float32", 1e-6)):
        measure = measure_multiplier(getattr(plain, gelu["m"]), calc.reference(),
                                     calc.slope_scale, dtype, z0_grid(3.0),
                                     value=getattr(plain, gelu["f"]))
        assert measure.max_error <= bar, (dtype, measure)
    for dtype in (np.float64, np.float32):
        z0, z = _pairs(dtype)
        a, b = getattr(plain, gelu["m"])(z0, z), getattr(module, gelu["m"])(z0, z)
        gap = np.abs(a - b) / (np.abs(b) + 1e-8 * calc.slope_scale)
        assert gap.max() <= 16 * np.finfo(dtype).eps
        assert getattr(plain, gelu["f"])(z).dtype == dtype


def test_scalars_and_broadcasting(rendered: numpy_printer.RenderedActivations,
                                  module: types.ModuleType) -> None:
    names = rendered.names[derive("relu").key]
    m = getattr(module, names["m"])
    assert m(0.0, 2.0).shape == ()
    assert m(np.zeros((3, 1)), np.ones(4)).shape == (3, 4)
    assert getattr(module, names["df"])(np.float32(0.0)).dtype == np.float32


def test_divisions_stay_whole() -> None:
    # 1/d would overflow for a subnormal float32 d where (a - b)/d does not
    x, y, d = sympy.symbols("x y d", real=True)
    protected = protect_divisions((x - y) / d + x / d**2)
    text = PbxNumPyPrinter().doprint(protected)
    assert "(1 /" not in text and "/ (d * d)" in text.replace("((d) * (d))", "(d * d)")


def test_printer_is_strict_and_names_the_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UnsupportedOp, match="no rule for gamma"):
        PbxNumPyPrinter().doprint(sympy.gamma(Z))
    with pytest.raises(UnsupportedOp, match="no rule for"):
        PbxNumPyPrinter().doprint(sympy.Integral(Z, Z))
    program = parse_text("model m\ninput x: float64[1]\nactivation sq(z) = z * z\n"
                         "output y = sq(x)\n", "sq.pbx")
    defs = {d.name: d for d in program.activations}

    def broken(*args: Any, **kwargs: Any) -> str:
        raise UnsupportedOp("the NumPy printer has no rule for Thing")

    monkeypatch.setattr(numpy_printer, "render_routine", broken)
    with pytest.raises(UnsupportedOp) as err:
        render_activation_functions(["sq"], defs)
    assert "activation 'sq'" in err.value.message and err.value.pos.line == 3


def test_render_function_still_serves_the_forward_pass() -> None:
    source = NUMPY_PRELUDE + "\n" + render_function("act", ["z"], derive("gelu").f)
    act = load(source).act
    np.testing.assert_allclose(act(np.array([-1.0, 0.0, 2.0])),
                               [-0.15865525393145707, 0.0, 1.9544997361036416], rtol=1e-15)


def _special_pairs(dtype: type) -> tuple[np.ndarray, np.ndarray]:
    z0, z = _pairs(dtype)
    info = np.finfo(dtype)
    edge = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, info.max, -info.max, info.tiny,
                     -info.tiny, info.smallest_subnormal, 1e-30, -1e-30, 40.0, -40.0, 800.0,
                     -800.0], dtype=dtype)
    a, b = np.meshgrid(edge, edge)
    return np.concatenate([z0, a.ravel()]), np.concatenate([z, b.ravel()])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_shared_exponentials_are_bit_for_bit(monkeypatch: pytest.MonkeyPatch,
                                            dtype: type) -> None:
    """sigmoid(x), sigmoid(-x) and softplus over one exp(-|x|): the same bits as each helper
    computing its own, for every built-in activation's f, f' and multiplier (NaN, inf, +-0,
    subnormal and overflowing arguments included; signs of zeros compared). f'' is left to
    the evaluator test's measure: where its CSE temporaries are renamed (GELU-tanh, mish) the
    printer orders a sum's terms differently, and f'' cancels near its zeros. Products of a
    sigmoid pair are left unpaired here (their own test follows)."""
    monkeypatch.setattr(numpy_printer, "pair_sigmoids", lambda expr: expr)
    shared = render_activation_functions(NAMES, prefix="unpaired")
    monkeypatch.setattr(numpy_printer, "share_exponentials", list)
    plain = render_activation_functions(NAMES, prefix="plain")
    assert "_neg_abs_exp" in shared.source and "_sigmoid_of(" in shared.source
    assert "_sigmoid_of(" not in plain.source[len(NUMPY_PRELUDE):]
    shared_module, plain_module = load(shared.source), load(plain.source)
    z0, z = _special_pairs(dtype)
    for key, names in shared.names.items():
        for kind, name in names.items():
            if kind == "d2f":
                continue
            args = [z0, z] if kind == "m" else [z]
            got = getattr(shared_module, name)(*args)
            want = getattr(plain_module, plain.names[key][kind])(*args)
            assert got.dtype == want.dtype == dtype, (key.name, kind)
            same = (got == want) & (np.signbit(got) == np.signbit(want))
            same |= np.isnan(got) & np.isnan(want)
            assert same.all(), (key.name, kind, z0[~same][:3], z[~same][:3])


def test_tanh_derivative_pays_one_exponential() -> None:
    """tanh' = 4 sigmoid(-2z) sigmoid(2z): one exp(-|2z|), one 1 + e, one division."""
    rendered = render_activation_functions(["tanh"], prefix="t")
    source = rendered.source[len(NUMPY_PRELUDE):]
    body = source[source.index("def t0_df("):source.index("def t0_d2f(")]
    assert body.count("_neg_abs_exp(") == 1 and body.count("_sigmoid_pair(") == 1
    assert "np.exp(" not in body and "_sigmoid(" not in body and "_sigmoid_of(" not in body


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sigmoid_pairs_round_like_the_product(monkeypatch: pytest.MonkeyPatch,
                                              dtype: type) -> None:
    """Routines whose sigmoid(x) sigmoid(-x) is printed as e / (1 + e)^2 (tanh', sigmoid',
    softplus'', ...) against the same routines with the two factors multiplied: within 4
    units in the last place where the value is not tiny (both are three roundings of one
    number), NaN exactly where the product is NaN, and zeros and infinities where it has
    them."""
    paired = render_activation_functions(NAMES, prefix="paired")
    assert paired.source.count("_sigmoid_pair(") >= 4   # the helper's definition, tanh',
    monkeypatch.setattr(numpy_printer, "pair_sigmoids", lambda expr: expr)   # sigmoid', ...
    plain = render_activation_functions(NAMES, prefix="product")
    assert "_sigmoid_pair(" not in plain.source[len(NUMPY_PRELUDE):]
    paired_module, plain_module = load(paired.source), load(plain.source)
    z0, z = _special_pairs(dtype)
    eps, compared = np.finfo(dtype).eps, 0
    for key, names in paired.names.items():
        for kind, name in names.items():
            if kind == "d2f" or "_sigmoid_pair(" not in _body(paired.source, name):
                continue
            compared += 1
            args = [z0, z] if kind == "m" else [z]
            got = getattr(paired_module, name)(*args)
            want = getattr(plain_module, plain.names[key][kind])(*args)
            assert got.dtype == want.dtype == dtype, (key.name, kind)
            assert np.array_equal(np.isnan(got), np.isnan(want)), (key.name, kind)
            assert np.array_equal(got[~np.isfinite(want)], want[~np.isfinite(want)],
                                  equal_nan=True)
            assert np.array_equal(got == 0, want == 0), (key.name, kind)
            ok = np.isfinite(want) & (np.abs(want) > np.finfo(dtype).tiny / eps)
            gap = np.abs(got[ok] - want[ok]) / np.abs(want[ok])
            assert gap.max(initial=0) <= 4 * eps, (key.name, kind, gap.max())
    assert compared >= 2


def _body(source: str, name: str) -> str:
    start = source.index(f"def {name}(")
    end = source.find("\ndef ", start + 1)
    return source[start:end if end >= 0 else len(source)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sigmoid_pair_helper_against_mpmath(dtype: type) -> None:
    """_sigmoid_pair(e, 1 + e) = sigmoid(x) sigmoid(-x) to 4 ulps (40-digit reference), with
    0 at |x| = inf, 1/4 at 0 and NaN kept."""
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.uniform(-80, 80, 400), rng.uniform(-1, 1, 300),
                        rng.uniform(-1e-6, 1e-6, 100)]).astype(dtype)
    e = numeric._neg_abs_exp(x)
    got = numeric._sigmoid_pair(e, 1 + e)
    assert got.dtype == dtype
    with mpmath.workdps(40):
        want = np.array([float(1 / ((1 + mpmath.exp(mpmath.mpf(float(v))))
                                    * (1 + mpmath.exp(-mpmath.mpf(float(v)))))) for v in x])
    ok = want > np.finfo(dtype).tiny / np.finfo(dtype).eps
    assert (np.abs(got[ok] - want[ok]) / want[ok]).max() <= 4 * np.finfo(dtype).eps
    special = np.array([np.inf, -np.inf, 0.0, -0.0, np.nan], dtype)
    e = numeric._neg_abs_exp(special)
    out = numeric._sigmoid_pair(e, 1 + e)
    assert out[0] == out[1] == 0 and out[2] == out[3] == 0.25 and np.isnan(out[4])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_exponential_helpers_match_the_whole_helpers(dtype: type) -> None:
    z0, z = _special_pairs(dtype)
    x = np.concatenate([z0, z])
    e = numeric._neg_abs_exp(x)
    assert np.array_equal(numeric._neg_abs_exp(-x), e, equal_nan=True)
    for got, want in [(numeric._sigmoid_of(x, e, 1 + e), numeric._sigmoid(x)),
                      (numeric._sigmoid_of(-x, e, 1 + e), numeric._sigmoid(-x)),
                      (numeric._softplus_of(x, e), numeric._softplus(x)),
                      (numeric._softplus_of(-x, e), numeric._softplus(-x))]:
        assert got.dtype == dtype
        assert np.array_equal(got, want, equal_nan=True)
        assert np.array_equal(np.signbit(got), np.signbit(want))
