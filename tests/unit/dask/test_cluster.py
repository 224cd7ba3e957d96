"""Data-set runs on a real ``distributed.LocalCluster`` of 2 worker processes: the same store
as one process, one model build per worker, a worker killed mid-run, the CLI's --scheduler."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")

from pbxc import dask as pbxc_dask  # noqa: E402
from pbxc.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
DIGITS = REPO / "examples" / "digits_cnn.pbx"


@pytest.fixture(autouse=True)
def one_blas_thread() -> Iterator[None]:
    """The workers run one BLAS thread each (distributed sets OMP/OPENBLAS_NUM_THREADS=1); the
    in-process references run one too. Some OpenBLAS builds (measured: 0.3.31 DYNAMIC_ARCH on
    an AMD EPYC) split a GEMM across threads in a way that changes the last bits, so the stores
    are bit-identical at equal thread counts (specs/dask.md)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    # the workers import pbxc as this process does (PYTHONPATH travels with them)
    with pbxc_dask.local_cluster(2) as c:
        assert len(c.scheduler_info()["workers"]) == 2
        yield c


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "digits.npy"
    np.save(path, np.load(REPO / "examples" / "digits_cnn_reference.npz")["inputs"][:128])
    return path


def store(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return {name: np.asarray(group[name][:]) for name in sorted(group.array_keys())}


def assert_same_store(a: Path, b: Path) -> None:
    sa, sb = store(a), store(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key, strict=True)
    assert zarr.open_group(a, mode="r").attrs.asdict() == \
        zarr.open_group(b, mode="r").attrs.asdict()


def loads(client: Any) -> dict[str, int]:
    return client.run(lambda: pbxc_dask.MODEL_LOADS[0])


def test_workers_write_the_store_one_process_writes(client: Any, digits: Path,
                                                    tmp_path: Path) -> None:
    options: dict[str, Any] = {"chunk": 16, "batch_size": 16}
    pbxc_dask.to_zarr(DIGITS, digits, tmp_path / "here.zarr", "dfd", **options)
    before = loads(client)
    summary = pbxc_dask.to_zarr(DIGITS, digits, tmp_path / "there.zarr", "dfd", client=client,
                                **options)
    assert summary.computed_chunks == 8
    assert_same_store(tmp_path / "there.zarr", tmp_path / "here.zarr")
    built = {w: n - before.get(w, 0) for w, n in loads(client).items()}
    assert all(n <= 1 for n in built.values()) and sum(built.values()) >= 1, built
    # samples held in memory travel with their tasks; a dask array is computed on the cluster
    import dask.array as da

    x = np.load(digits)
    for i, source in enumerate([x, da.from_array(x, chunks=(40, 1, 8, 8))]):
        pbxc_dask.to_zarr(DIGITS, source, tmp_path / f"m{i}.zarr", "dfd", client=client,
                          **options)
        got, ref = store(tmp_path / f"m{i}.zarr"), store(tmp_path / "here.zarr")
        for key in ("attributions", "delta", "targets"):
            np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
    # per-sample baselines and targets held in memory travel with their chunks too
    extra = {"baseline": x[::-1].copy(), "target": np.arange(len(x)) % 10}
    pbxc_dask.to_zarr(DIGITS, x, tmp_path / "p1.zarr", "dfd", **options, **extra)
    pbxc_dask.to_zarr(DIGITS, x, tmp_path / "p2.zarr", "dfd", client=client, **options, **extra)
    assert_same_store(tmp_path / "p1.zarr", tmp_path / "p2.zarr")
    np.testing.assert_array_equal(store(tmp_path / "p2.zarr")["targets"], extra["target"])


def _kill_this_worker_on_its_next_chunk() -> int:
    import signal

    def die(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGKILL)

    pbxc_dask.explain_rows = die  # type: ignore[assignment]  # this worker process only
    return os.getpid()


def test_a_worker_killed_mid_run_and_the_run_still_completes(client: Any, digits: Path,
                                                             tmp_path: Path) -> None:
    options: dict[str, Any] = {"chunk": 16, "batch_size": 16}
    pbxc_dask.to_zarr(DIGITS, digits, tmp_path / "ref.zarr", "lrp", **options)
    victim = sorted(client.scheduler_info()["workers"])[0]
    doomed = client.run(_kill_this_worker_on_its_next_chunk, workers=[victim])[victim]
    summary = pbxc_dask.to_zarr(DIGITS, digits, tmp_path / "o.zarr", "lrp", client=client,
                                **options)
    assert summary.computed_chunks == 8 and summary.samples == 128
    assert_same_store(tmp_path / "o.zarr", tmp_path / "ref.zarr")
    client.wait_for_workers(2, timeout=60)
    assert doomed not in client.run(os.getpid).values()   # it died; its nanny restarted it


def test_the_cli_runs_on_a_running_scheduler(client: Any, digits: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    address = client.scheduler.address
    argv = ["explain", str(DIGITS), "-m", "lrp", "-i", str(digits), "--out",
            str(tmp_path / "o.zarr"), "--chunk", "64", "--batch-size", "32"]
    assert main([*argv[:-4], "--out", str(tmp_path / "ref.zarr"), *argv[-4:]]) == 0
    assert main([*argv, "--scheduler", address]) == 0
    out, err = capsys.readouterr()
    assert f"lrp on {address}: 128 samples in 2 chunks (2 computed)" in out
    assert "worst conservation error" in out and "Traceback" not in err
    assert_same_store(tmp_path / "o.zarr", tmp_path / "ref.zarr")
    shutil.rmtree(tmp_path / "o.zarr")
    from pbxc.runtime.cupy_backend import cupy_unavailable

    if cupy_unavailable() is None:
        pytest.skip("these workers have cupy and a GPU")
    # the cupy backend where the workers have no GPU: their error, on one line
    code = main([*argv, "--scheduler", address, "--backend", "cupy"])
    out, err = capsys.readouterr()
    assert code == 1 and err.startswith("error: backend 'cupy' is unavailable")
    assert "Traceback" not in err


def test_the_cli_starts_local_workers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = np.load(REPO / "examples" / "breast_cancer_mlp_reference.npz")["inputs"]
    np.save(tmp_path / "x.npy", x)
    mlp = REPO / "examples" / "breast_cancer_mlp.pbx"
    argv = ["explain", str(mlp), "-m", "dfd", "-i", str(tmp_path / "x.npy"), "--chunk", "64",
            "--batch-size", "32"]
    assert main([*argv, "--out", str(tmp_path / "ref.zarr")]) == 0
    assert main([*argv, "--out", str(tmp_path / "o.zarr"), "--workers", "1"]) == 0
    out, err = capsys.readouterr()
    assert "dfd on 1 local worker(s): 143 samples in 3 chunks (3 computed)" in out
    assert "Traceback" not in err
    assert_same_store(tmp_path / "o.zarr", tmp_path / "ref.zarr")
