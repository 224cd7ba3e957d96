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
