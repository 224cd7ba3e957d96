"""DFD multiplier accuracy: pbxc's generated multipliers beside the usual approaches.

For every built-in elementwise activation, on the issue-3 grid (z0 = step * i on [-30, 30];
z = fl(z0 + delta), delta = +-10^k for k = -300 .. 2, and z = z0; references from 50-digit
mpmath with the exact delta of the two floats), the largest error

    err = |m - m_ref| / (|m_ref| + 1e-8 * s_f),   s_f = max |f'| over [-30, 30]

of four ways to compute m(z0, z) = (f(z) - f(z0)) / (z - z0) (f'(z0) at z = z0), each in
float64 and in float32 end to end:

  pbxc      the generated NumPy routine (render_activation_functions)
  secant    (f(z) - f(z0)) / (z - z0), and f'(z0) only where z == z0
  captum    the local gradient f'(z) where |z - z0| < 1e-10 (Captum's rule), else the secant
  deeplift  the gradient at the default f'(z0) where |z - z0| < 1e-7 (DeepLIFT's), else secant

The three baselines use pbxc's own generated f and f' (stable forms), so only the treatment of
the multiplier differs. Pairs where f or m_ref overflows the type are left out (counted).

    python bench/multiplier_accuracy.py              # the full table (about two minutes)
    python bench/multiplier_accuracy.py --step 0.5   # a coarser grid
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from pbxc.codegen.numpy_printer import render_activation_functions
from pbxc.ops import BUILTIN_ACTIVATIONS
from pbxc.runtime.codeload import load_generated_module
from pbxc.symbolic import derive
from pbxc.symbolic.accuracy import grid_pairs, reference_values, relative_errors, z0_grid

METHODS = ("pbxc", "secant", "captum", "deeplift")
BARS = {"float64": 1e-14, "float32": 1e-6}


def baselines(f, df, a, b):
    with np.errstate(all="ignore"):
        d = b - a
        secant = (f(b) - f(a)) / d
        return {
            "secant": np.where(d == 0, df(a), secant),
            "captum": np.where(np.abs(d) < 1e-10, df(b), secant),
            "deeplift": np.where(np.abs(d) < 1e-7, df(a), secant),
        }


def measure(names, step, offset):
    rendered = render_activation_functions(names)
    module = load_generated_module(rendered.source, "bench_activations")
    table = {}
    for name in names:
        calc = derive(name)
        fns = {k: getattr(module, v) for k, v in rendered.names[calc.key].items()}
        ref = calc.reference()
        z0 = z0_grid(step) + offset
        z0 = z0[np.abs(z0) <= 30]
        row = {}
        for dtype in ("float64", "float32"):
            dt = np.dtype(dtype)
            a, b = grid_pairs(dt, z0)
            with np.errstate(all="ignore"):
                keep = np.isfinite(fns["f"](a)) & np.isfinite(fns["f"](b))
            refs = reference_values(ref, a, b, keep)
            values = {"pbxc": fns["m"](a, b), **baselines(fns["f"], fns["df"], a, b)}
            limit = float(np.finfo(dt).max)
            for method, v in values.items():
                err, excluded = relative_errors(np.asarray(v, dtype=dt), refs,
                                                calc.slope_scale, limit)
                worst = int(np.argmax(err))
                row[dtype, method] = (float(err[worst]), float(a[worst]), float(b[worst]))
            row[dtype, "pairs"] = int((~excluded).sum())
            row[dtype, "excluded"] = int(excluded.sum())
        table[name] = row
    return table


def usual_grid(names):
    """The issue's quoted setting: z0 in [-3, 3], delta from 1e-14 to 3, float64."""
    rendered = render_activation_functions(names)
    module = load_generated_module(rendered.source, "bench_usual")
    out = {}
    for name in names:
        calc = derive(name)
        fns = {k: getattr(module, v) for k, v in rendered.names[calc.key].items()}
        z0 = np.linspace(-3, 3, 61)
        deltas = np.concatenate([s * np.logspace(-14, np.log10(3), 57) for s in (1, -1)])
        a = np.repeat(z0, deltas.size)
        b = a + np.tile(deltas, z0.size)
        refs = reference_values(calc.reference(), a, b)
        values = {"pbxc": fns["m"](a, b), **baselines(fns["f"], fns["df"], a, b)}
        row = {}
        for method, v in values.items():
            ref = np.array([float(r) for r in refs])
            row[method] = float(np.max(np.abs(v - ref) / np.abs(ref)))
        out[name] = row
    return out


def fmt(x):
    return f"{x:9.2e}" if np.isfinite(x) else "      inf"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--step", type=float, default=0.1, help="z0 spacing (default 0.1)")
    parser.add_argument("--offset", type=float, default=0.0, help="shift of the z0 grid")
    parser.add_argument("--activations", nargs="*", default=list(BUILTIN_ACTIVATIONS))
    args = parser.parse_args(argv)
    start = time.time()
    table = measure(args.activations, args.step, args.offset)
    print(f"DFD multiplier: largest error on the grid (z0 = {args.step:g} i + {args.offset:g} on "
          f"[-30, 30], delta = +-10^k, k = -300..2, and 0); bars: float64 1e-14, float32 1e-6")
    head = " ".join(f"{m:>9s}" for m in METHODS)
    print(f"{'activation':12s} | {'float64':^39s} | {'float32':^39s}")
    print(f"{'':12s} | {head} | {head}")
    overall = {(dt, m): 0.0 for dt in BARS for m in METHODS}
    for name, row in table.items():
        cells = []
        for dt in BARS:
            cells.append(" ".join(fmt(row[dt, m][0]) for m in METHODS))
            for m in METHODS:
                overall[dt, m] = max(overall[dt, m], row[dt, m][0])
        note = f"  ({row['float32', 'excluded']} float32 pairs overflow)" \
            if row["float32", "excluded"] else ""
        print(f"{name:12s} | {cells[0]} | {cells[1]}{note}")
    cells = [" ".join(fmt(overall[dt, m]) for m in METHODS) for dt in BARS]
    print(f"{'overall max':12s} | {cells[0]} | {cells[1]}")
    verdict = all(overall[dt, "pbxc"] <= bar for dt, bar in BARS.items())
    pairs = sum(row["float64", "pairs"] for row in table.values())
    print(f"pbxc {'meets' if verdict else 'MISSES'} both bars ({pairs} float64 pairs in all); "
          "worst pbxc pairs:")
    for dt in BARS:
        name = max(table, key=lambda n: table[n][dt, "pbxc"][0])
        err, a, b = table[name][dt, "pbxc"]
        print(f"  {dt}: {name} at z0 = {a!r}, z = {b!r}: {err:.2e}")
    usual = usual_grid([n for n in ("tanh", "sigmoid", "softplus") if n in args.activations])
    if usual:
        print("\nThe issue's setting (tanh, sigmoid, softplus; z0 in [-3, 3], delta from 1e-14 "
              "to 3, float64; plain relative error):")
        print(f"{'activation':12s} | {head}")
        for name, row in usual.items():
            print(f"{name:12s} | " + " ".join(fmt(row[m]) for m in METHODS))
        print(f"{'max':12s} | " + " ".join(fmt(max(r[m] for r in usual.values()))
                                          for m in METHODS))
    print(f"\n({time.time() - start:.0f} s)")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
