"""The fused elementwise kernels (numba, the ``fast`` extra) agree with the plain NumPy
reference: every elementwise output bit for bit (LRP's epsilon step, x c, relu, DFD's secant
multipliers), per-sample sums (float64 accumulation) within a few units of float64 rounding
of an exact (math.fsum) reference, float32 and float64, kernels and whole passes."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from pbxc.codegen import fused_kernels
from pbxc.codegen import numpy_kernels as K

pytest.importorskip("numba")
FUSED = fused_kernels.FusedKernels()


@pytest.fixture(autouse=True)
def _small_arrays_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' arrays are small: take the fused loops whatever the size."""
    monkeypatch.setattr(fused_kernels, "MIN_ELEMENTS", 0)


def test_small_arrays_take_the_plain_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused_kernels, "MIN_ELEMENTS", 1 << 16)
    a = np.ones((2, 1 << 14))
    assert FUSED.sums(a) is None and FUSED.relu(a) is None
    assert FUSED.epsilon_step(a, a, 1e-6, None) is None
    big = np.ones((2, 1 << 15))
    assert FUSED.sums(big) is not None and FUSED.relu(big) is not None


def _edgy(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Normal values with exact zeros, tiny and huge magnitudes mixed in."""
    a = rng.normal(size=shape)
    flat = a.reshape(-1)
    picks = rng.integers(0, flat.size, size=flat.size // 5)
    flat[picks[0::4]] = 0.0
    flat[picks[1::4]] *= 1e-30
    flat[picks[2::4]] *= 1e30
    flat[picks[3::4]] = -0.0
    return a.astype(dtype)


def _exact_sums(terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: the correctly rounded sum of float64 terms, and the sum of |terms|."""
    rows = terms.reshape(len(terms), -1).astype(np.float64)
    return (np.array([math.fsum(row) for row in rows]),
            np.array([math.fsum(np.abs(row)) for row in rows]))


def _assert_sum(got: np.ndarray, terms: np.ndarray, dtype: str) -> None:
    """float64: within 1e-15 of sum |terms| (relative); float32: the float64 sum rounded
    once to float32 (half an ulp of the result), plus the float32 terms' own error."""
    exact, size = _exact_sums(terms)
    assert got.dtype == np.dtype(dtype)
    if dtype == "float64":
        assert np.all(np.abs(got - exact) <= 1e-15 * size), (got, exact)
    else:
        tol = np.abs(exact) * np.finfo(np.float32).eps / 2 + 1e-15 * size
        assert np.all(np.abs(got.astype(np.float64) - exact) <= tol * 1.0001), (got, exact)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("epsilon", [1e-6, 0.25])
@pytest.mark.parametrize("bias", ["none", "channel", "full"])
def test_the_fused_epsilon_step_is_the_reference(dtype: str, epsilon: float, bias: str) -> None:
    rng = np.random.default_rng(0)
    r, z = _edgy(rng, (4, 3, 5, 6), dtype), _edgy(rng, (4, 3, 5, 6), dtype)
    b = {"none": None, "channel": K.channel_view(rng.normal(size=3).astype(dtype), 3),
         "full": rng.normal(size=z.shape).astype(dtype)}[bias]
    got = FUSED.epsilon_step(r, z, epsilon, b)
    assert got is not None
    s, stab, share = got
    with np.errstate(all="ignore"):
        s_ref = K.lrp_divide(r, K.lrp_stabilise(z, epsilon, "sign"), epsilon, "sign")
        np.testing.assert_array_equal(s, s_ref)
        assert s.dtype == np.dtype(dtype)
        _assert_sum(stab, r - s_ref * z, dtype)
        if b is not None:
            _assert_sum(share, s_ref.astype(np.float64) * np.broadcast_to(b, z.shape), dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_fused_product_and_sums_are_the_reference(dtype: str) -> None:
    rng = np.random.default_rng(4)
    x, c = _edgy(rng, (3, 4, 7), dtype), rng.normal(size=(3, 4, 7)).astype(dtype)
    with np.errstate(all="ignore"):
        out = FUSED.product_sums(x, c)
        assert out is not None
        np.testing.assert_array_equal(out, x * c)
        noted = FUSED.sums(out)   # noted by the product, read once
        assert noted is not None and id(out) not in FUSED._noted
        again = FUSED.sums(out)   # computed from the array
        assert again is not None
    for total, size in (noted, again):
        _assert_sum(total, x * c, dtype)
        _assert_sum(size, np.abs(x * c), dtype)
    assert FUSED.sums(np.asfortranarray(out)) is None   # not C-contiguous: the caller's path


def test_fused_relu_is_the_plain_one() -> None:
    from pbxc.runtime.model import _relu

    rng = np.random.default_rng(5)
    for dtype in ("float32", "float64"):
        z = _edgy(rng, (5, 40), dtype)
        got = FUSED.relu(z)
        assert got is not None
        np.testing.assert_array_equal(got.view(f"u{z.itemsize}"), _relu(z).view(f"u{z.itemsize}"))
        z2 = z.copy()
        z2[2, 3] = np.nan   # the routine's case: both hand over
        with np.errstate(invalid="ignore"):
            assert FUSED.relu(z2) is None and _relu(z2) is None
        z2[2, 3] = -np.inf   # +0.0, as the routine's np.where(z > 0, z, 0.0)
        got, want = FUSED.relu(z2), _relu(z2)
        assert got is not None and want is not None and got[2, 3] == 0
        np.testing.assert_array_equal(got.view(f"u{z.itemsize}"), want.view(f"u{z.itemsize}"))
    z3 = np.array([[np.inf, 2.0, -1.0]])
    np.testing.assert_array_equal(FUSED.relu(z3), _relu(z3))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_whole_rule_step_is_the_reference(dtype: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 7)).astype(dtype)
    p = {"weight": rng.normal(size=(5, 7)).astype(dtype), "bias": rng.normal(size=5).astype(dtype)}
    z = K.linear_forward([x], p)
    r = rng.normal(size=(3, 5)).astype(dtype)
    for groups, z_out in (((1.0, K.UNMODIFIED),), z), \
            (((1.0, ((1, ("pos", None), ("pos", None), ("pos", None)),)),), None):
        plain = K.lrp_rule_step("linear", r, [x], p, groups, 1e-6, "sign", z_out)
        fused = K.lrp_rule_step("linear", r, [x], p, groups, 1e-6, "sign", z_out, None, FUSED)
        np.testing.assert_array_equal(plain[0][0], fused[0][0])
        np.testing.assert_allclose(plain[1], fused[1], rtol=1e-5 if dtype == "float32" else 1e-13)
        np.testing.assert_allclose(plain[2], fused[2], rtol=1e-3 if dtype == "float32" else 1e-9,
                                   atol=1e-6 if dtype == "float32" else 1e-15)
        assert fused[1].dtype == fused[2].dtype == np.dtype(dtype)
        FUSED.forget()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_fused_secant_is_the_reference(dtype: str, tmp_path: Any) -> None:
    import pbxc

    (tmp_path / "m.pbx").write_text(
        "model m\ninput x: float64[4]\nh = tanh(x)\ng = softplus(h)\noutput y = relu(g)\n")
    model = pbxc.load(tmp_path / "m.pbx", dtype=dtype)
    table = model.activations
    assert table.fused is not None
    plain = type(table)(**{**table.__dict__, "fused": None})
    rng = np.random.default_rng(2)
    z = _edgy(rng, (6, 50), dtype)
    z0 = np.where(rng.random((6, 50)) < 0.3, z, _edgy(rng, (6, 50), dtype)).astype(dtype)
    z0[:, :5] = z[:, :5] * (1 + np.finfo(dtype).eps)   # secants that cancel
    z[0, 7], z0[1, 9] = np.inf, -np.inf
    for name in ("h", "g", "y"):
        with np.errstate(all="ignore"):
            f0, f1 = table(name, z0), table(name, z)
            got = table.multiplier(name, z0, z, f0, f1)
            want = plain.multiplier(name, z0, z, f0, f1)
        np.testing.assert_array_equal(got.view(f"u{z.itemsize}"), want.view(f"u{z.itemsize}"))
    shared = np.broadcast_to(z0[:1], z.shape)   # a baseline row shared by the batch
    with np.errstate(all="ignore"):
        f0 = np.broadcast_to(table("h", z0[:1]), z.shape)
        np.testing.assert_array_equal(table.multiplier("h", shared, z, f0, table("h", z)),
                                      plain.multiplier("h", shared, z, f0, table("h", z)))


def test_the_switch_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fused_kernels.FUSED_ENV, raising=False)
    auto = fused_kernels.available()   # on by default where numba is installed: large arrays
    assert auto is not None and auto.min_elements == fused_kernels.AUTO_MIN_ELEMENTS
    monkeypatch.setenv(fused_kernels.FUSED_ENV, "1")
    every = fused_kernels.available()
    assert every is not None and every.min_elements is None   # MIN_ELEMENTS, read per call
    monkeypatch.setenv(fused_kernels.FUSED_ENV, "0")
    assert fused_kernels.available() is None
    monkeypatch.setenv(fused_kernels.FUSED_ENV, "fast")
    with pytest.warns(UserWarning, match="not 0, 1 or auto"):
        assert fused_kernels.available() is auto


def test_by_default_only_large_arrays_take_the_loops() -> None:
    auto = fused_kernels.FusedKernels(fused_kernels.AUTO_MIN_ELEMENTS)
    below = np.ones((4, fused_kernels.AUTO_MIN_ELEMENTS // 4 - 1))
    assert auto.sums(below) is None and auto.relu(below.reshape(-1)) is None
    assert auto.epsilon_step(below, below, 1e-6, None) is None
    at = np.ones((4, fused_kernels.AUTO_MIN_ELEMENTS // 4))
    total, size = auto.sums(at)  # type: ignore[misc]
    assert np.array_equal(total, at.sum(axis=1)) and np.array_equal(size, total)


@pytest.mark.parametrize("setting, started", [(None, "False"), ("1", "True")])
def test_a_small_call_starts_numba_only_when_asked(tmp_path: Any, setting: str | None,
                                                   started: str) -> None:
    """The default setting keeps numba's start (about 0.3 s) off the first call of a model
    whose arrays are under AUTO_MIN_ELEMENTS (here 72000-element arrays, which ``1`` takes)."""
    path = _tiny_model(tmp_path)
    code = ("import sys, numpy as np, pbxc; "
            f"m = pbxc.load({str(path)!r}); x = np.ones((1000, 2, 6, 6)); "
            "m.lrp(x, composite='epsilon'); m.dfd(x); print('numba' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != fused_kernels.FUSED_ENV}
    if setting is not None:
        env[fused_kernels.FUSED_ENV] = setting
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == started


def test_no_writable_cache_just_compiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """numba refuses ``cache=True`` when no cache directory is writable: compile in memory."""
    import numba

    real = numba.njit

    def refusing(*args: Any, **kw: Any) -> Any:
        if kw.get("cache"):
            raise RuntimeError("cannot cache function: no locator available")
        return real(*args, **kw)

    monkeypatch.setattr(numba, "njit", refusing)
    kernels = fused_kernels.FusedKernels()
    assert kernels.ready()
    a = np.arange(6.0).reshape(2, 3)
    got = kernels.sums(a)
    assert got is not None
    np.testing.assert_array_equal(got[0], [3.0, 12.0])


def test_a_broken_numba_leaves_the_plain_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "numba", None)   # import numba raises ImportError
    kernels = fused_kernels.FusedKernels()
    with pytest.warns(RuntimeWarning, match="numba does not import"):
        assert not kernels.ready()
    assert kernels.sums(np.ones((2, 3))) is None


def test_an_unwritable_numba_cache_dir_still_runs(tmp_path: Any) -> None:
    """A fresh process with NUMBA_CACHE_DIR on a file (not a directory) still computes."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    code = ("import numpy as np; from pbxc.codegen import fused_kernels as F;"
            "k = F.FusedKernels(); print(k.sums(np.ones((2, 1 << 16)))[0])")
    env = {**__import__("os").environ, "NUMBA_CACHE_DIR": str(blocker / "cache")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "[65536. 65536.]" in done.stdout


def _tiny_model(tmp_path: Any) -> Any:
    (tmp_path / "m.pbx").write_text('model m\nweights "m.npz"\ninput x: float64[2, 6, 6]\n'
                                    "c = relu(conv2d(x, @c, padding=1))\n"
                                    "h = relu(linear(flatten(c), @a))\n"
                                    "output y = linear(h, @b)\n")
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "m.npz", **{"c.weight": rng.normal(size=(4, 2, 3, 3)),
                                    "c.bias": rng.normal(size=4),
                                    "a.weight": rng.normal(size=(8, 144)) / 10,
                                    "a.bias": rng.normal(size=8),
                                    "b.weight": rng.normal(size=(3, 8)),
                                    "b.bias": rng.normal(size=3)})
    return tmp_path / "m.pbx"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_lrp_and_dfd_passes_are_the_same_fused(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                               dtype: str) -> None:
    import pbxc

    path = _tiny_model(tmp_path)
    x = np.random.default_rng(6).normal(size=(5, 2, 6, 6)).astype(dtype)
    monkeypatch.setenv(fused_kernels.FUSED_ENV, "1")   # every array (the fixture: any size)
    fused = pbxc.load(path, dtype=dtype)
    monkeypatch.setenv(fused_kernels.FUSED_ENV, "0")
    plain = pbxc.load(path, dtype=dtype)
    assert fused.fused is not None and plain.fused is None
    for composite in ("epsilon", "epsilon-plus"):
        a, b = plain.lrp(x, composite=composite), fused.lrp(x, composite=composite)
        np.testing.assert_array_equal(a.relevance["x"], b.relevance["x"])
        assert a.relevance["x"].dtype == b.relevance["x"].dtype == np.dtype(dtype)
        for name, layer in a.ledger.layers.items():
            other = b.ledger.layers[name]
            for field in ("relevance_out", "relevance_in", "bias", "stabiliser"):
                want, got = getattr(layer, field), getattr(other, field)
                assert got.dtype == np.dtype(dtype)
                scale = np.abs(layer.magnitude) if layer.magnitude is not None else 1.0
                # float32: NumPy's float32 pairwise sums against float64 accumulation
                np.testing.assert_array_less(np.abs(got - want), 1e-5 * scale + 1e-30
                                             if dtype == "float32" else 1e-13 * scale + 1e-300)
        np.testing.assert_allclose(b.ledger.conservation_error, 0, atol=1e-4 if dtype ==
                                   "float32" else 1e-12)
        assert np.all(np.abs(a.ledger.conservation_error - b.ledger.conservation_error) <= 1e-3)
    da, db = plain.dfd(x), fused.dfd(x)
    np.testing.assert_array_equal(da.attributions["x"], db.attributions["x"])
    for name, m in da.multipliers.items():
        np.testing.assert_array_equal(m, db.multipliers[name])
    np.testing.assert_array_equal(da.delta, db.delta)
    assert np.all(db.summation_error <= (1e-12 if dtype == "float64" else 1e-4))
