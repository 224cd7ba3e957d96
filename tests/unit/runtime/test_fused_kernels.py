"""The fused elementwise kernels (numexpr, the ``fast`` extra) agree with the plain NumPy
reference bit for bit: LRP's epsilon step and DFD's secant multiplier."""

from __future__ import annotations

import numpy as np
import pytest

from pbxc.codegen import fused_kernels
from pbxc.codegen import numpy_kernels as K

pytest.importorskip("numexpr")
FUSED = fused_kernels.NumexprKernels(__import__("numexpr"))


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


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("epsilon", [1e-6, 0.25])
def test_the_fused_epsilon_step_is_the_reference(dtype: str, epsilon: float) -> None:
    rng = np.random.default_rng(0)
    r, z = _edgy(rng, (4, 3, 5, 6), dtype), _edgy(rng, (4, 3, 5, 6), dtype)
    with np.errstate(all="ignore"):
        s_ref = K.lrp_divide(r, K.lrp_stabilise(z, epsilon, "sign"), epsilon, "sign")
        s = FUSED.quotient(r, z, epsilon)
        np.testing.assert_array_equal(s, s_ref)
        assert s.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(FUSED.residual(r, s, z), r - s * z)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_whole_rule_step_is_the_reference(dtype: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 7)).astype(dtype)
    p = {"weight": rng.normal(size=(5, 7)).astype(dtype), "bias": rng.normal(size=5).astype(dtype)}
    z = K.linear_forward([x], p)
    r = rng.normal(size=(3, 5)).astype(dtype)
    groups = ((1.0, K.UNMODIFIED),)
    plain = K.lrp_rule_step("linear", r, [x], p, groups, 1e-6, "sign", z)
    fused = K.lrp_rule_step("linear", r, [x], p, groups, 1e-6, "sign", z, None, FUSED)
    for a, b in zip([plain[0][0], plain[1], plain[2]], [fused[0][0], fused[1], fused[2]]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_fused_secant_is_the_reference(dtype: str, tmp_path,  # type: ignore[no-untyped-def]
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import pbxc

    monkeypatch.setenv(fused_kernels.FUSED_ENV, "1")
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
    for name in ("h", "g", "y"):
        with np.errstate(all="ignore"):
            f0, f1 = table(name, z0), table(name, z)
            np.testing.assert_array_equal(table.multiplier(name, z0, z, f0, f1),
                                          plain.multiplier(name, z0, z, f0, f1))
    shared = np.broadcast_to(z0[:1], z.shape)   # a baseline row shared by the batch
    with np.errstate(all="ignore"):
        f0 = np.broadcast_to(table("h", z0[:1]), z.shape)
        np.testing.assert_array_equal(table.multiplier("h", shared, z, f0, table("h", z)),
                                      plain.multiplier("h", shared, z, f0, table("h", z)))


def test_the_switch_turns_it_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fused_kernels.FUSED_ENV, raising=False)
    assert fused_kernels.available() is None   # off by default: NumPy measured faster
    monkeypatch.setenv(fused_kernels.FUSED_ENV, "1")
    assert fused_kernels.available() is not None


def test_an_lrp_pass_is_the_same_fused(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import pbxc

    (tmp_path / "m.pbx").write_text('model m\nweights "m.npz"\ninput x: float32[6]\n'
                                    "h = relu(linear(x, @a))\noutput y = linear(h, @b)\n")
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "m.npz", **{"a.weight": rng.normal(size=(8, 6)),
                                    "a.bias": rng.normal(size=8), "b.weight": rng.normal(size=(3, 8)),
                                    "b.bias": rng.normal(size=3)})
    x = rng.normal(size=(5, 6))
    plain = pbxc.load(tmp_path / "m.pbx")
    monkeypatch.setenv(fused_kernels.FUSED_ENV, "1")
    fused = pbxc.load(tmp_path / "m.pbx")
    assert fused.fused is not None and plain.fused is None
    a, b = plain.lrp(x), fused.lrp(x)
    np.testing.assert_array_equal(a.relevance["x"], b.relevance["x"])
    np.testing.assert_array_equal(a.ledger.stabiliser, b.ledger.stabiliser)
    np.testing.assert_array_equal(plain.dfd(x).attributions["x"], fused.dfd(x).attributions["x"])
