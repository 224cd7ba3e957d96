"""pbxc verify: the verify block, the properties on the examples, counterexamples that shrink
and replay, and deliberately broken rules that the verifier must catch (injected by
monkeypatching, never by editing the library)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import pbxc
from pbxc.cli import main
from pbxc.codegen import numpy_kernels as K
from pbxc.errors import PbxValidationError
from pbxc.runtime.model import ActivationTable
from pbxc.symbolic.derive import derive
from pbxc.symbolic.routine import bind
from pbxc.verify import PROPERTIES, Context, config_for, load_counterexample, verify_model
from pbxc.verify.lanes import float_kit, reference_jacobian
from pbxc.verify.search import run_property

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"

SMALL = '''model small
weights "w.npz"
input x: float64[3]
h = tanh(linear(x, @fc))
output y = linear(h, @out)
verify {
  domain x in [0, 1]
  multiplier_accuracy(baseline=zeros)
  summation_to_delta(tol=1e-12, baseline=zeros)
  search(examples=100, seed=3)
}
'''


def _small_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"fc.weight": rng.normal(size=(4, 3)), "fc.bias": rng.normal(size=4),
            "out.weight": rng.normal(size=(2, 4)), "out.bias": rng.normal(size=2)}


def _stable(self: ActivationTable, node: str, z0: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The symbolic stage's cancellation-free multiplier routine."""
    calc = derive(self.keys[node])
    return np.asarray(bind(calc.multiplier, z.dtype)(z0, z), dtype=z.dtype)


def _threshold(self: ActivationTable, node: str, z0: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Broken: switches to the gradient f'(z0) whenever |z - z0| < 1e-7."""
    small = np.abs(z - z0) < 1e-7
    return np.where(small, self.derivative(node, z0), _stable(self, node, z0, z)).astype(z.dtype)


def _load(write_model: Callable[..., Path], text: str = SMALL) -> pbxc.Model:
    return pbxc.load(write_model(text, _small_weights()), dtype="float64")


# ---------------------------------------------------------------- the block


def test_verify_block_becomes_the_plan(write_model: Callable[..., Path]) -> None:
    model = _load(write_model)
    plan, _ = verify_model(model, examples=0)
    assert [c.name for c in plan.checks] == ["multiplier_accuracy", "summation_to_delta"]
    assert plan.checks[1].tol == 1e-12 and plan.checks[1].pos is not None
    assert plan.checks[1].pos.line == 9
    assert plan.seed == 3
    assert plan.domains["x"].low.tolist() == [0, 0, 0]


@pytest.mark.parametrize(("check", "message"), [
    ("sumation_to_delta", "unknown property 'sumation_to_delta'; did you mean "
                          "'summation_to_delta'?"),
    ("jacobian_fd(tolerance=1)", "jacobian_fd has no setting 'tolerance'"),
])
def test_bad_checks_are_reported_at_their_line(write_model: Callable[..., Path], check: str,
                                               message: str) -> None:
    text = SMALL.replace("multiplier_accuracy(baseline=zeros)", check)
    model = _load(write_model, text)
    with pytest.raises(PbxValidationError) as info:
        verify_model(model, examples=0)
    assert message in info.value.message
    assert info.value.pos is not None and info.value.pos.line == 8


# ---------------------------------------------------------------- the examples


@pytest.mark.parametrize("name", ["breast_cancer_mlp", "digits_cnn", "digits_resnet"])
def test_every_property_holds_on_the_relu_examples(name: str) -> None:
    model = pbxc.load(EXAMPLES / f"{name}.pbx", dtype="float64")
    data = np.load(EXAMPLES / f"{name}_reference.npz")["inputs"].astype(np.float64)
    _, results = verify_model(model, data={model.input_names[0]: data},
                              samples={model.input_names[0]: data[:4]}, examples=5)
    for r in results:
        assert r.status in ("holds", "skipped"), (r.config.name, r.counterexample)
    skipped = {r.config.name: r.reason for r in results if r.status == "skipped"}
    if name != "digits_cnn":
        assert "weight values" in skipped["jacobian_mp"]   # refused: too large for mpmath


def test_lane_evaluator_agrees_with_the_runtime_jacobian() -> None:
    model = pbxc.load(EXAMPLES / "digits_resnet.pbx", dtype="float64")
    x = np.load(EXAMPLES / "digits_resnet_reference.npz")["inputs"][:1].astype(np.float64)
    ref, _ = reference_jacobian(model, {"image": x[0]}, "logits", "image", float_kit(model))
    np.testing.assert_allclose(model.jacobian(x).jacobian[0], ref, rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------- broken rules are caught


def test_naive_threshold_multiplier_is_caught_and_shrunk(
        write_model: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    model = _load(write_model)
    monkeypatch.setattr(ActivationTable, "multiplier", _stable)
    _, results = verify_model(model, properties=["multiplier_accuracy"])
    assert results[0].status == "holds", results[0].counterexample

    monkeypatch.setattr(ActivationTable, "multiplier", _threshold)
    _, results = verify_model(model, properties=["multiplier_accuracy"],
                              counterexample_dir=tmp_path)
    r = results[0]
    assert r.status == "violated" and r.counterexample is not None
    cx = r.counterexample
    assert cx.origin == "search (shrunk)" and cx.outcome.nodes == ("h",)
    z = model.evaluate(model.prepare_inputs(cx.inputs["x"]))["h/linear"]
    z0 = model.evaluate(model.prepare_inputs(np.zeros((1, 3))))["h/linear"]
    assert np.abs(z - z0).min() < 1e-7            # it found the regime the bug lives in
    # the saved file replays: the broken rule still fails, the stable one holds
    assert cx.file is not None
    replay = load_counterexample(Path(cx.file))
    assert replay.config.name == "multiplier_accuracy"
    assert main(["verify", "--replay", cx.file, "-q"]) == 1
    monkeypatch.setattr(ActivationTable, "multiplier", _stable)
    assert main(["verify", "--replay", cx.file, "-q"]) == 0


def _maxpool_indicator(m: np.ndarray, xs: list[np.ndarray], xs0: list[np.ndarray],
                       y: np.ndarray, y0: np.ndarray, local: np.ndarray, p: dict[str, np.ndarray],
                       kernel: tuple[int, int], stride: tuple[int, int],
                       padding: tuple[int, int]) -> list[np.ndarray]:
    """Broken: eq. 13's indicator on the argmax of x, ignoring defaults that differ."""
    result: list[np.ndarray] = K.maxpool2d_vjp(m, xs, y, local, p, kernel, stride, padding)
    return result


def test_maxpool_rule_ignoring_differing_defaults_is_caught(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = pbxc.load(EXAMPLES / "digits_cnn.pbx", dtype="float64")
    data = np.load(EXAMPLES / "digits_cnn_reference.npz")["inputs"].astype(np.float64)
    # the mean image: a default that differs across the windows
    cfg = config_for("summation_to_delta", model.dtype, {"baseline": "mean"})
    ctx = Context(model, {"image": data}, EXAMPLES)
    check = PROPERTIES["summation_to_delta"].check
    x = model.prepare_inputs(data[:8])
    assert max(o.measured for o in check(ctx, x, cfg)) < 1e-12
    monkeypatch.setattr(K, "maxpool2d_dfd", _maxpool_indicator)
    worst = max(check(ctx, x, cfg), key=lambda o: o.measured)
    assert worst.measured > 1e-6
    assert worst.nodes[0] == "p1"                  # localised to the max-pooling node
    # the search finds one in the domain alone, and shrinks it
    plan, _ = verify_model(model, data={"image": data}, properties=["summation_to_delta"],
                           examples=0)
    plan.examples = 30
    result = run_property(ctx, cfg, None, plan)
    assert result.status == "violated" and result.counterexample is not None
    assert result.counterexample.origin == "search (shrunk)"
    assert result.counterexample.outcome.nodes[0] == "p1"


# ---------------------------------------------------------------- kinks


def test_kinks_report_one_sided_jacobians(write_model: Callable[..., Path]) -> None:
    text = '''model kinked
weights "w.npz"
input x: float64[2]
h = relu(linear(x, @fc))
output y = linear(h, @out)
'''
    weights = {"fc.weight": np.array([[1.0, -1.0], [0.5, 0.25]]), "fc.bias": np.zeros(2),
               "out.weight": np.array([[2.0, 1.0]]), "out.bias": np.zeros(1)}
    model = pbxc.load(write_model(text, weights))
    ctx = Context(model)
    cfg = config_for("kinks", model.dtype)
    x = model.prepare_inputs(np.array([[0.3, 0.3], [1.0, 0.0]]))  # first: unit 0 at z = 0
    at_kink, smooth = PROPERTIES["kinks"].check(ctx, x, cfg)
    assert not PROPERTIES["kinks"].holds(at_kink.measured, cfg.tol)
    assert at_kink.nodes == ("h",)
    np.testing.assert_allclose(at_kink.arrays["jacobian_left"][0], [[0.5, 0.25]])
    np.testing.assert_allclose(at_kink.arrays["jacobian_right"][0], [[2.5, -1.75]])
    assert PROPERTIES["kinks"].holds(smooth.measured, cfg.tol)


# ---------------------------------------------------------------- the command


def test_cli_json_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "r.json"
    code = main(["verify", str(EXAMPLES / "breast_cancer_mlp.pbx"), "--data",
                 str(EXAMPLES / "breast_cancer_mlp_reference.npz"), "--key", "inputs",
                 "--samples", "4", "--examples", "3", "-p", "summation_to_delta",
                 "-p", "gradient_row", "--json", str(report), "-q"])
    assert code == 0
    out = json.loads(report.read_text())
    assert [p["property"] for p in out["properties"]] == ["summation_to_delta", "gradient_row"]
    assert out["holds"] and "every property holds" in capsys.readouterr().out
    assert main(["verify", str(EXAMPLES / "breast_cancer_mlp.pbx"), "-p", "nope"]) == 2
    assert main(["verify"]) == 2


LAYERNORM = '''model ln
weights "w.npz"
input x: float64[4, 8]
h = layernorm(x, @ln, eps=1e-6)
output logits = linear(flatten(h), @head)
'''


def _layernorm_model(write_model: Callable[..., Path]) -> pbxc.Model:
    rng = np.random.default_rng(0)
    path = write_model(LAYERNORM, {"ln.weight": 1 + 0.1 * rng.normal(size=8),
                                   "ln.bias": rng.normal(size=8),
                                   "head.weight": rng.normal(size=(3, 32)),
                                   "head.bias": np.zeros(3)})
    return pbxc.load(path, dtype="float64")


def test_jacobian_fd_at_a_constant_token_is_not_a_false_violation(
        write_model: Callable[..., Path]) -> None:
    """A layer norm of a zero token (variance 0, curvature ~ eps^-3/2): central differences
    alone miss 1e-6 there although the Jacobian is exact; Richardson's (h, h/2) holds."""
    model = _layernorm_model(write_model)
    x = np.zeros((1, 4, 8))
    ctx = Context(model, scales={"x": np.ones((4, 8))})
    config = config_for("jacobian_fd", np.float64)
    assert config.tol == 1e-6
    (plain,) = PROPERTIES["jacobian_fd"].check(ctx, {"x": x},
                                               dataclasses.replace(config, tol=1.0))
    assert plain.measured > 1e-6 and "Richardson" not in plain.detail   # step h alone
    (refined,) = PROPERTIES["jacobian_fd"].check(ctx, {"x": x}, config)
    assert refined.measured < 1e-8 and "Richardson" in refined.detail


def test_jacobian_fd_still_catches_a_wrong_jacobian(write_model: Callable[..., Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    model = _layernorm_model(write_model)
    real = type(model).jacobian

    def off(self: pbxc.Model, *args: object, **kwargs: object) -> object:
        result = real(self, *args, **kwargs)
        result.jacobian[..., 0, 0] *= 1.0001          # one column 1e-4 off
        return result

    monkeypatch.setattr(type(model), "jacobian", off)
    x = np.random.default_rng(1).normal(size=(1, 4, 8))
    ctx = Context(model, scales={"x": np.ones((4, 8))})
    (outcome,) = PROPERTIES["jacobian_fd"].check(ctx, {"x": x},
                                                 config_for("jacobian_fd", np.float64))
    assert outcome.measured > 1e-6 and "Richardson" in outcome.detail
