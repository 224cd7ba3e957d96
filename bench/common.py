"""Shared pieces of the benchmarks: models, timing, the measured GEMM rate."""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import pbxc

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
MLP_WIDTHS = (784, 512, 512, 512, 10)


def mlp_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """The 784-512-512-512-10 tanh MLP's weights, from a seeded generator (PyTorch init)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for i, (a, b) in enumerate(itertools.pairwise(MLP_WIDTHS)):
        bound = 1 / np.sqrt(a)
        weights[f"fc{i}.weight"] = rng.uniform(-bound, bound, size=(b, a))
        weights[f"fc{i}.bias"] = rng.uniform(-bound, bound, size=b)
    return weights


MLP_PBX = """model mlp
weights "mlp.npz"
input x: float64[784]
h0 = tanh(linear(x, @fc0))
h1 = tanh(linear(h0, @fc1))
h2 = tanh(linear(h1, @fc2))
output logits = linear(h2, @fc3)
"""

_TMP = tempfile.TemporaryDirectory(prefix="pbxc-bench-")


def load_mlp(dtype: str) -> pbxc.Model:
    folder = Path(_TMP.name)
    if not (folder / "mlp.npz").exists():
        np.savez(folder / "mlp.npz", **mlp_weights())
        (folder / "mlp.pbx").write_text(MLP_PBX)
    return pbxc.load(folder / "mlp.pbx", dtype=dtype)


def load_digits(dtype: str) -> pbxc.Model:
    return pbxc.load(EXAMPLES / "digits_cnn.pbx", dtype=dtype)


def digits_inputs(batch: int, dtype: str) -> np.ndarray:
    data = np.load(EXAMPLES / "digits_cnn_reference.npz")["inputs"]
    reps = -(-batch // len(data))
    return np.tile(data, (reps, 1, 1, 1))[:batch].astype(dtype)


def median_time(fn: Callable[[], object], repeat: int = 7, min_time: float = 0.2) -> float:
    """Median seconds per call, after a warm-up call."""
    fn()
    times = []
    deadline = time.perf_counter() + min_time
    for i in range(repeat * 10):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if i + 1 >= repeat and time.perf_counter() > deadline:
            break
    return statistics.median(times)


def forward_macs(model: pbxc.Model) -> int:
    """Multiply-adds of one sample's forward pass through the weighted layers."""
    from pbxc.lower.plan import vector_cost
    from pbxc.ops import WEIGHTED

    return sum(vector_cost(n, model.graph) for n in model.nodes if n.kind in WEIGHTED)


def gemm_rate(dtype: str, n: int = 512) -> float:
    """Multiply-adds per second of an n x n x n matrix product, measured now."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(n, n)).astype(dtype)
    b = rng.normal(size=(n, n)).astype(dtype)
    return n**3 / median_time(lambda: a @ b)
