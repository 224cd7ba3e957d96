"""Explaining a data set: samples/s in one process and on 1 and 2 local Dask workers.

    python bench/scale.py [--samples 100000] [--methods lrp] [--workers 0 1 2]
                          [--models digits mlp] [--chunk 4096] [--batch-size 256]

For each model (the digits CNN, float32 [1, 8, 8]; the 784-512-512-512-10 tanh MLP of
bench/common.py, run in float32), ``--samples`` inputs are generated chunk by chunk into a
Zarr store (uniform pixels / standard normal features, seeded), then explained into a Zarr
store by ``pbxc.dask.to_zarr``: in this process (workers 0) and on a ``LocalCluster`` of
K single-threaded worker processes. "in memory" is the same batches through the model with
no store at all (the calls ``pbxc explain --out X.npz`` makes). The overhead per chunk is the
time a run spends beyond that compute, in worker-seconds per chunk:
``(wall * max(K, 1) - in_memory) / chunks``; the cluster's start-up is printed apart.
Figures on a shared machine are noisy: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# One BLAS thread in this process too, as Dask gives its worker processes: "one process" then
# uses one core like one worker, and the speed-ups measure the chunking, not BLAS threading
# (set PBXC_SCALE_BLAS_THREADS to compare with a threaded BLAS). Before numpy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, os.environ.get("PBXC_SCALE_BLAS_THREADS", "1"))

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EXAMPLES, MLP_PBX, mlp_weights  # noqa: E402

import pbxc  # noqa: E402
from pbxc import dask as pbxc_dask  # noqa: E402


def make_models(folder: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    np.savez(folder / "mlp.npz", **mlp_weights())
    (folder / "mlp.pbx").write_text(MLP_PBX)
    return {"digits": (EXAMPLES / "digits_cnn.pbx", (1, 8, 8)),
            "mlp": (folder / "mlp.pbx", (784,))}


def make_inputs(path: Path, n: int, shape: tuple[int, ...], kind: str, chunk: int) -> None:
    """``n`` samples written chunk by chunk: never more than one chunk in memory."""
    import zarr

    array = zarr.create_array(path, shape=(n, *shape), chunks=(chunk, *shape),
                              dtype="float32")
    rng = np.random.default_rng(0)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        block = (rng.uniform(0, 1, size=(size, *shape)) if kind == "digits"
                 else rng.standard_normal(size=(size, *shape)))
        array[start:start + size] = block.astype(np.float32)


def in_memory_seconds(model_path: Path, data: Path, method: str, batch: int) -> float:
    """The calls ``pbxc explain --out X.npz`` makes per batch (the forward pass for the
    outputs, then the method), on the same batches, read from the store, written nowhere."""
    import zarr

    model = pbxc.load(model_path, dtype="float32")
    x = zarr.open_array(data, mode="r")
    passes = {"lrp": model.lrp, "dfd": model.dfd, "gradient": model.gradient,
              "input_x_gradient": model.input_x_gradient}

    def run(xb: np.ndarray) -> None:
        model.outputs(xb)
        passes[method](xb)

    run(np.asarray(x[:batch]))          # warm-up: dense caches, plans
    total = 0.0
    step = max(batch, 16 * batch)
    for start in range(0, x.shape[0], step):
        block = np.asarray(x[start:start + step])
        t0 = time.perf_counter()
        for b in range(0, len(block), batch):
            run(block[b:b + batch])
        total += time.perf_counter() - t0
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--models", nargs="+", default=["digits", "mlp"],
                        choices=["digits", "mlp"])
    parser.add_argument("--methods", nargs="+", default=["lrp"],
                        choices=["lrp", "dfd", "gradient", "input_x_gradient"])
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2],
                        help="0: this process, no Dask; K: a LocalCluster of K processes")
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="pbxc-scale-"))
    try:
        models = make_models(folder)
        print(f"{args.samples} samples, chunks of {args.chunk}, batches of {args.batch_size}, "
              f"float32, {os.environ['OPENBLAS_NUM_THREADS']} BLAS thread(s) per process; "
              "figures from a shared machine are noisy")
        for name in args.models:
            model_path, shape = models[name]
            data = folder / f"{name}-inputs.zarr"
            t0 = time.perf_counter()
            make_inputs(data, args.samples, shape, name, args.chunk)
            print(f"\n{name}: generated {args.samples} x {list(shape)} into Zarr in "
                  f"{time.perf_counter() - t0:.1f} s")
            for method in args.methods:
                plain = in_memory_seconds(model_path, data, method, args.batch_size)
                print(f"  {method:<6} in memory (no store): {plain:7.2f} s "
                      f"{args.samples / plain:>10,.0f} samples/s")
                single = None
                for workers in args.workers:
                    out = folder / f"{name}-{method}-{workers}.zarr"
                    options = {"chunk": args.chunk, "batch_size": args.batch_size,
                               "dtype": "float32"}
                    start_up = 0.0
                    if workers == 0:
                        summary = pbxc_dask.to_zarr(model_path, data, out, method,
                                                    progress=False, **options)
                        label = "one process"
                    else:
                        t0 = time.perf_counter()
                        with pbxc_dask.local_cluster(workers) as client:
                            start_up = time.perf_counter() - t0
                            summary = pbxc_dask.to_zarr(model_path, data, out, method,
                                                        client=client, progress=False,
                                                        **options)
                        label = f"{workers} worker(s)"
                    wall = summary.seconds
                    single = wall if workers == 0 else single
                    speedup = f"x{single / wall:.2f}" if single else "   -"
                    overhead = (wall * max(workers, 1) - plain) / summary.chunks
                    print(f"  {method:<6} {label:<12} {wall:7.2f} s "
                          f"{summary.samples_per_second:>10,.0f} samples/s  speed-up "
                          f"{speedup:>6} vs one process  overhead {overhead * 1e3:7.1f} ms/"
                          f"chunk" + (f"  (cluster start-up {start_up:.1f} s)"
                                      if workers else ""))
                    shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(data, ignore_errors=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":   # the workers are spawned processes that import this file
    main()
