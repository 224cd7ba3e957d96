"""ResNet-18 gradient at realistic sizes: pbxc beside torch, time and peak memory.

Each measurement runs in its own process, so the peak resident memory (ru_maxrss) is that
pass's alone. torchvision's resnet18 with weights=None (seeded), BatchNorm in eval with
non-trivial running statistics; the .pbx is written from the module's structure.

    python bench/conv_resnet18.py --batch 16 --size 224 --dtype float64

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


def measure(which: str, folder: Path, batch: int, size: int, dtype: str) -> dict[str, float]:
    x = np.random.default_rng(1).normal(size=(batch, 3, size, size)).astype(dtype)
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
            y[torch.arange(batch), y.argmax(1)].sum().backward()
            return xt.grad.numpy()
    else:
        import pbxc

        model = pbxc.load(folder / "resnet18.pbx", dtype=dtype)

        def run() -> np.ndarray:
            return model.gradient(x)
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
    ap.add_argument("--only", choices=["torch", "pbxc"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
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
