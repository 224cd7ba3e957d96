"""Paper estimate of the CUDA backend on an H100: FLOPs and bytes of every launch, a roofline.

    python bench/gpu_estimate.py [--batch 256] [--dtypes float32 float64] [--kernels]

Runs each pass of the generated CUDA module on a *counting device*: numpy arrays, no
computation, every kernel launch and every matrix product recorded with its shapes. So the
counts are those of the code pbxc generates, on any machine (no GPU, no compiler). Per launch:

- bytes: every array argument read or written once (a gather that re-reads a neighbour hits
  the cache), in the dtype; a matrix product reads A and B and writes C once;
- FLOPs: 2 m n k for a product; for a kernel, its elements times a per-kind count (below).

Each launch takes max(FLOP / peak, bytes / bandwidth), and is compute bound where its
arithmetic intensity exceeds the ridge point peak / bandwidth. H100 SXM published peaks:
FP64 67 TFLOP/s on tensor cores (cuBLAS DGEMM) and 34 on vector units (the kernels), FP32
67 TFLOP/s without tensor cores, HBM3 3.35 TB/s. The launch overhead (about 5 us a launch
through cupy, host side) is reported apart: at batch 256 it, not the GPU, sets the time of
these small models.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EXAMPLES, load_mlp

import pbxc
from pbxc.lower.plan import plan_jacobian
from pbxc.runtime.codeload import load_generated_module
from pbxc.runtime.compile import render_cuda_module

PEAK = {  # FLOP/s: (matrix products, kernels)
    "float64": (67e12, 34e12),
    "float32": (67e12, 67e12),
}
BANDWIDTH = 3.35e12   # bytes/s, HBM3
LAUNCH = 5e-6         # seconds a launch, host side (cupy)

#: FLOPs per element of a kernel, by the end of its name (a generous count of its math)
KERNEL_FLOPS = {"fwd": 20, "vjp": 10, "dfd": 40, "im2col": 0, "col2im": 9, "add": 1,
                "mul": 1, "contribution": 2, "scale": 1, "modify": 2, "axpy": 2, "bias": 4,
                "divide": 4, "accumulate": 3, "terms": 3, "diag": 1}


@dataclass
class Launch:
    kind: str          # "gemm" or "kernel"
    name: str
    flops: float
    bytes: float


@dataclass
class CountingDevice:
    """xp = numpy; launches are recorded, not run."""

    itemsize: int
    launches: list[Launch] = field(default_factory=list)
    name: str = "counting"
    xp: Any = np

    def launch(self, name: str, grid: int, block: int, args: list[Any]) -> None:
        total = int(args[-1])
        moved = sum(a.nbytes for a in args if isinstance(a, np.ndarray))
        base = name.rsplit("_", 1)[0]
        per = next((v for k, v in KERNEL_FLOPS.items() if base.endswith(k)), 4)
        self.launches.append(Launch("kernel", base, float(per * total), float(moved)))


def instrument(module: Any, device: CountingDevice) -> None:
    """Record the module's matrix products too."""
    context = module.Context

    def matmul(self: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = np.matmul(a, b)
        k = a.shape[-1]
        flops = 2.0 * out.size * k
        moved = (a.size + b.size + out.size) * device.itemsize
        device.launches.append(Launch("gemm", f"gemm {list(a.shape)}x{list(b.shape)}", flops,
                                      float(moved)))
        return out

    context.matmul = matmul
    original = context.conv_matmul, context.conv_matmul_t

    def conv(self: Any, w2: np.ndarray, cols: np.ndarray, groups: int) -> np.ndarray:
        return matmul(self, w2, cols) if groups == 1 else original[0](self, w2, cols, groups)

    def conv_t(self: Any, w2: np.ndarray, g: np.ndarray, groups: int) -> np.ndarray:
        return matmul(self, w2.T, g) if groups == 1 else original[1](self, w2, g, groups)

    context.conv_matmul, context.conv_matmul_t = conv, conv_t


def estimate(launches: list[Launch], dtype: str) -> dict[str, Any]:
    gemm_peak, kernel_peak = PEAK[dtype]
    rows = []
    for launch in launches:
        peak = gemm_peak if launch.kind == "gemm" else kernel_peak
        compute, memory = launch.flops / peak, launch.bytes / BANDWIDTH
        rows.append((launch, max(compute, memory), "compute" if compute > memory else "memory"))
    device = sum(t for _, t, _ in rows)
    return {"rows": rows, "device": device, "launches": len(launches),
            "flops": sum(lc.flops for lc in launches), "bytes": sum(lc.bytes for lc in launches)}


def run_pass(module: Any, device: CountingDevice, pass_name: str, x: np.ndarray,
             dtype: str) -> list[Launch]:
    device.launches.clear()
    if pass_name == "lrp":
        module.lrp(x, composite="epsilon", dtype=dtype)
    elif pass_name == "dfd":
        module.dfd(x, dtype=dtype)
    else:
        getattr(module, pass_name)(x, dtype=dtype)
    return list(device.launches)


def models(dtype: str) -> dict[str, pbxc.Model]:
    out = {"mlp 784-512-512-512-10 tanh": load_mlp(dtype)}
    for name in ("breast_cancer_mlp", "wine_swish_mlp", "digits_cnn", "digits_resnet"):
        out[name] = pbxc.load(EXAMPLES / f"{name}.pbx", dtype=dtype)
    return out


PASSES = ("forward", "gradient", "jacobian", "dfd", "lrp")


def plan_note(model: pbxc.Model, pass_name: str, batch: int) -> str:
    """The Jacobian plan's own count (pbxc.lower.plan), beside the launches' count."""
    if pass_name != "jacobian":
        return ""
    plan = plan_jacobian(model.graph, model.input_names[0], model.output_names[0], batch)
    return f"  (plan: {plan.mode}, {2 * plan.flops_per_sample * batch / 1e9:.3f} GFLOP)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--kernels", nargs="*", default=None, metavar="MODEL",
                        help="list every launch (of these models' names, by prefix; all when "
                             "none is given) with its intensity, time and bound")
    parser.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    args = parser.parse_args(argv)
    # the counting device computes nothing: arrays hold garbage, so silence numpy about it
    warnings.simplefilter("ignore")
    np.seterr(all="ignore")
    print(f"H100 SXM paper estimate, batch {args.batch}: peaks FP64 67 (GEMM) / 34 (kernels), "
          f"FP32 67 TFLOP/s; HBM3 {BANDWIDTH / 1e12:.2f} TB/s; launch {LAUNCH * 1e6:.0f} us")
    print("device time = sum over launches of max(FLOP/peak, bytes/bandwidth)\n")
    header = (f"{'model':<28} {'dtype':<8} {'pass':<9} {'launches':>8} {'GFLOP':>8} {'MB':>8} "
              f"{'device us':>10} {'samples/s':>14} {'+launch us':>10} {'samples/s':>10} "
              f"{'gemm bound':>11} {'kernels bound':>14}")
    print(header)
    print("-" * len(header))
    for dtype in args.dtypes:
        for name, model in models(dtype).items():
            py = render_cuda_module(model)[1]
            module = load_generated_module(py, f"estimate_{model.name}")
            module.set_weights({k: np.asarray(v) for k, v in model.weights.items()})
            device = CountingDevice(np.dtype(dtype).itemsize)
            module.set_device(device)
            instrument(module, device)
            rng = np.random.default_rng(0)
            x = rng.random((args.batch, *model.graph.inputs[0].shape)).astype(dtype)
            for pass_name in args.passes:
                est = estimate(run_pass(module, device, pass_name, x, dtype), dtype)
                bounds: dict[str, set[str]] = defaultdict(set)
                for launch, _, bound in est["rows"]:
                    bounds[launch.kind].add(bound)
                wall = est["device"] + est["launches"] * LAUNCH
                print(f"{name:<28} {dtype:<8} {pass_name:<9} {est['launches']:>8} "
                      f"{est['flops'] / 1e9:>8.3f} {est['bytes'] / 1e6:>8.2f} "
                      f"{est['device'] * 1e6:>10.2f} {args.batch / est['device']:>14,.0f} "
                      f"{wall * 1e6:>10.1f} {args.batch / wall:>10,.0f} "
                      f"{'/'.join(sorted(bounds['gemm'])) or '-':>11} "
                      f"{'/'.join(sorted(bounds['kernel'])) or '-':>14}" + plan_note(model, pass_name,
                                                                         args.batch))
                listed = args.kernels is not None and (
                    not args.kernels or any(name.startswith(k) for k in args.kernels))
                if listed and dtype == args.dtypes[0]:
                    for launch, t, bound in est["rows"]:
                        ai = launch.flops / max(launch.bytes, 1)
                        print(f"    {launch.name:<40} {launch.flops / 1e6:>9.3f} MFLOP "
                              f"{launch.bytes / 1e6:>8.3f} MB  AI {ai:>6.2f}  "
                              f"{t * 1e6:>7.3f} us  {bound}")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
