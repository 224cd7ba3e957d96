"""LRP: hand-worked rules, LRP-0 = input x gradient, the epsilon limit, conservation, errors."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import pbxc
from pbxc.lower.plan import path_nodes
from pbxc.runtime.jacobian import linearize, reverse_sweep
from pbxc.runtime.lrp import (
    LRP0,
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    LrpConfigError,
    Rule,
    WSquare,
    ZBox,
    ZPlus,
    get_composite,
    lrp,
)

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
NAMES = ["breast_cancer_mlp", "digits_cnn", "digits_resnet", "wine_swish_mlp"]
COMPOSITE_NAMES = ["epsilon", "lrp0", "epsilon-plus", "epsilon-gamma-box"]
RNG = np.random.default_rng(5)

Writer = Callable[..., Path]


def example(name: str) -> tuple[pbxc.Model, np.ndarray]:
    model = pbxc.load(EXAMPLES / f"{name}.pbx", dtype="float64")
    return model, np.load(EXAMPLES / f"{name}_reference.npz")["inputs"][:24]


def input_x_gradient(model: pbxc.Model, x: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """x * d f_c / d x by a reverse sweep with a one-hot seed (independent of the LRP code)."""
    inputs = model.prepare_inputs(x)
    (wrt,), (out,) = model.input_names, model.output_names
    lin = linearize(model, inputs)
    y = lin.values[out]
    seed = np.zeros((y.shape[0], 1, y.shape[1]))
    seed[np.arange(y.shape[0]), 0, targets] = 1.0
    grad = reverse_sweep(model, lin, wrt, out, path_nodes(model.graph, wrt, out), seed)[:, 0]
    return inputs[wrt] * grad


# ---------------------------------------------------------------- by hand, one linear layer

def one_layer(write_model: Writer, weight: list[list[float]], bias: list[float]) -> pbxc.Model:
    return pbxc.load(write_model('model one\nweights "w.npz"\ninput x: float64[2]\n'
                                 "output y = linear(x, @fc)",
                                 {"fc.weight": np.array(weight), "fc.bias": np.array(bias)}))


# x = [1, 2], w = [3, -1], b = 1: z = 3 - 2 + 1 = 2 = R_out.
HAND = [
    # rule, expected R_x, expected bias share, expected stabiliser share
    (LRP0(), [3.0, -2.0], 1.0, 0.0),                             # a w / z * R
    (Epsilon(epsilon=1.0), [2.0, -4 / 3], 2 / 3, 2 / 3),         # z + eps = 3
    (Gamma(gamma=0.5, epsilon=0.0), [2.25, -1.0], 0.75, 0.0),    # w -> [4.5, -1], b -> 1.5
    (ZPlus(epsilon=0.0), [1.5, 0.0], 0.5, 0.0),                  # z+ = 3 + max(0, 1) = 4
    (WSquare(epsilon=0.0), [1.8, 0.2], 0.0, 0.0),                # 9/10, 1/10
    (Flat(epsilon=0.0), [1.0, 1.0], 0.0, 0.0),
    (ZBox(low=0.0, high=2.0, epsilon=0.0), [2.0, 0.0], 0.0, 0.0),  # [3 - 0 - 0, -2 - 0 + 2]
]


@pytest.mark.parametrize(("rule", "expected", "bias", "stab"), HAND,
                         ids=[type(h[0]).__name__ for h in HAND])
def test_single_linear_layer_by_hand(write_model: Writer, rule: Rule, expected: list[float],
                                     bias: float, stab: float) -> None:
    model = one_layer(write_model, [[3.0, -1.0]], [1.0])
    res = lrp(model, np.array([[1.0, 2.0]]), rule=rule)
    np.testing.assert_allclose(res.relevance["x"][0], expected, rtol=1e-14, atol=1e-15)
    entry = res.ledger.layers["y"]
    assert entry.relevance_out[0] == pytest.approx(2.0, rel=1e-15)
    assert entry.bias[0] == pytest.approx(bias, rel=1e-14, abs=1e-15)
    assert entry.stabiliser[0] == pytest.approx(stab, rel=1e-14, abs=1e-15)


def test_alphabeta_by_hand(write_model: Writer) -> None:
    # x = [1, 2], w = [3, -1], b = 0: z+ = 3, z- = -2, R_out = z = 1
    model = one_layer(write_model, [[3.0, -1.0]], [0.0])
    res = lrp(model, np.array([[1.0, 2.0]]), rule=AlphaBeta(alpha=2.0, beta=1.0, epsilon=0.0))
    np.testing.assert_allclose(res.relevance["x"][0], [2.0, -1.0], rtol=1e-14)


def test_epsilon_placement_differs_for_negative_z(write_model: Writer) -> None:
    # x = [1, 2], w = [-3, 1], b = -1: z = -2 = R_out (target 0 is the only class)
    model = one_layer(write_model, [[-3.0, 1.0]], [-1.0])
    x = np.array([[1.0, 2.0]])
    sign = lrp(model, x, rule=Epsilon(epsilon=1.0))                       # z - 1 = -3
    slides = lrp(model, x, rule=Epsilon(epsilon=1.0, placement="slides"))  # z + 1 = -1
    np.testing.assert_allclose(sign.relevance["x"][0], [-2.0, 4 / 3], rtol=1e-14)
    np.testing.assert_allclose(slides.relevance["x"][0], [-6.0, 4.0], rtol=1e-14)
    for res in (sign, slides):
        assert res.ledger.conservation_error[0] < 1e-14


# ---------------------------------------------------------------- LRP-0 and the epsilon limit

BIAS_FREE_MLP = ('model r\nweights "w.npz"\ninput x: float64[5]\n'
                 "h = relu(linear(relu(linear(x, @a, bias=false)), @b, bias=false))\n"
                 "output y = linear(h, @c, bias=false)")
BIAS_FREE_CNN = ('model c\nweights "w.npz"\ninput x: float64[2, 6, 6]\n'
                 "h = maxpool2d(relu(conv2d(x, @k1, padding=1, bias=false)), kernel=2)\n"
                 "g = avgpool2d(relu(conv2d(h, @k2, bias=false)), kernel=2)\n"
                 "output y = linear(flatten(g), @fc, bias=false)")


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_lrp0_is_input_x_gradient_without_bias(write_model: Writer, which: str) -> None:
    if which == "mlp":
        w = {"a.weight": RNG.normal(size=(8, 5)), "b.weight": RNG.normal(size=(6, 8)),
             "c.weight": RNG.normal(size=(3, 6))}
        model, x = pbxc.load(write_model(BIAS_FREE_MLP, w)), RNG.normal(size=(12, 5))
    else:
        w = {"k1.weight": RNG.normal(size=(4, 2, 3, 3)), "k2.weight": RNG.normal(size=(3, 4, 2, 2)),
             "fc.weight": RNG.normal(size=(3, 3))}
        model, x = pbxc.load(write_model(BIAS_FREE_CNN, w)), RNG.normal(size=(12, 2, 6, 6))
    for target in (None, 1, RNG.integers(0, 3, size=12)):
        res = lrp(model, x, target=target, rule=LRP0())
        ixg = input_x_gradient(model, x, res.targets)
        assert np.abs(ixg).max() > 0.1
        np.testing.assert_allclose(res.relevance["x"], ixg, rtol=1e-10, atol=1e-12)
        # exact conservation: nothing absorbed, all of f_c(x) reaches the input
        assert np.all(res.ledger.bias == 0) and np.all(res.ledger.stabiliser == 0)
        np.testing.assert_allclose(res.relevance["x"].reshape(12, -1).sum(axis=1),
                                   res.ledger.start, rtol=1e-12)
    assert res.targets.tolist() == target.tolist()


@pytest.mark.parametrize("name", ["breast_cancer_mlp", "digits_resnet"])
def test_epsilon_to_zero_approaches_lrp0(name: str) -> None:
    model, x = example(name)
    reference = lrp(model, x, rule=LRP0()).relevance[model.input_names[0]]
    scale = np.abs(reference).max()
    gaps = [np.abs(lrp(model, x, rule=Epsilon(epsilon=eps)).relevance[model.input_names[0]]
                   - reference).max() / scale for eps in (1e-1, 1e-3, 1e-5, 1e-7, 1e-9)]
    assert gaps[0] > 1e-4                       # epsilon matters at all
    assert all(b < a for a, b in itertools.pairwise(gaps)), gaps
    assert gaps[-1] < 1e-4, gaps
    assert gaps[-1] < 0.05 * gaps[-2], gaps     # first order in epsilon near 0


# ---------------------------------------------------------------- conservation

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("composite", COMPOSITE_NAMES)
def test_conservation_on_examples(name: str, composite: str) -> None:
    model, x = example(name)
    res = lrp(model, x, composite=composite)
    key = model.input_names[0]
    assert res.relevance[key].shape == x.shape
    logits = res.outputs[model.output_names[0]]
    np.testing.assert_array_equal(res.targets, logits.argmax(axis=1))
    np.testing.assert_allclose(res.ledger.start, logits[np.arange(len(x)), res.targets],
                               rtol=1e-15)
    for entry in res.ledger.layers.values():
        assert np.all(entry.conservation_error < 1e-12), (entry.node, entry.conservation_error)
    assert np.all(res.ledger.conservation_error < 1e-12)
    total = res.relevance[key].reshape(len(x), -1).sum(axis=1)
    np.testing.assert_allclose(total + res.ledger.bias + res.ledger.stabiliser,
                               res.ledger.start, rtol=1e-12)


def test_ledger_detects_a_leak() -> None:
    """The check can fail: a ledger entry whose relevance does not add up is flagged."""
    model, x = example("digits_cnn")
    entry = next(iter(lrp(model, x).ledger.layers.values()))
    entry.relevance_in = entry.relevance_in * (1 + 1e-9)
    assert np.all(entry.conservation_error > 1e-12)


def test_bias_absorbs_relevance_in_batchnorm_and_normalize() -> None:
    for name, node in (("digits_resnet", "h0/batchnorm"), ("breast_cancer_mlp", "s")):
        model, x = example(name)
        layers = lrp(model, x).ledger.layers
        assert node in layers, list(layers)
        assert np.abs(layers[node].bias).max() > 1e-3


# ---------------------------------------------------------------- routing ops

def test_maxpool_ties_go_to_the_first_maximum(write_model: Writer) -> None:
    model = pbxc.load(write_model('model m\nweights "w.npz"\ninput x: float64[1, 2, 4]\n'
                                  "output y = linear(flatten(maxpool2d(x, kernel=2)), @fc, "
                                  "bias=false)", {"fc.weight": np.ones((1, 2))}))
    x = np.array([[[[2.0, 2.0, 1.0, 3.0], [2.0, 0.0, 3.0, 0.0]]]])
    res = lrp(model, x, rule=LRP0())
    expected = np.array([[[[2.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]]]])
    np.testing.assert_array_equal(res.relevance["x"], expected)
    assert res.maxpool_ties == {next(iter(res.maxpool_ties)): 2}


def test_softmax_output_starts_at_the_logits(write_model: Writer) -> None:
    w = {"a.weight": RNG.normal(size=(4, 3)), "a.bias": RNG.normal(size=4)}
    head = 'model s\nweights "w.npz"\ninput x: float64[3]\n'
    plain = pbxc.load(write_model(head + "output y = linear(x, @a)", w, name="p.pbx"))
    soft = pbxc.load(write_model(head + "z = linear(x, @a)\noutput y = softmax(z)", w,
                                 name="s.pbx"))
    x = RNG.normal(size=(6, 3))
    a, b = lrp(plain, x), lrp(soft, x)
    np.testing.assert_array_equal(a.targets, b.targets)
    np.testing.assert_allclose(a.relevance["x"], b.relevance["x"], rtol=1e-15)
    assert b.start == "z"
    np.testing.assert_allclose(b.outputs["y"].sum(axis=1), 1.0)


def test_residual_add_splits_in_proportion(write_model: Writer) -> None:
    model = pbxc.load(write_model('model a\nweights "w.npz"\ninput x: float64[2]\n'
                                  "output y = add(linear(x, @p, bias=false), "
                                  "linear(x, @q, bias=false))",
                                  {"p.weight": np.array([[1.0, 0.0]]),
                                   "q.weight": np.array([[0.0, 1.0]])}))
    res = lrp(model, np.array([[3.0, 1.0]]), rule=LRP0())  # y = 3 + 1: shares 3/4, 1/4 of 4
    np.testing.assert_allclose(res.relevance["x"][0], [3.0, 1.0], rtol=1e-15)
    assert "y" in res.ledger.layers and res.ledger.layers["y"].op == "add"


def test_overrides_and_composites() -> None:
    model, x = example("digits_cnn")
    base = lrp(model, x, composite="epsilon-gamma-box")
    assert base.rules["c1/conv2d"] == "zbox" and base.rules["c2/conv2d"].startswith("gamma")
    over = lrp(model, x, composite="epsilon-gamma-box", overrides={"c1/conv2d": Flat()})
    assert over.rules["c1/conv2d"].startswith("flat")
    assert not np.allclose(base.relevance["image"], over.relevance["image"])
    explicit = lrp(model, x, composite=get_composite("epsilon-gamma-box", low=0.0, high=1.0))
    assert np.all(explicit.ledger.conservation_error < 1e-12)


# ---------------------------------------------------------------- errors

def test_alphabeta_checks_alpha_minus_beta() -> None:
    with pytest.raises(LrpConfigError, match="alpha - beta = 1"):
        AlphaBeta(alpha=1.5, beta=1.0)
    with pytest.raises(LrpConfigError, match="alpha >= 0 and beta >= 0"):
        AlphaBeta(alpha=0.5, beta=-0.5)
    assert AlphaBeta(alpha=1.0, beta=0.0).groups()[1].coef == 0.0


def test_rule_parameters_are_checked() -> None:
    with pytest.raises(LrpConfigError, match="epsilon"):
        Epsilon(epsilon=-1.0)
    with pytest.raises(LrpConfigError, match="placement"):
        Epsilon(placement="middle")
    with pytest.raises(LrpConfigError, match="gamma"):
        Gamma(gamma=-0.1)
    with pytest.raises(LrpConfigError, match="low <= high"):
        ZBox(low=1.0, high=0.0)


def test_unknown_composite_and_bad_override() -> None:
    model, x = example("breast_cancer_mlp")
    with pytest.raises(LrpConfigError, match=r"unknown LRP composite 'epsilon-gama'.*epsilon-plus"):
        lrp(model, x, composite="epsilon-gama")
    with pytest.raises(LrpConfigError, match="'h2x': it is not a value of this model"):
        lrp(model, x, overrides={"h2x": LRP0()})
    # a statement name sets the ops of that statement that take a rule
    assert lrp(model, x, overrides={"h1": LRP0()}).rules["h1/linear"] == "lrp0"
    with pytest.raises(LrpConfigError, match="not both"):
        lrp(model, x, rule=LRP0(), composite="epsilon")


def test_unsupported_op_names_pass_op_and_position(write_model: Writer) -> None:
    w = {"a.weight": RNG.normal(size=(4, 3)), "b.weight": RNG.normal(size=(2, 4))}
    model = pbxc.load(write_model('model u\nweights "w.npz"\ninput x: float64[3]\n'
                                  "h = log_softmax(linear(x, @a, bias=false))\n"
                                  "output y = linear(h, @b, bias=false)", w))
    # (an interior softmax takes AttnLRP's rule, tests/unit/lrp/test_attnlrp.py)
    with pytest.raises(pbxc.UnsupportedOp, match=r"lrp pass.*'log_softmax'") as info:
        lrp(model, RNG.normal(size=(2, 3)))
    assert info.value.pos is not None and info.value.pos.line == 4
