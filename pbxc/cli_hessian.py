"""``pbxc explain --method hessian|interactions``: second-order explanations (specs/hessian.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

#: the explain methods this module answers
SECOND_ORDER_METHODS = ("hessian", "interactions")


def _parse_step(text: str) -> Any:
    from pbxc.cli import UsageError, load_array_file

    try:
        return float(text)
    except ValueError:
        pass
    if not Path(text).is_file():
        raise UsageError(f"--step must be a number or a .npy/.npz file, got '{text}'")
    return load_array_file(text, None, ())


def explain_second_order(model: Any, x: np.ndarray, args: argparse.Namespace,
                         target: Any, output: str) -> int:
    """Hessians (``hessian``) or mixed differences (``interactions``) of the target output,
    batch by batch; prints the plan (--explain-plan), the kink report and the top-k pairs."""
    from pbxc.cli import EXIT_OK, _batches, _fmt_shape, save_npz

    on = args.on
    n = len(x)
    parts: dict[str, list[np.ndarray]] = {}
    plan_text = None
    kink_lines: list[str] = []
    results = []
    for start in _batches(n, args.batch_size, args.method):
        xb = x[start:start + args.batch_size]
        if args.method == "hessian":
            res = model.hessian(xb, target=target, output=output, on=on,
                                mode=args.mode if args.mode in ("forward", "reverse")
                                else "auto")
            plan_text = res.plan.explain()
            parts.setdefault("hessian", []).append(res.hessian)
            parts.setdefault("targets", []).append(np.asarray(res.targets))
            reports = [(start + b, res.kinks.describe(b)) for b in range(len(xb))
                       if res.kinks.any(b)]
        else:
            step = _parse_step(args.step) if isinstance(args.step, str) else args.step
            if isinstance(step, np.ndarray) and step.ndim == x.ndim and len(step) == n:
                step = step[start:start + args.batch_size]
            res_i = model.interactions(xb, target=target, output=output, on=on, step=step)
            results.append(res_i)
            for key in ("interactions", "taylor", "residual", "steps", "hessian", "values",
                        "targets", "crossed"):
                parts.setdefault(key, []).append(np.asarray(getattr(res_i, key)))
            reports = [(start + b, res_i.kinks.describe(b)) for b in range(len(xb))
                       if res_i.kinks.any(b)]
        kink_lines += [f"  sample {b}: kink {text}" for b, text in reports]
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    if args.explain_plan and plan_text:
        print(plan_text)
    key = "hessian" if args.method == "hessian" else "interactions"
    what = "logits" if on == "logits" else "softmax probabilities"
    print(f"{args.method} of the target {what}: {key} {_fmt_shape(arrays[key].shape)} "
          f"{arrays[key].dtype}" + ("" if args.out else " (use --out FILE.npz to save them)"))
    if kink_lines:
        print(f"  {len(kink_lines)} sample(s) with a kink (f'' there is the "
              f"'{model.activations.convention}' convention; a kink between x and x + d "
              "makes the mixed difference differ from the Taylor term):")
        for line in kink_lines[:20]:
            print(line)
        if len(kink_lines) > 20:
            print(f"  ... and {len(kink_lines) - 20} more")
    if args.method == "interactions" and results:
        merged = _merge(results)
        print(f"top {args.top} interacting pairs (I_ij = f(x+d_i+d_j) - f(x+d_i) - f(x+d_j) "
              "+ f(x); Taylor term d_i^T H d_j):")
        print(merged.table(args.top, None if n > 1 else 0))
    if args.out:
        save_npz(Path(args.out), arrays)
        print(f"wrote {', '.join(f'{k}{_fmt_shape(v.shape)}' for k, v in arrays.items())} "
              f"to {args.out}")
    if args.png:
        from pbxc.evaluate.interaction_plots import draw_pair_matrices

        wrt = model.input_names[0]
        features = model.feature_names.get(wrt)
        mats = arrays[key]
        size = int(np.prod(model.input_shapes[wrt]))
        mats = mats.reshape(len(mats), -1, size, size)
        if mats.shape[1] != 1:
            raise ValueError("internal: one target per sample expected")
        pngs = draw_pair_matrices(mats[:, 0], args.png, label=key, feature_names=features,
                                  max_files=args.png_max)
        print(f"wrote {len(pngs)} PNG file(s) to {args.png}")
    return EXIT_OK


def _merge(results: list[Any]) -> Any:
    """One InteractionResult from per-batch ones (for the table over the whole input)."""
    if len(results) == 1:
        return results[0]
    from dataclasses import replace

    from pbxc.runtime.hessian import KinkReport

    first = results[0]
    cat = {k: np.concatenate([getattr(r, k) for r in results])
           for k in ("interactions", "taylor", "residual", "steps", "hessian", "values",
                     "targets", "crossed")}
    kinks = KinkReport([d for r in results for d in r.kinks.at_x],
                       [d for r in results for d in r.kinks.crossed])
    return replace(first, kinks=kinks, **cat)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The explain options of the second-order methods."""
    p.add_argument("--on", default="logits", choices=["logits", "probabilities"],
                   help="hessian/interactions: of the logits or of the softmax probabilities")
    p.add_argument("--step", default="0.1",
                   help="interactions: the perturbation d_i = STEP * |x_i| (|x_i| = 0: the "
                   "batch's mean |x_i|), or a .npy/.npz of absolute steps (per feature, or "
                   "per sample)")
    p.add_argument("--top", type=int, default=10, help="interactions: pairs in the table (10)")
