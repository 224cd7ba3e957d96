"""The transformer composites (issue 12): AttnLRP's softmax rule on an interior softmax, and
the product policies of ``attnlrp`` (uniform) and ``cp-lrp`` (attention weights as constants),
on a hand-written two-head self-attention block, each against a slow NumPy reference of the
paper's equations, with conservation through the ledger; the composite's epsilon as the
matmul and mean stabiliser; the standalone NumPy module running them as model.lrp does.
(Whole blocks against LXT: test_attnlrp_lxt.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pbxc
from pbxc.runtime.lrp import get_composite, softmax_relevance

ATTENTION = """model attention_block
weights "w.npz"
input x: float64[5, 8]
q = transpose(reshape(linear(x, @q), shape=(5, 2, 4)), perm=(1, 0, 2))
k = transpose(reshape(linear(x, @k), shape=(5, 2, 4)), perm=(1, 2, 0))
v = transpose(reshape(linear(x, @v), shape=(5, 2, 4)), perm=(1, 0, 2))
w = softmax(div(matmul(q, k), value=2.0), axis=-1)
c = reshape(transpose(matmul(w, v), perm=(1, 0, 2)), shape=(5, 8))
h = add(x, linear(c, @o))
g = mul(h, sigmoid(linear(h, @gate)))
output y = linear(mean(g, axes=(0,)), @head)
"""


def build(tmp_path: Path) -> pbxc.Model:
    rng = np.random.default_rng(12)
    weights = {f"{n}.weight": rng.normal(0, 0.5, (8, 8)) for n in ("q", "k", "v", "o", "gate")}
    weights |= {f"{n}.bias": rng.normal(0, 0.1, 8) for n in ("q", "k", "v", "o", "gate")}
    weights |= {"head.weight": rng.normal(0, 0.5, (3, 8)), "head.bias": rng.normal(0, 0.1, 3)}
    np.savez(tmp_path / "w.npz", **weights)
    (tmp_path / "m.pbx").write_text(ATTENTION)
    return pbxc.load(tmp_path / "m.pbx")


def slow_softmax_relevance(r: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Prop. 3.1 of AttnLRP, one row at a time: R_in_i = x_i (R_i - s_i sum_j R_j)."""
    out = np.empty_like(r)
    for idx in np.ndindex(*r.shape[:-1]):
        row = x[idx]
        s = np.exp(row - row.max())
        s /= s.sum()
        out[idx] = [row[i] * (r[idx][i] - s[i] * r[idx].sum()) for i in range(len(row))]
    return out


def test_softmax_rule_against_the_paper() -> None:
    rng = np.random.default_rng(3)
    x, r = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(2, 3, 4, 5))
    s = np.exp(x - x.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    r_in, absorbed = softmax_relevance(r, x, s, axis=-1)
    np.testing.assert_allclose(r_in, slow_softmax_relevance(r, x), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(absorbed, r.sum((1, 2, 3)) - r_in.sum((1, 2, 3)), rtol=1e-12)


@pytest.mark.parametrize("composite", ["attnlrp", "cp-lrp", "epsilon"])
def test_composites_conserve_with_the_ledger(tmp_path: Path, composite: str) -> None:
    m = build(tmp_path)
    x = np.random.default_rng(5).normal(size=(4, 5, 8))
    res = m.lrp(x, composite=composite)
    assert res.ledger.conservation_error.max() < 1e-12
    assert res.ledger.max_layer_error < 1e-12
    assert res.relevance["x"].shape == x.shape and res.relevance["x"].dtype == np.float64


def test_attnlrp_rules_are_the_ones_named(tmp_path: Path) -> None:
    m = build(tmp_path)
    x = np.random.default_rng(6).normal(size=(3, 5, 8))
    attn = m.lrp(x, composite="attnlrp").ledger.layers
    cp = m.lrp(x, composite="cp-lrp").ledger.layers
    by_op = {e.op: e.rule for e in attn.values() if e.op in ("matmul", "mul", "softmax")}
    assert by_op == {"matmul": "matmul-uniform(epsilon=1e-06, placement=sign)",
                     "mul": "product-uniform", "softmax": "attnlrp-softmax"}
    cp_rules = sorted(e.rule.split("(")[0] for e in cp.values() if e.op == "matmul")
    # matmul(q, k) has no softmax operand (uniform); matmul(w, v) holds w constant
    assert cp_rules == ["matmul-constant0", "matmul-uniform"]
    # under CP-LRP the attention weights take no relevance: the softmax never receives any
    softmax = [e for e in cp.values() if e.op == "softmax"]
    assert not softmax or all(np.all(e.relevance_out == 0) for e in softmax)


def test_cp_lrp_value_path_conserves(tmp_path: Path) -> None:
    """Under CP-LRP, matmul(w, v) hands v everything that came in but the stabiliser's share
    (w takes nothing: the softmax test above)."""
    m = build(tmp_path)
    x = np.random.default_rng(8).normal(size=(2, 5, 8))
    lin = m.lrp(x, composite="cp-lrp").ledger.layers
    mm = next(e for e in lin.values() if e.op == "matmul" and e.rule.startswith("matmul-constant0"))
    # conservation of that layer: what v received plus the stabiliser is what came in
    np.testing.assert_allclose(mm.relevance_in + mm.stabiliser, mm.relevance_out, rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("composite", ["attnlrp", "cp-lrp", "epsilon"])
def test_matmul_and_mean_stabiliser_is_the_composites_epsilon(tmp_path: Path,
                                                             composite: str) -> None:
    """The composite's epsilon (not a fixed 1e-6) stabilises matmul and mean; the ledger
    books it as those layers' stabiliser and names it in the rule label."""
    m = build(tmp_path)
    x = np.random.default_rng(7).normal(size=(2, 5, 8))
    small = m.lrp(x, composite=composite).ledger.layers
    big = m.lrp(x, composite=get_composite(composite, epsilon=0.5)).ledger.layers
    for name, entry in big.items():
        if entry.op not in ("matmul", "mean") or not np.any(entry.relevance_out):
            continue   # (under cp-lrp, matmul(q, k) receives nothing)
        assert entry.rule.endswith("(epsilon=0.5, placement=sign)"), entry.rule
        assert small[name].rule.endswith("(epsilon=1e-06, placement=sign)")
        # a larger epsilon absorbs more: the stabiliser's share grows by orders of magnitude
        assert np.abs(entry.stabiliser).max() > 1e3 * np.abs(small[name].stabiliser).max()
        assert entry.conservation_error.max() < 1e-12
    slides = m.lrp(x, composite=get_composite(
        composite, epsilon=0.5, **({"placement": "slides"} if composite != "epsilon" else {})))
    assert slides.ledger.conservation_error.max() < 1e-12


def test_lrp0_rule_gives_matmul_no_stabiliser(tmp_path: Path) -> None:
    """One rule for every layer (LRP-0) sets the tensor ops' epsilon too: nothing absorbed."""
    from pbxc.runtime.lrp import LRP0

    m = build(tmp_path)
    res = m.lrp(np.random.default_rng(8).normal(size=(2, 5, 8)), rule=LRP0())
    for entry in res.ledger.layers.values():
        if entry.op in ("matmul", "mean"):
            assert entry.rule.endswith("(epsilon=0, placement=sign)")
            # R - (R / z) z: zero up to rounding
            assert np.all(np.abs(entry.stabiliser) <= 1e-14 * entry.magnitude)
    assert res.ledger.conservation_error.max() < 1e-12


PRENORM = """model prenorm
weights "w.npz"
input x: float64[5, 8]
a = layernorm(x, @ln1, eps=1e-5)
q = transpose(reshape(linear(a, @q), shape=(5, 2, 4)), perm=(1, 0, 2))
k = transpose(reshape(linear(a, @k), shape=(5, 2, 4)), perm=(1, 2, 0))
v = transpose(reshape(linear(a, @v), shape=(5, 2, 4)), perm=(1, 0, 2))
w = softmax(div(matmul(q, k), value=2.0), axis=-1)
h = add(x, linear(reshape(transpose(matmul(w, v), perm=(1, 0, 2)), shape=(5, 8)), @o))
m = linear(gelu(linear(layernorm(h, @ln2, eps=1e-5), @fc1)), @fc2)
g = mul(add(h, m), sigmoid(linear(h, @gate)), lrp="uniform")
output y = softmax(linear(sum(g, axes=(0,)), @head), axis=-1)
"""


def build_prenorm(tmp_path: Path, block: str = "") -> pbxc.Model:
    rng = np.random.default_rng(13)
    weights = {f"{n}.weight": rng.normal(0, 0.5, (8, 8)) for n in ("q", "k", "v", "o", "gate")}
    weights |= {f"{n}.bias": rng.normal(0, 0.1, 8) for n in ("q", "k", "v", "o", "gate")}
    weights |= {f"{n}.weight": 1 + rng.normal(0, 0.2, 8) for n in ("ln1", "ln2")}
    weights |= {f"{n}.bias": rng.normal(0, 0.2, 8) for n in ("ln1", "ln2")}
    weights |= {"fc1.weight": rng.normal(0, 0.5, (16, 8)), "fc1.bias": rng.normal(0, 0.1, 16),
                "fc2.weight": rng.normal(0, 0.5, (8, 16)), "fc2.bias": rng.normal(0, 0.1, 8),
                "head.weight": rng.normal(0, 0.5, (3, 8)), "head.bias": rng.normal(0, 0.1, 3)}
    np.savez(tmp_path / "w.npz", **weights)
    (tmp_path / "m.pbx").write_text(PRENORM + block)
    return pbxc.load(tmp_path / "m.pbx")


def compiled(model: pbxc.Model, out: Path) -> Any:
    import importlib.util

    from pbxc.runtime.compile import compile_model

    compile_model(model, out)
    spec = importlib.util.spec_from_file_location(model.name, out / f"{model.name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_module_matches(module: Any, model: pbxc.Model, x: np.ndarray, composite: Any,
                          name: str | None = None) -> None:
    relevance, ledger = module.lrp(x) if name is None else module.lrp(x, composite=name)
    res = model.lrp(x, composite=composite)
    scale = np.abs(res.relevance["x"]).max()
    np.testing.assert_allclose(relevance, res.relevance["x"], rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(ledger["start"], res.ledger.start, rtol=1e-12)
    np.testing.assert_allclose(ledger["bias"], res.ledger.bias, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(ledger["stabiliser"], res.ledger.stabiliser, rtol=0,
                               atol=1e-12 * scale)
    total = ledger["inputs"] + ledger["bias"] + ledger["stabiliser"]
    np.testing.assert_allclose(total, ledger["start"], rtol=1e-12)


@pytest.mark.parametrize("builder", [build, build_prenorm])
def test_compiled_module_runs_the_transformer_composites(tmp_path: Path, builder: Any) -> None:
    """The standalone NumPy module runs attnlrp and cp-lrp (matmul, elementwise products,
    interior softmax, mean/sum, layernorm, GELU) and every other composite, as model.lrp
    does, to 1e-12: relevance and the ledger's bias (the softmax's share included) and
    stabiliser."""
    m = builder(tmp_path)
    module = compiled(m, tmp_path / "out")
    x = np.random.default_rng(9).normal(size=(3, 5, 8))
    for name in ("attnlrp", "cp-lrp", "epsilon", "lrp0", "epsilon-plus"):
        assert_module_matches(module, m, x, name, name)
    res = m.lrp(x, composite="attnlrp")
    assert any(e.op == "softmax" and np.any(e.bias) for e in res.ledger.layers.values())
    ours, theirs = module.forward(x), m.forward(x)
    ours = ours["y"] if isinstance(ours, dict) else ours
    theirs = theirs["y"] if isinstance(theirs, dict) else theirs
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_compiled_module_takes_the_lrp_block_composite(tmp_path: Path) -> None:
    """An lrp block asking for cp-lrp with its epsilon is the compiled module's default."""
    m = build_prenorm(tmp_path, "lrp {\n  composite cp_lrp(0.01)\n}\n")
    module = compiled(m, tmp_path / "out")
    x = np.random.default_rng(10).normal(size=(2, 5, 8))
    assert_module_matches(module, m, x, get_composite("cp-lrp", epsilon=0.01))
    assert_module_matches(module, m, x, None)   # model.lrp() without arguments: the block
    res = m.lrp(x)
    assert any(e.rule.startswith("matmul-constant0(epsilon=0.01") for e in
               res.ledger.layers.values())


RELU_ATTENTION = """model relu_attention
weights "w.npz"
input x: float64[3, 4]
q = relu(linear(x, @q, bias=false))
k = relu(linear(x, @k, bias=false))
s = softmax(relu(matmul(q, transpose(k, perm=(1, 0)))), axis=-1)
v = relu(linear(x, @v, bias=false))
c = mean(relu(matmul(s, v)), axes=(0,))
output y = linear(c, @h, bias=false)
"""


@pytest.mark.parametrize("composite", ["attnlrp", "cp-lrp", "epsilon"])
def test_recomputed_relu_outputs_reach_matmul_softmax_and_mean(tmp_path: Path,
                                                               composite: str) -> None:
    """LRP's memory plan recomputes cheap activations' outputs instead of keeping them; the
    tensor ops and the softmax rule read them through that recomputation (a regression: they
    read the released value)."""
    rng = np.random.default_rng(0)
    weights = {f"{n}.weight": rng.normal(size=(4, 4)) for n in "qkv"}
    np.savez(tmp_path / "w.npz", **weights, **{"h.weight": rng.normal(size=(2, 4))})
    (tmp_path / "m.pbx").write_text(RELU_ATTENTION)
    res = pbxc.load(tmp_path / "m.pbx").lrp(rng.normal(size=(2, 3, 4)), composite=composite)
    assert res.ledger.conservation_error.max() < 1e-12
    assert res.ledger.max_layer_error < 1e-12


def test_placement_is_checked_and_float32_stays_float32(tmp_path: Path) -> None:
    from pbxc.runtime.lrp import LrpConfigError

    with pytest.raises(LrpConfigError, match="placement"):
        get_composite("attnlrp", placement="middle")
    with pytest.raises(LrpConfigError, match="epsilon"):
        get_composite("cp-lrp", epsilon=-1.0)
    build_prenorm(tmp_path)
    m32 = pbxc.load(tmp_path / "m.pbx", dtype="float32")
    x = np.random.default_rng(11).normal(size=(2, 5, 8)).astype(np.float32)
    module = compiled(m32, tmp_path / "out")
    for name in ("attnlrp", "cp-lrp"):
        res = m32.lrp(x, composite=name)
        relevance, _ = module.lrp(x, composite=name)
        assert res.relevance["x"].dtype == np.float32 and relevance.dtype == np.float32
        np.testing.assert_allclose(relevance, res.relevance["x"], rtol=0,
                                   atol=1e-5 * np.abs(relevance).max())
