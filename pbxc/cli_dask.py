"""``pbxc explain`` over a whole data set: chunked into a Zarr store, here or on Dask workers.

The explain command hands over here when it is given ``--workers``, ``--scheduler``, a Zarr
output or a Zarr input; otherwise it runs in memory as before and nothing here is imported
beyond this module (no Dask, no Zarr).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from pbxc.errors import InputError

EXIT_OK = 0
#: samples per batch of a data-set run when --batch-size is not given (the one-batch default
#: of earlier versions)
DATASET_BATCH = 256


def add_dataset_options(p: argparse.ArgumentParser) -> None:
    """The explain options of data-set runs (see the README's "Explaining a data set")."""
    g = p.add_argument_group("data sets (a Zarr store, chunked and resumable; see specs/dask.md)")
    g.add_argument("--chunk", type=int, metavar="N",
                   help="samples per chunk of the Zarr store: a multiple of --batch-size "
                        "(default: whole batches up to about 32 MB of attributions)")
    where = g.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, metavar="K",
                       help="run the chunks on a local Dask cluster of K worker processes")
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="run the chunks on a running Dask cluster, e.g. tcp://host:8786")
    g.add_argument("--strict", action="store_true",
                   help="stop at samples holding NaN or infinity (default: list and skip them)")
    g.add_argument("--backend", choices=["numpy", "cupy"], default=None,
                   help="the workers' backend: numpy (default) or cupy (workers with a GPU)")


def _is_zarr(path: str | None) -> bool:
    if not path:
        return False
    p = Path(path)
    return p.suffix == ".zarr" or (p.is_dir() and ((p / "zarr.json").is_file()
                                                  or (p / ".zgroup").is_file()
                                                  or (p / ".zarray").is_file()))


def wants_dataset_run(args: argparse.Namespace) -> bool:
    return bool(args.workers is not None or args.scheduler or _is_zarr(args.out)
                or _is_zarr(args.input) or args.chunk is not None or args.strict
                or args.backend is not None)


def _usage(message: str) -> Exception:
    from pbxc.cli import UsageError

    return UsageError(message)


def explain_dataset(args: argparse.Namespace) -> int:
    """``pbxc explain ... --out OUT.zarr``: every chunk into the store, resumably."""
    if not _is_zarr(args.out):
        raise _usage("--workers, --scheduler, --chunk, --strict, --backend and Zarr inputs "
                     "write a Zarr store: give --out OUT.zarr")
    if args.png or args.explain_plan:
        raise _usage("--png and --explain-plan apply to in-memory runs (--out FILE.npz)")
    from pbxc.dask import METHODS

    if args.method not in METHODS:
        raise _usage(f"--method {args.method} runs in memory only (--out FILE.npz); Zarr "
                     f"stores and Dask workers take {', '.join(METHODS)}")
    if Path(args.out).is_symlink() and not getattr(args, "force", False):
        raise InputError(f"'{args.out}' is a symbolic link; pbxc writes a store only where it "
                         "is (--force writes through the link)")
    if args.workers is not None and args.workers < 1:
        raise _usage(f"--workers must be at least 1, got {args.workers}")
    if args.method != "dfd" and args.baseline is not None:
        raise _usage("--baseline applies to --method dfd")
    if args.method != "dfd" and args.dfd_rule != "rescale":
        raise _usage("--dfd-rule applies to --method dfd")
    if args.method != "lrp" and (args.rule or args.composite):
        raise _usage("--rule and --composite apply to --method lrp")
    if args.batch_size is None:
        # a fixed default, not the memory-derived one of a one-batch run: the batch is part of
        # the run's options that a resumed run must match, whatever machine resumes it
        args.batch_size = DATASET_BATCH
    if args.batch_size < 1:
        raise _usage(f"--batch-size must be at least 1, got {args.batch_size}")

    from pbxc import dask as pbxc_dask

    options: dict[str, Any] = {
        "key": args.key, "chunk": args.chunk, "dtype": args.dtype, "kinks": args.kinks,
        "backend": args.backend or "numpy", "batch_size": args.batch_size,
        "strict": args.strict, "output": args.output_name, "target": _target(args.target),
    }
    if args.method == "jacobian":
        options["mode"] = args.mode
    if args.method == "dfd":
        options.update(baseline=_baseline(args.baseline), dfd_rule=args.dfd_rule,
                       baseline_data=_data(args.data, args.data_key))
    if args.method == "lrp":
        options.update(rule=args.rule, composite=args.composite)
    t0 = time.perf_counter()
    # the model, the data and the options are checked before any cluster starts
    job = pbxc_dask.plan(args.model, args.input, args.method, **options)
    if args.workers is None and args.scheduler is None:
        summary = pbxc_dask.to_zarr(job, None, args.out)
    elif args.scheduler is not None:
        client = pbxc_dask.connect(args.scheduler)
        try:
            summary = _on(client, pbxc_dask, job, args.out)
        finally:
            client.close()
    else:
        with pbxc_dask.local_cluster(args.workers) as client:
            summary = _on(client, pbxc_dask, job, args.out)
    where = (f" on {args.workers} local worker(s)" if args.workers is not None else
             f" on {args.scheduler}" if args.scheduler else "")
    print(f"{args.method}{where}: {summary.line()} (total {time.perf_counter() - t0:.2f} s)")
    note = summary.nonfinite_line()
    if note:
        print(f"  {note}")
    if summary.kinks is not None:
        print(f"  {summary.kinks} unit(s) sat exactly on a kink; there f' is the "
              f"'{args.kinks}' convention (--kinks)")
    print(f"wrote {args.out}")
    return EXIT_OK


def _on(client: Any, pbxc_dask: Any, job: Any, out: str) -> Any:
    from distributed.scheduler import KilledWorker

    try:
        return pbxc_dask.to_zarr(job, None, out, client=client)
    except KilledWorker as err:
        raise InputError(f"a chunk killed its worker again and again ({err}); the chunks "
                         "already done are kept: rerun the same command to resume") from None
    except (ModuleNotFoundError, ImportError) as err:
        raise InputError(f"a worker cannot import what pbxc needs: {err}") from None


def _target(text: str) -> Any:
    if text == "predicted":
        return None
    try:
        return int(text)
    except ValueError:
        raise _usage(f"--target must be 'predicted' or a class index, got '{text}'") from None


def _baseline(text: str | None) -> Any:
    if text is None or text in ("zeros", "mean"):
        return text or "zeros"
    try:
        return float(text)
    except ValueError:
        return text   # a .npy/.npz/Zarr file: one shared sample, or one per input sample


def _data(path: str | None, key: str | None) -> Any:
    if path is None:
        return None
    from pbxc import dask as pbxc_dask

    return pbxc_dask.open_rows(path, key)

