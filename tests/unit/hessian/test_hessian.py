"""The Hessian pass (specs/hessian.md): against torch.func, between its two plans, the rule
table, kinks, Hessian-vector products, finite-perturbation interactions and the CLI."""

from __future__ import annotations

import functools
import importlib.util
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import sympy

import pbxc
from pbxc.cli import main
from pbxc.codegen import numpy_kernels as K
from pbxc.errors import InputError, UnsupportedOp
from pbxc.lower import hessian_plan
from pbxc.ops import AFFINE, SHAPE_ONLY, OpKind
from pbxc.runtime import hessian as hess_mod
from pbxc.symbolic.softmax import definitions, derived_second_derivatives

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples"
SMOOTH = ("wine_swish_mlp", "breast_cancer_smooth_mlp")


@functools.cache
def model(name: str, dtype: str = "float64") -> pbxc.Model:
    return pbxc.load(EXAMPLES / f"{name}.pbx", dtype=dtype)


@functools.cache
def inputs(name: str, count: int = 6) -> np.ndarray:
    with np.load(EXAMPLES / f"{name}_reference.npz", allow_pickle=False) as f:
        return np.asarray(f["inputs"][:count], dtype=np.float64)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@functools.cache
def torch_hessians(name: str, target: int, on: str) -> np.ndarray:
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(EXAMPLES))
    try:
        import models
    finally:
        sys.path.remove(str(EXAMPLES))
    net = models.load_model(name, EXAMPLES).requires_grad_(False)

    def f(v: torch.Tensor) -> torch.Tensor:
        y = net(v[None])[0]
        return (torch.softmax(y, -1) if on == "probabilities" else y)[target]

    x = torch.from_numpy(inputs(name))
    return torch.func.vmap(torch.func.hessian(f))(x).detach().numpy()


# ---------------------------------------------------------------- against torch.func


@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("on", ["logits", "probabilities"])
def test_float64_matches_torch_func_hessian(name: str, mode: str, on: str) -> None:
    ref = torch_hessians(name, 1, on)
    res = model(name).hessian(inputs(name), target=1, mode=mode, on=on)
    assert res.plan.mode == mode and res.hessian.shape == ref.shape
    assert _rel(res.hessian, ref) < 1e-10
    assert np.abs(ref).max() > 1e-4          # a smooth model: nonzero logit Hessians


@pytest.mark.parametrize("name", SMOOTH)
def test_float32_matches_torch_func_hessian(name: str) -> None:
    ref = torch_hessians(name, 0, "logits")
    res = model(name, "float32").hessian(inputs(name).astype(np.float32), target=0)
    assert res.hessian.dtype == np.float32
    assert _rel(res.hessian.astype(np.float64), ref) < 1e-4


def test_every_output_and_every_intermediate() -> None:
    m, x = model("wine_swish_mlp"), inputs("wine_swish_mlp")
    full = m.hessian(x, target="all", mode="forward", intermediates=True)
    assert full.hessian.shape == (len(x), 3, 13, 13) and full.targets is None
    for c in range(3):
        np.testing.assert_allclose(full.hessian[:, c], torch_hessians("wine_swish_mlp", c,
                                                                      "logits"),
                                   rtol=0, atol=1e-10 * np.abs(full.hessian).max())
    rev = m.hessian(x, target="all", mode="reverse")
    assert _rel(rev.hessian, full.hessian) < 1e-12
    inter = full.intermediates
    assert inter is not None and set(inter) >= {"s", "h1", "h2", "logits"}
    np.testing.assert_array_equal(inter["logits"], full.hessian)
    assert not inter["s"].any()                       # normalize is affine: H[s] = 0
    # H[h1] by the second-order Algorithm 1 against the chain rule written out:
    # h1 = swish(W s + b): d2 h1_u = f''(z_u) (w_u . J_s)(w_u . J_s)^T
    lin = hess_mod.linearize(m, m.prepare_inputs(x))
    z = lin.values["h1/linear"]
    d2 = m.activations.second_derivative("h1", z)
    w = m.params["h1/linear"]["weight"] / m.params["s"]["std"]
    expect = d2[:, :, None, None] * w[None, :, :, None] * w[None, :, None, :]
    np.testing.assert_allclose(inter["h1"], expect, rtol=1e-12, atol=1e-15)


def test_plan_chooses_the_cheaper_mode_and_explains_it() -> None:
    m, x = model("breast_cancer_smooth_mlp"), inputs("breast_cancer_smooth_mlp")
    plan = m.hessian(x, target=0).plan
    assert plan.mode == min(plan.alternatives, key=plan.alternatives.__getitem__) == "reverse"
    text = plan.explain()
    assert "reverse" in text and "forward" in text and "<- chosen" in text
    assert "h1, h2" in text and "chunks of" in text
    with pytest.raises(InputError, match="forward recursion"):
        m.hessian(x, mode="reverse", intermediates=True)
    with pytest.raises(InputError, match="mode"):
        m.hessian(x, mode="sideways")


def test_memory_is_checked_before_anything_is_allocated(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    m, x = model("wine_swish_mlp"), inputs("wine_swish_mlp")
    monkeypatch.setattr(hessian_plan, "SAMPLE_LIMIT_BYTES", 1000)
    m.plan_cache.clear()
    with pytest.raises(InputError, match="GiB of tangent blocks for one sample"):
        m.hessian(x, mode="forward")
    m.plan_cache.clear()


def test_chunks_give_the_same_hessians(monkeypatch: pytest.MonkeyPatch) -> None:
    m, x = model("wine_swish_mlp"), inputs("wine_swish_mlp")
    whole = m.hessian(x, target=2).hessian
    monkeypatch.setattr(hessian_plan, "WORK_BYTES", 1)
    m.plan_cache.clear()
    res = m.hessian(x, target=2)
    m.plan_cache.clear()
    assert res.plan.chunk == 1
    np.testing.assert_allclose(res.hessian, whole, rtol=0, atol=1e-14 * np.abs(whole).max())


# ---------------------------------------------------------------- Hessian-vector products


def test_hvp_is_the_hessian_times_vectors() -> None:
    m, x = model("breast_cancer_smooth_mlp"), inputs("breast_cancer_smooth_mlp")
    h = m.hessian(x, target=1, on="probabilities").hessian
    rng = np.random.default_rng(0)
    v = rng.normal(size=(len(x), 3, 30))
    got = m.hvp(x, v, target=1, on="probabilities")
    assert got.hvp.shape == v.shape and got.plan.directions == 3
    np.testing.assert_allclose(got.hvp, np.einsum("bij,bkj->bki", h, v), rtol=1e-10,
                               atol=1e-12 * np.abs(h).max())
    single = m.hvp(x, v[0, 0], target=1, on="probabilities").hvp   # one vector for all
    np.testing.assert_allclose(single, h @ v[0, 0], rtol=1e-10, atol=1e-12 * np.abs(h).max())
    with pytest.raises(InputError, match="hvp vectors have shape"):
        m.hvp(x, np.ones(7))
    with pytest.raises(InputError, match="non-finite"):
        m.hvp(x, np.full(30, np.nan))


# ---------------------------------------------------------------- the rule table


def test_linear_ops_get_their_rule_by_construction() -> None:
    for kind in AFFINE | SHAPE_ONLY | {OpKind.ADD, OpKind.CONCAT, OpKind.MAXPOOL2D}:
        rule = hess_mod.SECOND_ORDER_RULES[kind]
        assert not rule.curved and rule.source
    assert {OpKind.ACTIVATION, OpKind.SOFTMAX, OpKind.LOG_SOFTMAX, OpKind.MUL,
            OpKind.MATMUL, OpKind.LAYERNORM} == hess_mod.CURVED_KINDS


def test_a_missing_rule_names_the_pass_and_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    m, x = model("wine_swish_mlp"), inputs("wine_swish_mlp")
    monkeypatch.delitem(hess_mod.SECOND_ORDER_RULES, OpKind.ACTIVATION)
    with pytest.raises(UnsupportedOp, match="the hessian pass has no rule for op 'activation'"):
        m.hessian(x)


def test_softmax_second_derivative_tensors_by_sympy() -> None:
    d = derived_second_derivatives(3)
    z, _, _ = definitions(3)
    e = sympy.symbols("e1:4", positive=True)
    as_exp = {a: sympy.log(b) for a, b in zip(z, e)}   # rational functions of e = exp(z)
    for kind in ("softmax", "log_softmax"):
        for derived, closed in zip(d[kind], d[f"{kind}_closed"]):
            assert (derived - closed).xreplace(as_exp).applyfunc(sympy.cancel).is_zero_matrix
    # and the kernels against the sympy tensors, at a point, along two directions
    point = {a: sympy.Rational(v, 7) for a, v in zip(z, (3, -5, 11))}
    rng = np.random.default_rng(1)
    t = rng.normal(size=(1, 2, 3))
    zs = np.array([[3 / 7, -5 / 7, 11 / 7]])
    for kind, kernel in (("softmax", K.softmax_jvp2), ("log_softmax", K.log_softmax_jvp2)):
        y = K.softmax(zs, 1) if kind == "softmax" else K.log_softmax(zs, 1)
        got = kernel([None], [t], [zs], y, None, None, {}, axis=0).reshape(2, 2, 3)
        for i in range(3):
            hi = np.array(d[kind][i].xreplace(point).evalf(30), dtype=np.float64)
            want = t[0] @ hi @ t[0].T
            np.testing.assert_allclose(got[:, :, i], want, rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------- piecewise-linear nets, kinks


def test_relu_net_logit_hessian_is_zero_and_probabilities_are_not() -> None:
    m, x = model("breast_cancer_mlp"), inputs("breast_cancer_mlp")
    logits = m.hessian(x)
    assert np.all(logits.hessian == 0) and np.isfinite(logits.hessian).all()
    probs = m.hessian(x, on="probabilities")
    assert np.isfinite(probs.hessian).all() and np.abs(probs.hessian).max() > 0


KINKED = '''model kinked
weights "w.npz"
input x: float64[2] features ["a", "b"]
h = relu(linear(x, @fc))
output y = linear(h, @out)
'''


def test_kinks_at_x_and_between_x_and_x_plus_d(write_model: Callable[..., Path]) -> None:
    w = {"fc.weight": np.array([[1.0, -1.0], [1.0, 1.0]]), "fc.bias": np.zeros(2),
         "out.weight": np.array([[1.0, 2.0]]), "out.bias": np.zeros(1)}
    m = pbxc.load(write_model(KINKED, w))
    x = np.array([[1.0, 1.0], [3.0, -1.0]])      # sample 0: unit 0 exactly on its kink
    res = m.hessian(x, target=0, mode="forward")
    assert np.all(res.hessian == 0) and not np.isnan(res.hessian).any()
    assert res.kinks.at_x[0] == {"h": 1} and res.kinks.at_x[1] == {}
    assert "at x: h 1" in res.kinks.describe(0)
    inter = m.interactions(x, target=0, step=0.5)
    assert not np.isnan(inter.interactions).any()
    # sample 0 sits on unit 0's kink (z = a - b = 0): moving a up switches its piece, moving
    # b up keeps it off (z < 0): the pairs (a, a) and (a, b) cross, (b, b) does not
    np.testing.assert_array_equal(inter.crossed[0], [[True, True], [True, False]])
    assert inter.kinks.crossed[0] == {"h": 2}
    # sample 1: z = (4, 2), steps 1.5 and 0.5: no unit changes piece, I = 0 = Taylor
    assert not inter.crossed[1].any() and np.all(inter.interactions[1] == 0)
    # a kink between x and x + d: the mixed difference sees the ReLU's corner
    assert inter.interactions[0, 0, 1] != 0 and inter.taylor[0, 0, 1] == 0


def test_maxpool_ties_are_reported_per_sample() -> None:
    m = model("digits_cnn")
    x = np.zeros((1, 1, 8, 8))          # every window tied
    res = m.hessian(x, target=0)
    assert res.kinks.at_x[0].get("p1", 0) > 0 and np.isfinite(res.hessian).all()


# ---------------------------------------------------------------- interactions


def test_mixed_differences_match_a_direct_evaluation_exactly() -> None:
    m, x = model("breast_cancer_smooth_mlp"), inputs("breast_cancer_smooth_mlp", 2)
    res = m.interactions(x, target=1, step=0.05)
    for b in range(len(x)):
        points, iu, ju = hess_mod_points(x[b], 0.05 * np.abs(x[b]))
        n = x.shape[1]
        f = m.forward(points)[:, 1]          # the same points, one forward batch
        f0, fi, fij = f[0], f[1:1 + n], f[1 + n:]
        direct = ((fij - fi[iu]) - fi[ju]) + f0
        np.testing.assert_array_equal(res.interactions[b][iu, ju], direct)
        # one point at a time, BLAS may take another kernel (gemv): equal to rounding of f
        single = np.array([m.forward(p[None])[0, 1] for p in points[:40]])
        np.testing.assert_allclose(single, f[:40], rtol=8 * np.finfo(float).eps)
        np.testing.assert_array_equal(res.interactions[b], res.interactions[b].T)
    np.testing.assert_allclose(res.taylor, res.steps[:, :, None] * res.steps[:, None, :]
                               * res.hessian, rtol=1e-15)
    np.testing.assert_array_equal(res.residual, res.interactions - res.taylor)


def hess_mod_points(x: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The perturbed points rebuilt here, independently of the runtime's helper."""
    n = x.size
    pts = [x.copy()]
    for i in range(n):
        p = x.copy()
        p[i] += d[i]
        pts.append(p)
    iu, ju = np.triu_indices(n)
    for i, j in zip(iu, ju):
        p = x.copy()
        p[i] += d[i]
        p[j] += d[j]
        pts.append(p)
    return np.array(pts), iu, ju


def test_taylor_residual_ratio_falls_with_the_step() -> None:
    m, x = model("wine_swish_mlp"), inputs("wine_swish_mlp", 3)
    ratios = []
    for step in (0.08, 0.04, 0.02, 0.01):
        res = m.interactions(x, target=0, step=step)
        iu, ju = np.triu_indices(13, 1)
        ratios.append(float(np.median(np.abs(res.residual[:, iu, ju])
                                      / np.abs(res.taylor[:, iu, ju]))))
    assert all(a > 1.6 * b for a, b in itertools.pairwise(ratios))   # O(|d|): halves per halving


def test_top_pairs_carry_the_feature_names() -> None:
    m, x = model("breast_cancer_smooth_mlp"), inputs("breast_cancer_smooth_mlp", 4)
    res = m.interactions(x, step=0.05)
    top = res.top_pairs(5)
    assert len(top) == 5 and all(r["i"] < r["j"] for r in top)
    strengths = [r["strength"] for r in top]
    assert strengths == sorted(strengths, reverse=True)
    names = m.feature_names["x"]
    assert names is not None and top[0]["feature_i"] == names[top[0]["i"]]
    table = res.table(5)
    assert table.count("\n") == 6 and top[0]["feature_j"] in table
    with pytest.raises(InputError, match="step has shape"):
        m.interactions(x, step=np.ones(7))


# ---------------------------------------------------------------- generated code, CLI


def test_compiled_numpy_module_has_hessian_and_hvp(tmp_path: Path) -> None:
    from pbxc.runtime.compile import compile_model

    m, x = model("wine_swish_mlp"), inputs("wine_swish_mlp", 3)
    files = compile_model(m, tmp_path / "out")
    path = next(f for f in files if str(f).endswith(".py"))
    spec = importlib.util.spec_from_file_location("wine_generated", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ref = m.hessian(x, target=2).hessian
    np.testing.assert_allclose(mod.hessian(x, target=2), ref, rtol=0,
                               atol=1e-13 * np.abs(ref).max())
    v = np.random.default_rng(0).normal(size=x.shape)
    np.testing.assert_allclose(mod.hvp(x, v, target=2), np.einsum("bij,bj->bi", ref, v),
                               rtol=1e-12, atol=1e-13 * np.abs(ref).max())


def test_cuda_target_says_hessian_is_left_out() -> None:
    from pbxc.codegen import cuda_module

    assert "hessian and hvp have no CUDA kernels" in cuda_module.PASSES
    assert "def hessian(" in cuda_module.PASSES and "def hvp(" in cuda_module.PASSES


def test_cli_explain_hessian_and_interactions(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    data = tmp_path / "x.npy"
    np.save(data, inputs("breast_cancer_smooth_mlp", 3))
    pbx = str(EXAMPLES / "breast_cancer_smooth_mlp.pbx")
    code = main(["explain", pbx, "--method", "hessian", "--input", str(data),
                 "--explain-plan", "--out", str(tmp_path / "h.npz")])
    out = capsys.readouterr().out
    assert code == 0 and "hessian plan: reverse" in out and "hessian[3, 30, 30]" in out
    with np.load(tmp_path / "h.npz") as saved:
        np.testing.assert_array_equal(saved["hessian"], model("breast_cancer_smooth_mlp")
                                      .hessian(inputs("breast_cancer_smooth_mlp", 3)).hessian)
    code = main(["explain", pbx, "--method", "interactions", "--input", str(data),
                 "--on", "probabilities", "--top", "3", "--png", str(tmp_path / "png"),
                 "--png-max", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "softmax probabilities" in out and "| 3 |" in out
    assert "worst" in out or "mean" in out            # feature names in the table
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [
        "interactions_mean.png", "interactions_sample_0.png"]
    code = main(["explain", pbx, "--method", "gradient", "--input", str(data),
                 "--on", "probabilities"])
    assert code == 2 and "--on and --step apply to" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["digits_cnn", "digits_resnet"])
def test_convolutions_pooling_batchnorm_residuals_match_torch(name: str) -> None:
    """The rules by construction (conv, avg/global pooling, batchnorm, residual add, flatten)
    and max pooling's piecewise-linear rule, through the softmax's curvature."""
    m = model(name)
    x = inputs(name, 2)
    ref = torch_hessians_of(name, 3, x.shape)
    for mode in ("forward", "reverse"):
        res = m.hessian(x, target=3, on="probabilities", mode=mode)
        assert res.hessian.shape == (2, 1, 8, 8, 1, 8, 8)
        assert _rel(res.hessian, ref) < 1e-10


def torch_hessians_of(name: str, target: int, shape: tuple[int, ...]) -> np.ndarray:
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(EXAMPLES))
    try:
        import models
    finally:
        sys.path.remove(str(EXAMPLES))
    net = models.load_model(name, EXAMPLES).requires_grad_(False)

    def f(v: torch.Tensor) -> torch.Tensor:
        return torch.softmax(net(v[None])[0], -1)[target]

    x = torch.from_numpy(inputs(name, shape[0]))
    return torch.func.vmap(torch.func.hessian(f))(x).detach().numpy()


PRODUCT = '''model products
weights "w.npz"
input x: float64[4]
a = tanh(linear(x, @fa))
b = sigmoid(linear(x, @fb))
g = mul(a, b)
q = prelu(linear(g, @fc), @pr)
h = mul(q, 2.0)
output y = linear(h, @out)
'''


def test_products_prelu_and_constant_scaling_match_torch(write_model: Callable[..., Path],
                                                         tmp_path: Path) -> None:
    """mul of two values (the product rule twice), mul by a constant (linear), prelu
    (piecewise linear), in both plans and in the generated module."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w = {"fa.weight": rng.normal(size=(5, 4)), "fa.bias": rng.normal(size=5),
         "fb.weight": rng.normal(size=(5, 4)), "fb.bias": rng.normal(size=5),
         "fc.weight": rng.normal(size=(3, 5)), "fc.bias": rng.normal(size=3),
         "pr.weight": np.array([0.2]), "out.weight": rng.normal(size=(2, 3)),
         "out.bias": rng.normal(size=2)}
    m = pbxc.load(write_model(PRODUCT, w))
    x = rng.normal(size=(3, 4))
    tw = {k: torch.from_numpy(v) for k, v in w.items()}

    def f(v: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(v @ tw["fa.weight"].T + tw["fa.bias"])
        b = torch.sigmoid(v @ tw["fb.weight"].T + tw["fb.bias"])
        z = (a * b) @ tw["fc.weight"].T + tw["fc.bias"]
        q = torch.where(z > 0, z, tw["pr.weight"] * z)
        return ((2 * q) @ tw["out.weight"].T + tw["out.bias"])[1]

    ref = torch.func.vmap(torch.func.hessian(f))(torch.from_numpy(x)).detach().numpy()
    for mode in ("forward", "reverse"):
        assert _rel(m.hessian(x, target=1, mode=mode).hessian, ref) < 1e-12
    from pbxc.runtime.compile import compile_model

    files = compile_model(m, tmp_path / "out")
    path = next(f for f in files if str(f).endswith(".py"))
    spec = importlib.util.spec_from_file_location("products_generated", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert _rel(mod.hessian(x, target=1), ref) < 1e-12


def test_interactions_on_chosen_features() -> None:
    m, x = model("breast_cancer_smooth_mlp"), inputs("breast_cancer_smooth_mlp", 1)
    full = m.interactions(x, step=0.05)
    chosen = [3, 7, 20]
    sub = m.interactions(x, step=0.05, features=chosen)
    assert sub.interactions.shape == (1, 3, 3)
    assert sub.feature_names == [m.feature_names["x"][i] for i in chosen]
    want = full.interactions[0][np.ix_(chosen, chosen)]
    np.testing.assert_allclose(sub.interactions[0], want, rtol=1e-9,
                               atol=1e-12 * np.abs(full.values).max())
    with pytest.raises(InputError, match="features must be distinct"):
        m.interactions(x, features=[1, 1])
