"""The NumPy reference forward pass of every op, against slow independent loops and mpmath."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import mpmath
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pbxc
from pbxc.ops import BUILTIN_ACTIVATIONS

RNG = np.random.default_rng(1234)


def naive_conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: tuple[int, int],
                 pad: tuple[int, int], dil: tuple[int, int], groups: int) -> np.ndarray:
    batch, _, h, wd = x.shape
    cout, cpg, kh, kw = w.shape
    oh = (h + 2 * pad[0] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * pad[1] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((batch, cout, oh, ow))
    opg = cout // groups
    for n, o, i, j in itertools.product(range(batch), range(cout), range(oh), range(ow)):
        g = o // opg
        acc = 0.0 if b is None else b[o]
        for c, p, q in itertools.product(range(cpg), range(kh), range(kw)):
            r = i * stride[0] - pad[0] + p * dil[0]
            s = j * stride[1] - pad[1] + q * dil[1]
            if 0 <= r < h and 0 <= s < wd:
                acc += x[n, g * cpg + c, r, s] * w[o, c, p, q]
        out[n, o, i, j] = acc
    return out


def naive_pool(x: np.ndarray, k: tuple[int, int], s: tuple[int, int], pad: tuple[int, int],
               kind: str, include_pad: bool = True) -> np.ndarray:
    batch, c, h, w = x.shape
    oh = (h + 2 * pad[0] - k[0]) // s[0] + 1
    ow = (w + 2 * pad[1] - k[1]) // s[1] + 1
    out = np.zeros((batch, c, oh, ow))
    for n, ch, i, j in itertools.product(range(batch), range(c), range(oh), range(ow)):
        vals = []
        for p, q in itertools.product(range(k[0]), range(k[1])):
            r, t = i * s[0] - pad[0] + p, j * s[1] - pad[1] + q
            inside = 0 <= r < h and 0 <= t < w
            if inside:
                vals.append(x[n, ch, r, t])
            elif kind == "avg" and include_pad:
                vals.append(0.0)
        out[n, ch, i, j] = max(vals) if kind == "max" else sum(vals) / len(vals)
    return out


def one_op_model(write_model: Callable[..., Path], shape: tuple[int, ...], call: str,
                 weights: dict[str, np.ndarray] | None = None) -> pbxc.Model:
    dims = ", ".join(map(str, shape))
    weights_line = 'weights "w.npz"' if weights else ""
    text = (f"model t\n{weights_line}\n"
            f"input x: float64[{dims}]\noutput y = {call}\n")
    return pbxc.load(write_model(text, weights))


@pytest.mark.parametrize(("stride", "pad", "dil", "groups"), [
    ((1, 1), (0, 0), (1, 1), 1), ((2, 1), (1, 2), (1, 1), 1), ((1, 2), (1, 1), (2, 1), 2),
    ((2, 2), (2, 0), (1, 2), 4),
])
def test_conv2d_matches_loops(write_model: Callable[..., Path], stride: tuple[int, int],
                              pad: tuple[int, int], dil: tuple[int, int], groups: int) -> None:
    x = RNG.normal(size=(2, 4, 7, 6))
    w = RNG.normal(size=(8, 4 // groups, 3, 2))
    b = RNG.normal(size=8)
    model = one_op_model(write_model, (4, 7, 6),
                         f"conv2d(x, @c, stride={stride}, padding={pad}, dilation={dil}, "
                         f"groups={groups})", {"c.weight": w, "c.bias": b})
    np.testing.assert_allclose(model.forward(x), naive_conv2d(x, w, b, stride, pad, dil, groups),
                               rtol=1e-12, atol=1e-12)


def test_conv1d_matches_loops(write_model: Callable[..., Path]) -> None:
    x = RNG.normal(size=(3, 2, 9))
    w = RNG.normal(size=(4, 1, 3))
    model = one_op_model(write_model, (2, 9), "conv1d(x, @c, stride=2, padding=1, dilation=2, "
                         "groups=2, bias=false)", {"c.weight": w})
    expected = naive_conv2d(x[:, :, None, :], w[:, :, None, :], None, (1, 2), (0, 1), (1, 2), 2)
    np.testing.assert_allclose(model.forward(x), expected[:, :, 0, :], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("kernel", "stride", "pad"), [
    ((2, 2), None, (0, 0)), ((3, 2), (1, 2), (1, 1)), ((3, 3), (2, 2), (1, 0))])
def test_pools_match_loops(write_model: Callable[..., Path], kernel: tuple[int, int],
                           stride: tuple[int, int] | None, pad: tuple[int, int]) -> None:
    x = RNG.normal(size=(2, 3, 7, 6))
    s = stride or kernel
    stride_arg = f", stride={stride}" if stride else ""
    for kind, op in (("max", "maxpool2d"), ("avg", "avgpool2d")):
        model = one_op_model(write_model, (3, 7, 6),
                             f"{op}(x, kernel={kernel}{stride_arg}, padding={pad})")
        np.testing.assert_allclose(model.forward(x), naive_pool(x, kernel, s, pad, kind),
                                   rtol=1e-12, atol=1e-13)
    model = one_op_model(write_model, (3, 7, 6), f"avgpool2d(x, kernel={kernel}{stride_arg}, "
                         f"padding={pad}, count_include_pad=false)")
    np.testing.assert_allclose(model.forward(x), naive_pool(x, kernel, s, pad, "avg", False),
                               rtol=1e-12, atol=1e-13)


def test_batchnorm_normalize_and_global_pool(write_model: Callable[..., Path]) -> None:
    x = RNG.normal(size=(2, 3, 4, 5))
    p = {"bn.weight": RNG.normal(size=3), "bn.bias": RNG.normal(size=3),
         "bn.running_mean": RNG.normal(size=3), "bn.running_var": RNG.random(3) + 0.1,
         "s.mean": RNG.normal(size=3), "s.std": RNG.random(3) + 0.5}
    model = one_op_model(write_model, (3, 4, 5),
                         "global_avgpool(normalize(batchnorm(x, @bn, eps=0.01), @s))", p)
    c = (slice(None), None, None)
    bn = (x - p["bn.running_mean"][c]) / np.sqrt(p["bn.running_var"][c] + 0.01) \
        * p["bn.weight"][c] + p["bn.bias"][c]
    norm = (bn - p["s.mean"][c]) / p["s.std"][c]
    np.testing.assert_allclose(model.forward(x), norm.mean(axis=(2, 3)), rtol=1e-12)


def test_softmax_family_concat_reshape(write_model: Callable[..., Path]) -> None:
    x = RNG.normal(size=(4, 2, 3)) * 50  # large logits: must not overflow
    model = one_op_model(write_model, (2, 3), "log_softmax(concat(x, softmax(x, axis=0), "
                         "axis=1), axis=-1)")
    e = np.exp(x - x.max(axis=1, keepdims=True))
    sm = e / e.sum(axis=1, keepdims=True)
    cat = np.concatenate([x, sm], axis=2)
    expected = cat - cat.max(axis=2, keepdims=True)
    expected -= np.log(np.exp(expected).sum(axis=2, keepdims=True))
    np.testing.assert_allclose(model.forward(x), expected, rtol=1e-12, atol=1e-12)
    flat = one_op_model(write_model, (2, 3), "reshape(flatten(x), [3, -1])")
    np.testing.assert_array_equal(flat.forward(x), x.reshape(4, 3, 2))


def test_shared_weights_and_residual(write_model: Callable[..., Path]) -> None:
    w = RNG.normal(size=(3, 3))
    model = one_op_model(write_model, (3,), "add(x, linear(tanh(linear(x, weight=@t, "
                         "bias=false)), weight=@t, bias=false))", {"t": w})
    x = RNG.normal(size=(5, 3))
    np.testing.assert_allclose(model.forward(x), x + np.tanh(x @ w.T) @ w.T, rtol=1e-13)


# ------------------------------------------------------------------ activations vs mpmath

def _mp_sigmoid(z: mpmath.mpf) -> mpmath.mpf:
    return 1 / (1 + mpmath.exp(-z))


def _mp_softplus(z: mpmath.mpf) -> mpmath.mpf:
    return mpmath.log1p(mpmath.exp(z))


MP_REFERENCE: dict[str, Callable[[mpmath.mpf], mpmath.mpf]] = {
    "identity": lambda z: z,
    "relu": lambda z: max(z, 0),
    "leaky_relu": lambda z: z if z > 0 else z / 100,
    "elu": lambda z: z if z > 0 else mpmath.expm1(z),
    "selu": lambda z: mpmath.mpf("1.0507009873554804934193349852946")
    * (z if z > 0 else mpmath.mpf("1.6732632423543772848170429916717") * mpmath.expm1(z)),
    "gelu": lambda z: z * mpmath.erfc(-z / mpmath.sqrt(2)) / 2,
    "silu": lambda z: z * _mp_sigmoid(z),
    "mish": lambda z: z * mpmath.tanh(_mp_softplus(z)),
    "softplus": _mp_softplus,
    "sigmoid": _mp_sigmoid,
    "tanh": mpmath.tanh,
    "hardtanh": lambda z: min(max(z, -1), 1),
    "hardsigmoid": lambda z: min(max(z / 6 + mpmath.mpf(1) / 2, 0), 1),
    "relu6": lambda z: min(max(z, 0), 6),
    "clip": lambda z: min(max(z, -1), 1),
    "hardswish": lambda z: z * min(max(z + 3, 0), 6) / 6,
    # z/2 (1 + tanh u) = z sigmoid(2u): the tanh form cancels even at 50 digits for z < -20
    "gelu_tanh": lambda z: z * _mp_sigmoid(2 * mpmath.sqrt(2 / mpmath.pi)
                                           * (z + mpmath.mpf("0.044715") * z**3)),
    "abs": abs,
    "exp": mpmath.exp,
    "log_sigmoid": lambda z: -_mp_softplus(-z),
}


def test_reference_table_covers_every_builtin() -> None:
    assert set(MP_REFERENCE) == set(BUILTIN_ACTIVATIONS)


@pytest.mark.parametrize("name", sorted(BUILTIN_ACTIVATIONS))
def test_builtin_activation_values(write_model: Callable[..., Path], name: str) -> None:
    z = np.concatenate([np.linspace(-40, 40, 161), [-700.0, -30.5, -1e-300, 0.0, 1e-300, 3.0,
                                                    700.0]])
    model = one_op_model(write_model, (z.size,), f"{name}(x)")
    got = model.forward(z[None])[0]
    f = MP_REFERENCE[name]
    with mpmath.workdps(50):
        ref = np.array([float(f(mpmath.mpf(float(v)))) for v in z])
        # the function's own condition number |z f'(z) / f(z)|: rounding the argument once
        # (e.g. z / sqrt 2 inside gelu's erfc) costs that many ulps in any implementation
        cond = np.array([float(abs(mpmath.mpf(float(v)) * mpmath.diff(f, mpmath.mpf(float(v)))
                                   / f(mpmath.mpf(float(v)))))
                         if v != 0 and f(mpmath.mpf(float(v))) != 0 and abs(v) < 100 else 0.0
                         for v in z])
    finite = np.isfinite(ref)
    tolerance = 1e-15 * (1 + cond[finite]) * np.abs(ref[finite])
    assert np.all(np.abs(got[finite] - ref[finite]) <= tolerance + 1e-300), name
    np.testing.assert_array_equal(got[~finite], ref[~finite])


@given(st.floats(-50, 50, allow_nan=False), st.floats(0.05, 5))
def test_user_activation_matches_its_math(z: float, beta: float) -> None:
    model = pbxc.loads(f"model u\ninput x: float64[1]\nactivation sw(z, b = 1) = "
                       f"z * sigmoid(b * z) + where(z > 1, log1p(z), z ^ 2 / 2)\n"
                       f"output y = sw(x, b = {beta!r})")
    with mpmath.workdps(40):
        zm = mpmath.mpf(z)
        ref = zm * _mp_sigmoid(beta * zm) + (mpmath.log1p(zm) if z > 1 else zm**2 / 2)
    got = float(model.forward(np.array([[z]]))[0, 0])
    assert got == pytest.approx(float(ref), rel=1e-13, abs=1e-300)


def test_float32_forward_stays_float32(write_model: Callable[..., Path]) -> None:
    model = pbxc.load(write_model("model t\ninput x: float32[5]\noutput y = gelu(softplus(x, 2))"))
    out = model.forward(np.linspace(-3, 3, 5)[None])
    assert model.dtype == np.float32 and out.dtype == np.float32
