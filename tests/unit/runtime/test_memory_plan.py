"""The memory plan (pbxc.lower.memory): passes release what they no longer read, their
peaks stay within the plan's prediction, and the results equal the keep-everything path."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import pbxc
from pbxc.errors import InputError
from pbxc.lower.memory import (
    backward_needs,
    batch_for_limit,
    parse_bytes,
    predict,
    recomputed,
    release_schedule,
)
from pbxc.lower.plan import path_nodes
from pbxc.runtime import jacobian as jacobian_module
from pbxc.runtime.dfd import dfd, linearize_both
from pbxc.runtime.jacobian import linearize, reverse_sweep
from pbxc.runtime.released import Released, ReleasedValueError

RESIDUAL = """model residual
weights "residual.npz"
input img: float64[3, 12, 12]
stem = relu(batchnorm(conv2d(img, @conv1, padding=1, bias=false), @bn1))
pool = maxpool2d(stem, kernel=2)
b1 = relu(conv2d(pool, @c2, padding=1))
b2 = conv2d(b1, @c3, padding=1)
r = relu(add(b2, pool))
cat = concat(r, pool, axis=0)
output logits = linear(global_avgpool(cat), @head)
"""


def _residual(tmp_path: Path, dtype: str = "float64") -> pbxc.Model:
    rng = np.random.default_rng(3)
    w = {"conv1.weight": rng.normal(size=(6, 3, 3, 3)) * 0.4,
         "bn1.weight": rng.uniform(0.5, 1.5, 6), "bn1.bias": rng.normal(size=6) * 0.1,
         "bn1.running_mean": rng.normal(size=6) * 0.1, "bn1.running_var": rng.uniform(0.5, 2, 6),
         "c2.weight": rng.normal(size=(6, 6, 3, 3)) * 0.3, "c2.bias": rng.normal(size=6) * 0.1,
         "c3.weight": rng.normal(size=(6, 6, 3, 3)) * 0.3, "c3.bias": rng.normal(size=6) * 0.1,
         "head.weight": rng.normal(size=(5, 12)), "head.bias": rng.normal(size=5) * 0.1}
    np.savez(tmp_path / "residual.npz", **w)
    (tmp_path / "residual.pbx").write_text(RESIDUAL)
    return pbxc.load(tmp_path / "residual.pbx", dtype=dtype)


def _deep_mlp(tmp_path: Path, depth: int = 16, width: int = 128) -> pbxc.Model:
    rng = np.random.default_rng(0)
    lines = ["model deep", 'weights "deep.npz"', f"input x: float64[{width}]"]
    w = {}
    prev = "x"
    for i in range(depth):
        w[f"fc{i}.weight"] = rng.normal(size=(width, width)) / np.sqrt(width)
        w[f"fc{i}.bias"] = rng.normal(size=width) * 0.1
        lines.append(f"h{i} = relu(linear({prev}, @fc{i}))")
        prev = f"h{i}"
    w["out.weight"] = rng.normal(size=(10, width))
    w["out.bias"] = np.zeros(10)
    lines.append(f"output y = linear({prev}, @out)")
    np.savez(tmp_path / "deep.npz", **w)
    (tmp_path / "deep.pbx").write_text("\n".join(lines) + "\n")
    return pbxc.load(tmp_path / "deep.pbx")


def _traced_peak(fn) -> int:  # type: ignore[no-untyped-def]
    fn()   # warm: caches and plans are not the pass's own memory
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("pass_name", ["gradient", "lrp", "dfd"])
def test_deep_net_peak_stays_within_the_plan(tmp_path: Path, pass_name: str) -> None:
    model = _deep_mlp(tmp_path)
    batch = 32
    x = np.random.default_rng(1).normal(size=(batch, 128))
    run = {"gradient": lambda: model.gradient(x), "lrp": lambda: model.lrp(x),
           "dfd": lambda: model.dfd(x)}[pass_name]
    plan = predict(model.graph, pass_name, batch, np.float64)
    measured = _traced_peak(run)
    # the plan frees: it keeps well under every value and local ...
    assert plan.kept < 0.6 * plan.kept_all
    # ... and the pass keeps to it (the slack covers NumPy's small temporaries)
    assert measured <= 1.5 * plan.peak + (64 << 10), (measured, plan.explain())
    if pass_name == "gradient":   # bool ReLU masks only: far below the forward values
        assert measured < 0.2 * plan.kept_all


def test_the_peak_is_explained(tmp_path: Path) -> None:
    model = _residual(tmp_path)
    text = predict(model.graph, "lrp", 4, np.float32).explain()
    assert "predicted peak" in text and "held at the peak" in text
    assert "float32" in text and "batch 4" in text


def test_gradient_equals_the_keep_everything_path(tmp_path: Path) -> None:
    model = _residual(tmp_path)
    x = np.random.default_rng(2).normal(size=(5, 3, 12, 12))
    planned = model.gradient(x, target=1)
    lin = linearize(model, model.prepare_inputs(x))     # every value and f'(z), as floats
    nodes = path_nodes(model.graph, "img", "logits")
    seed = np.zeros((5, 1, 5))
    seed[:, 0, 1] = 1
    full = reverse_sweep(model, lin, "img", "logits", nodes, seed)[:, 0]
    np.testing.assert_array_equal(planned, full)


def test_dfd_equals_the_keep_everything_path(tmp_path: Path) -> None:
    model = _residual(tmp_path)
    x = np.random.default_rng(4).normal(size=(3, 3, 12, 12))
    inputs = model.prepare_inputs(x)
    default = {"img": np.full_like(x, 0.25)}
    seed = np.zeros((3, 5))
    seed[:, 2] = 1
    planned, _, _ = dfd(model, inputs, default, "logits", seed)
    full, _, _ = dfd(model, inputs, default, "logits", seed,
                     points=linearize_both(model, inputs, default, keep=None))
    np.testing.assert_array_equal(planned["img"], full["img"])


def test_lrp_recomputes_relu_outputs_bit_for_bit(tmp_path: Path) -> None:
    model = _residual(tmp_path)
    remat = recomputed("lrp", model.nodes, model.graph.user_activations)
    assert remat, "the ReLU outputs read by the next layer are recomputed"
    x = np.random.default_rng(5).normal(size=(4, 3, 12, 12))
    res = model.lrp(x)
    # recomputing f(z) changes nothing: LRP-0/epsilon relevance still conserves per layer
    assert res.ledger.max_layer_error < 1e-12
    again = model.lrp(x)
    np.testing.assert_array_equal(res.relevance["img"], again.relevance["img"])


def test_every_read_value_is_released_once(tmp_path: Path) -> None:
    model = _residual(tmp_path)
    for pass_name in ("gradient", "lrp", "dfd"):
        needed, locals_ = backward_needs(pass_name, model.nodes)
        schedule = release_schedule(pass_name, model.nodes)
        released = [v for vs, _ in schedule.values() for v in vs]
        assert sorted(released) == sorted(needed)
        assert sorted(v for _, ls in schedule.values() for v in ls) == sorted(locals_)


def test_a_released_value_refuses_its_data() -> None:
    r = Released.of("h1", np.zeros((2, 3)))
    assert r.shape == (2, 3) and r.ndim == 2 and r.dtype == np.float64 and len(r) == 2
    assert r.rows(0, 1).shape == (1, 3) and r.rows(1, 2, spread_to=4).shape == (4, 3)
    for read in (lambda: np.asarray(r), lambda: r * 2.0, lambda: np.zeros((2, 3)) + r,
                 lambda: r[0], lambda: np.abs(r)):
        with pytest.raises(ReleasedValueError, match="h1"):
            read()


def test_relu_masks_are_bool_and_exact(tmp_path: Path) -> None:
    model = _residual(tmp_path, "float32")
    z = np.array([-1.0, 0.0, 2.0], dtype=np.float32)
    mask = model.activations.slope("stem", z)
    assert mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, model.activations.derivative("stem", z))
    mean = pbxc.load(tmp_path / "residual.pbx", convention="mean")
    assert mean.activations.slope("stem", z).dtype == np.float32   # f'(0) = 1/2: floats


def test_batch_for_a_memory_limit(tmp_path: Path) -> None:
    model = _residual(tmp_path)
    per_8 = predict(model.graph, "lrp", 8, np.float64).peak
    chosen = batch_for_limit(model.graph, "lrp", per_8, np.float64, most=1000)
    assert chosen >= 8
    assert predict(model.graph, "lrp", chosen, np.float64).peak <= per_8
    assert predict(model.graph, "lrp", chosen + 1, np.float64).peak > per_8
    assert batch_for_limit(model.graph, "lrp", 1, np.float64, most=1000) == 1
    assert batch_for_limit(model.graph, "lrp", 1 << 40, np.float64, most=7) == 7


def test_memory_sizes_parse() -> None:
    assert parse_bytes("512M") == 512 << 20
    assert parse_bytes("1.5GiB") == 3 << 29
    assert parse_bytes("4096") == 4096
    for bad in ("", "-1G", "lots", "3 parsecs", "0"):
        with pytest.raises(InputError):
            parse_bytes(bad)


def test_the_cli_chooses_the_batch_from_the_memory_limit(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from pbxc.cli import main

    model = _residual(tmp_path)
    x = np.random.default_rng(6).normal(size=(9, 3, 12, 12))
    np.save(tmp_path / "x.npy", x)
    limit = predict(model.graph, "lrp", 4, np.float64).peak
    code = main(["explain", str(tmp_path / "residual.pbx"), "-m", "lrp", "-i",
                 str(tmp_path / "x.npy"), "--memory-limit", str(limit), "--explain-plan",
                 "-o", str(tmp_path / "r.npz")])
    out = capsys.readouterr().out
    assert code == 0
    assert "batch size 4 per step (from the memory limit" in out and "predicted peak" in out
    saved = np.load(tmp_path / "r.npz")
    np.testing.assert_allclose(saved["attributions"], model.lrp(x).relevance["img"],
                               rtol=1e-12, atol=1e-15)
    assert main(["explain", str(tmp_path / "residual.pbx"), "-m", "lrp", "-i",
                 str(tmp_path / "x.npy"), "--memory-limit", "lots"]) == 2


RESIDUAL_PBX = """model res
weights "w.npz"
input x: {dtype}[3, 8, 8]
a = relu(conv2d(x, @c1, padding=1))
b = relu(conv2d(a, @c2, padding=1))
s = relu(add(conv2d(b, @c3, padding=1), a))
t = relu(add(relu(conv2d(s, @c4, stride=2, padding=1)), maxpool2d(s, kernel=3, stride=2, padding=1)))
output y = linear(flatten(t), @fc)
"""


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_in_place_reverse_sweep_is_the_allocating_one_bit_for_bit(
        write_model: Callable[..., Path], dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reverse sweep updates the cotangents it owns in place (residual sums, an
    activation's v * f'(z) after a convolution or a sum): the same values, bit for bit, as
    the sweep that allocates every result; and the caller's seed is left untouched."""
    rng = np.random.default_rng(5)
    weights = {f"c{i}.weight": rng.normal(size=(6, 3 if i == 1 else 6, 3, 3)) for i in range(1, 5)}
    weights |= {f"c{i}.bias": rng.normal(size=6) for i in range(1, 5)}
    weights |= {"fc.weight": rng.normal(size=(4, 6 * 16)), "fc.bias": rng.normal(size=4)}
    model = pbxc.load(write_model(RESIDUAL_PBX.format(dtype=dtype), weights), dtype=dtype)
    x = rng.normal(size=(5, 3, 8, 8)).astype(dtype)
    seed = rng.normal(size=(5, 2, 4)).astype(dtype)
    kept = seed.copy()
    nodes = path_nodes(model.graph, "x", "y")
    scaled: list[str] = []
    check = jacobian_module._scales_in_place

    def counting(node: object, maps: object, v: np.ndarray) -> bool:
        ok = check(node, maps, v)   # type: ignore[arg-type]
        if ok:
            scaled.append(node.name)   # type: ignore[attr-defined]
        return ok

    monkeypatch.setattr(jacobian_module, "_scales_in_place", counting)
    got = []
    for in_place in (True, False):
        lin = linearize(model, {"x": x}, local_of=None)
        got.append(reverse_sweep(model, lin, "x", "y", nodes, seed, in_place=in_place))
    assert sorted(scaled) == ["a", "b", "s"]   # after a sum or a convolution, not the seed's
    assert got[0].dtype == np.dtype(dtype)
    assert got[0].tobytes() == got[1].tobytes()
    assert seed.tobytes() == kept.tobytes()
    grad = model.gradient(x)
    assert np.abs(grad).sum() > 0
