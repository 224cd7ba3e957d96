"""pbxc's passes beside their peers, in one run: times, ratios and FLOP-bound limits.

    python bench/passes.py [--batches 1 32 256] [--dtypes float64 float32] [--quick]
                           [--sections passes hessian]
    python bench/passes.py --models resnet18,resnet50,densenet121 [--size 224]
        [--batches 1 32] [--passes gradient,lrp,dfd] [--max-gb 10]   (see bench/cnn.py)
    python bench/passes.py --models vit [--batches 1 32] [--dtypes float32 float64] [--quick]
        (a ViT-like transformer: pbxc attnlrp and DFD beside LXT and Captum; bench/vit.py)

Models: the 784-512-512-512-10 tanh MLP (seeded weights) and the shipped digits CNN. Peers
that are not installed are reported as such (torch, jax, captum, zennit). The FLOP-bound
limit of a pass is its multiply-adds divided by the GEMM rate measured in this run: for the
Jacobian the chosen plan's products plus the forward pass that gives its D matrices; for LRP
two forward passes' worth (the forward, the transposed products); for DFD the same two
and one row more (the shared default's forward at one row: counted, though a warm call
reuses the one its first call kept).
The hessian section times model.hessian (one target logit) beside
torch.func.vmap(torch.func.hessian) on a 30-64-32-2 and the 784-512-512-512-10 tanh MLP; its
limit is the Hessian plan's multiply-adds over the same GEMM rate.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cnn import MODELS, run_models
from cnn import PASSES as CNN_PASSES
from common import (
    EXAMPLES,
    MLP_WIDTHS,
    digits_inputs,
    forward_macs,
    gemm_rate,
    load_digits,
    load_mlp,
    median_time,
    mlp_weights,
)
from vit import run_vit

from pbxc.lower.plan import plan_jacobian


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def torch_mlp(dtype: str):  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    layers: list[nn.Module] = []
    w = mlp_weights()
    for i, (a, b) in enumerate(itertools.pairwise(MLP_WIDTHS)):
        lin = nn.Linear(a, b)
        lin.weight.data = torch.from_numpy(w[f"fc{i}.weight"])
        lin.bias.data = torch.from_numpy(w[f"fc{i}.bias"])
        layers.append(lin)
        if i < len(MLP_WIDTHS) - 2:
            layers.append(nn.Tanh())
    net = nn.Sequential(*layers).to(getattr(torch, dtype)).eval()
    return net


def torch_digits(dtype: str):  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    w = np.load(EXAMPLES / "digits_cnn.npz")
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Flatten(), nn.Linear(64, 10))
    keys = ["conv1", "conv2", "fc"]
    for module, key in zip([net[0], net[3], net[7]], keys):
        module.weight.data = torch.from_numpy(w[f"{key}.weight"])
        module.bias.data = torch.from_numpy(w[f"{key}.bias"])
    return net.to(getattr(torch, dtype)).eval()


def peers_for(name: str, dtype: str, x: np.ndarray) -> dict[str, dict[str, Callable[[], object]]]:
    """Peer implementations, per pass, that are installed here."""
    peers: dict[str, dict[str, Callable[[], object]]] = {"jacobian": {}, "lrp": {}, "dfd": {}}
    if have("torch"):
        import torch
        from torch.func import jacfwd, jacrev, vmap

        torch.set_num_threads(2)
        net = torch_mlp(dtype) if name == "mlp" else torch_digits(dtype)
        xt = torch.from_numpy(x)

        def single(v: torch.Tensor) -> torch.Tensor:
            return net(v[None])[0]

        peers["jacobian"]["torch vmap(jacrev)"] = lambda: vmap(jacrev(single))(xt)
        peers["jacobian"]["torch vmap(jacfwd)"] = lambda: vmap(jacfwd(single))(xt)
        if have("captum"):
            from captum.attr import DeepLift

            dl = DeepLift(net)
            target = net(xt).argmax(dim=1)
            peers["dfd"]["captum DeepLift"] = lambda: dl.attribute(xt, torch.zeros_like(xt),
                                                                   target=target)
        if have("zennit"):
            from zennit.composites import EpsilonPlusFlat

            def zennit_lrp() -> object:
                from zennit.attribution import Gradient

                with Gradient(model=net, composite=EpsilonPlusFlat()) as attributor:
                    out = net(xt)
                    onehot = torch.eye(out.shape[1], dtype=out.dtype)[out.argmax(1)]
                    return attributor(xt, onehot)
            peers["lrp"]["zennit EpsilonPlusFlat"] = zennit_lrp
    if have("jax"):
        import jax
        import jax.numpy as jnp

        jax.config.update("jax_enable_x64", dtype == "float64")
        if name == "mlp":
            w = mlp_weights()
            params = [(jnp.asarray(w[f"fc{i}.weight"], dtype), jnp.asarray(w[f"fc{i}.bias"],
                                                                              dtype))
                      for i in range(len(MLP_WIDTHS) - 1)]

            def f(v):  # type: ignore[no-untyped-def]
                for i, (wt, b) in enumerate(params):
                    v = v @ wt.T + b
                    if i < len(params) - 1:
                        v = jnp.tanh(v)
                return v

            xj = jnp.asarray(x)
            jr = jax.jit(jax.vmap(jax.jacrev(f)))
            jf = jax.jit(jax.vmap(jax.jacfwd(f)))
            peers["jacobian"]["jax jacrev (jit)"] = lambda: jr(xj).block_until_ready()
            peers["jacobian"]["jax jacfwd (jit)"] = lambda: jf(xj).block_until_ready()
    return peers


def our_passes(model, x: np.ndarray) -> dict[str, Callable[[], object]]:  # type: ignore[no-untyped-def]
    return {
        "forward": lambda: model.forward(x),
        "jacobian": lambda: model.jacobian(x),
        "lrp": lambda: model.lrp(x, composite="epsilon"),
        "dfd": lambda: model.dfd(x, baseline="zeros"),
    }


def finite_differences(model, x: np.ndarray) -> Callable[[], object]:  # type: ignore[no-untyped-def]
    """The cost of a one-sided finite-difference Jacobian: m + 1 forward passes, batched."""
    stacked = np.repeat(x, x[0].size + 1, axis=0)
    return lambda: model.forward(stacked)


def run(batches: list[int], dtypes: list[str], quick: bool) -> None:
    print("missing peers (not installed): "
          + (", ".join(p for p in ("torch", "jax", "captum", "zennit") if not have(p)) or "none"))
    header = (f"{'model':<6} {'dtype':<8} {'batch':>5}  {'pass':<9} {'pbxc ms':>9}  "
              f"{'best peer':<24} {'peer ms':>9} {'ratio':>6}  {'limit ms':>9} {'/limit':>6}")
    for dtype in dtypes:
        rate = gemm_rate(dtype)
        print(f"\nGEMM rate ({dtype}, 512^3): {2 * rate / 1e9:.1f} GFLOP/s")
        print(header)
        for name in ("mlp", "digits"):
            model = load_mlp(dtype) if name == "mlp" else load_digits(dtype)
            for batch in batches:
                rng = np.random.default_rng(0)
                x = (rng.normal(size=(batch, 784)).astype(dtype) if name == "mlp"
                     else digits_inputs(batch, dtype))
                plan = plan_jacobian(model.graph, model.input_names[0], model.output_names[0],
                                     batch)
                fwd = forward_macs(model) * batch
                # every pass runs the forward pass too (the Jacobian's D matrices, LRP's z,
                # DFD's z and f(z)); DFD's shared default is one more forward row
                limits = {"jacobian": (plan.flops_per_sample * batch + fwd) / rate,
                          "lrp": 2 * fwd / rate, "dfd": (2 + 1 / batch) * fwd / rate,
                          "forward": fwd / rate}
                ours = our_passes(model, x)
                peers = peers_for(name, dtype, x)
                peers["jacobian"]["finite differences"] = finite_differences(model, x)
                for pass_name, fn in ours.items():
                    t = median_time(fn, repeat=3 if quick else 7)
                    best_name, best = "-", float("nan")
                    for peer_name, peer_fn in peers.get(pass_name, {}).items():
                        try:
                            pt = median_time(peer_fn, repeat=3 if quick else 7)
                        except Exception as err:  # a peer failing is reported, not fatal
                            print(f"  ({peer_name} failed: {type(err).__name__}: {err})")
                            continue
                        if not best < pt:
                            best_name, best = peer_name, pt
                    limit = limits[pass_name]
                    print(f"{name:<6} {dtype:<8} {batch:>5}  {pass_name:<9} {t * 1e3:>9.2f}  "
                          f"{best_name:<24} {best * 1e3:>9.2f} {t / best:>6.2f}  "
                          f"{limit * 1e3:>9.2f} {t / limit:>6.2f}")


# ---------------------------------------------------------------- hessian (issue 15)
SMALL_WIDTHS = (30, 64, 32, 2)
SMALL_PBX = """model small_mlp
weights "small_mlp.npz"
input x: float64[30]
h0 = tanh(linear(x, @fc0))
h1 = tanh(linear(h0, @fc1))
output logits = linear(h1, @fc2)
"""


def small_mlp_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """The 30-64-32-2 tanh MLP's weights, from a seeded generator (PyTorch's init bounds)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for i, (a, b) in enumerate(itertools.pairwise(SMALL_WIDTHS)):
        bound = 1 / np.sqrt(a)
        weights[f"fc{i}.weight"] = rng.uniform(-bound, bound, size=(b, a))
        weights[f"fc{i}.bias"] = rng.uniform(-bound, bound, size=b)
    return weights


def load_small_mlp(dtype: str):  # type: ignore[no-untyped-def]
    import tempfile

    import pbxc

    folder = Path(tempfile.mkdtemp(prefix="pbxc-bench-small-"))
    np.savez(folder / "small_mlp.npz", **small_mlp_weights())
    (folder / "small_mlp.pbx").write_text(SMALL_PBX)
    return pbxc.load(folder / "small_mlp.pbx", dtype=dtype)


def torch_tanh_mlp(widths: tuple[int, ...], weights: dict[str, np.ndarray], dtype: str
                   ):  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        lin = nn.Linear(a, b)
        lin.weight.data = torch.from_numpy(weights[f"fc{i}.weight"])
        lin.bias.data = torch.from_numpy(weights[f"fc{i}.bias"])
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(getattr(torch, dtype)).eval().requires_grad_(False)


def torch_hessian(net, x: np.ndarray, target: int,  # type: ignore[no-untyped-def]
                  chunk: int | None = None) -> Callable[[], object]:
    """torch.func.vmap(torch.func.hessian(f_target)) over the batch (in chunks of ``chunk``
    samples when given, to bound memory)."""
    import torch

    xt = torch.from_numpy(x)

    def f(v: torch.Tensor) -> torch.Tensor:
        return net(v[None])[0, target]

    fn = torch.func.vmap(torch.func.hessian(f))
    if chunk is None or chunk >= len(x):
        return lambda: fn(xt)
    return lambda: torch.cat([fn(xt[s:s + chunk]) for s in range(0, len(xt), chunk)])


def run_hessian(batches: list[int], dtypes: list[str], quick: bool,
                models: tuple[str, ...] = ("small", "large")) -> None:
    """pbxc's model.hessian (one target) beside torch.func.vmap(torch.func.hessian)."""
    from pbxc.runtime.hessian import CURVED_KINDS

    print("\nHessian of one target logit: pbxc model.hessian beside "
          "torch.func.vmap(torch.func.hessian)")
    header = (f"{'model':<13} {'dtype':<8} {'batch':>5}  {'plan':<8} {'pbxc ms':>9} "
              f"{'torch ms':>9} {'ratio':>6}  {'limit ms':>9} {'/limit':>6}")
    target = 0
    for dtype in dtypes:
        rate = gemm_rate(dtype)
        print(f"\nGEMM rate ({dtype}, 512^3): {2 * rate / 1e9:.1f} GFLOP/s")
        print(header)
        for name in [n for n, key in (("30-64-32-2", "small"), ("784-512x3-10", "large"))
                     if key in models]:
            small = name.startswith("30")
            model = load_small_mlp(dtype) if small else load_mlp(dtype)
            widths = SMALL_WIDTHS if small else MLP_WIDTHS
            weights = small_mlp_weights() if small else mlp_weights()
            net = torch_tanh_mlp(widths, weights, dtype) if have("torch") else None
            for batch in batches:
                x = np.random.default_rng(0).normal(size=(batch, widths[0])).astype(dtype)
                res = model.hessian(x, target=target)
                plan = res.plan
                assert {n.kind for n in model.nodes} & CURVED_KINDS
                t = median_time(lambda m=model, v=x: m.hessian(v, target=target),
                                repeat=3 if quick else 7)
                limit = plan.flops_per_sample * batch / rate
                peer = float("nan")
                if net is not None:
                    # the large MLP above batch 32 in chunks of 32: one vmap over 256 samples
                    # x 784 tangents would hold several GB of tangent blocks at once
                    chunk = None if small or batch <= 32 else 32
                    peer = median_time(torch_hessian(net, x, target, chunk),
                                       repeat=3 if quick else 7)
                print(f"{name:<13} {dtype:<8} {batch:>5}  {plan.mode:<8} {t * 1e3:>9.2f} "
                      f"{peer * 1e3:>9.2f} {t / peer:>6.2f}  {limit * 1e3:>9.2f} "
                      f"{t / limit:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--sections", nargs="+", default=["passes", "hessian"],
                        choices=["passes", "hessian"],
                        help="which sections to run (default: both)")
    parser.add_argument("--models", help="torchvision CNNs or the ViT (bench/vit.py) instead "
                        "of the MLP and digits sections, comma-separated: "
                        + ",".join([*MODELS, "vit"]))
    parser.add_argument("--size", type=int, default=224, help="image side for --models")
    parser.add_argument("--passes", default=",".join(CNN_PASSES), help="passes for --models")
    parser.add_argument("--max-gb", type=float, default=10.0,
                        help="address-space limit of each --models measurement (GB)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds per --models measurement")
    parser.add_argument("--hessian-models", nargs="+", default=["small", "large"],
                        choices=["small", "large"],
                        help="hessian section: the 30-64-32-2 and/or the 784-512x3-10 MLP")
    args = parser.parse_args()
    if args.models:
        names = args.models.split(",")
        unknown = sorted(set(names) - set(MODELS) - {"vit"})
        if unknown:
            parser.error(f"unknown models {unknown}; choose from {[*MODELS, 'vit']}")
        batches = args.batches if args.batches != [1, 32, 256] else [1, 32]
        cnns = [n for n in names if n != "vit"]
        if cnns:
            run_models(cnns, args.size, batches, args.dtypes, args.passes.split(","),
                       args.max_gb, 1 if args.quick else 3, args.timeout)
        if "vit" in names:   # issue 12: bench/vit.py
            run_vit(batches, args.dtypes, args.max_gb, 2 if args.quick else 5, args.timeout)
        return
    if "passes" in args.sections:
        run(args.batches, args.dtypes, args.quick)
    if "hessian" in args.sections:
        run_hessian(args.batches, args.dtypes, args.quick, tuple(args.hessian_models))


if __name__ == "__main__":
    main()
