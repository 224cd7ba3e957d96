"""The exact Jacobian: every plan agrees, and matches finite differences, mpmath and torch."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import mpmath
import numpy as np
import pytest

import pbxc
from pbxc.codegen import numpy_kernels as K
from pbxc.lower.plan import plan_jacobian

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
NAMES = ["breast_cancer_mlp", "digits_cnn", "digits_resnet", "wine_swish_mlp"]
RNG = np.random.default_rng(7)


def example(name: str, n: int = 3, jitter: float = 0.0) -> tuple[pbxc.Model, np.ndarray]:
    model = pbxc.load(EXAMPLES / f"{name}.pbx", dtype="float64")
    x = np.load(EXAMPLES / f"{name}_reference.npz")["inputs"][:n].astype(np.float64)
    # jitter moves inputs off exact ties of max pooling (digits have many equal pixels)
    return model, x + jitter * RNG.normal(size=x.shape) * (np.abs(x).mean() + 1e-3)


def central_differences(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """(B, *out, *in) by central differences with a step scaled to each input."""
    batch = x.shape[0]
    flat = x.reshape(batch, -1)
    cols = []
    for k in range(flat.shape[1]):
        h = 1e-6 * np.maximum(1.0, np.abs(flat[:, k]))
        e = np.zeros_like(flat)
        e[:, k] = h
        up = f((flat + e).reshape(x.shape))
        down = f((flat - e).reshape(x.shape))
        cols.append((up - down).reshape(batch, -1) / (2 * h)[:, None])
    out = np.stack(cols, axis=-1)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_plans_agree_and_match_finite_differences(name: str) -> None:
    model, x = example(name, jitter=0.05 if "digits" in name else 0.0)
    out = model.output_names[0]
    modes = ["forward", "reverse"] + (["chain"] if name != "digits_resnet" else [])
    results = {m: model.jacobian(x, mode=m).jacobian for m in modes}
    ref = results["forward"]
    assert ref.shape == (x.shape[0], *model.output_shapes[out], *x.shape[1:])
    for mode, j in results.items():
        np.testing.assert_allclose(j, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max(),
                                   err_msg=mode)
    fd = central_differences(lambda v: model.outputs(v)[out], x)
    scale = np.abs(ref).max()
    assert np.abs(fd - ref.reshape(fd.shape)).max() <= 1e-6 * scale


def test_auto_plan_is_cheapest_and_explained() -> None:
    model, x = example("digits_cnn")
    res = model.jacobian(x)
    assert res.plan.mode in res.plan.alternatives
    assert res.plan.alternatives[res.plan.mode] == min(res.plan.alternatives.values())
    text = res.plan.explain()
    assert "jacobian plan:" in text and "<- chosen" in text


def test_cost_model_picks_reverse_for_wide_inputs_and_forward_for_wide_outputs(
        write_model: Callable[..., Path]) -> None:
    w = {"a.weight": RNG.normal(size=(64, 512)), "a.bias": np.zeros(64),
         "b.weight": RNG.normal(size=(2, 64)), "b.bias": np.zeros(2),
         "c.weight": RNG.normal(size=(64, 2)), "c.bias": np.zeros(64),
         "d.weight": RNG.normal(size=(512, 64)), "d.bias": np.zeros(512)}
    wide_in = pbxc.load(write_model('model w\nweights "w.npz"\ninput x: float64[512]\n'
                                    "output y = linear(tanh(linear(x, @a)), @b)", w))
    plan = plan_jacobian(wide_in.graph, "x", "y", 256)
    assert plan.alternatives["reverse"] < plan.alternatives["forward"]
    assert plan.mode in ("reverse", "chain")
    wide_out = pbxc.load(write_model('model v\nweights "w.npz"\ninput x: float64[2]\n'
                                     "output y = linear(tanh(linear(x, @c)), @d)", w,
                                     name="v.pbx"))
    plan = plan_jacobian(wide_out.graph, "x", "y", 256)
    assert plan.alternatives["forward"] < plan.alternatives["reverse"]
    assert plan.mode in ("forward", "chain")


def test_intermediates_are_the_papers_byproduct() -> None:
    model, x = example("breast_cancer_mlp")
    res = model.jacobian(x, intermediates=True)
    inter = res.intermediates
    assert inter is not None and res.plan.mode == "forward"
    np.testing.assert_allclose(inter["logits"], res.jacobian, rtol=1e-13)
    # d h1/linear / d x = W1 diag(1/std): the first affine layers' exact Jacobian
    w1 = model.params["h1/linear"]["weight"]
    std = model.params["s"]["std"]
    expected = np.broadcast_to(w1 / std[None, :], (x.shape[0], *w1.shape))
    np.testing.assert_allclose(inter["h1/linear"], expected, rtol=1e-13)
    assert set(inter) >= {"s", "h1", "h2", "logits"}


def test_gradient_is_the_jacobian_row_of_the_target() -> None:
    model, x = example("wine_swish_mlp", n=5)
    jac = model.jacobian(x).jacobian
    logits = model.forward(x)
    pred = logits.argmax(axis=1)
    np.testing.assert_allclose(model.gradient(x), jac[np.arange(5), pred], rtol=1e-13,
                               atol=1e-15)
    np.testing.assert_allclose(model.gradient(x, target=2), jac[:, 2], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(model.input_x_gradient(x, target=[0, 1, 2, 0, 1]),
                               x * jac[np.arange(5), [0, 1, 2, 0, 1]], rtol=1e-13, atol=1e-15)
    with pytest.raises(pbxc.InputError, match="target must be"):
        model.gradient(x, target=3)


def test_float32_jacobian() -> None:
    model = pbxc.load(EXAMPLES / "digits_cnn.pbx", dtype="float32")
    x = np.load(EXAMPLES / "digits_cnn_reference.npz")["inputs"][:4]
    j32 = model.jacobian(x).jacobian
    j64 = pbxc.load(EXAMPLES / "digits_cnn.pbx", dtype="float64").jacobian(x).jacobian
    assert j32.dtype == np.float32
    assert np.abs(j32 - j64).max() <= 1e-5 * np.abs(j64).max()


def test_jacobian_matches_mpmath_on_a_small_model(write_model: Callable[..., Path]) -> None:
    w1, b1 = RNG.normal(size=(5, 3)), RNG.normal(size=5)
    w2, b2 = RNG.normal(size=(2, 5)), RNG.normal(size=2)
    model = pbxc.load(write_model(
        'model s\nweights "w.npz"\ninput x: float64[3]\n'
        "output y = log_softmax(linear(softplus(tanh(linear(x, @a)), beta=2), @b))",
        {"a.weight": w1, "a.bias": b1, "b.weight": w2, "b.bias": b2}))
    x = RNG.normal(size=(2, 3))
    jac = model.jacobian(x).jacobian
    mpmath.mp.dps = 40

    def f(sample: list[mpmath.mpf], i: int) -> mpmath.mpf:
        h = [mpmath.tanh(sum(w1[r, c] * sample[c] for c in range(3)) + b1[r]) for r in range(5)]
        h = [mpmath.log1p(mpmath.exp(2 * v)) / 2 for v in h]
        z = [sum(w2[r, c] * h[c] for c in range(5)) + b2[r] for r in range(2)]
        return z[i] - mpmath.log(sum(mpmath.exp(v) for v in z))

    for b in range(2):
        for i in range(2):
            for k in range(3):
                def partial(t: mpmath.mpf, b: int = b, i: int = i, k: int = k) -> mpmath.mpf:
                    s = [mpmath.mpf(v) for v in x[b]]
                    s[k] = t
                    return f(s, i)
                ref = mpmath.diff(partial, mpmath.mpf(x[b, k]))
                assert jac[b, i, k] == pytest.approx(float(ref), rel=1e-13, abs=1e-15)


@pytest.mark.parametrize(("stride", "pad", "dil", "groups"), [
    ((1, 1), (0, 0), (1, 1), 1), ((2, 1), (1, 2), (1, 1), 1), ((2, 2), (1, 0), (2, 1), 2)])
def test_adjoint_kernels(stride: tuple[int, int], pad: tuple[int, int], dil: tuple[int, int],
                         groups: int) -> None:
    """<A x, g> == <x, A^T g> for every linear kernel and its transpose."""
    x = RNG.normal(size=(2, 4, 9, 8))
    w = RNG.normal(size=(6, 4 // groups, 3, 2))
    y = K.conv2d(x, w, None, stride, pad, dil, groups)
    g = RNG.normal(size=y.shape)
    assert np.vdot(y, g) == pytest.approx(
        np.vdot(x, K.conv2d_transpose(g, w, (9, 8), stride, pad, dil, groups)), rel=1e-12)
    values, index = K.maxpool2d(x, (3, 2), stride, (1, 1))
    g = RNG.normal(size=values.shape)
    assert np.vdot(values, g) == pytest.approx(
        np.vdot(x, K.maxpool2d_transpose(g, index, (9, 8), (3, 2), stride, (1, 1))), rel=1e-12)
    for include in (True, False):
        a = K.avgpool2d(x, (3, 2), stride, (1, 1), include)
        g = RNG.normal(size=a.shape)
        back = K.avgpool2d_transpose(g, (9, 8), (3, 2), stride, (1, 1), include)
        assert np.vdot(a, g) == pytest.approx(np.vdot(x, back), rel=1e-12)


def _torch_example(name: str):  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch", reason="the peers extra (torch) is not installed")
    spec = importlib.util.spec_from_file_location("pbxc_examples_models", EXAMPLES / "models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return torch, module.load_model(name)


@pytest.mark.parametrize("name", NAMES)
def test_matches_torch_func_jacrev(name: str) -> None:
    torch, net = _torch_example(name)
    model, x = example(name, n=4)
    ours = model.jacobian(x).jacobian
    from torch.func import jacrev, vmap

    def single(v: object) -> object:
        out = net(v[None])  # type: ignore[index]
        return (out[0] if isinstance(out, torch.Tensor) else out[0][0])

    theirs = vmap(jacrev(single))(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12 * np.abs(theirs).max())


def test_dense_conv_matrices_agree_with_the_conv_kernels(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    from pbxc.lower import plan as plan_module

    model, x = example("digits_cnn", n=5, jitter=0.05)
    dense = model.jacobian(x)
    assert dense.plan.dense_ops, "the small convolutions should be applied as dense matrices"
    monkeypatch.setattr(plan_module, "DENSE_LIMIT", 0)
    model.plan_cache.clear()   # plans are kept per model; the planner's constant just changed
    native = model.jacobian(x)
    assert not native.plan.dense_ops
    np.testing.assert_allclose(dense.jacobian, native.jacobian, rtol=1e-12,
                               atol=1e-13 * np.abs(native.jacobian).max())


# ---------------------------------------------------------------- kinks


def _relu_at_kink(write_model: Callable[..., Path], convention: str) -> pbxc.Model:
    path = write_model('model k\nweights "w.npz"\ninput x: float64[2]\n'
                       "output y = linear(relu(linear(x, @a)), @b)",
                       {"a.weight": np.eye(2), "a.bias": np.zeros(2),
                        "b.weight": np.array([[1.0, 2.0]]), "b.bias": np.zeros(1)})
    return pbxc.load(path, convention=convention)


@pytest.mark.parametrize(("convention", "slope"), [("owner", 0.0), ("left", 0.0),
                                                   ("right", 1.0), ("mean", 0.5)])
def test_units_on_a_kink_follow_the_convention_and_are_counted(
        write_model: Callable[..., Path], convention: str, slope: float) -> None:
    model = _relu_at_kink(write_model, convention)
    x = np.array([[0.0, 3.0], [0.0, 0.0], [1.0, 1.0]])   # 1 + 2 + 0 units on relu's kink
    res = model.jacobian(x)
    assert res.kinks is not None and list(res.kinks.values()) == [3], res.kinks
    np.testing.assert_array_equal(res.jacobian[:, 0, 0], [slope, slope, 1.0])
    np.testing.assert_array_equal(res.jacobian[:, 0, 1], [2.0, 2 * slope, 2.0])
    assert sum(model.kinks_hit(x).values()) == 3
    assert sum(model.kinks_hit(x + 1e-300).values()) == 0


def test_unknown_kink_convention_is_an_input_error(write_model: Callable[..., Path]) -> None:
    with pytest.raises(pbxc.InputError, match=r"unknown kink convention 'middle'.*owner"):
        _relu_at_kink(write_model, "middle")


def test_plans_are_kept_per_batch_and_mode() -> None:
    model, x = example("digits_cnn", n=3)
    first = model.jacobian(x).plan
    assert model.jacobian(x).plan is first
    assert model.jacobian(x[:2]).plan.batch == 2
    assert model.jacobian(x, mode="reverse").plan.mode == "reverse"
    assert model.jacobian(x).plan is first


@pytest.mark.parametrize("name", NAMES)
def test_every_mode_leaves_weights_and_inputs_as_they_were(name: str) -> None:
    """The chain plan scales its own blocks in place; nothing the caller or model holds."""
    model, x = example(name, n=4)
    weights = {n: {k: v.copy() for k, v in p.items()} for n, p in model.params.items()}
    x_before = x.copy()
    first = {mode: model.jacobian(x, mode=mode).jacobian
             for mode in ("forward", "reverse", "chain", "auto")
             if mode != "chain" or model.jacobian(x).plan.alternatives.get("chain")}
    for mode, j in first.items():
        np.testing.assert_array_equal(model.jacobian(x, mode=mode).jacobian, j)
        np.testing.assert_allclose(j, first["reverse"], rtol=1e-11,
                                   atol=1e-13 * np.abs(first["reverse"]).max())
    np.testing.assert_array_equal(x, x_before)
    for n, p in model.params.items():
        for k, v in p.items():
            np.testing.assert_array_equal(v, weights[n][k])
