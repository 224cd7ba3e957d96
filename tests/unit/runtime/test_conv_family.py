"""The convolution family (pbxc/codegen/kernels/conv.py) against independent references.

Each variant (conv1d/2d/3d, conv_transpose1d/2d/3d; stride, per-side padding, dilation,
groups, output_padding) is checked against a slow reference written as explicit loops over
the definition, and against torch (forward and gradient), in float64 and float32. The tiled
kernels are checked against the untiled ones, and the workspace of a large convolution is
measured with tracemalloc.
"""

from __future__ import annotations

import itertools
import tracemalloc
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbxc.codegen.kernels import conv as C

RNG = np.random.default_rng(7)

# (dims, in_ch, out_ch, size, kernel, stride, padding (begin, end) per axis, dilation, groups,
#  output_padding of the transposed variant)
CASES = [
    (1, 4, 6, (13,), (3,), (2,), ((2, 1),), (2,), 2, (1,)),
    (2, 4, 6, (9, 8), (3, 2), (2, 1), ((1, 0), (0, 2)), (1, 2), 2, (1, 0)),
    (2, 6, 6, (7, 7), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 6, (0, 0)),   # depthwise
    (3, 2, 4, (5, 6, 5), (3, 2, 2), (2, 1, 2), ((1, 0), (0, 1), (1, 1)), (1, 2, 1), 2,
     (1, 0, 0)),
]


@pytest.fixture
def small_workspace() -> Iterator[None]:
    previous = C.set_conv_workspace(C.conv_workspace())
    yield
    C.set_conv_workspace(previous)


def loops_conv(x: np.ndarray, w: np.ndarray, stride: tuple[int, ...],
               pads: tuple[tuple[int, int], ...], dilation: tuple[int, ...], groups: int
               ) -> np.ndarray:
    """y[n, o, r] = sum over c in o's group and k of w[o, c, k] x[n, c, r*s + k*d - begin]."""
    n, _c_in = x.shape[:2]
    c_out, cpg = w.shape[:2]
    kernel = w.shape[2:]
    out = tuple((s + b + e - d * (k - 1) - 1) // st + 1
                for s, (b, e), d, k, st in zip(x.shape[2:], pads, dilation, kernel, stride))
    y = np.zeros((n, c_out, *out), dtype=np.float64)
    opg = c_out // groups
    for b, o, *r in itertools.product(range(n), range(c_out), *map(range, out)):
        g = o // opg
        total = 0.0
        for c, *k in itertools.product(range(cpg), *map(range, kernel)):
            pos = [ri * st + ki * d - p[0] for ri, ki, st, d, p in zip(r, k, stride, dilation, pads)]
            if all(0 <= q < s for q, s in zip(pos, x.shape[2:])):
                total += w[(o, c, *k)] * x[(b, g * cpg + c, *pos)]
        y[(b, o, *r)] = total
    return y


def loops_conv_transpose(x: np.ndarray, w: np.ndarray, stride: tuple[int, ...],
                         pads: tuple[tuple[int, int], ...], output_padding: tuple[int, ...],
                         dilation: tuple[int, ...], groups: int) -> np.ndarray:
    """y[n, g*opg + o, i*s + k*d - begin] += x[n, c, i] w[c, o, k] (c in group g)."""
    n, c_in = x.shape[:2]
    opg = w.shape[1]
    kernel = w.shape[2:]
    out = tuple((s - 1) * st - b - e + d * (k - 1) + op + 1 for s, st, (b, e), d, k, op in
                zip(x.shape[2:], stride, pads, dilation, kernel, output_padding))
    y = np.zeros((n, opg * groups, *out), dtype=np.float64)
    cpg = c_in // groups
    for b, c, *i in itertools.product(range(n), range(c_in), *map(range, x.shape[2:])):
        g = c // cpg
        for o, *k in itertools.product(range(opg), *map(range, kernel)):
            pos = [ii * st + ki * d - p[0] for ii, ki, st, d, p in zip(i, k, stride, dilation, pads)]
            if all(0 <= q < s for q, s in zip(pos, out)):
                y[(b, g * opg + o, *pos)] += x[(b, c, *i)] * w[(c, o, *k)]
    return y


def _torch_pad(x: object, pads: tuple[tuple[int, int], ...]) -> object:
    import torch.nn.functional as F

    flat = [p for pair in reversed(pads) for p in pair]   # F.pad: last axis first
    return F.pad(x, flat)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}d-g{c[8]}")
def test_conv_matches_loops(case: tuple) -> None:
    _dims, cin, cout, size, kernel, stride, pads, dil, groups, _ = case
    x = RNG.normal(size=(2, cin, *size))
    w = RNG.normal(size=(cout, cin // groups, *kernel))
    expected = loops_conv(x, w, stride, pads, dil, groups)
    np.testing.assert_allclose(C.conv_nd(x, w, None, stride, pads, dil, groups), expected,
                               rtol=1e-12, atol=1e-12)
    # the adjoint: <conv(x), g> == <x, conv^T(g)>
    g = RNG.normal(size=expected.shape)
    back = C.conv_nd_transpose(g, w, size, stride, pads, dil, groups)
    assert np.vdot(expected, g) == pytest.approx(np.vdot(x, back), rel=1e-12)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}d-g{c[8]}")
def test_conv_transpose_matches_loops(case: tuple) -> None:
    dims, cin, cout, size, kernel, stride, pads, dil, groups, out_pad = case
    x = RNG.normal(size=(2, cin, *size))
    w = RNG.normal(size=(cin, cout // groups, *kernel))
    b = RNG.normal(size=cout)
    expected = loops_conv_transpose(x, w, stride, pads, out_pad, dil, groups)
    expected += b.reshape(1, -1, *(1,) * dims)
    got = C.conv_transpose_nd(x, w, b, stride, pads, out_pad, dil, groups)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}d-g{c[8]}")
def test_against_torch_forward_and_gradient(case: tuple, dtype: str) -> None:
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    dims, cin, cout, size, kernel, stride, pads, dil, groups, out_pad = case
    tol = 1e-12 if dtype == "float64" else 2e-5
    x = RNG.normal(size=(2, cin, *size)).astype(dtype)
    w = RNG.normal(size=(cout, cin // groups, *kernel)).astype(dtype)
    wt = RNG.normal(size=(cin, cout // groups, *kernel)).astype(dtype)
    bias = RNG.normal(size=cout).astype(dtype)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]

    xt = torch.tensor(x, requires_grad=True)   # per-side padding: pad first, as ONNX
    yt = conv(_torch_pad(xt, pads), torch.tensor(w), torch.tensor(bias), stride=stride,
              dilation=dil, groups=groups)
    y = C.conv_nd(x, w, bias, stride, pads, dil, groups)
    assert y.dtype == np.dtype(dtype)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=tol, atol=tol)
    g = RNG.normal(size=y.shape).astype(dtype)
    yt.backward(torch.tensor(g))
    back = C.conv_nd_transpose(g, w, size, stride, pads, dil, groups)
    assert back.dtype == np.dtype(dtype)
    np.testing.assert_allclose(back, xt.grad.numpy(), rtol=tol, atol=tol)

    sym = tuple(p[0] for p in pads)   # torch's ConvTranspose pads both sides alike
    xt = torch.tensor(x, requires_grad=True)
    yt = conv_t(xt, torch.tensor(wt), torch.tensor(bias), stride=stride, padding=sym,
                output_padding=out_pad, groups=groups, dilation=dil)
    y = C.conv_transpose_nd(x, wt, bias, stride, sym, out_pad, dil, groups)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=tol, atol=tol)
    g = RNG.normal(size=y.shape).astype(dtype)
    yt.backward(torch.tensor(g))
    back = C.conv_transpose_vjp(g[:, None], [x], y, None, {"weight": wt}, stride, sym, out_pad,
                                dil, groups)[0][:, 0]
    np.testing.assert_allclose(back, xt.grad.numpy(), rtol=tol, atol=tol)


def _magnitude(x: np.ndarray, w: np.ndarray, args: tuple) -> np.ndarray:
    return C.conv_nd(np.abs(x), np.abs(w), None, *args)


def test_tiled_kernels_agree_with_untiled(small_workspace: None) -> None:
    """Batch tiles: bit for bit (each output element is the same GEMM dot product). Row tiles
    (one sample over the limit): the forward bit for bit here; the transpose's col2im adds
    the offsets' contributions in another order, so within 1e-15 of the magnitude sum."""
    x = RNG.normal(size=(6, 8, 30, 30))
    w = RNG.normal(size=(16, 8, 3, 3))
    args = ((2, 1), ((1, 0), (1, 1)), (1, 2), 1)
    y0 = C.conv_nd(x, w, None, *args)
    g = RNG.normal(size=y0.shape)
    t0 = C.conv_nd_transpose(g, w, (30, 30), *args)
    per_sample = 8 * 15 * 28 * (8 * 9 + 2 * 16)
    C.set_conv_workspace(2 * per_sample)   # two samples a tile
    assert len(C._conv_tiles(6, 15, per_sample // 15)) == 3
    assert np.array_equal(C.conv_nd(x, w, None, *args), y0)
    assert np.array_equal(C.conv_nd_transpose(g, w, (30, 30), *args), t0)
    C.set_conv_workspace(per_sample // 4)   # a quarter of one sample's rows a tile
    assert len(C._conv_tiles(6, 15, per_sample // 15)) > 6
    y1 = C.conv_nd(x, w, None, *args)
    t1 = C.conv_nd_transpose(g, w, (30, 30), *args)
    assert np.abs(y1 - y0).max() <= 1e-15 * _magnitude(x, w, args).max()
    bound = C.conv_nd_transpose(np.abs(g), np.abs(w), (30, 30), *args)
    assert np.all(np.abs(t1 - t0) <= 1e-15 * bound + 1e-300)


def test_workspace_of_a_large_convolution_is_bounded(small_workspace: None) -> None:
    """Untiled, the columns of this convolution take 32*9*8*64*64*8 B = 75 MB; with a 4 MB
    limit the kernels' own allocations beyond their output stay within the limit."""
    x = RNG.normal(size=(8, 32, 64, 64))
    w = RNG.normal(size=(32, 32, 3, 3))
    limit = 4 << 20
    C.set_conv_workspace(limit)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        y = C.conv_nd(x, w, None, (1, 1), (1, 1), (1, 1), 1)
        forward_peak = tracemalloc.get_traced_memory()[1] - base - y.nbytes
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        back = C.conv_nd_transpose(y, w, (64, 64), (1, 1), (1, 1), (1, 1), 1)
        transpose_peak = tracemalloc.get_traced_memory()[1] - base - back.nbytes
    finally:
        tracemalloc.stop()
    assert 0 <= forward_peak <= limit * 1.05, forward_peak
    assert 0 <= transpose_peak <= limit * 1.05, transpose_peak
    untiled_cols = 32 * 9 * x.shape[0] * 64 * 64 * 8
    assert untiled_cols > 10 * limit


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}d-g{c[8]}")
def test_dense_matrix_scattered_from_the_weights(case: tuple) -> None:
    _dims, cin, cout, size, kernel, stride, pads, dil, groups, _ = case
    w = RNG.normal(size=(cout, cin // groups, *kernel))
    x = RNG.normal(size=(1, cin, *size))
    dense = C.conv_dense_matrix(w, size, stride, pads, dil, groups)
    y = C.conv_nd(x, w, None, stride, pads, dil, groups)
    np.testing.assert_allclose(dense @ x.ravel(), y.ravel(), rtol=1e-12, atol=1e-12)


def test_workspace_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="at least 1 byte"):
        C.set_conv_workspace(0)


@st.composite
def conv_configs(draw: st.DrawFn) -> dict:
    dims = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    axis = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 2),
                     st.integers(0, 3), st.integers(0, 3))   # kernel, stride, dilation, pads
    axes = [draw(axis) for _ in range(dims)]
    sizes = [draw(st.integers(max(1, (k - 1) * d + 1 - b - e), 7)) for k, _, d, b, e in axes]
    out_pad = [draw(st.integers(0, max(s, d) - 1)) for _, s, d, _, _ in axes]
    return {"dims": dims, "groups": groups, "cin": groups * draw(st.integers(1, 2)),
            "cout": groups * draw(st.integers(1, 2)), "size": tuple(sizes),
            "kernel": tuple(a[0] for a in axes), "stride": tuple(a[1] for a in axes),
            "dilation": tuple(a[2] for a in axes), "pads": tuple((a[3], a[4]) for a in axes),
            "out_pad": tuple(out_pad)}


@settings(max_examples=25, deadline=None)
@given(conv_configs())
def test_random_configurations_match_torch(cfg: dict) -> None:
    """Any stride/padding/dilation/groups/output_padding, padding wider than the kernel
    included: the forward, its adjoint and the transposed convolution against torch."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    d, g = cfg["dims"], cfg["groups"]
    x = rng.normal(size=(2, cfg["cin"], *cfg["size"]))
    w = rng.normal(size=(cfg["cout"], cfg["cin"] // g, *cfg["kernel"]))
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    xt = torch.tensor(x, requires_grad=True)
    yt = conv(_torch_pad(xt, cfg["pads"]), torch.tensor(w), stride=cfg["stride"],
              dilation=cfg["dilation"], groups=g)
    y = C.conv_nd(x, w, None, cfg["stride"], cfg["pads"], cfg["dilation"], g)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    cot = rng.normal(size=y.shape)
    yt.backward(torch.tensor(cot))
    back = C.conv_nd_transpose(cot, w, cfg["size"], cfg["stride"], cfg["pads"],
                               cfg["dilation"], g)
    np.testing.assert_allclose(back, xt.grad.numpy(), rtol=1e-12, atol=1e-12)
    # the transposed convolution, with torch's symmetric padding (begin of each axis)
    sym = tuple(min(b, (k - 1) * dl // 2) for (b, _), k, dl in
                zip(cfg["pads"], cfg["kernel"], cfg["dilation"]))
    conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[d - 1]
    wt = rng.normal(size=(cfg["cin"], cfg["cout"] // g, *cfg["kernel"]))
    yt = conv_t(torch.tensor(x), torch.tensor(wt), stride=cfg["stride"], padding=sym,
                output_padding=cfg["out_pad"], groups=g, dilation=cfg["dilation"])
    got = C.conv_transpose_nd(x, wt, None, cfg["stride"], sym, cfg["out_pad"],
                              cfg["dilation"], g)
    np.testing.assert_allclose(got, yt.numpy(), rtol=1e-12, atol=1e-12)


# groups = 1 variants meeting the per-sample gate (positions a multiple of 16, M*N*K >= 2^21),
# with pointwise and strided 1x1 kernels (ResNet's downsample) and a padded 7x7 stride-2 stem
DIRECT_CASES = [
    (1, 16, 96, (1025,), (3,), (2,), ((2, 1),), (2,)),
    (2, 8, 96, (33, 32), (3, 2), (2, 1), ((1, 0), (0, 2)), (1, 2)),
    (2, 3, 64, (64, 64), (7, 7), (2, 2), ((3, 3), (3, 3)), (1, 1)),
    (2, 16, 32, (32, 32), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    (2, 32, 64, (32, 32), (1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1)),
    (2, 32, 64, (64, 63), (1, 1), (2, 2), ((0, 0), (0, 0)), (1, 1)),
    (3, 8, 32, (8, 16, 17), (3, 2, 2), (1, 1, 1), ((1, 1), (0, 1), (1, 0)), (1, 1, 2)),
]


@pytest.fixture
def direct_threshold() -> Iterator[list[int]]:
    previous = C.DIRECT_MIN_POSITIONS[0]
    yield C.DIRECT_MIN_POSITIONS
    C.DIRECT_MIN_POSITIONS[0] = previous


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", DIRECT_CASES, ids=lambda c: f"{c[0]}d-k{c[4]}-s{c[5]}")
def test_per_sample_gemms_agree_bit_for_bit(case: tuple, dtype: type,
                                            direct_threshold: list[int]) -> None:
    """The per-sample path (columns of one sample, GEMM into y[b]; for the transpose the
    cotangent read as it lies, col2im per sample) against the batched one (one GEMM over the
    tile's samples): where the gate admits it, every output element is the same dot product
    in the same order and col2im adds the offsets in the same order: bit for bit."""
    _dims, cin, cout, size, kernel, stride, pads, dil = case
    x = RNG.normal(size=(3, cin, *size)).astype(dtype)
    w = RNG.normal(size=(cout, cin, *kernel)).astype(dtype)
    bias = RNG.normal(size=cout).astype(dtype)
    args = (stride, pads, dil, 1)
    depth = cin * int(np.prod(kernel))
    direct_threshold[0] = 10 ** 9   # batched
    y0 = C.conv_nd(x, w, bias, *args)
    g = RNG.normal(size=y0.shape).astype(dtype)
    t0 = C.conv_nd_transpose(g, w, size, *args)
    direct_threshold[0] = 256   # per sample
    positions = int(np.prod(y0.shape[2:]))
    assert C._per_sample_gemms(cout, depth, positions)
    assert C._per_sample_gemms(depth, cout, positions)
    y1 = C.conv_nd(x, w, bias, *args)
    t1 = C.conv_nd_transpose(g, w, size, *args)
    assert y1.dtype == t1.dtype == dtype
    assert np.array_equal(y0, y1)
    assert np.array_equal(t0, t1)


def test_per_sample_gate() -> None:
    """Ragged positions and small GEMMs keep the batched path (their BLAS kernels may round
    differently from the batched GEMM's)."""
    assert C._per_sample_gemms(64, 576, 3136)
    assert not C._per_sample_gemms(512, 4608, 49)        # 7x7: the batched GEMM is faster
    assert not C._per_sample_gemms(64, 147, 260)         # ragged
    assert not C._per_sample_gemms(4, 100, 1024)         # small


def test_im2col_zeroes_every_position_no_input_reaches() -> None:
    """im2col writes into a reused buffer without zero-filling it first: a buffer full of
    NaN gives the same columns as a fresh zeroed one (padding, stride and dilation leave
    unwritten borders on every side; one offset reads nothing at all)."""
    x = RNG.normal(size=(2, 3, 5, 6))
    kernel, stride, pads, dil = (3, 4), (2, 1), ((2, 3), (4, 1)), (2, 2)
    out = tuple(C.conv_out_size(s, k, st, p, d)
                for s, k, st, p, d in zip(x.shape[2:], kernel, stride, pads, dil))
    for sample_major in (False, True):
        fresh = C.im2col_nd(x, kernel, stride, pads, dil, out, sample_major=sample_major)
        work = np.full(fresh.size + 5, np.nan)
        reused = C.im2col_nd(x, kernel, stride, pads, dil, out, sample_major=sample_major,
                             work=work)
        assert np.shares_memory(reused, work)
        assert not np.isnan(reused).any()
        assert np.array_equal(reused, fresh)
        # the reference: explicit zero padding, then a strided read per offset
        xp = np.pad(x, ((0, 0), (0, 0), *pads))
        for k0, k1 in itertools.product(range(kernel[0]), range(kernel[1])):
            ref = xp[:, :, k0 * dil[0]::stride[0], k1 * dil[1]::stride[1]][:, :, :out[0], :out[1]]
            got = fresh[:, :, k0, k1] if sample_major else fresh[:, k0, k1].swapaxes(0, 1)
            assert np.array_equal(got, ref)
