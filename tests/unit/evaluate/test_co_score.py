"""The CO score (eq. 5), kappa, normalisation, AX accuracy, the gap statistic, and GAX."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import pbxc
from pbxc.errors import InputError
from pbxc.evaluate import (
    co_score,
    co_score_gradient,
    gap_statistic,
    gax,
    gax_loss,
    kappa,
    normalize_heatmaps,
    rank_biserial,
    score_methods,
)

REPO = Path(__file__).resolve().parents[3]
LINEAR = """model lin
weights "w.npz"
input x: float64[2]
output y = linear(x, @fc)
"""
W = np.array([[1.0, 2.0], [3.0, -1.0], [0.0, 1.0]])
B = np.array([0.5, -0.5, 0.0])


@pytest.fixture
def linear(write_model: Callable[..., Path]) -> pbxc.Model:
    return pbxc.load(write_model(LINEAR, {"fc.weight": W, "fc.bias": B}))


def test_kappa() -> None:
    k = kappa(np.array([1, 0]), 3)
    assert np.array_equal(k, [[-0.5, 1.0, -0.5], [1.0, -0.5, -0.5]])
    assert np.allclose(kappa(np.arange(10), 10).sum(axis=1), 0)
    assert np.array_equal(kappa(np.array([1]), 2), [[-1.0, 1.0]])
    with pytest.raises(InputError, match="labels must lie in"):
        kappa(np.array([3]), 3)
    with pytest.raises(InputError, match="at least 2 classes"):
        kappa(np.array([0]), 1)


def test_normalize_heatmaps() -> None:
    h = np.array([[[2.0, -4.0]], [[0.0, 0.0]], [[0.5, 0.25]]])
    n = normalize_heatmaps(h)
    assert np.array_equal(n, [[[0.5, -1.0]], [[0.0, 0.0]], [[1.0, 0.5]]])
    assert n.dtype == h.dtype


def test_co_score_by_hand(linear: pbxc.Model) -> None:
    x = np.array([[1.0, 1.0]])
    h = np.array([[0.5, -1.0]])
    # f(x+h) - f(x) = W h = [-1.5, 2.5, -1]; kappa (label 0) = [1, -1/2, -1/2]
    assert co_score(linear, x, h, np.array([0]))[0] == pytest.approx(-1.5 - 1.25 + 0.5)
    # label 1: kappa = [-1/2, 1, -1/2] -> 0.75 + 2.5 + 0.5
    assert co_score(linear, x, h, np.array([1]))[0] == pytest.approx(3.75)
    # x * h = [0.5, -1]: f(x*h) - f(x) = W (x*h - x) = W [-0.5, -2] = [-4.5, 0.5, -2]
    assert co_score(linear, x, h, np.array([0]), mode="product")[0] == pytest.approx(
        -4.5 - 0.25 + 1.0)
    # softmax version, by hand
    def sm(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max())
        return e / e.sum()
    fx, fxh = W @ x[0] + B, W @ (x[0] + h[0]) + B
    want = kappa(np.array([2]), 3)[0] @ (sm(fxh) - sm(fx))
    assert co_score(linear, x, h, np.array([2]), use_softmax=True)[0] == pytest.approx(want)


def test_co_score_gradient_is_kappa_vjp(linear: pbxc.Model) -> None:
    x = np.array([[0.3, -0.2], [1.0, 2.0]])
    labels = np.array([2, 0])
    _, g = co_score_gradient(linear, x, labels)
    assert np.allclose(g, kappa(labels, 3) @ W)
    _, g = co_score_gradient(linear, x, labels, use_softmax=True)
    e = 1e-6
    for j in range(2):
        d = np.zeros_like(x)
        d[:, j] = e
        vp, _ = co_score_gradient(linear, x + d, labels, use_softmax=True)
        vm, _ = co_score_gradient(linear, x - d, labels, use_softmax=True)
        assert np.allclose((vp - vm) / (2 * e), g[:, j], atol=1e-8)


def test_gap_statistic() -> None:
    assert rank_biserial(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert rank_biserial(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == -1.0
    assert rank_biserial(np.array([1.0]), np.array([1.0])) == 0.0
    assert rank_biserial(np.array([1.0, 3.0]), np.array([2.0])) == 0.0
    g = gap_statistic(np.array([5.0, 7.0, 9.0, -1.0, 0.0]),
                      np.array([True, True, True, False, False]))
    assert (g.n_correct, g.n_wrong) == (3, 2)
    assert g.median_correct == 7.0 and g.median_wrong == -0.5 and g.median_gap == 7.5
    assert g.rank_biserial == 1.0


def test_ax_accuracy_and_report(linear: pbxc.Model) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2))
    labels = rng.integers(0, 3, size=40)
    report = score_methods(linear, x, labels, ["gradient", "input"], progress=False)
    logits = x @ W.T + B
    assert report.accuracy == pytest.approx(np.mean(logits.argmax(1) == labels))
    # gradient heatmap of a linear model: the predicted class's row of W, normalised
    h = W[logits.argmax(1)] / np.abs(W[logits.argmax(1)]).max(axis=1, keepdims=True)
    after = (x + h) @ W.T + B
    res = report.methods["gradient"]
    assert res.accuracy_after["sum"] == pytest.approx(np.mean(after.argmax(1) == labels))
    assert np.allclose(res.scores["sum"], np.einsum("bc,bc->b", kappa(labels, 3), h @ W.T))
    after_p = (x * h) @ W.T + B
    assert res.accuracy_after["product"] == pytest.approx(np.mean(after_p.argmax(1) == labels))
    g = res.gaps["sum"]
    assert g.n_correct == int(report.correct.sum())
    text = report.table()
    assert "gradient" in text and "x+h" in text and "x*h" in text
    assert report.as_dict()["methods"][0]["sum"]["accuracy_after"] == res.accuracy_after["sum"]


def test_unknown_method_and_label_count(linear: pbxc.Model) -> None:
    x = np.zeros((3, 2))
    with pytest.raises(InputError, match="unknown heatmap method 'saliency'"):
        score_methods(linear, x, np.zeros(3, dtype=int), ["saliency"])
    with pytest.raises(InputError, match="3 samples but 2 labels"):
        score_methods(linear, x, np.zeros(2, dtype=int), ["gradient"])


def test_gax_increases_co_score() -> None:
    model = pbxc.load(REPO / "examples" / "breast_cancer_mlp.pbx")
    ref = np.load(REPO / "examples" / "breast_cancer_mlp_reference.npz")
    x, y = ref["inputs"][:12], ref["labels"][:12]
    res = gax(model, x, y, target_score=1e9, max_steps=15)
    assert np.all(res.steps == 15) and not res.reached.any()
    assert np.all(res.history[:, -1] > res.history[:, 0])
    assert np.allclose(res.heatmaps, np.tanh(res.weights * x) + 0.01)
    # a reachable target stops each sample at its own step, history frozen after it
    # (each sample's trajectory is its own and deterministic, so all reach the lowest final)
    res = gax(model, x, y, target_score=float(res.history[:, -1].min()), max_steps=15,
              snapshot_steps=(0, 3))
    assert res.reached.all() and res.steps.min() < res.steps.max()
    i = int(np.argmin(res.steps))
    assert np.isnan(res.history[i, res.steps[i] + 1:]).all()
    assert set(res.snapshots) == {0, 3}
    assert np.allclose(res.snapshots[0], np.tanh(x) + 0.01)


@pytest.mark.parametrize("use_softmax", [False, True])
def test_gax_gradient_matches_finite_differences(use_softmax: bool) -> None:
    model = pbxc.load(REPO / "examples" / "digits_cnn.pbx", dtype="float64")
    ref = np.load(REPO / "examples" / "digits_cnn_reference.npz")
    x, y = ref["inputs"][:3].astype(np.float64), ref["labels"][:3]
    w = np.random.default_rng(2).normal(1.0, 0.5, size=x.shape)
    loss, grad, _ = gax_loss(model, x, y, w, use_softmax=use_softmax)
    rng = np.random.default_rng(3)
    e = 1e-6
    for _ in range(6):
        idx = (slice(None), 0, int(rng.integers(8)), int(rng.integers(8)))
        d = np.zeros_like(w)
        d[idx] = e
        lp, _, _ = gax_loss(model, x, y, w + d, use_softmax=use_softmax)
        lm, _, _ = gax_loss(model, x, y, w - d, use_softmax=use_softmax)
        fd = (lp - lm) / (2 * e)
        assert np.allclose(fd, grad[idx], rtol=1e-5, atol=1e-7 * np.abs(loss).max()), (fd, grad[idx])
