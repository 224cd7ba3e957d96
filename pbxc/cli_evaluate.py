"""``pbxc score``: CO scores of heatmap methods (AX, GAX) on a labelled batch."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from pbxc.cli import (
    EXIT_OK,
    FORCE_HELP,
    UsageError,
    atomic_write,
    check_output,
    load_array_file,
)
from pbxc.errors import InputError
from pbxc.outputs import check_directory_target

DEFAULT_METHODS = "gradient,input_x_gradient,lrp-epsilon,dfd"


def _labels(args: argparse.Namespace) -> np.ndarray:
    if args.labels and args.labels_key and not args.labels.endswith(".npz"):
        raise UsageError("--labels-key applies to .npz label files")
    if args.labels:
        y = load_array_file(args.labels, args.labels_key, ("labels",), option="--labels-key")
    elif args.labels_key:
        y = load_array_file(args.data, args.labels_key, (), option="--labels-key")
    else:
        raise UsageError("give --labels FILE or --labels-key KEY (a key of --data)")
    y = np.asarray(y)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer)
                           or np.all(np.mod(y, 1) == 0)):
        raise InputError(f"labels must be a 1-D array of class indices, got "
                         f"{y.dtype}{list(y.shape)}")
    return y.astype(np.int64)


def cmd_score(args: argparse.Namespace) -> int:
    from pbxc.evaluate import score_methods
    from pbxc.pipeline import load

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise UsageError("--methods needs at least one method")
    modes = [m.strip() for m in args.ax.split(",") if m.strip()]
    if any(m not in ("sum", "product") for m in modes) or not modes:
        raise UsageError(f"--ax takes sum and/or product, got '{args.ax}'")
    if args.png_max < 0 or args.batch_size < 1:
        raise InputError(f"--png-max must be >= 0 and --batch-size >= 1, got {args.png_max} "
                         f"and {args.batch_size}")
    if args.max_samples is not None and args.max_samples < 1:
        raise InputError(f"--max-samples must be a positive number, got {args.max_samples}")
    check_output(args.out, args.force)
    if args.png:
        check_directory_target(args.png)
    model = load(args.model, dtype=args.dtype)
    if len(model.input_names) != 1:
        raise UsageError(f"score takes models with one input; this one has "
                         f"{list(model.input_names)}")
    x = np.asarray(load_array_file(args.data, args.key, model.input_names))
    y = _labels(args)
    if args.max_samples:
        x, y = x[:args.max_samples], y[:args.max_samples]
    model.prepare_inputs(x)  # shape, dtype, finiteness and an empty batch, before scoring
    if len(y) != len(x):
        raise InputError(f"{len(x)} samples but {len(y)} labels")
    n_classes = int(np.prod(model.output_shapes[model.output_names[0]]))
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise InputError(f"labels must be class indices in [0, {n_classes - 1}], got "
                         f"{int(y.min())} to {int(y.max())}")
    gax_options: dict[str, Any] = {"target_score": args.gax_target, "max_steps": args.gax_steps,
                                   "lr": args.gax_lr, "bias": args.gax_bias,
                                   "similarity": args.gax_similarity}
    report = score_methods(model, x.astype(model.dtype), y, methods, modes=modes,
                           use_softmax=args.softmax, batch_size=args.batch_size,
                           gax_options=gax_options)
    print(report.table())
    if args.out:
        text = json.dumps(report.as_dict(), indent=2) + "\n"

        def write(tmp: Path) -> None:
            tmp.write_text(text, encoding="utf-8")
        atomic_write(Path(args.out), write, args.force)
        print(f"wrote {args.out}")
    if args.png:
        from pbxc.evaluate.plots import draw_attributions, draw_co_boxplots, draw_gax_history

        out = Path(args.png)
        files = [draw_co_boxplots(report, out / f"co_scores_{mode}.png", mode) for mode in modes]
        wrt = model.input_names[0]
        classes = model.class_names.get(model.output_names[0])
        for name, res in report.methods.items():
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
            files += draw_attributions(x, res.heatmaps.astype(np.float64), out / safe,
                                       method=safe, feature_names=model.feature_names.get(wrt),
                                       class_names=classes, targets=report.predicted,
                                       labels=y, max_files=args.png_max)
            for part, gres in enumerate(res.extra.get("gax_history", [])):
                files.append(draw_gax_history(gres.history, out / f"gax_history_{part}.png",
                                              args.gax_target, f"GAX on {model.name}"))
        print(f"wrote {len(files)} PNG file(s) to {out}")
    return EXIT_OK


def register(sub: Any) -> None:
    p = sub.add_parser("score", help="CO scores (Tjoa et al.) of heatmap methods: AX and GAX")
    p.add_argument("model", help="the .pbx file")
    p.add_argument("--data", required=True, help="inputs (.npy/.npz)")
    p.add_argument("--key", help="the .npz key of the inputs")
    p.add_argument("--labels", help="true classes (.npy/.npz)")
    p.add_argument("--labels-key", help="key of the labels in --labels, or else in --data")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated: gradient, input_x_gradient, lrp-RULE, "
                   "lrp-COMPOSITE, dfd, dfd-mean, gax, input, random "
                   f"(default {DEFAULT_METHODS})")
    p.add_argument("--ax", default="sum,product", help="AX modes: sum (x+h), product (x*h)")
    p.add_argument("--softmax", action="store_true", help="score softmax outputs, not logits")
    p.add_argument("--out", "-o", help="write the report as JSON")
    p.add_argument("--png", metavar="DIR", help="box plots, heatmaps and GAX curves as PNG")
    p.add_argument("--png-max", type=int, default=4, help="heatmap PNGs per method (4)")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--max-samples", type=int, help="score only the first N samples")
    p.add_argument("--batch-size", type=int, default=256, help="samples per step")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--gax-target", type=float, default=48.0, help="GAX target CO score (48)")
    p.add_argument("--gax-steps", type=int, default=100, help="GAX step limit (100)")
    p.add_argument("--gax-lr", type=float, default=0.1, help="GAX Adam learning rate (0.1)")
    p.add_argument("--gax-bias", type=float, default=0.01, help="GAX bias b (0.01)")
    p.add_argument("--gax-similarity", type=float, default=100.0,
                   help="GAX similarity factor l_s (100)")
    p.set_defaults(func=cmd_score)
