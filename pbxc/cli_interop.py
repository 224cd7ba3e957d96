"""``pbxc import``: an ONNX file to a readable .pbx and its weights (.npz)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pbxc.cli import EXIT_OK, UsageError


def cmd_import(args: argparse.Namespace) -> int:
    from pbxc.interop.onnx_import import import_onnx
    from pbxc.pipeline import check_file

    src = Path(args.source)
    if src.suffix.lower() != ".onnx":
        raise UsageError(f"pbxc import reads .onnx files, got '{src}'")
    out = Path(args.output) if args.output else src.with_suffix(".pbx")
    if out.suffix != ".pbx":
        raise UsageError(f"-o must name a .pbx file, got '{out}'")
    outputs = [o for o in (args.outputs or "").split(",") if o] or None
    # the written model is checked (parses, builds, binds its weights) before it is kept
    result = import_onnx(src, out, name=args.name, weights_name=args.weights,
                         dtype=args.dtype, outputs=outputs,
                         check=lambda staged: check_file(str(staged)))
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {out} and {result.weights_path} ({len(result.weights)} tensors, "
          f"{len(result.statements)} statements)")
    return EXIT_OK


def register(sub: Any) -> None:
    p = sub.add_parser("import", help="convert an ONNX model to .pbx and .npz weights")
    p.add_argument("source", help="the .onnx file")
    p.add_argument("--output", "-o", help="the .pbx file to write (default: beside the source)")
    p.add_argument("--weights", help="weights file name (default: MODEL.npz beside the .pbx)")
    p.add_argument("--name", help="model name (default: the .pbx file's stem)")
    p.add_argument("--dtype", choices=("float32", "float64"),
                   help="convert every float of the model to this dtype (without it, the "
                        "model keeps its input's dtype and any other float dtype is an error)")
    p.add_argument("--outputs", help="comma-separated ONNX graph outputs to import (default: "
                   "every float tensor output)")
    p.set_defaults(func=cmd_import)
