"""The fast paths taken for speed compute exactly what their plain forms compute."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from pbxc.codegen import numpy_kernels as K
from pbxc.symbolic.numeric import _sigmoid


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("placement", ["zennit", "slides"])
def test_stabiliser_adds_exactly_signed_epsilon(dtype: type, placement: str) -> None:
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.standard_normal(997), [0.0, -0.0, 1e-30, -1e-30]]).astype(dtype)
    eps = 0.1
    got = K.lrp_stabilise(z, eps, placement)
    e = dtype(eps)
    if placement == "slides":
        want = z + e
    else:   # sign(0) = +1, also for -0.0 (z >= 0 holds for it)
        want = np.array([zi + (e if zi >= 0 else -e) for zi in z], dtype=dtype)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)


def test_division_guards_zero_only_where_it_can_occur() -> None:
    r = np.array([[1.0, 2.0, 3.0]])
    z = np.array([[0.0, 2.0, -3.0]])
    assert np.array_equal(K.lrp_divide(r, K.lrp_stabilise(z, 0.0, "zennit"), 0.0, "zennit"),
                          [[0.0, 1.0, -1.0]])
    slides = K.lrp_stabilise(np.array([[-0.5, 1.5]]), 0.5, "slides")
    assert np.array_equal(K.lrp_divide(np.ones((1, 2)), slides, 0.5, "slides"), [[0.0, 0.5]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_single_division_against_mpmath(dtype: type) -> None:
    mpmath = pytest.importorskip("mpmath")
    x = np.linspace(-90, 90, 2001).astype(dtype)
    got = _sigmoid(x)
    want = np.array([float(1 / (1 + mpmath.exp(-mpmath.mpf(float(v))))) for v in x])
    assert got.dtype == dtype
    ulp = np.spacing(want.astype(dtype)).astype(np.float64)
    assert np.all(np.abs(got - want) <= 3 * ulp)   # exp's own error, 2.1 ulp at worst here
    e = np.exp(-np.abs(x))   # bit for bit the two-division form it replaced
    np.testing.assert_array_equal(got, np.where(x >= 0, 1 / (1 + e), e / (1 + e)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_branch_free_sigmoid_equals_the_where_form_on_every_special_value(dtype: type) -> None:
    rng = np.random.default_rng(1)
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 88.7, -88.7, 103.0, -103.0,
               745.0, -745.0, 1e300, -1e300]
    with np.errstate(all="ignore"):
        x = np.concatenate([rng.standard_normal(4096) * 30, special]).astype(dtype)
        e = np.exp(-np.abs(x))
        want = np.where(x >= 0, 1, e) / (1 + e)
        got = _sigmoid(x)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)   # NaN where NaN, bit for bit elsewhere
    assert _sigmoid(np.float64(-0.0)) == 0.5 and np.isnan(_sigmoid(np.float64("nan")))


def test_finish_copies_only_what_it_must() -> None:
    from pbxc.symbolic.numeric import _finish

    z = np.arange(6.0).reshape(2, 3)
    fresh = z * 2.0
    assert _finish(fresh, z) is fresh                      # already the routine's array
    same = _finish(z, z)
    assert same is not z and np.array_equal(same, z)       # never the caller's own input
    view = _finish(fresh[:, :], z)
    assert view is not fresh and view.base is None          # a view is copied
    widened = _finish(z.astype(np.float32), z)
    assert widened.dtype == np.float64                     # the arguments' type
    spread = _finish(np.float64(1.5), z)
    assert spread.shape == (2, 3) and spread.flags.writeable


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("setting, expect", [("1", "True"), ("0", "False")])
def test_allocator_tuning_and_its_opt_out(setting: str, expect: str) -> None:
    code = "from pbxc.runtime.allocator import tune_allocator; print(tune_allocator())"
    env = {**os.environ, "PBXC_MALLOC_TUNING": setting}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == expect


@pytest.mark.parametrize("in_hw", [(8, 8), (5, 7)])   # 5x7: a row and a column no window covers
def test_tiled_pool_transposes_match_the_window_scatter(in_hw: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    kernel = stride = (2, 2)
    x = rng.standard_normal((3, 4, *in_hw))
    _, index = K.maxpool2d(x, kernel, stride, (0, 0))
    g = rng.standard_normal((3, 5, 4, *index.shape[-2:]))   # a tangent axis beside the batch
    index = index[:, None]
    kw = kernel[1]
    want_max = K._scatter_windows(lambda p, q: np.where(index == p * kw + q, g, 0), in_hw,
                                  kernel, stride, (0, 0), g.dtype, g.shape[:-2])
    np.testing.assert_array_equal(K.maxpool2d_transpose(g, index, in_hw, kernel, stride, (0, 0)),
                                  want_max)
    share = g / 4
    want_avg = K._scatter_windows(lambda p, q: share, in_hw, kernel, stride, (0, 0), g.dtype,
                                  g.shape[:-2])
    np.testing.assert_array_equal(K.avgpool2d_transpose(g, in_hw, kernel, stride, (0, 0), True),
                                  want_avg)


def test_division_guards_an_epsilon_that_underflows_in_float32() -> None:
    r = np.ones((1, 2), dtype=np.float32)
    zs = K.lrp_stabilise(np.zeros((1, 2), dtype=np.float32), 1e-50, "zennit")   # eps -> 0
    assert np.array_equal(K.lrp_divide(r, zs, 1e-50, "zennit"), np.zeros((1, 2)))


def test_tiled_maxpool_transpose_keeps_a_non_finite_cotangent_at_its_winner() -> None:
    g = np.array([[[[np.inf]]]])
    index = np.array([[[[3]]]])
    got = K.maxpool2d_transpose(g, index, (2, 2), (2, 2), (2, 2), (0, 0))
    np.testing.assert_array_equal(got, [[[[0.0, 0.0], [0.0, np.inf]]]])


@pytest.mark.parametrize("in_hw", [(8, 8), (5, 7)])
def test_tiled_maxpool_tangents_match_the_window_gather(in_hw: tuple[int, int]) -> None:
    rng = np.random.default_rng(2)
    kernel = stride = (2, 2)
    x = rng.standard_normal((3, 4, *in_hw))
    _, local = K.maxpool2d(x, kernel, stride, (0, 0))
    t = rng.standard_normal((3, 5, 4, *in_hw))   # five tangent rows per sample
    got = K.maxpool2d_jvp([t], [x], None, local, {}, kernel, stride, (0, 0))
    want = np.stack([K.maxpool2d_gather(t[:, k], local, kernel, stride, (0, 0))
                     for k in range(5)], axis=1)
    np.testing.assert_array_equal(got, want)
    v = rng.standard_normal(want.shape)
    back = K.maxpool2d_vjp(v, [x], None, local, {}, kernel, stride, (0, 0))[0]
    assert back.shape == t.shape
    np.testing.assert_allclose(np.sum(back * t), np.sum(v * got), rtol=1e-12)   # adjoint


@pytest.mark.parametrize("in_hw", [(8, 8), (5, 7)])
@pytest.mark.parametrize("ties", [False, True])
def test_pools_match_the_window_reductions(in_hw: tuple[int, int], ties: bool) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 4, *in_hw))
    if ties:   # few distinct values: many windows with a tied maximum
        x = np.round(x)
    kernel = stride = (2, 2)
    win = K.windows2d(x, kernel, stride, (0, 0), pad_value=-np.inf)
    flat = win.reshape(*win.shape[:4], -1)
    values, index = K.maxpool2d(x, kernel, stride, (0, 0))
    np.testing.assert_array_equal(index, flat.argmax(axis=4))   # the first maximum wins
    np.testing.assert_array_equal(values, flat.max(axis=4))
    np.testing.assert_allclose(K.avgpool2d(x, kernel, stride, (0, 0), True),
                               flat.mean(axis=4), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("in_hw", [(8, 8), (5, 7)])
def test_tiled_lrp_maxpool_counts_the_same_ties(in_hw: tuple[int, int]) -> None:
    rng = np.random.default_rng(4)
    x = np.round(rng.standard_normal((3, 4, *in_hw)))   # many tied windows
    _, index = K.maxpool2d(x, (2, 2), (2, 2), (0, 0))
    relevance = rng.standard_normal(index.shape)
    relevance[0, 0] = 0.0   # windows without relevance are not reported
    win = K.windows2d(x, (2, 2), (2, 2), (0, 0), pad_value=-np.inf)
    flat = win.reshape(*win.shape[:4], -1)
    tied = (flat == flat.max(axis=4, keepdims=True)).sum(axis=4) > 1
    _, ties = K.lrp_maxpool(relevance, x, index, (2, 2), (2, 2), (0, 0))
    assert ties == int(np.count_nonzero(tied & (relevance != 0))) > 0


POOLS = [((3, 3), (2, 2), (1, 1)), ((2, 2), (2, 2), (0, 0)), ((3, 2), (1, 2), (1, 0)),
         ((3, 3), (1, 1), (1, 1)), ((3, 3), (2, 2), (2, 2))]


def _pool_input(rng: np.random.Generator, dtype: type, special: str) -> np.ndarray:
    x = rng.normal(size=(2, 3, 9, 11)).astype(dtype)
    x[0, 0, :3, :3] = 0.0            # tied maxima
    x[1, 1] = np.round(x[1, 1]) + 0.0   # many ties (+ 0.0: round gives -0.0 too)
    if special == "negzero":
        x[0, 1, :3, :3] = -0.0       # equal zeros of both signs: np.maximum may pick either
        x[0, 1, 1, 1] = 0.0
    elif special == "nan":
        x[1, 2, 4, 4] = np.nan
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("special", ["", "negzero", "nan"])
def test_offset_maxpool_is_the_window_argmax_bit_for_bit(dtype: type, pool: tuple,
                                                        special: str) -> None:
    x = _pool_input(np.random.default_rng(0), dtype, special)
    got, want = K.maxpool2d(x, *pool), K._maxpool2d_windows(x, *pool)
    assert got[0].dtype == dtype and got[1].dtype == want[1].dtype
    np.testing.assert_array_equal(got[1], want[1])
    assert got[0].tobytes() == want[0].tobytes()
    assert K._has_negative_zero(x) == (special == "negzero")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("shared", [False, True])
def test_offset_maxpool_dfd_is_the_window_form_bit_for_bit(dtype: type, pool: tuple,
                                                           shared: bool) -> None:
    rng = np.random.default_rng(1)
    x = _pool_input(rng, dtype, "")
    x0 = rng.normal(size=x.shape).astype(dtype)
    x0[:, :, :4, :4] = x[:, :, :4, :4]           # z == z0 entries: the 0/0 limit
    if shared:
        x0 = np.broadcast_to(x0[:1], x.shape)
    out = K.maxpool2d(x, *pool)[0].shape[2:]
    m = rng.normal(size=(2, 1, 3, *out)).astype(dtype)
    got = K.maxpool2d_dfd(m, [x], [x0], None, None, None, {}, *pool)[0]
    want = K._maxpool2d_dfd_windows(m, [x], [x0], None, None, None, {}, *pool)[0]
    assert got.dtype == dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_multiplier_quotient_is_the_where_form_bit_for_bit(dtype: type) -> None:
    rng = np.random.default_rng(4)
    d0, d = (rng.normal(size=(6, 50)).astype(dtype) for _ in range(2))
    d[0], d0[1], d[2], d0[2] = d0[0], 0.0, -0.0, 0.0          # equal, zeros of both signs
    d0[3, :10], d[3, :10] = -0.0, -0.0
    d[4] = d0[4] + np.finfo(dtype).tiny                        # near pairs
    d[5] = (np.finfo(dtype).tiny * rng.normal(size=50)).astype(dtype)
    got, want = K.relu_multiplier(d0, d), K._relu_multiplier_where(d0, d)
    assert got.dtype == dtype and got.tobytes() == want.tobytes()


@pytest.mark.parametrize("pool", [((3, 3), (2, 2), (1, 1)), ((3, 2), (1, 2), (1, 0))])
@pytest.mark.parametrize("ties", [False, True])
def test_maxpool_in_plane_blocks_matches_the_whole_array(pool: tuple, ties: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """maxpool2d and its window scatter run a block of planes at a time (cache): with blocks
    of one plane the values, indices and cotangent scatter are bit for bit the reference
    window argmax and _scatter_windows on the whole array; forward_local is forward + local."""
    kernel, stride, padding = pool
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 4, 9, 8))
    if ties:
        x = np.round(x)
    monkeypatch.setattr(K, "POOL_BLOCK_BYTES", 1)
    values, index = K.maxpool2d(x, kernel, stride, padding)
    want_values, want_index = K._maxpool2d_windows(x, kernel, stride, padding)
    np.testing.assert_array_equal(values, want_values)
    np.testing.assert_array_equal(index, want_index)
    both = K.maxpool2d_forward_local([x], {}, kernel, stride, padding)
    np.testing.assert_array_equal(both[0], K.maxpool2d_forward([x], {}, kernel, stride, padding))
    np.testing.assert_array_equal(both[1], K.maxpool2d_local([x], {}, kernel, stride, padding))
    g = rng.standard_normal(index.shape)
    g[0, 0, 0, 0] = -0.0
    kw = kernel[1]
    want = K._scatter_windows(lambda p, q: np.where(index == p * kw + q, g, 0), x.shape[2:],
                              kernel, stride, padding, g.dtype, g.shape[:-2])
    got = K.maxpool2d_transpose(g, index, x.shape[2:], kernel, stride, padding)
    assert got.shape == x.shape
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    np.testing.assert_array_equal(got, want)
    monkeypatch.setattr(K, "POOL_BLOCK_BYTES", 1 << 20)   # one block
    np.testing.assert_array_equal(K.maxpool2d_transpose(g, index, x.shape[2:], kernel, stride,
                                                        padding), want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("default", ["shared", "per-sample", "one-row"])
@pytest.mark.parametrize("block_bytes", [1, 4000, 5000, 10000, 1 << 30])
def test_maxpool_dfd_in_blocks_is_the_window_form_bit_for_bit(
        dtype: type, pool: tuple, default: str, block_bytes: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """maxpool2d_dfd a block of samples and channels at a time gives the window reference's
    bits: blocks of one plane; of two samples (the last block ragged); of 1, 2 or 4 channels
    over the whole batch (ragged too); one block. For two rows of multipliers (K = 2; a
    plane counts 9 * 11 * itemsize * K bytes) and defaults shared (broadcast), per sample or
    one row."""
    rng = np.random.default_rng(12)
    x = rng.normal(size=(3, 5, 9, 11)).astype(dtype)
    x[0, 0, :3, :3] = 0.0
    x[1, 1] = np.round(x[1, 1]) + 0.0
    x0 = rng.normal(size=x.shape).astype(dtype)
    x0[:, :, :4, :4] = x[:, :, :4, :4]          # z == z0: the 0/0 limit
    if default == "shared":
        x0 = np.broadcast_to(x0[:1], x.shape)
    elif default == "one-row":
        x0 = np.ascontiguousarray(x0[:1])
    out = K.maxpool2d(x, *pool)[0].shape[2:]
    m = rng.normal(size=(3, 2, 5, *out)).astype(dtype)
    want = K._maxpool2d_dfd_windows(m, [x], [np.broadcast_to(x0, x.shape)], None, None, None,
                                    {}, *pool)[0]
    monkeypatch.setattr(K, "POOL_BLOCK_BYTES", block_bytes)
    got = K.maxpool2d_dfd(m, [x], [x0], None, None, None, {}, *pool)[0]
    assert got.dtype == dtype and got.shape == want.shape == (3, 2, 5, 9, 11)
    assert got.tobytes() == np.ascontiguousarray(want).tobytes()


def test_maxpool_dfd_memory_is_bounded_by_its_blocks() -> None:
    """The offsets' slopes and shares live one block at a time: at ResNet-18's stem pool
    shape (8 samples, float64) the call allocates little beyond its result (measured with
    tracemalloc; the whole-array form took over six times its result)."""
    import tracemalloc

    rng = np.random.default_rng(13)
    x = rng.normal(size=(8, 16, 112, 112))
    x0 = np.broadcast_to(rng.normal(size=(1, 16, 112, 112)), x.shape)
    pool = ((3, 3), (2, 2), (1, 1))
    m = rng.normal(size=(8, 1, 16, 56, 56))
    tracemalloc.start()
    try:
        got = K.maxpool2d_dfd(m, [x], [x0], None, None, None, {}, *pool)[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.shape == (8, 1, 16, 112, 112)
    assert peak < got.nbytes + 16 * K.POOL_BLOCK_BYTES, (peak, got.nbytes)


def _window_ties(relevance: np.ndarray, x: np.ndarray, index: np.ndarray, pool: tuple) -> int:
    """lrp_maxpool's tie count on a copy of every window, against the value at the argmax
    (its former form, kept here as the reference)."""
    win = K.windows2d(x, *pool, pad_value=-np.inf)
    flat = win.reshape(*win.shape[:4], -1)
    equal = (flat == np.take_along_axis(flat, index[..., None], axis=4)).sum(axis=4)
    return int(np.count_nonzero((equal > 1) & (relevance != 0)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("special", ["", "negzero", "nan", "-inf"])
@pytest.mark.parametrize("block_bytes", [1, 1 << 20])
def test_lrp_maxpool_counts_the_window_forms_ties(dtype: type, pool: tuple, special: str,
                                                  block_bytes: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Ties counted offset by offset, a block of planes at a time (one plane, or all), equal
    the window copy's count, with ties of +-0, a NaN in a window and windows whose maximum
    is -inf (all of it, padding included, ties); the relevance routed is
    maxpool2d_transpose's."""
    monkeypatch.setattr(K, "POOL_BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(14)
    x = _pool_input(rng, dtype, "negzero" if special == "negzero" else "")
    if special == "nan":
        x[1, 2, 4, 4] = np.nan
        x[0, 0, 0, 0] = np.nan   # in a window at the padded corner
    elif special == "-inf":
        x[1, 0] = -np.inf
    _, index = K.maxpool2d(x, *pool)
    relevance = rng.normal(size=index.shape).astype(dtype)
    relevance[0, 1, :2] = 0.0    # windows without relevance are not reported
    routed, ties = K.lrp_maxpool(relevance, x, index, *pool)
    assert ties == _window_ties(relevance, x, index, pool)
    assert special == "nan" or ties > 0
    np.testing.assert_array_equal(routed, K.maxpool2d_transpose(relevance, index, x.shape[2:],
                                                                *pool))
