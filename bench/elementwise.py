"""Elementwise activation work, one routine at a time: f(z), f'(z), the DFD multiplier from
scratch, and the runtime's multiplier with f(z0), f(z) given (its secant fast path), for the
built-in activations on a (batch, width) array in float32 and float64. Median ms of
``--repeat`` calls.

z is standard normal, z0 one row shared by the batch (DFD's zeros default hands the layer's
bias over like that), seeded. Run it on two checkouts to compare a change:
``python bench/elementwise.py --acts tanh silu``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import pbxc
from pbxc.runtime.model import ActivationTable

BUILT_INS = ("tanh", "sigmoid", "silu", "gelu", "gelu_tanh", "softplus", "mish", "elu", "relu")


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--acts", nargs="+", default=list(BUILT_INS), choices=BUILT_INS)
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"],
                        choices=["float64", "float32"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=100)
    args = parser.parse_args()
    if not (1 <= args.batch <= 65536 and 1 <= args.width <= 65536
            and args.batch * args.width <= 1 << 26 and 1 <= args.repeat <= 10000):
        parser.error("--batch and --width in 1..65536, at most 2^26 elements; --repeat 1..10000")
    print(f"(batch, width) = ({args.batch}, {args.width}); median ms of {args.repeat} calls")
    print(f"{'activation':<11} {'dtype':<8} {'f':>8} {'df':>8} {'m':>8} {'m, f given':>11}")
    with tempfile.TemporaryDirectory() as folder:
        for act in args.acts:
            for dtype in args.dtypes:
                source = Path(folder) / f"{act}_{dtype}.pbx"
                source.write_text(f"model bench_{act}\ninput x: {dtype}[{args.width}]\n"
                                  f"output y = {act}(x)\n")
                table = pbxc.load(source).activations
                print(f"{act:<11} {dtype:<8} " + " ".join(
                    f"{t:>{w}.3f}" for t, w in zip(timings(table, dtype, args),
                                                    (8, 8, 8, 11))))


def timings(table: ActivationTable, dtype: str, args: argparse.Namespace) -> list[float]:
    """Median ms of f, f', the multiplier, and the multiplier given f(z0) and f(z)."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(args.batch, args.width)).astype(dtype)
    z0 = np.broadcast_to(rng.normal(size=(1, args.width)).astype(dtype), z.shape)
    f1 = table("y", z)
    f0 = np.broadcast_to(table("y", z0[:1]), z.shape)
    calls: list[Callable[[], object]] = [
        lambda: table("y", z),
        lambda: table.derivative("y", z),
        lambda: table.multiplier("y", z0, z),
        lambda: table.multiplier("y", z0, z, f0, f1)]
    return [median_ms(call, args.repeat) for call in calls]


if __name__ == "__main__":
    main()
