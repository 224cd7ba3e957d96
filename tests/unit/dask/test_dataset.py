"""Explaining a data set chunk by chunk into Zarr, in this process: bit-identical results,
resume, refusals, bad input (see specs/dask.md). The cluster runs are in test_cluster.py."""

from __future__ import annotations

import errno
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")
pytest.importorskip("dask.array")

from pbxc import dask as pbxc_dask  # noqa: E402
from pbxc.cli import main  # noqa: E402
from pbxc.errors import InputError  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
DIGITS = REPO / "examples" / "digits_cnn.pbx"
MLP = REPO / "examples" / "breast_cancer_mlp.pbx"
PER_SAMPLE = {
    "lrp": ["attributions", "outputs", "targets", "relevance_start", "relevance_inputs",
            "absorbed_bias", "absorbed_stabiliser", "conservation_error"],
    "dfd": ["attributions", "outputs", "targets", "delta", "summation_error"],
}


def inputs(name: str, n: int | None = None) -> np.ndarray:
    x = np.load(REPO / "examples" / f"{name}_reference.npz")["inputs"]
    return x if n is None else x[:n]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("data")
    files = {"digits": folder / "digits.npy", "mlp": folder / "mlp.npy"}
    np.save(files["digits"], inputs("digits_cnn", 128))
    np.save(files["mlp"], inputs("breast_cancer_mlp"))
    return files


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def store(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return {name: np.asarray(group[name][:]) for name in sorted(group.array_keys())}


def assert_same_store(a: Path, b: Path) -> None:
    sa, sb = store(a), store(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key, strict=True)
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    assert ga.attrs.asdict() == gb.attrs.asdict()


# ---------------------------------------------------------------- the same numbers


@pytest.mark.parametrize(("model", "name", "method"), [
    (DIGITS, "digits", "lrp"), (DIGITS, "digits", "dfd"), (MLP, "mlp", "lrp"),
    (MLP, "mlp", "dfd"), (MLP, "mlp", "gradient"), (MLP, "mlp", "input_x_gradient"),
    (MLP, "mlp", "jacobian"),
])
def test_store_is_bit_identical_to_the_single_process_run(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, data: dict[str, Path],
        model: Path, name: str, method: str) -> None:
    code, _, err = cli(capsys, "explain", model, "-m", method, "-i", data[name],
                       "--out", tmp_path / "ref.npz", "--batch-size", "32")
    assert code == 0, err
    ref = dict(np.load(tmp_path / "ref.npz"))
    code, out, err = cli(capsys, "explain", model, "-m", method, "-i", data[name],
                         "--out", tmp_path / "a.zarr", "--batch-size", "32", "--chunk", "64")
    assert code == 0, err
    assert "wrote" in out and err == ""        # no progress bar when stderr is no terminal
    got = store(tmp_path / "a.zarr")
    for key in PER_SAMPLE.get(method, ["attributions", "outputs", "targets"]):
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key, strict=True)
    assert got["done"].all() and not got["nonfinite"].any()
    if "kinks" in ref:
        assert got["kinks"].sum() == ref["kinks"].sum()
    # another chunking of the same batches: the same store but for its chunk size
    code, _, err = cli(capsys, "explain", model, "-m", method, "-i", data[name],
                       "--out", tmp_path / "b.zarr", "--batch-size", "32", "--chunk", "96")
    assert code == 0, err
    other = store(tmp_path / "b.zarr")
    for key in got:
        if key not in ("done", "kinks"):
            np.testing.assert_array_equal(other[key], got[key], err_msg=key, strict=True)


def test_the_lazy_array_matches_the_store_for_every_kind_of_input(
        tmp_path: Path, data: dict[str, Path]) -> None:
    import dask.array as da

    x = inputs("breast_cancer_mlp")
    np.savez(tmp_path / "stored.npz", images=x, other=x[:3])
    np.savez_compressed(tmp_path / "packed.npz", images=x)
    zarr.create_array(tmp_path / "x.zarr", data=x, chunks=(50, 30))
    group = zarr.open_group(tmp_path / "g.zarr", mode="w")
    group.create_array("images", data=x, chunks=(64, 30))
    pbxc_dask.to_zarr(MLP, data["mlp"], tmp_path / "ref.zarr", "dfd", chunk=64,
                      batch_size=32)
    ref = store(tmp_path / "ref.zarr")["attributions"]
    sources: list[tuple[Any, dict[str, Any]]] = [
        (data["mlp"], {}), (tmp_path / "stored.npz", {"key": "images"}),
        (tmp_path / "packed.npz", {}), (tmp_path / "x.zarr", {}),
        (tmp_path / "g.zarr", {"key": "images"}), (x, {}),
        (da.from_array(x, chunks=(50, 30)), {}),
    ]
    assert isinstance(pbxc_dask.open_rows(tmp_path / "stored.npz", "images"),
                      pbxc_dask.MappedRows)     # memory-mapped inside the zip, never read whole
    for source, extra in sources:
        lazy = pbxc_dask.explain(MLP, source, "dfd", chunk=64, batch_size=32, **extra)
        assert isinstance(lazy, da.Array) and lazy.chunks[0] == (64, 64, 15)
        np.testing.assert_array_equal(lazy.compute(), ref, err_msg=str(source), strict=True)
    every = pbxc_dask.explain_all(MLP, x, "dfd", chunk=64, batch_size=32)
    assert {"attributions", "delta", "summation_error", "targets", "nonfinite"} <= set(every)
    np.testing.assert_array_equal(every["delta"].compute(), store(tmp_path / "ref.zarr")["delta"])


def test_each_process_builds_a_model_once_and_notices_a_changed_one(tmp_path: Path) -> None:
    shutil.copy(MLP, tmp_path / "m.pbx")
    shutil.copy(MLP.with_suffix(".npz"), tmp_path / "breast_cancer_mlp.npz")
    source, _ = pbxc_dask.model_source(tmp_path / "m.pbx")
    as_float32 = replace(source, dtype="float32")
    before = pbxc_dask.MODEL_LOADS[0]
    first = pbxc_dask.cached_model(as_float32)
    assert pbxc_dask.cached_model(as_float32) is first and first.dtype == np.float32
    assert pbxc_dask.MODEL_LOADS[0] == before + 1
    weights = dict(np.load(tmp_path / "breast_cancer_mlp.npz"))
    weights["out.bias"] = weights["out.bias"] + 1
    np.savez(tmp_path / "breast_cancer_mlp.npz", **weights)
    with pytest.raises(InputError, match="changed since the run started"):
        pbxc_dask.cached_model(replace(source, convention="left"))


# ---------------------------------------------------------------- resume and refusals


class Stop(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_store(tmp_path: Path,
                                                      data: dict[str, Path]) -> None:
    options = {"chunk": 32, "batch_size": 32}
    pbxc_dask.to_zarr(DIGITS, data["digits"], tmp_path / "whole.zarr", "lrp", **options)
    seen = []

    def crash(done: pbxc_dask.ChunkDone) -> None:
        seen.append(done.index)
        if len(seen) == 3:
            raise Stop

    with pytest.raises(Stop):
        pbxc_dask.to_zarr(DIGITS, data["digits"], tmp_path / "part.zarr", "lrp",
                          on_chunk=crash, **options)
    marks = store(tmp_path / "part.zarr")["done"]
    assert marks.sum() == 3 and marks[:3].all()
    redone: list[int] = []
    summary = pbxc_dask.to_zarr(DIGITS, data["digits"], tmp_path / "part.zarr", "lrp",
                                on_chunk=lambda d: redone.append(d.index), **options)
    assert redone == [3] and summary.computed_chunks == 1 and summary.chunks == 4
    assert_same_store(tmp_path / "part.zarr", tmp_path / "whole.zarr")
    again = pbxc_dask.to_zarr(DIGITS, data["digits"], tmp_path / "part.zarr", "lrp", **options)
    assert again.computed_chunks == 0 and "already done" in again.line()


def test_a_rerun_with_other_settings_is_refused_naming_them(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, data: dict[str, Path]) -> None:
    out = tmp_path / "o.zarr"
    assert cli(capsys, "explain", MLP, "-m", "lrp", "-i", data["mlp"], "--out", out)[0] == 0
    before = store(out)
    for argv, named in [
        (["-m", "dfd"], "method"), (["-m", "lrp", "--rule", "zplus"], "options.rule"),
        (["-m", "lrp", "--target", "1"], "options.target"),
        (["-m", "lrp", "--dtype", "float32"], "dtype"),
    ]:
        code, _, err = cli(capsys, "explain", MLP, *argv, "-i", data["mlp"], "--out", out)
        assert code == 1 and err.startswith("error: ") and named in err, err
        assert "Traceback" not in err
    shutil.copy(MLP, tmp_path / "other.pbx")
    weights = dict(np.load(MLP.with_suffix(".npz")))
    weights["out.bias"] = weights["out.bias"] + 1
    np.savez(tmp_path / "breast_cancer_mlp.npz", **weights)
    code, _, err = cli(capsys, "explain", tmp_path / "other.pbx", "-m", "lrp", "-i",
                       data["mlp"], "--out", out)
    assert code == 1 and "model_hash" in err and "model:" in err
    np.save(tmp_path / "fewer.npy", inputs("breast_cancer_mlp", 100))
    code, _, err = cli(capsys, "explain", MLP, "-m", "lrp", "-i", tmp_path / "fewer.npy",
                       "--out", out)
    assert code == 1 and "input.shape" in err and "samples" in err
    after = store(out)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])
    (tmp_path / "mine.zarr").mkdir()
    (tmp_path / "mine.zarr" / "notes.txt").write_text("keep me")
    code, _, err = cli(capsys, "explain", MLP, "-m", "lrp", "-i", data["mlp"],
                       "--out", tmp_path / "mine.zarr")
    assert code == 1 and "not a pbxc attribution store" in err
    assert (tmp_path / "mine.zarr" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------- bad input


def test_nonfinite_samples_are_listed_and_skipped_or_stop_a_strict_run(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, data: dict[str, Path]) -> None:
    x = inputs("digits_cnn", 128).copy()
    x[[5, 70, 71], 0, 3, 3] = [np.nan, np.inf, -np.inf]
    np.save(tmp_path / "bad.npy", x)
    code, out, err = cli(capsys, "explain", DIGITS, "-m", "dfd", "-i", tmp_path / "bad.npy",
                         "--out", tmp_path / "o.zarr", "--chunk", "64", "--batch-size", "32")
    assert code == 0, err
    assert "3 sample(s) hold NaN or infinity" in out and "5, 70, 71" in out
    got = store(tmp_path / "o.zarr")
    assert np.flatnonzero(got["nonfinite"]).tolist() == [5, 70, 71]
    assert np.isnan(got["attributions"][[5, 70, 71]]).all()
    assert (got["targets"][[5, 70, 71]] == -1).all()
    clean = x.copy()
    clean[[5, 70, 71]] = 0   # the skipped samples ran as zeros: the others are untouched
    pbxc_dask.to_zarr(DIGITS, clean, tmp_path / "clean.zarr", "dfd", chunk=64, batch_size=32)
    ref = store(tmp_path / "clean.zarr")
    keep = ~got["nonfinite"]
    for key in ("attributions", "delta", "targets"):
        np.testing.assert_array_equal(got[key][keep], ref[key][keep], err_msg=key)
    code, out, err = cli(capsys, "explain", DIGITS, "-m", "dfd", "-i", tmp_path / "bad.npy",
                         "--out", tmp_path / "s.zarr", "--chunk", "64", "--batch-size", "32",
                         "--strict")
    assert code == 1 and err.startswith("error: 1 sample(s) hold NaN or infinity: 5")
    assert "Traceback" not in err
    assert not store(tmp_path / "s.zarr")["done"].any()


def test_a_data_set_of_the_wrong_shape_is_an_error_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, data: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = cli(capsys, "explain", DIGITS, "-m", "lrp", "-i", data["mlp"],
                         "--out", tmp_path / "o.zarr")
    assert code == 1 and out == ""
    assert err.startswith("error: input data has shape [143, 30]; model 'digits_cnn' takes "
                          "[samples, 1, 8, 8]")
    assert not (tmp_path / "o.zarr").exists()
    code, _, err = cli(capsys, "explain", DIGITS, "-m", "lrp", "-i", data["digits"],
                       "--out", tmp_path / "o.zarr", "--chunk", "100")
    assert code == 1 and "must be a multiple of batch_size (256)" in err
    monkeypatch.setattr(pbxc_dask, "MAX_CHUNK_BYTES", 10_000)
    code, _, err = cli(capsys, "explain", DIGITS, "-m", "lrp", "-i", data["digits"],
                       "--out", tmp_path / "o.zarr", "--chunk", "128", "--batch-size", "64")
    assert code == 1 and "choose a smaller chunk" in err and not (tmp_path / "o.zarr").exists()


def test_a_full_disk_is_an_error_line_and_the_done_chunks_stay(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, data: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from zarr.storage import LocalStore

    pbxc_dask.to_zarr(MLP, data["mlp"], tmp_path / "ref.zarr", "dfd", chunk=32, batch_size=32)
    real_set = LocalStore.set
    writes = [0]

    async def full_after_a_while(self: Any, key: str, value: Any) -> None:
        if key.startswith(("attributions/c", "delta/c")):
            writes[0] += 1
            if writes[0] > 4:
                raise OSError(errno.ENOSPC, "No space left on device")
        await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", full_after_a_while)
    argv = ["explain", MLP, "-m", "dfd", "-i", data["mlp"], "--out", tmp_path / "o.zarr",
            "--chunk", "32", "--batch-size", "32"]
    code, out, err = cli(capsys, *argv)
    assert code == 1 and "no space left on device" in err and "rerun" in err
    assert err.startswith("error: ") and "Traceback" not in err
    assert store(tmp_path / "o.zarr")["done"].tolist() == [True, True, False, False, False]
    monkeypatch.setattr(LocalStore, "set", real_set)
    code, out, err = cli(capsys, *argv)
    assert code == 0 and "(3 computed, 2 already done)" in out
    assert_same_store(tmp_path / "o.zarr", tmp_path / "ref.zarr")


def test_an_unreachable_scheduler_is_an_error_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, data: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pbxc_dask, "CONNECT_TIMEOUT", 0.5)
    code, out, err = cli(capsys, "explain", MLP, "-m", "lrp", "-i", data["mlp"],
                         "--out", tmp_path / "o.zarr", "--scheduler", "tcp://127.0.0.1:9")
    assert code == 1 and out == ""
    assert err.startswith("error: cannot reach the Dask scheduler at 'tcp://127.0.0.1:9'")
    assert "Traceback" not in err and not (tmp_path / "o.zarr").exists()


def test_the_cupy_backend_without_a_gpu_is_an_error_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, data: dict[str, Path]) -> None:
    pytest.importorskip("pbxc.runtime.cupy_backend")
    from pbxc.runtime.cupy_backend import cupy_unavailable

    if cupy_unavailable() is None:
        pytest.skip("this machine has cupy and a GPU")
    code, _, err = cli(capsys, "explain", MLP, "-m", "lrp", "-i", data["mlp"],
                       "--out", tmp_path / "o.zarr", "--backend", "cupy")
    assert code == 1 and err.startswith("error: backend 'cupy' is unavailable")
    assert "Traceback" not in err
    code, _, err = cli(capsys, "explain", MLP, "-m", "dfd", "-i", data["mlp"],
                       "--out", tmp_path / "o.zarr", "--backend", "cupy",
                       "--dfd-rule", "revealcancel")
    assert code == 1 and "cupy backend does not take dfd_rule 'revealcancel'" in err


def test_usage_errors_of_the_data_set_options(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path, data: dict[str, Path]) -> None:
    code, _, err = cli(capsys, "explain", MLP, "-m", "lrp", "-i", data["mlp"],
                       "--out", tmp_path / "o.npz", "--workers", "2")
    assert code == 2 and "give --out OUT.zarr" in err
    code, _, err = cli(capsys, "explain", MLP, "-m", "lrp", "-i", data["mlp"],
                       "--out", tmp_path / "o.zarr", "--workers", "0")
    assert code == 2 and "--workers must be at least 1" in err
    code, _, err = cli(capsys, "explain", MLP, "-m", "hessian", "-i", data["mlp"],
                       "--out", tmp_path / "o.zarr")
    assert code == 2 and "runs in memory only" in err
    (tmp_path / "elsewhere.zarr").mkdir()
    (tmp_path / "link.zarr").symlink_to(tmp_path / "elsewhere.zarr")
    code, _, err = cli(capsys, "explain", MLP, "-m", "lrp", "-i", data["mlp"],
                       "--out", tmp_path / "link.zarr")
    assert code == 1 and "is a symbolic link" in err
    assert not any((tmp_path / "elsewhere.zarr").iterdir())


def test_an_in_memory_run_imports_neither_dask_nor_zarr(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, data: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("dask", "dask.array", "distributed", "zarr", "pbxc.dask"):
        monkeypatch.setitem(sys.modules, name, None)   # importing any of them now fails
    code, out, err = cli(capsys, "explain", MLP, "-m", "lrp", "-i", data["mlp"],
                         "--out", tmp_path / "o.npz")
    assert code == 0 and "to " in out and err == "", err
    assert np.load(tmp_path / "o.npz")["attributions"].shape == (143, 30)


def test_per_sample_baselines_and_targets_follow_their_samples(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, data: dict[str, Path]) -> None:
    x = inputs("breast_cancer_mlp")
    np.save(tmp_path / "base.npy", x[::-1].copy())
    argv = ["explain", MLP, "-m", "dfd", "-i", data["mlp"], "--baseline", tmp_path / "base.npy",
            "--batch-size", "32"]
    assert cli(capsys, *argv, "--out", tmp_path / "ref.npz")[0] == 0
    assert cli(capsys, *argv, "--out", tmp_path / "o.zarr", "--chunk", "64")[0] == 0
    ref, got = dict(np.load(tmp_path / "ref.npz")), store(tmp_path / "o.zarr")
    for key in ("attributions", "delta", "summation_error"):
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key, strict=True)
    targets = np.arange(len(x)) % 2
    pbxc_dask.to_zarr(MLP, x, tmp_path / "t.zarr", "lrp", target=targets, chunk=64,
                      batch_size=32)
    np.testing.assert_array_equal(store(tmp_path / "t.zarr")["targets"], targets)
