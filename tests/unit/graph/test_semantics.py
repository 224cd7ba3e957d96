"""Semantic checks: names, ops, arguments, cycles and shapes, each reported with its position."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import pbxc
from pbxc.errors import PbxError, PbxValidationError
from pbxc.graph.build import build_graph
from pbxc.ops import OpKind
from pbxc.parse.parser import parse_text


def errors_of(text: str) -> list[tuple[int, str]]:
    with pytest.raises(PbxValidationError) as info:
        build_graph(parse_text(text, "m.pbx"))
    return [(d.pos.line if d.pos else 0, d.message) for d in info.value.diagnostics]


def only_error(text: str) -> tuple[int, str]:
    errs = errors_of(text)
    assert len(errs) == 1, errs
    return errs[0]


HEAD = "model m\ninput x: float32[4]\n"


def test_unknown_op_suggests_nearest() -> None:
    line, msg = only_error(HEAD + "output y = lineer(x, @fc)")
    assert line == 3 and "unknown op 'lineer'; did you mean 'linear'?" in msg


def test_unknown_activation_suggests_nearest() -> None:
    _, msg = only_error(HEAD + "output y = sigmod(x)")
    assert "unknown op 'sigmod'" in msg and "'sigmoid'" in msg


def test_user_activation_names_are_known_ops() -> None:
    graph = build_graph(parse_text(
        HEAD + "activation sq(z, a = 2) = a * z ^ 2\noutput y = sq(x, a=3)", "m.pbx"))
    node = graph.node("y")
    assert node.kind is OpKind.ACTIVATION and node.activation_params == (("a", 3.0),)


@pytest.mark.parametrize(("call", "fragment"), [
    ("add(x)", "takes two input values, or one and a constant"),
    ("relu()", "takes 1 input value, got 0"),
    ("relu(x, 2)", "takes 0 parameters after its input"),
    ("leaky_relu(x, slope=0.1)", "has no parameter 'slope'"),
    ("leaky_relu(x, alpha=@w)", "must be a number"),
    ("linear(x)", "needs weights"),
    ("linear(x, @w, strid=2)", "has no argument 'strid'"),
    ("conv2d(x, @w, stride=1.5)", "'stride' of conv2d() must be an integer or 2 integers"),
    ("conv2d(x, @w, stride=(1, 2, 3))", "2 integers in parentheses"),
    ("conv2d(x, @w, stride=0)", "must be at least 1"),
    ("maxpool2d(x)", "needs 'kernel'"),
    ("maxpool2d(x, @w, 2)", "has no weights"),
    ("reshape(x, [2, -1, -1])", "at most one dimension may be -1"),
    ("reshape(x, 4)", "a list of dimensions"),
    ("softmax(x, axis=true)", "must be an integer"),
    ("avgpool2d(x, 2, count_include_pad=3)", "must be true or false"),
    ("linear(x, @w, bias=3)", "must be a weight reference"),
    ("relu(x, x)", "takes 0 parameters"),
    ("concat(x, x, axis=0, axis=1)", "got 'axis' twice"),
])
def test_wrong_arguments(call: str, fragment: str) -> None:
    errs = errors_of(HEAD + f"output y = {call}")
    assert any(fragment in msg for _, msg in errs), errs
    assert all(line == 3 for line, _ in errs)


def test_undefined_and_redefined_names() -> None:
    errs = errors_of(HEAD + "h = relu(x)\nh = tanh(x)\noutput y = add(h, hh, q)")
    messages = [m for _, m in errs]
    assert (4, "'h' is already defined at line 3") in errs
    assert any("undefined name 'hh'; did you mean 'h'?" in m for m in messages)
    assert any("undefined name 'q'" in m for m in messages)


def test_input_redefined_by_statement() -> None:
    line, msg = only_error(HEAD + "x = relu(x)\noutput x")
    assert line == 3 and "'x' is already defined at line 2" in msg


def test_cycle_is_reported_with_its_path() -> None:
    line, msg = only_error(HEAD + "a = add(x, c)\nb = relu(a)\nc = tanh(b)\noutput c")
    assert line in (3, 4, 5) and msg.startswith("cycle: ")
    assert all(n in msg for n in ("a", "b", "c"))


def test_forward_references_are_allowed() -> None:
    graph = build_graph(parse_text(HEAD + "output y = relu(h)\nh = tanh(x)", "m.pbx"))
    assert [n.name for n in graph.topological()] == ["x", "h", "y"]


def test_several_errors_are_reported_together() -> None:
    errs = errors_of(HEAD + "a = relu(nope)\nb = lineer(x)\nc = tanh(x, 1)\noutput c")
    assert [line for line, _ in errs] == [4, 5, 3] or sorted(line for line, _ in errs) == [3, 4, 5]
    assert len(errs) == 3


def test_missing_inputs_and_outputs() -> None:
    errs = errors_of("model m\nh = relu(q)")
    messages = " ".join(m for _, m in errs)
    assert "declares no input" in messages and "declares no output" in messages


def test_user_activation_errors() -> None:
    errs = errors_of(HEAD + "activation f(z, a = 1) = z * b + foo(z) + exp(z, z) + abs(z > 0)\n"
                     "activation relu(z) = z\noutput y = f(x)")
    messages = [m for _, m in errs]
    assert any("unknown name 'b'" in m for m in messages)
    assert any("unknown function 'foo'" in m for m in messages)
    assert any("exp() takes 1 argument, got 2" in m for m in messages)
    assert any("comparison may appear only" in m for m in messages)
    assert any("redefines a built-in op" in m for m in messages)


def test_recursive_activation_is_refused() -> None:
    _, msg = only_error(HEAD + "activation f(z) = g(z)\nactivation g(z) = f(z) + 1\noutput y = f(x)")
    assert "defined in terms of itself" in msg


def test_feature_and_class_counts_are_checked(write_model: Callable[..., Path]) -> None:
    _, msg = only_error("model m\ninput x: float32[3] features [\"a\", \"b\"]\noutput x")
    assert "3 elements but 2 feature names" in msg
    path = write_model("model m\nweights \"w.npz\"\ninput x: float32[3]\n"
                       "output y = linear(x, @fc) classes [\"a\"]",
                       {"fc.weight": np.ones((2, 3)), "fc.bias": np.zeros(2)})
    with pytest.raises(PbxValidationError, match="2 elements but 1 class names"):
        pbxc.load(path)


# ------------------------------------------------------------------ shapes (need weights)

def test_shape_mismatch_states_both_shapes(write_model: Callable[..., Path]) -> None:
    path = write_model(
        "model m\nweights \"w.npz\"\ninput x: float32[4]\ninput u: float32[3]\n"
        "h = linear(x, @fc)\noutput y = add(h, u)",
        {"fc.weight": np.ones((5, 4)), "fc.bias": np.zeros(5)})
    with pytest.raises(PbxValidationError) as info:
        pbxc.check_file(path)
    d = info.value.diagnostics[0]
    assert d.pos is not None and d.pos.line == 6
    assert "'h' is [5] but 'u' is [3]" in d.message


@pytest.mark.parametrize(("body", "weights", "fragment"), [
    ("output y = linear(x, @fc)", {"fc.weight": np.ones((2, 5)), "fc.bias": np.zeros(2)},
     "has shape [2, 5] = [out, in], but the input 'x' has 4 features"),
    ("output y = linear(x, @fc)", {"fc.weight": np.ones((2, 4)), "fc.bias": np.zeros(3)},
     "weight 'fc.bias' (bias of linear) has shape [3], expected [2]"),
    ("output y = conv2d(reshape(x, [1, 2, 2]), @c, bias=false)", {"c.weight": np.ones((2, 3, 1, 1))},
     "expected 1 input channels per group"),
    ("output y = conv2d(x, @c, bias=false)", {"c.weight": np.ones((2, 1, 1, 1))},
     "expects input of shape [C, H, W] per sample, got [4]"),
    ("output y = maxpool2d(reshape(x, [1, 2, 2]), 3)", {},
     "does not fit an axis of 2"),
    ("output y = reshape(x, [3, -1])", {}, "cannot reshape [4] (4 elements) to [3, -1]"),
    ("output y = concat(x, reshape(x, [2, 2]))", {}, "does not match"),
    ("output y = softmax(x, axis=1)", {}, "axis 1 is out of range"),
    ("output y = batchnorm(reshape(x, [2, 2]), @bn)",
     {"bn.weight": np.ones(2), "bn.bias": np.ones(2), "bn.running_mean": np.ones(3),
      "bn.running_var": np.ones(2)}, "weight 'bn.running_mean' (running_mean of batchnorm)"),
    ("output y = normalize(x, @s)", {"s.mean": np.ones(3), "s.std": np.ones(4)},
     "(mean of normalize) has shape [3]"),
    ("output y = normalize(x, @s)", {"s.mean": np.ones(4), "s.std": np.zeros(4)},
     "zero entries"),
])
def test_shape_errors(write_model: Callable[..., Path], body: str,
                      weights: dict[str, np.ndarray], fragment: str) -> None:
    weights = {**weights, "unused": np.zeros(1)}
    path = write_model(f"model m\nweights \"w.npz\"\ninput x: float32[4]\n{body}", weights)
    with pytest.raises(PbxError) as info:
        pbxc.check_file(path)
    messages = [d.message for d in info.value.diagnostics]
    assert any(fragment in m for m in messages), messages
    assert all(d.pos is not None and d.pos.line == 4 for d in info.value.diagnostics)
