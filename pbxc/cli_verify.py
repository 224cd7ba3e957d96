"""``pbxc verify``: check attribution properties on samples and across the input domain.

Exit codes: 0 every property holds (or is skipped, with its reason), 1 a violation or bad
input, 2 usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pbxc.cli import EXIT_ERROR, EXIT_OK, FORCE_HELP, UsageError, check_output, load_array_file
from pbxc.outputs import check_directory_target, write_text


def _as_dict(x: Any, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    if isinstance(x, dict):
        return {k: np.asarray(v, dtype=np.float64) for k, v in x.items()}
    return {names[0]: np.asarray(x, dtype=np.float64)}


def cmd_verify(args: argparse.Namespace) -> int:
    from pbxc.pipeline import load
    from pbxc.verify import PROPERTIES, verify_model
    from pbxc.verify.report import to_json, to_table

    for name in args.property or ():
        if name not in PROPERTIES:
            raise UsageError(f"unknown property '{name}'; properties: {', '.join(PROPERTIES)}")
    if args.examples is not None and args.examples < 0:
        raise UsageError("--examples must be >= 0")
    if args.json and args.json != "-":
        check_output(args.json, args.force)
    if not args.replay:
        check_directory_target(args.counterexamples)
    if args.replay:
        model, plan, results = _replay(args)
    else:
        if not args.model:
            raise UsageError("give the model (.pbx), or --replay FILE")
        model = load(args.model, dtype=args.dtype or "float64")
        samples = data = None
        if args.data:
            loaded = load_array_file(args.data, args.key, model.input_names)
            data = _as_dict(loaded, model.input_names)
            samples = data
            if args.samples is not None:
                samples = {k: v[:args.samples] for k, v in data.items()}
        out_dir = Path(args.counterexamples)
        progress = _progress(args)
        plan, results = verify_model(model, data=data, samples=samples,
                                     properties=args.property or (), examples=args.examples,
                                     seed=args.seed, counterexample_dir=out_dir,
                                     progress=progress)
        if hasattr(progress, "close"):
            progress.close()
    report = to_json(model, plan, results)
    if args.json:
        text = json.dumps(report, indent=2, default=float) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            write_text(args.json, text, force=args.force)
    if args.json != "-":
        sys.stdout.write(to_table(model, plan, results))
    return EXIT_OK if report["holds"] else EXIT_ERROR


def _replay(args: argparse.Namespace) -> tuple[Any, Any, list[Any]]:
    """Re-check a saved counterexample exactly as it was checked: its inputs, property,
    tolerance, settings and dtype (``--dtype`` overrides), the finite-difference scales and
    the data set's mean it holds, on the model given (or the one it names, if that lies
    beside the file) which must be the model it was saved for."""
    from pbxc.errors import InputError
    from pbxc.pipeline import load
    from pbxc.verify import PROPERTIES, load_counterexample
    from pbxc.verify.properties import Context
    from pbxc.verify.search import Counterexample, Plan, PropertyResult, _measure

    file = Path(args.replay)
    replay = load_counterexample(file, args.dtype)
    if args.model:
        model_path = args.model
    else:
        named = Path(replay.model_path)
        beside = named.parent.resolve() == file.resolve().parent
        if not (beside and named.suffix == ".pbx" and named.is_file()):
            raise InputError(f"counterexample '{file}' names the model '{replay.model_path}', "
                             "which does not lie beside it; give the model: pbxc verify "
                             f"MODEL.pbx --replay {file}")
        model_path = str(named)
    model = load(model_path, dtype=args.dtype or replay.dtype or "float64")
    replay.check_model(model, file)
    data = {k: v[None] for k, v in replay.data_mean.items()} or None
    ctx = Context(model, data, Path(model.graph.path).parent, dict(replay.scales))
    prop = PROPERTIES[replay.config.name]
    outcome = _measure(prop, ctx, replay.config, replay.inputs)[0]
    holds = prop.holds(outcome.measured, replay.config.tol)
    result = PropertyResult(replay.config, "holds" if holds else "violated", outcome.measured,
                            samples=1, note=ctx.cache.get("notes", {}).get(prop.name, ""))
    if not holds:
        result.counterexample = Counterexample(replay.inputs, outcome, "replay", args.replay)
    return model, Plan([replay.config], {}), [result]


class _Progress:
    """A tqdm bar per property while it runs; silent when stderr is not a terminal."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet or not sys.stderr.isatty()
        self.bar: Any = None
        self.name = ""

    def __call__(self, name: str, n: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if name != self.name:
            self.close()
            self.name = name
            self.bar = tqdm(desc=name, unit="check", leave=False, file=sys.stderr)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _progress(args: argparse.Namespace) -> _Progress:
    return _Progress(bool(args.quiet))


def register(sub: Any) -> None:
    p = sub.add_parser("verify", help="check attribution properties; search for "
                       "counterexamples")
    p.add_argument("model", nargs="?", help="the .pbx file (optional with --replay)")
    p.add_argument("--data", help="samples to check first (.npy/.npz); also the data set for "
                   "'mean' baselines and the default domain")
    p.add_argument("--key", help="the .npz key of --data")
    p.add_argument("--samples", type=int, help="check only the first N samples of --data")
    p.add_argument("--examples", type=int, help="search examples per property (default: "
                   "the verify block's, else 100)")
    p.add_argument("--seed", type=int, help="the search's random seed (default 0)")
    p.add_argument("--property", "-p", action="append", metavar="NAME",
                   help="check this property (repeatable); default: the verify block's")
    p.add_argument("--json", metavar="REPORT", help="write the report as JSON ('-': stdout)")
    p.add_argument("--replay", metavar="FILE", help="re-check a saved counterexample (.npz) as "
                   "it was checked (its dtype, tolerance and settings)")
    p.add_argument("--counterexamples", default="pbxc-counterexamples",
                   help="folder for counterexample files (default: ./pbxc-counterexamples)")
    p.add_argument("--dtype", choices=["float32", "float64"],
                   help="compute dtype (default float64; float32 scales the default "
                   "tolerances)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=cmd_verify)
