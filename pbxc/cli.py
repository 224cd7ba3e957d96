"""The ``pbxc`` command. Diagnostics go to stderr; exit 0 ok, 1 bad input, 2 usage."""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pbxc.errors import InputError, PbxError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
#: what --force allows, on every command that writes (specs/security.md)
FORCE_HELP = ("replace an output that is a symbolic link or special file, or a compiled "
              "directory whose files were edited (never a directory pbxc did not write)")

#: Modules with a ``register(subparsers)`` function adding more subcommands.
EXTENSION_COMMANDS: tuple[str, ...] = ("pbxc.cli_interop", "pbxc.cli_evaluate", "pbxc.cli_verify",
                                       "pbxc.cli_activation")


class UsageError(Exception):
    """Bad command-line usage (exit 2)."""


# ---------------------------------------------------------------- file helpers


def atomic_write(path: Path, write: Callable[[Path], None], force: bool = False) -> None:
    """Write through a temporary file in the same folder, then rename: never half-written,
    and never over anything but a regular file (pbxc.outputs)."""
    from pbxc.outputs import write_with

    write_with(path, write, force=force)


def save_npz(path: Path, arrays: dict[str, np.ndarray], force: bool = False) -> None:
    from pbxc.outputs import write_npz

    write_npz(path, arrays, force=force)


def check_compile_output(path: str | None, force: bool = False) -> None:
    """Refuse ``compile -o DIR`` before compiling if DIR may not be replaced."""
    if path:
        from pbxc.outputs import check_directory_output

        check_directory_output(path, force)


def check_output(path: str | None, force: bool = False) -> None:
    """Refuse an unusable output path before any work is done (pbxc.outputs)."""
    if path:
        from pbxc.outputs import check_file_target

        check_file_target(path, force)


def load_array_file(path: str, key: str | None, names: Sequence[str],
                    option: str = "--key") -> Any:
    """An input batch from .npy or .npz; for .npz, ``key`` or the model's input names. Only
    the members picked are read, each after its declared size is checked
    (``pbxc.weights.arrays``); ``option`` is the flag that chooses a key, for messages."""
    from pbxc.weights.arrays import ArrayFileError, is_npy, npz_directory, read_npy
    from pbxc.weights.limits import LimitSettingError

    p = Path(path)
    if not p.is_file():
        raise InputError(f"input file not found: '{p}'")
    try:
        if is_npy(p):
            if key is not None:
                raise InputError(f"{option} applies to .npz files; '{p}' is a single array")
            return read_npy(p)
        try:
            directory = npz_directory(p)
        except ArrayFileError as err:
            raise InputError(f"cannot read '{p}': {err} (expected .npy or .npz)") from None
        files = list(directory)
        if key is not None:
            if key not in directory:
                raise InputError(f"'{p}' has no key '{key}' ({option}); it has {files}")
            return directory[key].read()
        if names and all(n in directory for n in names):
            picked = {n: directory[n].read() for n in names}
            return picked if len(names) > 1 else picked[names[0]]
        if len(files) == 1:
            return directory[files[0]].read()
    except ArrayFileError as err:
        raise InputError(f"cannot read '{p}': {err}") from None
    except (OSError, LimitSettingError) as err:
        raise InputError(f"cannot read '{p}': {err}") from None
    if not files:
        raise InputError(f"'{p}' holds no arrays")
    raise InputError(f"'{p}' has keys {files}; choose one with {option} (the model's inputs "
                     f"are {list(names)})")


# ---------------------------------------------------------------- commands


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def cmd_check(args: argparse.Namespace) -> int:
    from pbxc.pipeline import check_file, derive_activations

    failed: list[PbxError] = []
    for path in args.model:
        try:
            graph, store = check_file(path)
            derive_activations(graph)
        except PbxError as err:
            if len(args.model) == 1:
                raise
            failed.append(err)
            print(err.render(), file=sys.stderr)
            continue
        used = {key for node in graph.topological() for _, key, _ in node.params}
        n_values = sum(int(np.prod(store[k].shape)) for k in used)
        if not args.quiet:
            print(f"{path}: model '{graph.name}' is valid")
            for i in graph.inputs:
                print(f"  input  {i.name}: {i.dtype}{_fmt_shape(i.shape)}")
            for o in graph.outputs:
                print(f"  output {o.name}: {_fmt_shape(graph.shape_of(o.name))}"
                      + (f" ({len(o.classes)} classes)" if o.classes else ""))
            print(f"  {graph.digraph.number_of_nodes()} nodes, {len(used)} weight tensors "
                  f"holding {n_values:,} values (running statistics included)")
    if failed:
        print(f"{len(failed)} of {len(args.model)} files have errors", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from pbxc.pipeline import load

    if args.show < 0:
        raise InputError(f"--show must be 0 or more rows, got {args.show}")
    check_output(args.out, args.force)
    model = load(args.model, dtype=args.dtype)
    x = load_array_file(args.input, args.key, model.input_names)
    outputs = model.outputs(x)
    if args.out:
        save_npz(Path(args.out), outputs, args.force)
        print(f"wrote {', '.join(f'{k}{_fmt_shape(v.shape)}' for k, v in outputs.items())} "
              f"to {args.out}")
        return EXIT_OK
    for name, value in outputs.items():
        print(f"{name}: {_fmt_shape(value.shape)} {value.dtype}")
        classes = model.class_names.get(name)
        shown = min(len(value), args.show)
        with np.printoptions(precision=6, suppress=True, linewidth=100):
            for b in range(shown):
                row = value[b]
                line = f"  [{b}] {row}"
                if classes and row.ndim == 1:
                    line += f"  -> {classes[int(np.argmax(row))]}"
                print(line)
        if len(value) > shown:
            print(f"  ... {len(value) - shown} more (use --out FILE.npz to save all)")
    return EXIT_OK


def graph_json(graph: Any, sources: dict[int, str] | None = None) -> dict[str, Any]:
    sources = sources or {}
    nodes = []
    for node in graph.topological():
        nodes.append({
            **({"onnx": sources[node.pos.line]} if node.pos.line in sources else {}),
            "name": node.name, "op": node.label, "kind": node.kind.value,
            "inputs": list(node.inputs), "shape": list(node.shape or ()),
            "params": {role: key for role, key, _ in node.params},
            "attrs": {k: list(v) if isinstance(v, tuple) else v for k, v in node.attrs},
            "source": {"file": node.pos.file, "line": node.pos.line, "column": node.pos.column},
        })
    return {"model": graph.name, "inputs": list(graph.input_names),
            "outputs": list(graph.output_names), "nodes": nodes}


def graph_dot(graph: Any) -> str:
    def q(s: str) -> str:  # labels carry DOT's own \\n escapes, so only quotes need escaping
        return '"' + s.replace('"', '\\"') + '"'
    lines = [f"digraph {q(graph.name)} {{", "  rankdir=TB;", "  node [shape=box, fontname=monospace];"]
    outputs = set(graph.output_names)
    for node in graph.topological():
        label = f"{node.name}\\n{node.label} {_fmt_shape(node.shape or ())}\\nline {node.pos.line}"
        style = ", style=filled, fillcolor=lightblue" if node.kind.value == "input" else (
            ", style=filled, fillcolor=palegreen" if node.name in outputs else "")
        lines.append(f"  {q(node.name)} [label={q(label)}{style}];")
    for u, v in graph.digraph.edges:
        lines.append(f"  {q(u)} -> {q(v)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple):
        return "(" + ", ".join(map(str, v)) + ")"
    return f"{v:g}" if isinstance(v, float) else str(v)


ONNX_SOURCE = "  # onnx: "


def onnx_sources(path: str) -> dict[int, str]:
    """Line -> the ONNX node a statement was imported from: the trailing ``# onnx:`` comment
    `pbxc import` writes on each statement (none in hand-written files)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    # control characters (a terminal's escape sequences) never reach the output
    return {i: re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", "?",
                      ln.rsplit(ONNX_SOURCE, 1)[1].strip())
            for i, ln in enumerate(lines, 1) if ONNX_SOURCE in ln}


def graph_text(graph: Any, sources: dict[int, str] | None = None) -> str:
    """One row per node: its source line, name, shape, the op as pbxc recognised it and, for
    an imported model, the ONNX node it came from."""
    sources = sources or {}
    rows = []
    for node in graph.topological():
        if node.kind.value == "concat":   # operands in written order, constants as @key
            parts = [node.inputs[s] if isinstance(s, int) else f"@{node.param_key(s)}"
                     for s in node.operand_slots()]
        else:
            parts = [*node.inputs, *(f"{role}=@{key}" for role, key, _ in node.params)]
        settings = node.activation_params or tuple(
            (k, v) for k, v in node.attrs if v is not None)
        parts += [f"{k}={_fmt_value(v)}" for k, v in settings]
        op = node.activation or node.kind.value
        call = f"{op}({', '.join(parts)})" if node.kind.value != "input" else "input"
        origin = sources.get(node.pos.line)
        rows.append(f"{node.pos.line:>5}  {node.name:<24} {_fmt_shape(node.shape or ()):<14} "
                    f"{call}" + (f"   <- onnx {origin}" if origin else ""))
    return "\n".join(["line  name                     shape          op", *rows]) + "\n"


def cmd_graph(args: argparse.Namespace) -> int:
    from pbxc.pipeline import check_file

    check_output(args.output, args.force)
    graph, _ = check_file(args.model)
    sources = onnx_sources(args.model)
    if args.format == "json":
        text = json.dumps(graph_json(graph, sources), indent=2) + "\n"
    elif args.format == "dot":
        text = graph_dot(graph)
    else:
        text = graph_text(graph, sources)
    if args.output:
        def write(tmp: Path) -> None:
            tmp.write_text(text, encoding="utf-8")
        atomic_write(Path(args.output), write, args.force)
    else:
        sys.stdout.write(text)
    return EXIT_OK


METHODS = ("jacobian", "gradient", "input_x_gradient", "lrp", "dfd", "hessian", "interactions")


def _parse_target(text: str) -> Any:
    if text == "predicted":
        return None
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--target must be 'predicted' or a class index, got '{text}'") from None


def _parse_baseline(text: str, model: Any, n: int) -> Any:
    """zeros, mean, a number, or a file holding one sample or one per input sample."""
    if text in ("zeros", "mean"):
        return text
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not np.isfinite(value):
            raise InputError(f"--baseline {text} is not a finite number")
        return value
    if not Path(text).is_file():
        raise InputError(f"--baseline '{text}' is not zeros, mean, a number or a file")
    name = model.input_names[0]
    baseline = np.asarray(load_array_file(text, None, (name,), option="--baseline's key"))
    shape = tuple(model.input_shapes[name])
    if baseline.shape not in (shape, (1, *shape), (n, *shape)):
        raise InputError(f"--baseline '{text}' has shape {_fmt_shape(baseline.shape)}; expected "
                         f"one sample {_fmt_shape(shape)} or one per input sample "
                         f"{_fmt_shape((n, *shape))}")
    return baseline


def _check_explain_arguments(args: argparse.Namespace, model: Any) -> None:
    """Every value explain is given, before anything runs (exit 1 with an error line)."""
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size must be a positive number of samples, got "
                         f"{args.batch_size}")
    if args.png_max < 0:
        raise InputError(f"--png-max must be 0 or more, got {args.png_max}")
    if args.output_name is not None and args.output_name not in model.output_names:
        raise InputError(f"model '{model.name}' has no output '{args.output_name}'; its outputs "
                         f"are {list(model.output_names)}")


def _batches(n: int, size: int, label: str) -> Any:
    from tqdm import tqdm

    starts = range(0, n, size)
    # quiet when stderr is not a terminal (pipes, CI, files)
    return tqdm(starts, desc=label, unit="batch", disable=None if n > size else True,
                leave=False)


MEMORY_PASS = {"gradient": "gradient", "input_x_gradient": "gradient", "lrp": "lrp",
               "dfd": "dfd", "jacobian": "jacobian"}


#: samples per step of the Hessian methods when --batch-size is not given
SECOND_ORDER_BATCH = 64


def _batch_size(args: argparse.Namespace, model: Any, n: int) -> int:
    """``--batch-size``, or the largest batch whose predicted peak fits the memory limit."""
    from pbxc.lower.memory import batch_for_limit, memory_limit

    args.batch_size_given = args.batch_size is not None
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise UsageError("--batch-size must be >= 1")
        return int(args.batch_size)
    try:
        limit = memory_limit(args.memory_limit)
    except PbxError as exc:
        raise UsageError(f"--memory-limit: {exc.message}") from None
    return batch_for_limit(model.graph, MEMORY_PASS[args.method], limit, model.dtype, n)


def _memory_text(args: argparse.Namespace, model: Any, batch: int) -> str:
    from pbxc.lower.memory import jacobian_bytes, memory_limit, predict

    source = "--batch-size" if args.batch_size_given else \
        f"the memory limit, {memory_limit(args.memory_limit) / (1 << 20):,.0f} MiB"
    head = f"batch size {batch} per step (from {source})"
    if MEMORY_PASS[args.method] == "jacobian":
        return (f"{head}\nmemory: jacobian, batch {batch}: at most "
                f"{jacobian_bytes(model.graph, batch, model.dtype) / (1 << 20):,.1f} MiB")
    return head + "\n" + predict(model.graph, MEMORY_PASS[args.method], batch,
                                  model.dtype).explain()


def cmd_explain(args: argparse.Namespace) -> int:
    from pbxc.cli_dask import explain_dataset, wants_dataset_run

    if wants_dataset_run(args):   # a Zarr store, chunk by chunk, here or on Dask workers
        return explain_dataset(args)
    from pbxc.pipeline import load

    check_output(args.out, args.force)
    if args.png:
        from pbxc.outputs import check_directory_target

        check_directory_target(args.png)
    target = _parse_target(args.target)
    if args.method != "dfd" and args.baseline is not None:
        raise UsageError("--baseline applies to --method dfd")
    if args.method != "dfd" and args.dfd_rule != "rescale":
        raise UsageError("--dfd-rule applies to --method dfd")
    if args.method != "lrp" and (args.rule or args.composite):
        raise UsageError("--rule and --composite apply to --method lrp")
    if args.method not in ("hessian", "interactions") and (args.on != "logits"
                                                          or args.step != "0.1"):
        raise UsageError("--on and --step apply to --method hessian and interactions")
    model = load(args.model, dtype=args.dtype, convention=args.kinks)
    _check_explain_arguments(args, model)
    x = load_array_file(args.input, args.key, model.input_names)
    if isinstance(x, dict):
        raise UsageError("explain takes models with one input; this model has "
                         f"{list(model.input_names)}")
    x = np.asarray(x)
    model.prepare_inputs(x)  # shape, dtype, finiteness and an empty batch: before any chunk
    if args.method in ("hessian", "interactions"):
        from pbxc.cli_hessian import explain_second_order

        # (B, *in, *in) per output row: a fixed default batch, not the first-order memory plan
        args.batch_size = args.batch_size or SECOND_ORDER_BATCH

        return explain_second_order(model, x.reshape(-1, *model.input_shapes[
            model.input_names[0]]), args, target, args.output_name or model.output_names[0])
    data = (load_array_file(args.data, args.data_key, model.input_names, option="--data-key")
            if args.data else None)
    baseline = (_parse_baseline(args.baseline, model, len(x)) if args.baseline is not None
                else "zeros")
    if isinstance(baseline, np.ndarray) and baseline.ndim == x.ndim and len(baseline) == len(x):
        per_sample_baseline = baseline
    else:
        per_sample_baseline = None
    output = args.output_name or model.output_names[0]
    parts: dict[str, list[np.ndarray]] = {}

    def add(key: str, value: np.ndarray) -> None:
        parts.setdefault(key, []).append(value)

    n = len(x) if x.ndim > len(model.input_shapes[model.input_names[0]]) else 1
    plans: dict[str, list[int]] = {}   # each distinct plan, with the chunks that ran it
    kinks_hit = 0
    args.batch_size = _batch_size(args, model, n)
    for start in _batches(n, args.batch_size, f"{args.method}"):
        xb = x[start:start + args.batch_size]
        outputs = model.outputs(xb)[output]
        if args.method == "jacobian":
            res = model.jacobian(xb, output=output, mode=args.mode)
            add("attributions", res.jacobian)
            plans.setdefault(res.plan.explain(), []).append(start)
            targets = model.targets(outputs, target)
        elif args.method in ("gradient", "input_x_gradient"):
            fn = model.gradient if args.method == "gradient" else model.input_x_gradient
            add("attributions", fn(xb, target=target, output=output))
            targets = model.targets(outputs, target)
        elif args.method == "dfd":
            bl = baseline if per_sample_baseline is None else \
                per_sample_baseline[start:start + args.batch_size]
            res_d = model.dfd(xb, baseline=bl, target=target, output=output, data=data,
                              rule=args.dfd_rule)
            add("attributions", res_d.attributions[model.input_names[0]])
            add("delta", res_d.delta)
            add("summation_error", res_d.summation_error)
            targets = res_d.targets
        else:
            res_l = model.lrp(xb, target=target, output=output, rule=args.rule,
                              composite=args.composite)
            add("attributions", res_l.relevance[model.input_names[0]])
            for key, value in res_l.ledger_arrays().items():
                add(key, value)
            targets = res_l.targets
        add("outputs", outputs)
        add("targets", targets)
        if args.method in ("jacobian", "gradient", "input_x_gradient"):
            kinks_hit += sum(model.kinks_hit(xb).values())
    arrays = {k: np.concatenate(v) if v[0].ndim else np.stack(v) for k, v in parts.items()}
    if args.method in ("jacobian", "gradient", "input_x_gradient"):
        # one count for the whole batch, whatever --batch-size cut it into
        arrays["kinks"] = np.array([kinks_hit])
    if args.explain_plan:
        for text, starts in plans.items():
            if len(plans) > 1:
                print(f"samples {', '.join(f'{s}-{min(s + args.batch_size, n) - 1}' for s in starts)}:")
            print(text)
        print(_memory_text(args, model, min(n, args.batch_size)))
    if args.out:
        save_npz(Path(args.out), arrays, args.force)
        print(f"wrote {', '.join(f'{k}{_fmt_shape(v.shape)}' for k, v in arrays.items())} "
              f"to {args.out}")
    else:
        att = arrays["attributions"]
        print(f"{args.method}: attributions {_fmt_shape(att.shape)} {att.dtype} "
              "(use --out FILE.npz to save them)")
        if args.method == "lrp" and not (args.rule or args.composite) \
                and model.graph.lrp_block is not None:
            print(f"  rules: the lrp block at {model.graph.lrp_block.pos} (--rule/--composite "
                  "replace it)")
        if "summation_error" in arrays:
            print(f"  summation-to-delta: max relative error "
                  f"{float(arrays['summation_error'].max()):.2e}")
    if "kinks" in arrays:
        print(f"  {int(arrays['kinks'].sum())} unit(s) sat exactly on a kink; there f' is the "
              f"'{model.activations.convention}' convention (--kinks)")
    if args.png:
        from pbxc.evaluate.plots import draw_explanation

        pngs = draw_explanation(model, x, arrays, args.method, args.png,
                                max_files=args.png_max, output=output, force=args.force)
        print(f"wrote {len(pngs)} PNG file(s) to {args.png}")
    return EXIT_OK


def cmd_compile(args: argparse.Namespace) -> int:
    from pbxc.lower.plan import plan_jacobian
    from pbxc.pipeline import load
    from pbxc.runtime.compile import compile_model

    if args.batch is not None and (not args.explain_plan or args.batch < 1):
        raise UsageError("--batch N (N >= 1) sizes the cost estimate of --explain-plan; the "
                         "compiled module takes batches of any size")
    check_compile_output(args.output, args.force)
    model = load(args.model, dtype=args.dtype)
    if args.explain_plan:
        for out in model.output_names:
            for wrt in model.input_names:
                # the compiled module's jacobian() accumulates in reverse: show that plan,
                # with the other orders' costs beside it
                plan = plan_jacobian(model.graph, wrt, out, args.batch or 256, mode="reverse")
                print(f"d {out} / d {wrt} (the compiled module accumulates in reverse; "
                      "pbxc explain --mode picks per call):")
                print(plan.explain())
        from pbxc.lower.memory import PASSES, predict

        for pass_name in PASSES:
            print(predict(model.graph, pass_name, args.batch or 256, model.dtype).explain())
    if args.output:
        files = compile_model(model, args.output, target=args.target, force=args.force)
        print(f"wrote {', '.join(str(f) for f in files)}")
    elif not args.explain_plan:
        raise UsageError("give -o DIR to write the compiled module, or --explain-plan")
    return EXIT_OK


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from pbxc.cli_dask import add_dataset_options

    parser = argparse.ArgumentParser(
        prog="pbxc", description="Compile and verify neural-network attribution passes.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("check", help="parse models, check shapes and weights")
    p.add_argument("model", nargs="+", help="the .pbx file(s)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing when valid")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("run", help="the forward pass on a batch")
    p.add_argument("model", help="the .pbx file")
    p.add_argument("--input", "-i", required=True, help="inputs: .npy, or .npz by input name")
    p.add_argument("--key", help="the .npz key holding the input batch")
    p.add_argument("--out", "-o", help="save outputs by name to this .npz")
    p.add_argument("--dtype", choices=["float32", "float64"],
                   help="compute dtype (default: the inputs' declared dtype)")
    p.add_argument("--show", type=int, default=10, help="rows to print without --out")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("explain", help="attributions for a batch: jacobian, gradient, "
                       "input_x_gradient, lrp or dfd")
    p.add_argument("model", help="the .pbx file")
    p.add_argument("--method", "-m", required=True, choices=METHODS)
    p.add_argument("--input", "-i", required=True, help="inputs: .npy, or .npz")
    p.add_argument("--key", help="the .npz key holding the input batch")
    p.add_argument("--out", "-o", help="save attributions, outputs, targets, ... to this .npz")
    p.add_argument("--target", default="predicted", help="'predicted' or a class index")
    p.add_argument("--output-name", help="which model output to explain (default: the first)")
    p.add_argument("--baseline", help="dfd default input: zeros, mean (of --data), a number, "
                   "or a .npy/.npz file (one sample, or one per input sample)")
    p.add_argument("--data", help="data for the 'mean' baseline (.npy/.npz)")
    p.add_argument("--dfd-rule", default="rescale", choices=["rescale", "revealcancel"],
                   help="dfd rule for nonlinearities (default: rescale; see specs/dfd.md)")
    p.add_argument("--data-key", help="the .npz key of --data")
    p.add_argument("--rule", help="lrp rule for every layer, e.g. epsilon, gamma, zplus")
    p.add_argument("--composite", help="lrp composite, e.g. epsilon-gamma-box")
    p.add_argument("--mode", default="auto", choices=["auto", "forward", "reverse", "chain"],
                   help="jacobian accumulation order (default: the cheapest)")
    p.add_argument("--explain-plan", action="store_true", help="print the jacobian plan")
    p.add_argument("--kinks", default="owner", choices=["owner", "left", "right", "mean"],
                   help="f' where a preactivation sits exactly on a kink (default: owner)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples per step (default: the most whose predicted peak memory fits "
                        "--memory-limit)")
    p.add_argument("--memory-limit", metavar="SIZE",
                   help="memory a step may take, e.g. 512M or 4G (default: $PBXC_MEMORY_LIMIT, "
                        "else 2G); --explain-plan shows the predicted peak")
    p.add_argument("--dtype", choices=["float32", "float64"])
    p.add_argument("--png", metavar="DIR", help="draw one PNG per sample into DIR")
    p.add_argument("--png-max", type=int, default=16, help="at most this many PNGs (16)")
    add_dataset_options(p)
    from pbxc.cli_hessian import add_arguments as add_second_order_arguments

    add_second_order_arguments(p)
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("compile", help="write standalone NumPy or CUDA code for every pass")
    p.add_argument("model", help="the .pbx file")
    p.add_argument("--output", "-o", help="the directory to write")
    p.add_argument("--target", default="numpy", choices=["numpy", "cuda"],
                   help="the backend to generate for: numpy, or cuda (CUDA C kernels and a "
                        "CuPy launcher)")
    p.add_argument("--explain-plan", action="store_true",
                   help="print the Jacobian accumulation plan and its cost estimate")
    p.add_argument("--batch", type=int, help="with --explain-plan: the batch size its cost "
                   "estimate is for (default 256); the module takes any batch")
    p.add_argument("--dtype", choices=["float32", "float64"])
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("graph", help="print the computation graph")
    p.add_argument("model", help="the .pbx file")
    p.add_argument("--format", "-f", choices=["text", "dot", "json"], default="text")
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=cmd_graph)

    # commands that live in their own top-level modules (pbxc/cli_<name>.py)
    for module_name in EXTENSION_COMMANDS:
        import importlib

        importlib.import_module(module_name).register(sub)
    return parser


def _version() -> str:
    from pbxc import __version__
    return f"pbxc {__version__}"


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """pbxc's own warnings read like its errors; others keep Python's format."""
    if category.__module__.startswith("pbxc."):
        print(f"pbxc: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    restore = _interrupt_on_sigterm()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            code: int = args.func(args)
        return code
    except UsageError as err:
        print(f"pbxc: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except PbxError as err:
        print(err.render(), file=sys.stderr)
        n = len(err.diagnostics)
        if n > 1:
            print(f"{n} errors", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("pbxc: interrupted", file=sys.stderr)
        return 130
    finally:
        restore()


def _interrupt_on_sigterm() -> Callable[[], None]:
    """SIGTERM ends a command as Ctrl-C does, so the outputs being written are removed
    (pbxc.outputs' temporaries and staging folders); returns what puts the old handler back."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)
    return restore


if __name__ == "__main__":
    raise SystemExit(main())
