"""The ``lrp { ... }`` block of a .pbx: the model's own rule assignment, everywhere LRP runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import pbxc
from pbxc.cli import main
from pbxc.runtime.compile import compile_model
from pbxc.runtime.lrp_rules import LrpConfigError, ZBox, ZPlus

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
CNN = (EXAMPLES / "digits_cnn.pbx").read_text(encoding="utf-8")
X = np.load(EXAMPLES / "digits_cnn_reference.npz")["inputs"][:5].astype(np.float64)


def _model(block: str) -> pbxc.Model:
    return pbxc.loads(CNN + "\n" + block, path=str(EXAMPLES / "digits_cnn.pbx"),
                      dtype="float64")


BLOCK = """lrp {
  composite epsilon_gamma_box(gamma=0.5)
  c2 = alphabeta(2, beta=1)
  logits = epsilon(0.25)
}"""


def test_block_sets_composite_and_statement_rules() -> None:
    model = _model(BLOCK)
    res = model.lrp(X)
    assert res.rules["c1/conv2d"].startswith("zbox")        # the composite's first layer
    assert res.rules["c2/conv2d"] == "alphabeta(alpha=2, beta=1)"
    assert res.rules["logits"].startswith("epsilon(epsilon=0.25")
    assert res.ledger.conservation_error.max() < 1e-12
    # identical to spelling the same assignment out through the API
    from pbxc.runtime.lrp_rules import AlphaBeta, Epsilon, get_composite
    data = X  # z^B bounds default to the range of the first layer's input over the batch
    spelled = pbxc.load(EXAMPLES / "digits_cnn.pbx", dtype="float64").lrp(
        X, composite=get_composite("epsilon-gamma-box", low=float(data.min()),
                                   high=float(data.max()), gamma=0.5))
    spelled_over = pbxc.load(EXAMPLES / "digits_cnn.pbx", dtype="float64").lrp(
        X, composite=get_composite("epsilon-gamma-box", low=float(data.min()),
                                   high=float(data.max()), gamma=0.5),
        overrides={"c2": AlphaBeta(alpha=2, beta=1), "logits": Epsilon(epsilon=0.25)})
    np.testing.assert_array_equal(res.relevance["image"], spelled_over.relevance["image"])
    assert not np.array_equal(res.relevance["image"], spelled.relevance["image"])


def test_api_arguments_replace_or_refine_the_block() -> None:
    model = _model(BLOCK)
    assert model.lrp(X, composite="epsilon").rules["c2/conv2d"].startswith("epsilon")
    assert model.lrp(X, rule="lrp0").rules["logits"] == "lrp0"
    refined = model.lrp(X, overrides={"c2": ZPlus()}).rules
    assert refined["c2/conv2d"].startswith("zplus") and refined["logits"].startswith("epsilon(")


def test_bounds_written_in_the_block_are_used() -> None:
    model = _model("lrp { composite epsilon_gamma_box(low=-2, high=3) }")
    res = model.lrp(X)
    ref = pbxc.load(EXAMPLES / "digits_cnn.pbx", dtype="float64").lrp(
        X, overrides={"c1": ZBox(low=-2.0, high=3.0)}, composite="epsilon-gamma-box")
    np.testing.assert_allclose(res.relevance["image"], ref.relevance["image"], rtol=1e-13,
                               atol=1e-15)


def test_a_rule_value_the_rule_rejects_cites_the_line() -> None:
    model = _model("lrp { c2 = alphabeta(alpha=2, beta=2) }")
    with pytest.raises(LrpConfigError, match="alpha - beta = 1") as info:
        model.lrp(X)
    assert info.value.pos is not None and info.value.pos.line == CNN.count("\n") + 2


def test_compiled_module_defaults_to_the_block(tmp_path: Path) -> None:
    model = _model(BLOCK.replace("(gamma=0.5)", "(low=0, high=1, gamma=0.5)"))
    files = compile_model(model, tmp_path / "out")
    spec = importlib.util.spec_from_file_location("generated_lrp_block", files[0])
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    relevance, ledger = gen.lrp(X)
    assert np.allclose(ledger["inputs"] + ledger["bias"] + ledger["stabiliser"], ledger["start"])
    np.testing.assert_allclose(relevance, model.lrp(X).relevance["image"], rtol=1e-12,
                               atol=1e-14)
    # the bounds written in the block are compiled in: low/high of the call do not move them
    moved, _ = gen.lrp(X, low=-5.0, high=5.0)
    np.testing.assert_array_equal(moved, relevance)
    plain, _ = gen.lrp(X, composite="epsilon")
    np.testing.assert_allclose(plain, model.lrp(X, composite="epsilon").relevance["image"],
                               rtol=1e-12, atol=1e-14)


def test_cli_uses_the_block_unless_told_otherwise(tmp_path: Path) -> None:
    path = tmp_path / "cnn.pbx"
    path.write_text(CNN.replace('"digits_cnn', f'"{EXAMPLES}/digits_cnn') + "\n" + BLOCK)
    np.save(tmp_path / "x.npy", X)
    out_file, out_cli = tmp_path / "file.npz", tmp_path / "cli.npz"
    base = ["explain", str(path), "-m", "lrp", "-i", str(tmp_path / "x.npy"), "--dtype",
            "float64"]
    assert main([*base, "-o", str(out_file)]) == 0
    assert main([*base, "--composite", "epsilon", "-o", str(out_cli)]) == 0
    want_file = _model(BLOCK).lrp(X).relevance["image"]
    with np.load(out_file) as a, np.load(out_cli) as b:
        np.testing.assert_allclose(a["attributions"], want_file, rtol=1e-12, atol=1e-14)
        assert not np.allclose(a["attributions"], b["attributions"])


def test_every_mistake_in_the_block_is_reported_with_its_line() -> None:
    text = CNN + """
lrp {
  composite epsilon_gama_box(low=-1)
  composite lrp0
  cc1 = gamma(0.5)
  c1 = gama
  logits = epsilon(0.25, 3)
  image = epsilon
  logits = zbox(low=1, hi=2)
}
"""
    with pytest.raises(pbxc.PbxValidationError) as info:
        pbxc.loads(text, path=str(EXAMPLES / "digits_cnn.pbx"))
    messages = {d.message.split(";")[0]: d.pos.line for d in info.value.diagnostics
                if d.pos is not None}
    first = CNN.count("\n") + 3
    assert messages == {
        "unknown LRP composite 'epsilon-gama-box'": first,
        f"a second composite (the first is at line {first})": first + 1,
        "'cc1' is not a statement of this model": first + 2,
        "unknown LRP rule 'gama'": first + 3,
        "rule 'epsilon' takes 1 parameter(s) (epsilon), got 2": first + 4,
        "'image' holds no op that takes an LRP rule (it holds input, which route relevance)":
            first + 5,
        "rule 'zbox' has no parameter 'hi'": first + 6,
        f"'logits' already has a rule (line {first + 4})": first + 6,
    }
