"""The parser: well-formed programs become ASTs with positions; malformed ones get located errors."""

from __future__ import annotations

import pytest

from pbxc.errors import PbxSyntaxError
from pbxc.parse import ast
from pbxc.parse.parser import parse_text

GOOD = '''\
model m   # comment
weights "a.npz", "b.safetensors"
input x: float32[1, 8, 8] features ["a"]
activation sw(z, beta = -2.5e-1) = z * sigmoid(beta * z) ^ 2 - where(z >= 0, z, -z)
h = relu(conv2d(x, @"layers.0", stride=(2, 2), padding=1, bias=false))
output y = softmax(flatten(h), axis=-1) classes ["p", "q"]
output h
'''


def test_program_structure_and_positions() -> None:
    program = parse_text(GOOD, "good.pbx")
    assert program.name == "m"
    assert [type(i).__name__ for i in program.items] == [
        "WeightsDecl", "InputDecl", "ActivationDef", "Assign", "OutputDecl", "OutputDecl"]
    weights = program.weights[0]
    assert [p.value for p in weights.paths] == ["a.npz", "b.safetensors"]
    inp = program.inputs[0]
    assert (inp.name, inp.dtype, inp.shape, inp.features) == ("x", "float32", (1, 8, 8), ("a",))
    assert (inp.pos.line, inp.pos.column) == (3, 7)
    act = program.activations[0]
    assert act.params == (("beta", -0.25),)
    assert isinstance(act.body, ast.BinOp) and act.body.op == "-"
    assign = program.items[3]
    assert isinstance(assign, ast.Assign)
    relu = assign.call
    assert relu.op == "relu" and (relu.pos.line, relu.pos.column) == (5, 5)
    conv = relu.args[0].value
    assert isinstance(conv, ast.Call) and conv.op == "conv2d"
    param = conv.args[1].value
    assert isinstance(param, ast.ParamRef) and param.key == "layers.0"
    kw = {a.keyword: a.value for a in conv.args if a.keyword}
    assert isinstance(kw["stride"], ast.SeqLit) and len(kw["stride"].items) == 2
    assert isinstance(kw["bias"], ast.BoolLit) and kw["bias"].value is False
    out = program.items[4]
    assert isinstance(out, ast.OutputDecl) and out.classes == ("p", "q")
    last = program.items[5]
    assert isinstance(last, ast.OutputDecl) and last.call is None


def test_alias_is_an_identity_call() -> None:
    program = parse_text("model m\ninput x: float32[2]\nh = x\noutput y = h", "a.pbx")
    calls = [i.call for i in program.items if isinstance(i, (ast.Assign, ast.OutputDecl))]
    assert [(c.op, c.args[0].value.name) for c in calls if c is not None] == [
        ("identity", "x"), ("identity", "h")]


def test_string_escapes_are_decoded_without_eval() -> None:
    program = parse_text('model m\ninput x: float32[2] features ["a\\"b", "c\\\\d"]\noutput x',
                         "s.pbx")
    assert program.inputs[0].features == ('a"b', "c\\d")


@pytest.mark.parametrize(
    ("text", "line", "column", "fragment"),
    [
        ("input x: float32[3]", 1, 1, "starts with 'model NAME'"),
        ("model m\ninput x[3]", 2, 8, "input NAME: float32"),
        ("model m\ninput x: float32[a]", 2, 18, "positive integers"),
        ("model m\nh = relu(x y)", 2, 12, "separated by commas"),
        ("model m\nh = 3\n", 2, 5, "statement is 'NAME = op(...)'"),
        ("model m\nweights 'w.npz'", 2, 9, "double quotes"),
        ("model m\nactivation f(z, p) = z", 2, 18, "activation is defined"),
        ("model m\nh = relu(x", 2, 11, "unexpected end of file"),
        ("model m\ninput x: float16[3]", 2, 10, "expected a dtype"),
        ("model m\nh = relu(x) $", 2, 13, "unexpected character '$'"),
    ],
)
def test_syntax_errors_are_located(text: str, line: int, column: int, fragment: str) -> None:
    with pytest.raises(PbxSyntaxError) as info:
        parse_text(text, "bad.pbx")
    err = info.value
    assert err.pos is not None
    assert (err.pos.file, err.pos.line, err.pos.column) == ("bad.pbx", line, column)
    assert fragment in err.message
    rendered = err.render().splitlines()
    assert rendered[0].startswith(f"bad.pbx:{line}:{column}: error: ")
    source_line = text.splitlines()[line - 1]
    assert rendered[1].endswith(source_line)
    # the caret sits under the column
    caret_line = rendered[2]
    gutter = rendered[1].index("|") + 2
    assert caret_line.index("^") - gutter == column - 1


def test_caret_underlines_the_whole_token() -> None:
    with pytest.raises(PbxSyntaxError) as info:
        parse_text("model m\nh = relu(x yy)", "bad.pbx")
    assert info.value.render().splitlines()[2].endswith("^~")
