"""The round-2 ops (issue 11) at realistic sizes, beside torch: forward, gradient (one
reverse sweep), LRP-epsilon and DFD of a single-op model with a linear head.

    python bench/round2_ops.py [--quick]

Sizes are those of the issue's acceptance models: a U-Net decoder's 2x bilinear upsampling
of 64x64x64, MobileNet-V3's squeeze-and-excitation gate on 96x28x28, a 3-D CNN's max pooling
of 16x32x32x32, an ECG CNN's 1-D max pooling of 32x1000 (ceil_mode), SqueezeNet's ceil_mode
max pooling of 64x55x55 and its adaptive pooling. Prints the median time of each pass.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time

import pbxc

CASES = [
    ("upsample bilinear 64x64x64 -> 128x128", (64, 64, 64),
     'upsample(x, mode="linear", scale=2)'),
    ("upsample nearest 64x64x64 -> 128x128", (64, 64, 64), "upsample(x, scale=2)"),
    ("SE gate 96x28x28", (96, 28, 28),
     "mul(x, hardsigmoid(unsqueeze(linear(global_avgpool(x), @fc), axes=(1, 2))))"),
    ("maxpool3d 16x32^3 k2", (16, 32, 32, 32), "maxpool3d(x, 2)"),
    ("maxpool1d 32x1000 k3 s2 ceil", (32, 1000), "maxpool1d(x, 3, stride=2, ceil_mode=true)"),
    ("maxpool2d 64x55x55 k3 s2 ceil", (64, 55, 55), "maxpool2d(x, 3, stride=2, ceil_mode=true)"),
    ("adaptive_avgpool2d 512x13x13 -> 1x1", (512, 13, 13), "adaptive_avgpool2d(x, (1, 1))"),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    repeats = 2 if args.quick else 5
    print(f"{'case':<40} {'forward':>9} {'gradient':>9} {'lrp':>9} {'dfd':>9}  (ms, batch 1)")
    for label, shape, expr in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            channels = shape[0]
            weights = {"fc.weight": rng.normal(size=(channels, channels)) / np.sqrt(channels),
                       "fc.bias": np.zeros(channels)}
            if "@fc" in expr:   # the gate keeps the shape
                width = int(np.prod(shape))
            else:
                probe = pbxc.loads(f"model p\ninput x: float64[{', '.join(map(str, shape))}]"
                                   f"\noutput y = {expr}")
                width = int(np.prod(probe.graph.shape_of("y")))
            weights["head.weight"] = rng.normal(size=(10, width)) / np.sqrt(width)
            weights["head.bias"] = np.zeros(10)
            np.savez(Path(tmp) / "w.npz", **weights)
            (Path(tmp) / "m.pbx").write_text(
                f'model b\nweights "w.npz"\ninput x: float64[{", ".join(map(str, shape))}]\n'
                f"h = {expr}\noutput logits = linear(flatten(h), @head)\n")
            model = pbxc.load(Path(tmp) / "m.pbx")
            x = rng.normal(size=(1, *shape))
            passes = [lambda m=model, v=x: m.forward(v), lambda m=model, v=x: m.gradient(v),
                      lambda m=model, v=x: m.lrp(v),
                      lambda m=model, v=x: m.dfd(v, baseline=0.0)]
            times = [median_time(fn, repeats) for fn in passes]
            print(f"{label:<40} " + " ".join(f"{1e3 * t:>9.1f}" for t in times))


if __name__ == "__main__":
    main()
