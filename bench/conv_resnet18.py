"""ResNet-18 gradient at realistic sizes: pbxc beside torch, time and peak memory; and
DenseNet-121's first call against its warm call (``--densenet-first-call``).

Each measurement runs in its own process, so the peak resident memory (ru_maxrss) is that
pass's alone. torchvision's resnet18 with weights=None (seeded), BatchNorm in eval with
non-trivial running statistics; the .pbx is written from the module's structure.

    python bench/conv_resnet18.py --batch 16 --size 224 --dtype float64
    python bench/conv_resnet18.py --densenet-first-call --batch 1 --size 64

``--workspace-mb`` sets pbxc's convolution workspace (PBXC_WORKSPACE_MB, default 256).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_pbx(folder: Path, size: int, dtype: str) -> Path:
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    for m in net.modules():   # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    np.savez(folder / "resnet18.npz",
             **{k: v.detach().numpy() for k, v in net.state_dict().items()
                if not k.endswith("num_batches_tracked")})
    torch.save(net.state_dict(), folder / "resnet18.pt")

    lines = ["model resnet18", 'weights "resnet18.npz"', f"input x: {dtype}[3, {size}, {size}]",
             'stem = relu(batchnorm(conv2d(x, @conv1, stride=2, padding=3, bias=false), @bn1))',
             "h0 = maxpool2d(stem, kernel=3, stride=2, padding=1)"]
    h = "h0"
    for layer in range(1, 5):
        for block in range(2):
            p, n = f"layer{layer}.{block}", f"l{layer}b{block}"
            stride = 2 if layer > 1 and block == 0 else 1
            lines += [
                f'{n}a = relu(batchnorm(conv2d({h}, @"{p}.conv1", stride={stride}, padding=1, '
                f'bias=false), @"{p}.bn1"))',
                f'{n}b = batchnorm(conv2d({n}a, @"{p}.conv2", padding=1, bias=false), '
                f'@"{p}.bn2")']
            skip = h
            if layer > 1 and block == 0:
                skip = f"{n}d"
                lines.append(f'{skip} = batchnorm(conv2d({h}, @"{p}.downsample.0", stride=2, '
                             f'bias=false), @"{p}.downsample.1")')
            lines.append(f"{n} = relu(add({n}b, {skip}))")
            h = n
    lines.append(f"output y = linear(global_avgpool({h}), @fc)")
    path = folder / "resnet18.pbx"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_densenet_pbx(folder: Path, size: int, dtype: str) -> Path:
    """torchvision's densenet121 (weights=None, seeded) as .pbx, for the first-call figure."""
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.densenet121(weights=None).eval()
    np.savez(folder / "densenet121.npz",
             **{k: v.detach().numpy() for k, v in net.state_dict().items()
                if not k.endswith("num_batches_tracked")})
    f = "features"
    lines = ["model densenet121", 'weights "densenet121.npz"',
             f"input x: {dtype}[3, {size}, {size}]",
             f'stem = relu(batchnorm(conv2d(x, @"{f}.conv0", stride=2, padding=3, bias=false), '
             f'@"{f}.norm0"))',
             "t0 = maxpool2d(stem, kernel=3, stride=2, padding=1)"]
    src = "t0"
    for block, layers in enumerate((6, 12, 24, 16), start=1):
        feats = [src]
        for j in range(1, layers + 1):
            p, n = f"{f}.denseblock{block}.denselayer{j}", f"b{block}l{j}"
            inp = feats[0] if len(feats) == 1 else f"{n}cat"
            if len(feats) > 1:
                lines.append(f"{n}cat = concat({', '.join(feats)})")
            lines += [f'{n}a = relu(batchnorm(conv2d(relu(batchnorm({inp}, @"{p}.norm1")), '
                      f'@"{p}.conv1", bias=false), @"{p}.norm2"))',
                      f'{n} = conv2d({n}a, @"{p}.conv2", padding=1, bias=false)']
            feats.append(n)
        lines.append(f"b{block}out = concat({', '.join(feats)})")
        if block < 4:
            p = f"{f}.transition{block}"
            lines.append(f't{block} = avgpool2d(conv2d(relu(batchnorm(b{block}out, '
                         f'@"{p}.norm")), @"{p}.conv", bias=false), kernel=2)')
            src = f"t{block}"
    lines.append(f'output y = linear(global_avgpool(relu(batchnorm(b4out, @"{f}.norm5"))), '
                 '@classifier)')
    path = folder / "densenet121.pbx"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def first_call(folder: Path, batch: int, size: int, dtype: str) -> None:
    """DenseNet-121: the first and the warm gradient, LRP and DFD in one process (the dense
    matrices of its small convolutions are built during the first calls)."""
    import pbxc

    path = write_densenet_pbx(folder, size, dtype)
    start = time.perf_counter()
    model = pbxc.load(path, dtype=dtype)
    print(f"densenet121 {size}x{size} {dtype} batch {batch}: load {time.perf_counter() - start:.2f} s; "
          f"{len(model.dense_ops)} ops as dense matrices")
    x = np.random.default_rng(1).normal(size=(batch, 3, size, size)).astype(dtype)
    for name, fn in (("gradient", model.gradient), ("lrp", model.lrp), ("dfd", model.dfd)):
        times = []
        for _ in range(2):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
        print(f"  {name:<9} first {times[0]:6.2f} s   warm {times[1]:6.2f} s")
    cached = sum(a.nbytes for a in model.dense_cache.values())
    print(f"  dense cache {cached / 2**20:.1f} MiB; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


def measure(which: str, folder: Path, batch: int, size: int, dtype: str) -> dict[str, float]:
    x = np.random.default_rng(1).normal(size=(batch, 3, size, size)).astype(dtype)
    # fixed classes: in float32 an argmax may differ between two correct implementations
    target = np.arange(batch) * 37 % 1000
    if which == "torch":
        import torch
        import torchvision

        torch.set_num_threads(os.cpu_count() or 1)
        net = torchvision.models.resnet18(weights=None).eval()
        net.load_state_dict(torch.load(folder / "resnet18.pt"))
        net = net.to(getattr(torch, dtype))

        def run() -> np.ndarray:
            xt = torch.tensor(x, requires_grad=True)
            y = net(xt)
            y[torch.arange(batch), torch.from_numpy(target)].sum().backward()
            return xt.grad.numpy()
    else:
        import pbxc

        model = pbxc.load(folder / "resnet18.pbx", dtype=dtype)

        def run() -> np.ndarray:
            return model.gradient(x, target=target)
    start = time.perf_counter()
    grad = run()
    first = time.perf_counter() - start
    start = time.perf_counter()
    grad = run()
    warm = time.perf_counter() - start
    np.save(folder / f"grad_{which}.npy", grad)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB -> GiB
    return {"first_s": first, "warm_s": warm, "peak_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--workspace-mb", type=float, default=None)
    ap.add_argument("--densenet-first-call", action="store_true",
                    help="instead: DenseNet-121's first and warm calls (pbxc only)")
    ap.add_argument("--only", choices=["torch", "pbxc"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.densenet_first_call:
        with tempfile.TemporaryDirectory() as tmp:
            first_call(Path(tmp), args.batch, args.size, args.dtype)
        return
    if args.only:
        print(json.dumps(measure(args.only, Path(args.folder), args.batch, args.size,
                                 args.dtype)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_pbx(folder, args.size, args.dtype)
        env = dict(os.environ)
        if args.workspace_mb is not None:
            env["PBXC_WORKSPACE_MB"] = str(args.workspace_mb)
        results = {}
        for which in ("torch", "pbxc"):
            out = subprocess.run([sys.executable, __file__, "--only", which, "--folder", tmp,
                                  "--batch", str(args.batch), "--size", str(args.size),
                                  "--dtype", args.dtype], env=env, capture_output=True,
                                 text=True, check=False)
            if out.returncode:
                print(f"{which} failed:\n{out.stderr[-2000:]}")
                return
            results[which] = json.loads(out.stdout.strip().splitlines()[-1])
        a, b = (np.load(folder / f"grad_{w}.npy") for w in ("pbxc", "torch"))
        rel = float(np.abs(a - b).max() / np.abs(b).max())
        print(f"resnet18 gradient, {args.dtype}, batch {args.batch}, {args.size}x{args.size}")
        for which, r in results.items():
            print(f"  {which:<6} first {r['first_s']:7.2f} s   warm {r['warm_s']:7.2f} s   "
                  f"peak {r['peak_gib']:6.2f} GiB")
        t, p = results["torch"], results["pbxc"]
        print(f"  pbxc/torch: warm time {p['warm_s'] / t['warm_s']:.2f}x, peak memory "
              f"{p['peak_gib'] / t['peak_gib']:.2f}x; max |difference| / max |grad| {rel:.1e}")


if __name__ == "__main__":
    main()
