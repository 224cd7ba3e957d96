"""The runtime's activation table: the symbolic routines, and the multiplier's secant fast path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mpmath
import numpy as np
import pytest

import pbxc

ACTS = ["tanh", "gelu", "silu", "softplus", "elu", "sigmoid", "relu", "leaky_relu", "mish"]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fast_path_meets_the_bar_against_mpmath(write_model: Callable[..., Path], act: str,
                                                 dtype: str) -> None:
    model = pbxc.load(write_model(f"model a\ninput x: {dtype}[64]\noutput y = {act}(x)", {}))
    table = model.activations
    rng = np.random.default_rng(0)
    z0 = rng.normal(size=(50, 64)) * 4
    # far pairs, near pairs (cancellation), equal pairs and a kink
    z = np.concatenate([z0[:20] + rng.normal(size=(20, 64)) * 3,
                        z0[20:40] * (1 + rng.normal(size=(20, 64)) * 1e-9),
                        z0[40:49], np.zeros((1, 64))]).astype(dtype)
    z0 = z0.astype(dtype)
    f0, f1 = table("y", z0), table("y", z)
    fast = table.multiplier("y", z0, z, f0, f1)
    full = table.multiplier("y", z0, z)
    assert fast.dtype == np.dtype(dtype) and fast.shape == z.shape
    # against 40-digit references on a sample of each regime
    from pbxc.symbolic import derive
    calc = derive(act)
    ref = calc.reference()
    bar = 1e-14 if dtype == "float64" else 1e-6
    with mpmath.workdps(40):
        for i, j in [(0, 0), (5, 7), (25, 3), (33, 60), (45, 11), (49, 2)]:
            want = float(ref.multiplier(float(z0[i, j]), float(z[i, j])))
            scale = 1e-8 * calc.slope_scale
            assert abs(fast[i, j] - want) <= bar * (abs(want) + scale), (i, j)
    # where the fast path ran, it agrees with the full routine to a few ulps; elsewhere exactly
    eps = np.finfo(dtype).eps
    gap = np.abs(fast - full) / (np.abs(full) + 1e-8 * calc.slope_scale)
    assert gap.max() <= 16 * eps


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("convention", ["owner", "left", "right"])
def test_relu_quotient_is_the_generic_multiplier_bit_for_bit(
        write_model: Callable[..., Path], dtype: str, convention: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import pbxc.runtime.model as model_module

    model = pbxc.load(write_model(f"model a\ninput x: {dtype}[64]\noutput y = relu(x)", {}),
                      convention=convention)
    table, dt = model.activations, np.dtype(dtype)
    rng = np.random.default_rng(2)
    z0, z = (rng.normal(size=(40, 64)).astype(dt) for _ in range(2))
    z[0], z[1], z0[1], z[2], z0[3] = z0[0], 0.0, 0.0, -0.0, -0.0   # z == z0, zeros of each sign
    z0[4] = z[4] + np.finfo(dt).tiny                                 # near pairs
    z[5] = z0[5] * (1 + np.finfo(dt).eps)
    z[6], z0[7] = (np.finfo(dt).tiny * rng.normal(size=(2, 64))).astype(dt)  # subnormal widths
    z0[8] = np.broadcast_to(z0[9], (64,))
    fast = table.multiplier("y", z0, z, table("y", z0), table("y", z))
    monkeypatch.setattr(model_module, "_RELU", None)   # the generic secant tests
    generic = table.multiplier("y", z0, z, table("y", z0), table("y", z))
    assert fast.dtype == dt and fast.tobytes() == generic.tobytes()
    assert (fast >= 0).all() and not np.signbit(fast).any()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("convention", ["owner", "left", "right", "mean"])
def test_relu_forward_and_mask_are_the_generated_routines_bit_for_bit(
        write_model: Callable[..., Path], dtype: str, convention: str) -> None:
    model = pbxc.load(write_model(f"model a\ninput x: {dtype}[64]\noutput y = relu(x)", {}),
                      convention=convention)
    table, dt = model.activations, np.dtype(dtype)
    routines = table.routines[table.keys["y"]]
    z = np.random.default_rng(3).normal(size=(8, 64)).astype(dt)
    z[0, :6] = [0.0, -0.0, np.inf, -np.inf, np.finfo(dt).tiny / 4, -np.finfo(dt).tiny / 4]
    for special in (None, np.nan):
        if special is not None:
            z[1, 0] = special          # a NaN: the branch-free forward hands over
        want = table._apply(routines["f"], z)
        got = table("y", z)
        assert got.dtype == dt and got.tobytes() == want.tobytes()
        df = table.derivative("y", z)
        slope = table.slope("y", z)
        if table.keys["y"] in table.binary_slopes:
            assert slope.dtype == bool
            np.testing.assert_array_equal(slope, df == 1)
        else:
            assert slope.tobytes() == df.tobytes()


def _masked_secant(table: object, name: str, z0: np.ndarray, z: np.ndarray, f0: np.ndarray,
                   f1: np.ndarray) -> np.ndarray:
    """The secant's trust tests as first written (one boolean mask per test, three mask
    indexings): the reference the single-mask form and its index gathers must equal."""
    fn = table.routines[table.keys[name]]["m"]  # type: ignore[attr-defined]
    floor = np.finfo(z.dtype).tiny / np.finfo(z.dtype).eps
    with np.errstate(all="ignore"):
        d, df = z - z0, f1 - f0
        out = np.asarray(df / d, dtype=z.dtype)
        rest = (np.abs(df) < (np.abs(f1) + np.abs(f0)) * 0.25) | (np.abs(df) <= floor)
        rest |= (np.abs(d) <= floor) | ~np.isfinite(out)
        out[rest] = fn(z0[rest], z[rest])
    return out


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("act", ["tanh", "gelu", "softplus"])
@pytest.mark.parametrize("layout", ["full", "shared row", "transposed"])
def test_secant_tests_and_gathers_are_the_masked_form_bit_for_bit(
        write_model: Callable[..., Path], dtype: str, act: str, layout: str) -> None:
    model = pbxc.load(write_model(f"model a\ninput x: {dtype}[64]\noutput y = {act}(x)", {}))
    table, dt = model.activations, np.dtype(dtype)
    rng = np.random.default_rng(5)
    z = (rng.normal(size=(48, 64)) * 3).astype(dt)
    row = (rng.normal(size=(1, 64)) * 3).astype(dt)
    z0 = (rng.normal(size=(48, 64)) * 3).astype(dt)
    tiny, eps = np.finfo(dt).tiny, np.finfo(dt).eps
    z[0] = z0[0]                                         # z == z0
    z[1] = z0[1] * (1 + eps * rng.integers(1, 9, 64))    # cancellation
    z[2, :8] = [np.nan, np.inf, -np.inf, 0.0, -0.0, tiny, -tiny / 4, 1e30]
    z[3] = (tiny * rng.normal(size=64)).astype(dt)       # subnormal widths against z0
    z[4] = z0[4] + tiny                                  # widths at the floor
    # f(z0) and f(z) both below the floor with opposite signs: no cancellation, but the
    # values have lost their precision (gelu's z/2 of a subnormal)
    z0[5, :16] = row[0, :16] = (tiny * rng.integers(1, 1000, 16) * eps).astype(dt)
    z[5, :16] = -(tiny * rng.integers(1, 1000, 16) * eps).astype(dt)
    # wide apart, but f below the floor at both (softplus far left): the floor test alone
    deep = -700.0 if dt == np.float64 else -72.0
    z0[6, 16:32] = row[0, 16:32] = deep
    z[6, 16:32] = (deep - rng.uniform(0.5, 5, 16)).astype(dt)
    if layout == "shared row":    # a default shared by the batch, as DFD hands it over
        z0 = np.broadcast_to(row, z.shape)
    if layout == "transposed":    # no C order anywhere: the plain mask path
        z, z0 = np.asfortranarray(z), np.asfortranarray(z0)
    f0, f1 = table("y", z0), table("y", z)
    if layout == "shared row":
        f0 = np.broadcast_to(table("y", row), z.shape)
    got = table.multiplier("y", z0, z, f0, f1)
    want = _masked_secant(table, "y", z0, z, f0, f1)
    assert got.dtype == dt and got.shape == z.shape
    assert np.array_equal(got, want, equal_nan=True)
    assert np.array_equal(np.signbit(got), np.signbit(want))


@pytest.mark.parametrize("shape_case", ["contiguous", "broadcast row", "broadcast scalar",
                                        "strided"])
def test_redo_gathers_the_entries_a_mask_selects(shape_case: str) -> None:
    from pbxc.runtime.model import _redo

    rng = np.random.default_rng(9)
    base = rng.normal(size=(6, 5, 7))
    z = rng.normal(size=(6, 5, 7))
    z0 = {"contiguous": base, "broadcast row": np.broadcast_to(base[:1], base.shape),
          "broadcast scalar": np.broadcast_to(np.float64(0.5), base.shape),
          "strided": rng.normal(size=(6, 5, 14))[..., ::2]}[shape_case]
    rest = rng.random(base.shape) < 0.3
    calls = []

    def fn(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        calls.append(len(a))
        return a * 3.0 - b

    got, want = np.zeros(base.shape), np.zeros(base.shape)
    _redo(got, rest, z0, z, fn)
    want[rest] = z0[rest] * 3.0 - z[rest]
    assert np.array_equal(got, want) and calls == [int(rest.sum())]
