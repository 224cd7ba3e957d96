"""The second-order properties of pbxc verify (specs/hessian.md): they hold on the smooth
examples, catch a wrong f'', and their counterexamples replay."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pbxc
from pbxc.runtime.model import ActivationTable
from pbxc.verify import (
    PROPERTIES,
    Context,
    Skip,
    config_for,
    load_counterexample,
    verify_model,
)

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


@functools.cache
def wine() -> pbxc.Model:
    return pbxc.load(EXAMPLES / "wine_swish_mlp.pbx", dtype="float64")


def samples(count: int) -> dict[str, np.ndarray]:
    with np.load(EXAMPLES / "wine_swish_mlp_reference.npz", allow_pickle=False) as f:
        return wine().prepare_inputs(f["inputs"][:count])


@pytest.mark.parametrize("name", ["hessian_symmetry", "hessian_fd", "taylor_residual"])
def test_second_order_properties_hold_on_wine(name: str) -> None:
    ctx = Context(wine())
    cfg = config_for(name, "float64")
    outcomes = PROPERTIES[name].check(ctx, samples(4), cfg)
    assert len(outcomes) == 4
    assert all(PROPERTIES[name].holds(o.measured, cfg.tol) for o in outcomes)
    if name == "taylor_residual":    # a real fit, not the no-pair fallback
        assert all("residual order" in o.detail for o in outcomes)


TINY = """model tiny
weights "w.npz"
input x: float64[3]
h = tanh(linear(x, @fc))
g = softplus(linear(h, @mid))
output p = log_softmax(linear(g, @out))
"""


@pytest.mark.parametrize("on", ["logits", "probabilities"])
def test_hessian_mp_holds_and_skips_large_models(write_model: Any, on: str) -> None:
    rng = np.random.default_rng(3)
    w = {"fc.weight": rng.normal(size=(4, 3)), "fc.bias": rng.normal(size=4),
         "mid.weight": rng.normal(size=(4, 4)), "mid.bias": rng.normal(size=4),
         "out.weight": rng.normal(size=(3, 4)), "out.bias": rng.normal(size=3)}
    tiny = pbxc.load(write_model(TINY, w))
    cfg = config_for("hessian_mp", "float64", {"on": on})
    outcomes = PROPERTIES["hessian_mp"].check(Context(tiny),
                                              tiny.prepare_inputs(rng.normal(size=(2, 3))), cfg)
    assert all(o.measured < 1e-13 and "40-digit mpmath" in o.detail for o in outcomes)
    assert outcomes[0].arrays["mp_hessian"].shape == (1, 3, 3)
    assert np.abs(outcomes[0].arrays["mp_hessian"]).max() > 1e-3
    big = pbxc.load(EXAMPLES / "breast_cancer_smooth_mlp.pbx")
    with pytest.raises(Skip, match="max_params"):
        PROPERTIES["hessian_mp"].check(Context(big), big.prepare_inputs(np.ones((1, 30))), cfg)


def test_a_wrong_second_derivative_is_caught_and_replays(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    model = pbxc.load(EXAMPLES / "wine_swish_mlp.pbx", dtype="float64")
    right = ActivationTable.second_derivative
    monkeypatch.setattr(ActivationTable, "second_derivative",
                        lambda self, name, z: 1.001 * right(self, name, z))
    _, results = verify_model(model, samples=samples(3), properties=["hessian_fd"],
                              examples=1, counterexample_dir=tmp_path)
    (result,) = results
    assert result.status == "violated" and result.counterexample is not None
    assert result.counterexample.outcome.measured > 1e-4
    replay = load_counterexample(Path(str(result.counterexample.file)))
    assert replay.config.name == "hessian_fd"
    ctx = Context(model)
    again = PROPERTIES["hessian_fd"].check(ctx, replay.inputs, replay.config)[0]
    assert not PROPERTIES["hessian_fd"].holds(again.measured, replay.config.tol)
    monkeypatch.setattr(ActivationTable, "second_derivative", right)
    fixed = PROPERTIES["hessian_fd"].check(ctx, replay.inputs, replay.config)[0]
    assert PROPERTIES["hessian_fd"].holds(fixed.measured, replay.config.tol)


LAYERNORM = """model ln
weights "w.npz"
input x: float64[4, 8]
h = layernorm(x, @ln, eps=1e-5)
output logits = linear(tanh(flatten(h)), @head)
"""


def test_taylor_residual_halves_into_the_asymptotic_regime(write_model: Any) -> None:
    """A layer norm of a zero token bends on the scale sqrt(eps) ~ 0.003, below the first
    step 0.02: the residual's O(d^3) law shows only after more halvings, which the property
    takes instead of reporting a violation (the mixer's counterexample, made small)."""
    rng = np.random.default_rng(0)
    model = pbxc.load(write_model(LAYERNORM, {
        "ln.weight": 1 + 0.1 * rng.normal(size=8), "ln.bias": rng.normal(size=8),
        "head.weight": rng.normal(size=(3, 32)), "head.bias": np.zeros(3)}))
    x = np.zeros((1, 4, 8))
    x[0, 1:] = rng.normal(size=(3, 8))      # one constant token, three ordinary ones
    cfg = config_for("taylor_residual", "float64")
    (outcome,) = PROPERTIES["taylor_residual"].check(Context(model), {"x": x}, cfg)
    assert PROPERTIES["taylor_residual"].holds(outcome.measured, cfg.tol), outcome.detail
    assert "residual order" in outcome.detail and "from step 0.02;" not in outcome.detail
    few = dict(cfg.settings)
    (first,) = PROPERTIES["taylor_residual"].check(
        Context(model), {"x": x}, type(cfg)(cfg.name, 10.0, few))   # no halving on
    assert first.measured > cfg.tol and "from step 0.02;" in first.detail


def test_a_wrong_second_derivative_fails_taylor_residual(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """Halving on does not hide a wrong Hessian: its O(d^2) residual keeps the order at 2."""
    right = ActivationTable.second_derivative
    monkeypatch.setattr(ActivationTable, "second_derivative",
                        lambda self, name, z: 1.05 * right(self, name, z))
    cfg = config_for("taylor_residual", "float64")
    outcomes = PROPERTIES["taylor_residual"].check(Context(wine()), samples(2), cfg)
    assert any(not PROPERTIES["taylor_residual"].holds(o.measured, cfg.tol) for o in outcomes)
