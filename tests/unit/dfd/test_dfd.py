"""DFD / DeepLIFT: summation-to-delta, linear composition, and the identities it must meet."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pbxc
from pbxc.runtime.dfd import dfd, resolve_baseline

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
NAMES = ["breast_cancer_mlp", "digits_cnn", "digits_resnet", "wine_swish_mlp"]
RNG = np.random.default_rng(11)


def example(name: str, dtype: str = "float64") -> tuple[pbxc.Model, np.ndarray, np.ndarray]:
    model = pbxc.load(EXAMPLES / f"{name}.pbx", dtype=dtype)
    data = np.load(EXAMPLES / f"{name}_reference.npz")["inputs"]
    return model, data[:16], data


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("baseline", ["zeros", "mean", 0.25, "per-sample"])
def test_summation_to_delta_on_examples(name: str, baseline: object) -> None:
    model, x, data = example(name)
    if baseline == "per-sample":
        baseline = data[16:32]
    res = model.dfd(x, baseline=baseline, data=data)
    assert res.attributions[model.input_names[0]].shape == x.shape
    assert np.all(res.summation_error <= 1e-12), res.summation_error.max()
    # delta is the real change of the target logit
    y0 = model.forward(res.baseline[model.input_names[0]])
    expected = res.outputs[np.arange(16), res.targets] - y0[np.arange(16), res.targets]
    np.testing.assert_allclose(res.delta, expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", ["digits_cnn", "breast_cancer_mlp"])
def test_summation_to_delta_float32(name: str) -> None:
    model, x, data = example(name, "float32")
    res = model.dfd(x, baseline="mean", data=data)
    assert res.attributions[model.input_names[0]].dtype == np.float32
    assert np.all(res.summation_error <= 1e-4)


def test_linear_composition() -> None:
    """Seed 004 eq. 2: contributions to a linear combination are that combination's."""
    model, x, data = example("digits_cnn")
    inputs = model.prepare_inputs(x)
    default = resolve_baseline(model, inputs, "mean", data)
    out = model.output_names[0]
    a, b = np.zeros((16, 10)), np.zeros((16, 10))
    a[:, 3], b[:, 7] = 1.0, 1.0
    ma, _, _ = dfd(model, inputs, default, out, a)
    mb, _, _ = dfd(model, inputs, default, out, b)
    mab, _, _ = dfd(model, inputs, default, out, 2 * a - 0.5 * b)
    key = model.input_names[0]
    np.testing.assert_allclose(mab[key], 2 * ma[key] - 0.5 * mb[key], rtol=1e-12,
                               atol=1e-13)


def test_zero_baseline_on_bias_free_relu_net_is_input_x_gradient(
        write_model: Callable[..., Path]) -> None:
    w = {"a.weight": RNG.normal(size=(8, 5)), "b.weight": RNG.normal(size=(6, 8)),
         "c.weight": RNG.normal(size=(3, 6))}
    model = pbxc.load(write_model(
        'model r\nweights "w.npz"\ninput x: float64[5]\n'
        "h = relu(linear(relu(linear(x, @a, bias=false)), @b, bias=false))\n"
        "output y = linear(h, @c, bias=false)", w))
    x = RNG.normal(size=(10, 5))
    for target in (0, 2):
        np.testing.assert_allclose(model.dfd(x, target=target).attributions["x"],
                                   model.input_x_gradient(x, target=target), rtol=1e-12,
                                   atol=1e-14)


def test_maxpool_with_differing_defaults_keeps_summation(write_model: Callable[..., Path]
                                                          ) -> None:
    """Defaults that differ across a window (seed 004 section 2.3.2 sets this case aside)."""
    model = pbxc.load(write_model(
        'model p\nweights "w.npz"\ninput x: float64[2, 6, 6]\n'
        "output y = linear(flatten(maxpool2d(x, kernel=3, stride=2, padding=1)), @fc)",
        {"fc.weight": RNG.normal(size=(4, 18)), "fc.bias": RNG.normal(size=4)}))
    x = RNG.normal(size=(6, 2, 6, 6))
    baseline = RNG.normal(size=(6, 2, 6, 6))
    for t in range(4):
        res = model.dfd(x, baseline=baseline, target=t)
        assert np.all(res.summation_error <= 1e-12)
    # uniform defaults: eq. 13's indicator on the argmax (away from ties)
    res = model.dfd(x, baseline=0.0, target=1)
    grad = model.gradient(x, target=1)
    np.testing.assert_allclose(res.multipliers["x"], grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_rule_summation_to_delta(write_model: Callable[..., Path], op: str) -> None:
    model = pbxc.load(write_model(
        'model s\nweights "w.npz"\ninput x: float64[6]\n'
        f"output p = {op}(linear(tanh(linear(x, @a)), @b))",
        {"a.weight": RNG.normal(size=(8, 6)) * 3, "a.bias": RNG.normal(size=8),
         "b.weight": RNG.normal(size=(5, 8)) * 4, "b.bias": RNG.normal(size=5)}))
    x = RNG.normal(size=(12, 6)) * 2
    for target in range(5):
        res = model.dfd(x, baseline="zeros", target=target)
        assert np.all(res.summation_error <= 1e-12), res.summation_error.max()


@given(st.integers(0, 2**31 - 1))
def test_summation_to_delta_on_random_models(seed: int) -> None:
    rng = np.random.default_rng(seed)
    acts = ["relu", "tanh", "gelu", "softplus", "elu", "sigmoid", "leaky_relu", "silu"]
    widths = [int(w) for w in rng.integers(2, 9, size=rng.integers(2, 4))]
    lines = ["model rnd", f"input x: float64[{widths[0]}]"]
    weights = {}
    prev = "x"
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        weights[f"l{i}.weight"] = rng.normal(size=(b, a))
        weights[f"l{i}.bias"] = rng.normal(size=b)
        act = acts[int(rng.integers(len(acts)))]
        lines.append(f"h{i} = {act}(linear({prev}, @l{i}))")
        prev = f"h{i}"
    lines.append(f"output y = {prev}")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "w.npz", **weights)
        lines.insert(1, 'weights "w.npz"')
        (Path(tmp) / "m.pbx").write_text("\n".join(lines))
        model = pbxc.load(Path(tmp) / "m.pbx")
    x = rng.normal(size=(4, widths[0])) * 2
    res = model.dfd(x, baseline=rng.normal(size=widths[0]))
    # where f(x) and f(x0) nearly cancel, delta itself carries rounding of relative size
    # eps * (|f(x)| + |f(x0)|) / |delta|: judge only samples where that is far below the bar
    scale = np.abs(res.outputs).max() + np.abs(res.baseline_outputs).max()
    big = np.abs(res.delta) > 1e-4 * scale
    assert big.any() or scale == 0
    assert np.all(res.summation_error[big] <= 1e-11)


def test_baseline_errors() -> None:
    model, x, _ = example("breast_cancer_mlp")
    with pytest.raises(pbxc.InputError, match="needs data"):
        model.dfd(x, baseline="mean")
    with pytest.raises(pbxc.InputError, match="baseline for input 'x' has shape"):
        model.dfd(x, baseline=np.zeros(7))


def test_reveal_cancel_by_hand(write_model: Callable[..., Path]) -> None:
    """y = relu(a1 - a2) at a = (3, 1) against a0 = (0, 0): the DeepLIFT paper's example.

    dz+ = 3, dz- = -1, z0 = 0, z = 2; m+ = (M(0, 3) + M(-1, 2)) / 2 = (1 + 2/3) / 2 = 5/6 and
    m- = (M(0, -1) + M(3, 2)) / 2 = (0 + 1) / 2, so C = (5/6 * 3, 1/2 * -1) = (2.5, -0.5);
    rescale gives m = 1 and C = (3, -1). Both sum to delta = 2.
    """
    model = pbxc.load(write_model('model rc\nweights "w.npz"\ninput a: float64[2]\n'
                                  "output y = relu(linear(a, @l, bias=false))",
                                  {"l.weight": np.array([[1.0, -1.0]])}))
    x = np.array([[3.0, 1.0]])
    reveal = model.dfd(x, rule="revealcancel").attributions["a"]
    np.testing.assert_allclose(reveal, [[2.5, -0.5]], rtol=1e-15)
    np.testing.assert_allclose(model.dfd(x).attributions["a"], [[3.0, -1.0]], rtol=1e-15)
    with pytest.raises(pbxc.InputError, match="DFD rule must be one of"):
        model.dfd(x, rule="gradient")


@pytest.mark.parametrize("name", NAMES)
def test_reveal_cancel_keeps_summation_to_delta(name: str) -> None:
    model, x, data = example(name)
    res = model.dfd(x, baseline="mean", data=data, rule="revealcancel")
    assert np.all(res.summation_error <= 1e-12), res.summation_error.max()


@pytest.mark.parametrize("shared", [True, False])
def test_one_forward_batch_for_inputs_and_defaults_matches_two(shared: bool) -> None:
    from pbxc.runtime.dfd import linearize_both
    from pbxc.runtime.jacobian import linearize

    model = pbxc.load(EXAMPLES / "digits_cnn.pbx", dtype="float64")   # max pooling: local data
    x = np.load(EXAMPLES / "digits_cnn_reference.npz")["inputs"][:6].astype(np.float64)
    x0 = np.full_like(x, 0.25) if shared else x[::-1] * 0.5
    at, base = linearize_both(model, {"image": x}, {"image": x0})
    for got, point in ((at, x), (base, x0)):
        want = linearize(model, {"image": point}, derivatives=False)
        assert set(got.values) == set(want.values) and set(got.local) == set(want.local)
        for k, v in want.values.items():
            np.testing.assert_allclose(got.values[k], v, rtol=1e-13, atol=1e-13)
        for k, v in want.local.items():
            np.testing.assert_array_equal(got.local[k], v)


@pytest.mark.parametrize("name", ["digits_cnn", "digits_resnet"])
def test_small_convolutions_as_dense_matrices_agree_with_their_kernels(name: str) -> None:
    dense = pbxc.load(EXAMPLES / f"{name}.pbx", dtype="float64")
    native = pbxc.load(EXAMPLES / f"{name}.pbx", dtype="float64")
    assert dense.dense_ops, "the examples' small convolutions should take the dense path"
    native.dense_ops = frozenset()
    x = np.load(EXAMPLES / f"{name}_reference.npz")["inputs"][:6].astype(np.float64)
    a, b = dense.dfd(x, baseline="zeros"), native.dfd(x, baseline="zeros")
    for k in a.attributions:
        np.testing.assert_allclose(a.attributions[k], b.attributions[k], rtol=1e-12,
                                   atol=1e-13 * np.abs(b.attributions[k]).max())
    for composite in ("epsilon", "epsilon-gamma-box"):
        ra, rb = dense.lrp(x, composite=composite), native.lrp(x, composite=composite)
        for k in ra.relevance:
            np.testing.assert_allclose(ra.relevance[k], rb.relevance[k], rtol=1e-11,
                                       atol=1e-13 * np.abs(rb.relevance[k]).max())
    ga, gb = dense.gradient(x), native.gradient(x)
    np.testing.assert_allclose(ga, gb, rtol=1e-12, atol=1e-13 * np.abs(gb).max())


@pytest.mark.parametrize("name", ["digits_cnn", "digits_resnet"])
def test_the_kept_default_pass_serves_only_the_same_default(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import pbxc.runtime.dfd as dfd_module

    model, x, _ = example(name)
    fresh = lambda b: example(name)[0].dfd(x[:1], baseline=b)   # noqa: E731  (no cache yet)
    for b in ["zeros", 0.25, "zeros", np.full(x.shape[1:], 0.25), 0.5]:
        for batch in (1, 4):
            got, want = model.dfd(x[:batch], baseline=b), (fresh(b) if batch == 1 else None)
            if want is not None:   # bit for bit a model that evaluates the default anew
                key = model.input_names[0]
                np.testing.assert_array_equal(got.attributions[key], want.attributions[key])
            assert np.all(got.summation_error <= 1e-12)
    assert len(model.default_points) == 1                       # one plan, the last default
    kept = next(iter(model.default_points.values()))[1]
    assert all(not v.flags.writeable for v in kept.values.values() if isinstance(v, np.ndarray))
    # a default pass larger than the bound is used once and not kept
    monkeypatch.setattr(dfd_module, "DEFAULT_CACHE_BYTES", 0)
    small = example(name)[0]
    res = small.dfd(x[:2], baseline=0.1)
    assert small.default_points == {} and np.all(res.summation_error <= 1e-12)
