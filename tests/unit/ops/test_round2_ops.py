"""Round-2 ops (issue 11) in every pass: pooling in 1-3 d with ceil_mode and dilation,
adaptive pooling, upsampling, products, broadcasting sums, constants, prelu, shape ops.

Each op is checked against torch (forward and autograd Jacobian, float64), against a slow
loop reference written here from the definition, against the verifier's independent lanes
evaluator, and through LRP (the ledger, and the rule on the op's own dense matrix), DFD
(summation-to-delta) and the standalone compiled module.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import pbxc
from pbxc.runtime.compile import compile_model
from pbxc.verify.lanes import float_kit, reference_jacobian

torch = pytest.importorskip("torch")
F = torch.nn.functional
RNG = np.random.default_rng(11)


@dataclass
class Case:
    name: str
    shape: tuple[int, ...]
    expr: str                                   # the op applied to x, as .pbx
    torch_fn: Callable[..., object]             # the same op in torch, on (B, *shape)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    slow: Callable[[np.ndarray], np.ndarray] | None = None   # loops, one sample


def _t(a: np.ndarray) -> object:
    return torch.tensor(a, dtype=torch.float64)


# ---------------------------------------------------------------- slow references (loops)

def slow_pool(x: np.ndarray, kernel: tuple[int, ...], stride: tuple[int, ...],
              padding: tuple[int, ...], dilation: tuple[int, ...], ceil: bool, kind: str,
              include_pad: bool = True) -> np.ndarray:
    """One sample [C, *spatial]: every output from its window, element by element."""
    spatial = x.shape[1:]
    out = []
    for n, k, s, p, d in zip(spatial, kernel, stride, padding, dilation):
        span = d * (k - 1) + 1
        o = (math.ceil if ceil else math.floor)((n + 2 * p - span) / s) + 1
        if ceil and (o - 1) * s >= n + p:
            o -= 1
        out.append(o)
    y = np.zeros((x.shape[0], *out))
    for c in range(x.shape[0]):
        for index in itertools.product(*(range(o) for o in out)):
            vals, counted = [], 1
            for _a, (i, n, k, s, p) in enumerate(zip(index, spatial, kernel, stride, padding)):
                lo, hi = (-p, n + p) if include_pad else (0, n)
                counted *= min(i * s - p + k, hi) - max(i * s - p, lo)
            for offset in itertools.product(*(range(k) for k in kernel)):
                pos = [i * s - p + o * d for i, s, p, o, d in
                       zip(index, stride, padding, offset, dilation)]
                if all(0 <= q < n for q, n in zip(pos, spatial)):
                    vals.append(x[(c, *pos)])
            y[(c, *index)] = max(vals) if kind == "max" else sum(vals) / counted
    return y


def slow_adaptive(x: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    y = np.zeros((x.shape[0], *size))
    for c in range(x.shape[0]):
        for index in itertools.product(*(range(m) for m in size)):
            box = tuple(slice(math.floor(i * n / m), math.ceil((i + 1) * n / m))
                        for i, n, m in zip(index, x.shape[1:], size))
            y[(c, *index)] = x[(c, *box)].mean()
    return y


def slow_linear_resize(x: np.ndarray, size: tuple[int, ...], align: bool,
                       scale: tuple[float, ...] | None = None) -> np.ndarray:
    """(Bi/tri)linear interpolation, one output element at a time (torch's source index)."""
    y = np.zeros((x.shape[0], *size))
    for c in range(x.shape[0]):
        for index in itertools.product(*(range(m) for m in size)):
            taps = []
            for a, (j, n, m) in enumerate(zip(index, x.shape[1:], size)):
                if align:
                    src = j * (n - 1) / (m - 1) if m > 1 else 0.0
                else:
                    step = 1 / scale[a] if scale else n / m
                    src = max(step * (j + 0.5) - 0.5, 0.0)
                i0 = min(math.floor(src), n - 1)
                lam = src - i0
                taps.append(((i0, 1 - lam), (min(i0 + 1, n - 1), lam)))
            y[(c, *index)] = sum(np.prod([w for _, w in combo]) * x[(c, *[i for i, _ in combo])]
                                 for combo in itertools.product(*taps))
    return y


def slow_pad(x: np.ndarray, pairs: list[tuple[int, int]], value: float) -> np.ndarray:
    y = np.full(tuple(n + a + b for n, (a, b) in zip(x.shape, pairs)), value)
    for index in itertools.product(*(range(n) for n in x.shape)):
        y[tuple(i + a for i, (a, _) in zip(index, pairs))] = x[index]
    return y


# ---------------------------------------------------------------- the cases

C = 2
GATE = {"fc.weight": RNG.normal(size=(C, C)), "fc.bias": RNG.normal(size=C)}
CHAN = {"c": RNG.uniform(0.5, 1.5, size=(C, 1, 1))}
SLOPE = {"p.weight": np.array([0.25, -0.5])}


def _se(x: object) -> object:
    w, b = _t(GATE["fc.weight"]), _t(GATE["fc.bias"])
    gate = torch.sigmoid(x.mean(dim=(2, 3)) @ w.T + b)
    return x * gate[:, :, None, None]


CASES = [
    Case("maxpool1d_ceil", (C, 11), "maxpool1d(x, 3, stride=2, padding=1, ceil_mode=true)",
         lambda x: F.max_pool1d(x, 3, 2, 1, ceil_mode=True),
         slow=lambda x: slow_pool(x, (3,), (2,), (1,), (1,), True, "max")),
    Case("maxpool1d_dilated", (C, 12), "maxpool1d(x, 3, stride=1, dilation=2)",
         lambda x: F.max_pool1d(x, 3, 1, 0, dilation=2),
         slow=lambda x: slow_pool(x, (3,), (1,), (0,), (2,), False, "max")),
    Case("maxpool2d_ceil", (C, 7, 6), "maxpool2d(x, 3, stride=2, ceil_mode=true)",
         lambda x: F.max_pool2d(x, 3, 2, ceil_mode=True),
         slow=lambda x: slow_pool(x, (3, 3), (2, 2), (0, 0), (1, 1), True, "max")),
    Case("maxpool3d", (C, 4, 5, 5), "maxpool3d(x, 2, padding=1, ceil_mode=true)",
         lambda x: F.max_pool3d(x, 2, 2, 1, ceil_mode=True),
         slow=lambda x: slow_pool(x, (2,) * 3, (2,) * 3, (1,) * 3, (1,) * 3, True, "max")),
    Case("avgpool1d_excl", (C, 10), "avgpool1d(x, 3, stride=2, padding=1, ceil_mode=true, "
         "count_include_pad=false)",
         lambda x: F.avg_pool1d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False),
         slow=lambda x: slow_pool(x, (3,), (2,), (1,), (1,), True, "avg", False)),
    Case("avgpool2d_ceil", (C, 7, 5), "avgpool2d(x, 2, ceil_mode=true)",
         lambda x: F.avg_pool2d(x, 2, ceil_mode=True),
         slow=lambda x: slow_pool(x, (2, 2), (2, 2), (0, 0), (1, 1), True, "avg")),
    Case("avgpool3d", (C, 5, 4, 5), "avgpool3d(x, 3, stride=2, padding=1, ceil_mode=true)",
         lambda x: F.avg_pool3d(x, 3, 2, 1, ceil_mode=True),
         slow=lambda x: slow_pool(x, (3,) * 3, (2,) * 3, (1,) * 3, (1,) * 3, True, "avg")),
    Case("adaptive1d", (C, 11), "adaptive_avgpool1d(x, 4)",
         lambda x: F.adaptive_avg_pool1d(x, 4), slow=lambda x: slow_adaptive(x, (4,))),
    Case("adaptive2d", (C, 7, 5), "adaptive_avgpool2d(x, (3, 2))",
         lambda x: F.adaptive_avg_pool2d(x, (3, 2)), slow=lambda x: slow_adaptive(x, (3, 2))),
    Case("adaptive3d", (C, 5, 4, 3), "adaptive_avgpool3d(x, (2, 3, 2))",
         lambda x: F.adaptive_avg_pool3d(x, (2, 3, 2)),
         slow=lambda x: slow_adaptive(x, (2, 3, 2))),
    Case("nearest2d_size", (C, 3, 4), 'upsample(x, size=(7, 5))',
         lambda x: F.interpolate(x, size=(7, 5), mode="nearest")),
    Case("nearest2d_scale", (C, 3, 4), 'upsample(x, scale=(2, 1.5))',
         lambda x: F.interpolate(x, scale_factor=(2, 1.5), mode="nearest")),
    Case("linear1d", (C, 5), 'upsample(x, mode="linear", scale=2.5)',
         lambda x: F.interpolate(x, scale_factor=2.5, mode="linear", align_corners=False),
         slow=lambda x: slow_linear_resize(x, (12,), False, (2.5,))),
    Case("bilinear_corners", (C, 3, 4), 'upsample(x, mode="linear", size=(5, 7), '
         'align_corners=true)',
         lambda x: F.interpolate(x, size=(5, 7), mode="bilinear", align_corners=True),
         slow=lambda x: slow_linear_resize(x, (5, 7), True)),
    Case("trilinear", (C, 2, 3, 3), 'upsample(x, mode="linear", scale=2)',
         lambda x: F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False),
         slow=lambda x: slow_linear_resize(x, (4, 6, 6), False, (2.0,) * 3)),
    Case("prelu", (C, 3, 3), "prelu(x, @p)",
         lambda x: F.prelu(x, _t(SLOPE["p.weight"])), SLOPE),
    Case("se_gate", (C, 3, 4), "mul(x, sigmoid(unsqueeze(linear(global_avgpool(x), @fc), "
         "axes=(1, 2))))", _se, GATE),
    Case("product", (C, 3), "mul(tanh(x), x)", lambda x: torch.tanh(x) * x),
    Case("add_const", (C, 3, 3), "add(x, @c)", lambda x: x + _t(CHAN["c"]), CHAN),
    Case("sub_number", (C, 3), "sub(x, 0.5)", lambda x: x - 0.5),
    Case("mul_const", (C, 3, 3), "mul(x, @c)", lambda x: x * _t(CHAN["c"]), CHAN),
    Case("div_number", (C, 3), "div(x, 3)", lambda x: x / 3),
    Case("div_const", (C, 2, 3), "div(x, @c)", lambda x: x / _t(CHAN["c"]), CHAN),
    Case("add_broadcast", (C, 3, 3), "add(x, unsqueeze(global_avgpool(x), axes=(1, 2)))",
         lambda x: x + x.mean(dim=(2, 3))[:, :, None, None]),
    Case("sub_broadcast", (C, 3, 3), "sub(x, unsqueeze(global_avgpool(x), axes=(1, 2)))",
         lambda x: x - x.mean(dim=(2, 3))[:, :, None, None]),
    Case("squeeze", (C, 1, 3), "squeeze(x, axes=1)", lambda x: x[:, :, 0]),
    Case("pad", (C, 3, 4), "pad(x, pads=(1, 2, 0, 1), value=0.5)",
         lambda x: F.pad(x, (1, 2, 0, 1), value=0.5),
         slow=lambda x: slow_pad(x, [(0, 0), (0, 1), (1, 2)], 0.5)),
]
IDS = [c.name for c in CASES]
CLASSES = 3


def build(case: Case, tmp_path: Path) -> tuple[pbxc.Model, Callable[..., object],
                                                 dict[str, np.ndarray]]:
    """input -> op -> flatten -> linear head; and the same network in torch."""
    with torch.no_grad():
        width = int(np.prod(case.torch_fn(_t(np.zeros((1, *case.shape)))).shape[1:]))
    weights = dict(case.weights)
    weights["head.weight"] = RNG.normal(size=(CLASSES, width)) / np.sqrt(width)
    weights["head.bias"] = RNG.normal(size=CLASSES) * 0.1
    np.savez(tmp_path / "w.npz", **weights)
    text = (f'model {case.name}\nweights "w.npz"\n'
            f"input x: float64[{', '.join(map(str, case.shape))}]\n"
            f"h = {case.expr}\noutput logits = linear(flatten(h), @head)\n")
    (tmp_path / "m.pbx").write_text(text)
    model = pbxc.load(tmp_path / "m.pbx")
    head_w, head_b = _t(weights["head.weight"]), _t(weights["head.bias"])

    def net(x: object) -> object:
        return case.torch_fn(x).flatten(1) @ head_w.T + head_b

    return model, net, weights


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_and_jacobian_against_torch(case: Case, tmp_path: Path) -> None:
    model, net, _ = build(case, tmp_path)
    x = RNG.normal(size=(3, *case.shape))
    ref = net(_t(x)).numpy()
    np.testing.assert_allclose(model.forward(x), ref, rtol=1e-13, atol=1e-13)
    op_out = case.torch_fn(_t(x)).numpy()
    got_op = model.evaluate({"x": x})["h"]
    np.testing.assert_allclose(got_op, op_out, rtol=1e-14, atol=1e-14)
    if case.slow is not None:
        np.testing.assert_allclose(got_op[0], case.slow(x[0]), rtol=1e-13, atol=1e-14)
    jac = torch.autograd.functional.jacobian(lambda t: net(t[None])[0], _t(x[0])).numpy()
    modes = ["forward", "reverse", "auto"]
    if all(len(n.inputs) <= 1 for n in model.nodes) and "global_avgpool" not in case.expr:
        modes.append("chain")   # a chain: the matrix-chain plan applies
    for mode in modes:
        got = model.jacobian(x[:1], mode=mode).jacobian[0]
        np.testing.assert_allclose(got, jac, rtol=1e-12, atol=1e-13, err_msg=mode)
    lanes, _ = reference_jacobian(model, {"x": x[0]}, "logits", "x", float_kit(model))
    np.testing.assert_allclose(lanes, jac, rtol=1e-12, atol=1e-13)
    grad = model.gradient(x, target=1)
    xt = _t(x).requires_grad_(True)
    net(xt)[:, 1].sum().backward()
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lrp_ledger_and_dfd_summation(case: Case, tmp_path: Path) -> None:
    model, _, _ = build(case, tmp_path)
    x = RNG.normal(size=(2, *case.shape))
    for composite in ("epsilon", "lrp0", "epsilon-plus"):
        res = model.lrp(x, composite=composite)
        assert res.ledger.conservation_error.max() < 1e-12, composite
        assert res.ledger.max_layer_error < 1e-12, composite
    x0 = RNG.normal(size=(1, *case.shape)) * 0.3
    res = model.dfd(x, baseline=x0[0])
    assert res.summation_error.max() < 1e-12


LINEAR_CASES = [c for c in CASES if c.name.startswith(("avgpool", "adaptive", "nearest",
                                                       "linear", "bilinear", "trilinear"))
                or c.name in ("pad", "mul_const", "div_const")]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=[c.name for c in LINEAR_CASES])
def test_linear_ops_take_the_rule_on_their_own_matrix(case: Case, tmp_path: Path) -> None:
    """LRP-epsilon on the op alone equals the rule on its dense matrix W (from torch's
    Jacobian): R_j = x_j sum_k W_kj R_k / stab(z_k), z = W x (the padding value is a bias
    of the padded positions, which the target, an inner element, does not involve)."""
    weights = dict(case.weights)
    np.savez(tmp_path / "w.npz", **(weights or {"unused": np.zeros(1)}))
    (tmp_path / "m.pbx").write_text(f'model alone\nweights "w.npz"\ninput x: float64['
                                    f"{', '.join(map(str, case.shape))}]\n"
                                    f"h = {case.expr}\noutput y = flatten(h)\n")
    model = pbxc.load(tmp_path / "m.pbx")
    x = np.abs(RNG.normal(size=(1, *case.shape))) + 0.1
    w = torch.autograd.functional.jacobian(lambda t: case.torch_fn(t[None]).flatten(),
                                           _t(x[0])).numpy().reshape(-1, x[0].size)
    z = case.torch_fn(_t(x)).numpy().reshape(-1)
    target = int(np.argmax(z))
    res = model.lrp(x, target=target, rule=pbxc.runtime.lrp.Epsilon(epsilon=1e-9))
    s = np.zeros_like(z)
    s[target] = z[target] / (z[target] + 1e-9 * np.sign(z[target]))
    expected = (x[0].reshape(-1) * (w.T @ s)).reshape(case.shape)
    np.testing.assert_allclose(res.relevance["x"][0], expected, rtol=1e-12, atol=1e-14)


def test_product_dfd_is_the_two_player_rule(tmp_path: Path) -> None:
    """d(ab) = ((b + b0) / 2) da + ((a + a0) / 2) db, exactly, with a broadcast gate."""
    np.savez(tmp_path / "w.npz", unused=np.zeros(1))
    (tmp_path / "m.pbx").write_text('model p\nweights "w.npz"\ninput x: float64[2, 3, 3]\n'
                                    "g = unsqueeze(global_avgpool(x), axes=(1, 2))\n"
                                    "output y = flatten(mul(x, g))\n")
    model = pbxc.load(tmp_path / "m.pbx")
    x, x0 = RNG.normal(size=(1, 2, 3, 3)), RNG.normal(size=(1, 2, 3, 3))
    res = model.dfd(x, baseline=x0[0], target=4)
    a, a0 = x[0], x0[0]
    b, b0 = a.mean(axis=(1, 2)), a0.mean(axis=(1, 2))
    c, i, j = np.unravel_index(4, (2, 3, 3))
    assert np.isclose(res.delta[0], a[c, i, j] * b[c] - a0[c, i, j] * b0[c], rtol=1e-14)
    expected = np.zeros_like(a)
    expected[c, i, j] += (b[c] + b0[c]) / 2 * (a[c, i, j] - a0[c, i, j])
    # g = mean(x[c]): each x[c] element's multiplier through g is 1/9 of g's
    expected[c] += (a[c, i, j] + a0[c, i, j]) / 2 / 9 * (a[c] - a0[c])
    np.testing.assert_allclose(res.attributions["x"][0], expected, rtol=1e-13, atol=1e-15)
    assert abs(res.summation_error[0]) < 1e-14


def test_product_lrp_rules(tmp_path: Path) -> None:
    np.savez(tmp_path / "w.npz", unused=np.zeros(1))
    body = ('model p\nweights "w.npz"\ninput x: float64[2, 3, 3]\ninput g: float64[2, 1, 1]\n'
            "output y = flatten(mul(x, g{}))\n")
    x, g = RNG.normal(size=(1, 2, 3, 3)), RNG.normal(size=(1, 2, 1, 1))
    for rule, share in (("", 1.0), (', lrp="uniform"', 0.5)):
        (tmp_path / "m.pbx").write_text(body.format(rule))
        res = pbxc.load(tmp_path / "m.pbx").lrp({"x": x, "g": g}, target=5, composite="lrp0")
        out = (x * g).reshape(-1)[5]
        r_x = np.zeros(18)
        r_x[5] = share * out
        np.testing.assert_allclose(res.relevance["x"].reshape(-1), r_x, rtol=1e-15)
        np.testing.assert_allclose(res.relevance["g"].sum(), (1 - share) * out, rtol=1e-15)
        assert res.ledger.conservation_error.max() < 1e-15


@pytest.mark.parametrize("name", ["maxpool3d", "avgpool1d_excl", "trilinear", "se_gate",
                                  "prelu", "pad", "sub_broadcast", "div_const"])
def test_compiled_module_agrees(name: str, tmp_path: Path) -> None:
    case = next(c for c in CASES if c.name == name)
    model, _, _ = build(case, tmp_path)
    files = compile_model(model, tmp_path / "out")
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"gen_{name}", files[0])
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    x = RNG.normal(size=(2, *case.shape))
    np.testing.assert_allclose(gen.forward(x)["logits"], model.forward(x), rtol=1e-14)
    np.testing.assert_allclose(gen.gradient(x), model.gradient(x), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(gen.jacobian(x), model.jacobian(x).jacobian, rtol=1e-13,
                               atol=1e-15)
    contributions, _ = gen.dfd(x, baseline=0.1)
    np.testing.assert_allclose(contributions, model.dfd(x, baseline=0.1).attributions["x"],
                               rtol=1e-12, atol=1e-14)
    relevance, _ = gen.lrp(x, composite="epsilon")
    np.testing.assert_allclose(relevance, model.lrp(x, composite="epsilon").relevance["x"],
                               rtol=1e-12, atol=1e-14)


def test_fast_2d_pools_keep_their_kernels() -> None:
    """Without ceil_mode or dilation, 2-d pools call numpy_kernels' own tiled kernels."""
    from pbxc.lower.calls import kernel_name
    model = pbxc.loads("model f\ninput x: float64[1, 4, 4]\na = maxpool2d(x, 2)\n"
                       "b = avgpool2d(x, 2)\nc = maxpool2d(x, 2, ceil_mode=true)\n"
                       "output y = add(a, b, c)")
    names = {n.name: kernel_name(n, "forward") for n in model.nodes if n.name != "x"}
    assert names["a"] == "maxpool2d_forward" and names["b"] == "avgpool2d_forward"
    assert names["c"] == "maxpool_forward"


def test_flatten_from_an_axis_and_global_pooling_of_any_rank() -> None:
    model = pbxc.loads("model f\ninput x: float64[2, 3, 4]\na = flatten(x, start=1)\n"
                       "b = global_avgpool(x)\nc = global_avgpool(reshape(x, [2, 3, 2, 2]))\n"
                       "d = global_avgpool(reshape(x, [2, 12]))\noutput y = add(b, c, d)")
    x = RNG.normal(size=(2, 2, 3, 4))
    values = model.evaluate({"x": x})
    assert values["a"].shape == (2, 2, 12)
    for name in "bcd":
        np.testing.assert_allclose(values[name], x.reshape(2, 2, -1).mean(axis=2), rtol=1e-15)


def test_cuda_target_refuses_what_it_has_no_kernels_for() -> None:
    from pbxc.codegen.cuda_module import unsupported
    for body in ("maxpool3d(reshape(x, [2, 2, 2, 4]), 2)", "maxpool2d(reshape(x, [2, 4, 4]), 3, ceil_mode=true)",
                 "upsample(reshape(x, [2, 4, 4]), scale=2)", "mul(x, 2)", "add(x, 1)",
                 "sub(x, 1)"):
        model = pbxc.loads(f"model c\ninput x: float64[2, 16]\noutput y = {body}")
        reason = unsupported(model.graph)
        assert reason is not None and "cuda target" in reason, body


def test_prelu_kinks_are_reported(tmp_path: Path) -> None:
    np.savez(tmp_path / "w.npz", **{"p.weight": np.array([0.25, -0.5])})
    (tmp_path / "m.pbx").write_text('model k\nweights "w.npz"\ninput x: float64[2, 2]\n'
                                    "output y = flatten(prelu(x, @p))\n")
    model = pbxc.load(tmp_path / "m.pbx")
    x = np.array([[[0.0, 1.0], [0.0, -2.0]]])
    res = model.jacobian(x)
    assert res.kinks == {"y/prelu": 2}
    np.testing.assert_array_equal(np.diag(res.jacobian[0].reshape(4, 4)),
                                  [0.25, 1.0, -0.5, -0.5])   # the slope at 0, as PyTorch


def test_lrp_matches_zennit_on_round2_pooling_and_upsampling(tmp_path: Path) -> None:
    """Epsilon on conv/linear, Norm on every average pooling (ceil_mode, count_include_pad
    false, adaptive) and on the upsampling (Zennit's Norm hooked on nn.Upsample: a linear
    layer with unit-free weights), winner-take-all max pooling (ceil_mode), 1-d and 2-d."""
    try:
        from zennit import composites, rules, types
        from zennit.attribution import Gradient
    except Exception as exc:   # zennit imports torchvision
        pytest.skip(f"zennit does not import: {exc}")
    nn = torch.nn
    torch.manual_seed(0)
    net2d = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False, padding=1),
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        nn.AdaptiveAvgPool2d((3, 2)), nn.Flatten(), nn.Linear(18, 4)).double().eval()
    net1d = nn.Sequential(
        nn.Conv1d(1, 2, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2, ceil_mode=True),
        nn.AvgPool1d(3, 2, padding=1), nn.Upsample(size=9, mode="nearest"),
        nn.Flatten(), nn.Linear(18, 3)).double().eval()
    cases = [
        (net2d, (2, 9, 9), ["conv2d(x, @l0, padding=1)", "relu", "maxpool2d(_, 3, stride=2, "
         "ceil_mode=true)", "avgpool2d(_, 2, padding=1, ceil_mode=true, count_include_pad="
         "false)", 'upsample(_, mode="linear", scale=2)', "adaptive_avgpool2d(_, (3, 2))",
         "flatten", "linear(_, @l7)"]),
        (net1d, (1, 17), ["conv1d(x, @l0, padding=2)", "relu", "maxpool1d(_, 2, ceil_mode=true)",
         "avgpool1d(_, 3, stride=2, padding=1)", "upsample(_, size=9)", "flatten",
         "linear(_, @l6)"]),
    ]
    for net, shape, layers in cases:
        weights = {f"l{i}.{k}": v.detach().numpy() for i, m in enumerate(net)
                   for k, v in m.state_dict().items()}
        np.savez(tmp_path / "w.npz", **weights)
        lines, prev = [], "x"
        for i, layer in enumerate(layers):
            expr = layer if "(" in layer else f"{layer}(_)"
            lines.append(f"h{i} = {expr.replace('(_', '(' + prev).replace('(x', '(x')}")
            prev = f"h{i}"
        text = (f'model z\nweights "w.npz"\ninput x: float64[{", ".join(map(str, shape))}]\n'
                + "\n".join(lines) + f"\noutput logits = {prev}\n")
        (tmp_path / "z.pbx").write_text(text)
        model = pbxc.load(tmp_path / "z.pbx")
        x = RNG.normal(size=(4, *shape))
        ours = model.lrp(x, composite="epsilon")
        data = torch.from_numpy(x).requires_grad_(True)
        with torch.no_grad():
            logits = net(data)
        np.testing.assert_allclose(logits.numpy(), ours.outputs["logits"], rtol=1e-12)
        seed = torch.zeros_like(logits)
        rows, targets = torch.arange(len(x)), torch.from_numpy(ours.targets)
        seed[rows, targets] = logits[rows, targets]
        composite = composites.LayerMapComposite(layer_map=[
            *composites.layer_map_base(), (types.Convolution, rules.Epsilon()),
            (torch.nn.Linear, rules.Epsilon()), (torch.nn.Upsample, rules.Norm())])
        with Gradient(model=net, composite=composite) as attributor:
            _, relevance = attributor(data, seed)
        theirs = relevance.detach().numpy()
        assert np.abs(theirs).max() > 1e-3
        np.testing.assert_allclose(ours.relevance["x"], theirs, rtol=1e-9, atol=1e-12)


def test_family_modules_share_no_top_level_name() -> None:
    """`pbxc compile` pastes numpy_kernels and every family into one module: a name defined
    twice would silently replace the other."""
    import ast
    import importlib
    import inspect

    from pbxc.codegen import numpy_kernels
    from pbxc.codegen.kernels import FAMILIES

    seen: dict[str, str] = {}
    modules = [numpy_kernels] + [importlib.import_module(f"pbxc.codegen.kernels.{f}")
                                 for f in FAMILIES]
    for module in modules:
        for node in ast.parse(inspect.getsource(module)).body:
            names = ([node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else
                     [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)])
            for name in names:
                assert name not in seen, f"{name} in {module.__name__} and {seen[name]}"
                seen[name] = module.__name__


def test_dfd_matches_captum_on_linear_round2_ops(tmp_path: Path) -> None:
    """Captum's DeepLift (rescale on ReLU; exact on linear maps) on a 1-d net with ceil_mode
    average pooling, upsampling and adaptive pooling (no max pooling, where Captum's rule
    breaks summation-to-delta)."""
    try:
        from captum.attr import DeepLift
    except Exception as exc:
        pytest.skip(f"captum does not import: {exc}")
    nn = torch.nn
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv1d(1, 2, 3, padding=1), nn.ReLU(),
                        nn.AvgPool1d(2, ceil_mode=True), nn.Upsample(scale_factor=2,
                                                                      mode="linear"),
                        nn.ReLU(), nn.AdaptiveAvgPool1d(5), nn.Flatten(),
                        nn.Linear(10, 3)).double().eval()
    weights = {f"l{i}.{k}": v.detach().numpy() for i, m in enumerate(net)
               for k, v in m.state_dict().items()}
    np.savez(tmp_path / "w.npz", **weights)
    (tmp_path / "c.pbx").write_text(
        'model c\nweights "w.npz"\ninput x: float64[1, 13]\n'
        "a = relu(conv1d(x, @l0, padding=1))\nb = avgpool1d(a, 2, ceil_mode=true)\n"
        'u = relu(upsample(b, mode="linear", scale=2))\n'
        "output logits = linear(flatten(adaptive_avgpool1d(u, 5)), @l7)\n")
    model = pbxc.load(tmp_path / "c.pbx")
    x, x0 = RNG.normal(size=(3, 1, 13)), RNG.normal(size=(1, 1, 13)) * 0.2
    ours = model.dfd(x, baseline=x0[0], target=2)
    theirs = DeepLift(net).attribute(torch.from_numpy(x), torch.from_numpy(
        np.repeat(x0, 3, axis=0)), target=2).detach().numpy()
    np.testing.assert_allclose(ours.attributions["x"], theirs, rtol=1e-10, atol=1e-12)
    assert ours.summation_error.max() < 1e-12


def test_lanes_run_in_mpmath_through_the_round2_ops(tmp_path: Path) -> None:
    """The verifier's high-precision reference (mpmath lanes) through every round-2 form."""
    import mpmath

    from pbxc.verify.lanes import mp_kit
    weights = {"p.weight": np.array([0.25, -0.5]), "c": np.array([[[2.0]], [[0.5]]]),
               "head.weight": RNG.normal(size=(2, 8)), "head.bias": np.zeros(2)}
    np.savez(tmp_path / "w.npz", **weights)
    (tmp_path / "m.pbx").write_text(
        'model mp\nweights "w.npz"\ninput x: float64[2, 3, 3]\n'
        "a = upsample(prelu(maxpool2d(pad(x, pads=(0, 1, 0, 1), value=0.1), 2, "
        "ceil_mode=true), @p), scale=2)\n"
        'b = upsample(avgpool2d(x, 2, ceil_mode=true), mode="linear", scale=2)\n'
        "g = unsqueeze(global_avgpool(x), axes=(1, 2))\n"
        "c = div(sub(mul(add(a, b), g), 0.5), @c)\n"
        "output y = linear(flatten(adaptive_avgpool2d(c, (2, 2))), @head)\n")
    model = pbxc.load(tmp_path / "m.pbx")
    x = RNG.normal(size=(1, 2, 3, 3))
    with mpmath.workdps(30):
        jac, _ = reference_jacobian(model, {"x": x[0]}, "y", "x", mp_kit(model, 30))
    np.testing.assert_allclose(jac, model.jacobian(x).jacobian[0], rtol=1e-13, atol=1e-15)
