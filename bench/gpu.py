"""The CuPy backend on a GPU beside torch on the same GPU: times and ratios.

    python bench/gpu.py [--batches 1 256 4096] [--dtypes float32 float64]

Model: the 784-512-512-512-10 tanh MLP (seeded weights, bench/common.py). Passes: forward,
gradient (of the predicted logit), the full Jacobian, DFD (zero baseline) and LRP (epsilon);
torch does forward, gradient (autograd) and the Jacobian (torch.func.vmap(jacrev)); it has
no LRP or DFD of its own. Every timed call ends with a device synchronisation.

Where no GPU is present (cupy missing, or cupy.is_available() false) it says so and exits
0; ``bench/gpu_estimate.py`` gives the paper estimate on any machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MLP_WIDTHS, load_mlp, median_time, mlp_weights

import pbxc
from pbxc.runtime.cupy_backend import cupy_unavailable


def torch_mlp(dtype: str) -> tuple[Any, Callable[[Any], Any]] | None:
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    tdtype = getattr(torch, dtype)
    weights = {k: torch.tensor(v, dtype=tdtype, device="cuda") for k, v in mlp_weights().items()}
    layers = len(MLP_WIDTHS) - 1

    def f(x: Any) -> Any:
        for i in range(layers):
            x = torch.nn.functional.linear(x, weights[f"fc{i}.weight"], weights[f"fc{i}.bias"])
            if i < layers - 1:
                x = torch.tanh(x)
        return x

    return torch, f


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256, 4096])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    args = parser.parse_args(argv)
    reason = cupy_unavailable()
    if reason is not None:
        print(f"bench/gpu.py: no GPU here ({reason}); nothing to time. "
              "bench/gpu_estimate.py gives the H100 paper estimate on any machine.")
        return 0
    import cupy

    def synced(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            out = fn()
            cupy.cuda.Device().synchronize()
            return out
        return run

    print(f"GPU: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, "
          f"cupy {cupy.__version__}")
    print(f"{'dtype':<8} {'batch':>6} {'pass':<9} {'pbxc cupy ms':>13} {'torch ms':>9} "
          f"{'ratio':>6}")
    for dtype in args.dtypes:
        model = load_mlp(dtype)
        gpu = pbxc.load(model.graph.path, dtype=dtype, backend="cupy")
        peer = torch_mlp(dtype)
        for batch in args.batches:
            x = cupy.asarray(np.random.default_rng(0).random((batch, MLP_WIDTHS[0]),
                                                             dtype=np.float64), dtype=dtype)
            ours = {
                "forward": lambda gpu=gpu, x=x: gpu(x),
                "gradient": lambda gpu=gpu, x=x: gpu.gradient(x),
                "jacobian": lambda gpu=gpu, x=x: gpu.jacobian(x),
                "dfd": lambda gpu=gpu, x=x: gpu.dfd(x),
                "lrp": lambda gpu=gpu, x=x: gpu.lrp(x, composite="epsilon"),
            }
            theirs: dict[str, Callable[[], object]] = {}
            if peer is not None:
                torch, f = peer
                xt = torch.as_tensor(x, device="cuda")

                def grad(xt: Any = xt, f: Any = f, torch: Any = torch) -> Any:
                    xg = xt.detach().requires_grad_(True)
                    y = f(xg)
                    y.gather(1, y.argmax(1, keepdim=True)).sum().backward()
                    return xg.grad

                theirs = {
                    "forward": lambda f=f, xt=xt: f(xt),
                    "gradient": grad,
                    "jacobian": lambda f=f, xt=xt, torch=torch: torch.func.vmap(
                        torch.func.jacrev(f))(xt),
                }
            for name, fn in ours.items():
                t_ours = median_time(synced(fn))
                line = f"{dtype:<8} {batch:>6} {name:<9} {t_ours * 1e3:>13.3f}"
                if name in theirs:
                    t_peer = median_time(synced(theirs[name]))
                    line += f" {t_peer * 1e3:>9.3f} {t_ours / t_peer:>6.2f}"
                else:
                    line += f" {'-':>9} {'-':>6}"
                print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
