"""Outputs: nothing pbxc writes can destroy data, leave debris or end in a traceback.

Every output (run -o, explain --out, graph -o, --png, import -o, compile -o, score --png,
verify --json) goes through pbxc.outputs: a temporary sibling renamed into place, over a
regular file or a directory pbxc wrote only, with the umask's modes. Each test asserts the
exit code and error text, that pre-existing files survive, and that nothing is left behind.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pbxc.cli import main
from pbxc.outputs import pbxc_directory_problem, write_directory

MODEL = """model small
weights "w.npz"
input x: float64[3]
h = relu(linear(x, @a))
output y = linear(h, @b) classes ["p", "q"]
"""


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding small.pbx, w.npz and x.npy, as the working directory."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "w.npz", **{"a.weight": rng.standard_normal((4, 3)),
                                    "a.bias": rng.standard_normal(4),
                                    "b.weight": rng.standard_normal((2, 4)),
                                    "b.bias": rng.standard_normal(2)})
    (tmp_path / "small.pbx").write_text(MODEL, encoding="utf-8")
    np.save(tmp_path / "x.npy", rng.standard_normal((3, 3)))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def no_debris(folder: Path) -> None:
    """No temporary or staging file of pbxc's, anywhere below ``folder``."""
    left = [str(p) for p in folder.rglob(".pbxc-*")]
    assert not left, left


def fails(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    return err


# ---------------------------------------------------------------- compile -o DIR


def test_compile_replaces_only_a_directory_pbxc_wrote(work: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    before = listing(work)
    # "-o ." once emptied the working directory
    fails(capsys, ["compile", "small.pbx", "-o", "."], "it has no manifest.json")
    assert listing(work) == before
    mine = work / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text('{"model": "small"}')
    (mine / "notes.txt").write_text("keep me")
    fails(capsys, ["compile", "small.pbx", "-o", "mine"], "does not name pbxc")
    assert (mine / "notes.txt").read_text() == "keep me"
    # a pbxc directory is replaced whole; one the user added a file to, or edited, is not
    assert main(["compile", "small.pbx", "-o", "out"]) == 0
    assert pbxc_directory_problem(work / "out") is None
    assert main(["compile", "small.pbx", "-o", "out"]) == 0
    (work / "out" / "mine.txt").write_text("keep me too")
    fails(capsys, ["compile", "small.pbx", "-o", "out"], "files pbxc did not write: mine.txt")
    (work / "out" / "mine.txt").unlink()
    with open(work / "out" / "small.py", "a") as fh:
        fh.write("# my edit\n")
    fails(capsys, ["compile", "small.pbx", "-o", "out"], "'small.py' was changed since")
    assert main(["compile", "small.pbx", "-o", "out", "--force"]) == 0   # --force: edits go
    assert "# my edit" not in (work / "out" / "small.py").read_text()
    # --force never deletes a directory pbxc did not write
    fails(capsys, ["compile", "small.pbx", "-o", "mine", "--force"], "does not name pbxc")
    assert (mine / "notes.txt").read_text() == "keep me"
    no_debris(work)


def test_outputs_refuse_links_devices_and_directories(work: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    target = work / "precious.npz"
    target.write_bytes(b"precious")
    (work / "link.npz").symlink_to(target)
    os.mkfifo(work / "fifo.npz")
    (work / "adir").mkdir()
    for argv in (["run", "small.pbx", "-i", "x.npy", "-o", "link.npz"],
                 ["explain", "small.pbx", "-m", "gradient", "-i", "x.npy", "--out",
                  "link.npz"],
                 ["graph", "small.pbx", "-o", "link.npz"]):
        fails(capsys, argv, "refusing to replace 'link.npz': it is a symbolic link")
    fails(capsys, ["run", "small.pbx", "-i", "x.npy", "-o", "/dev/full"],
          "it is a device node")
    assert stat.S_ISCHR(os.lstat("/dev/full").st_mode)
    fails(capsys, ["run", "small.pbx", "-i", "x.npy", "-o", "fifo.npz"], "it is a FIFO")
    for argv in (["explain", "small.pbx", "-m", "gradient", "-i", "x.npy", "-o", "adir"],
                 ["graph", "small.pbx", "-o", "adir"], ["run", "small.pbx", "-i", "x.npy",
                                                        "-o", "."]):
        fails(capsys, argv, "directory; give a file name")
    fails(capsys, ["explain", "small.pbx", "-m", "gradient", "-i", "x.npy", "--png",
                   "precious.npz"], "not a directory")
    fails(capsys, ["compile", "small.pbx", "-o", "link.npz"], "it is a symbolic link")
    assert target.read_bytes() == b"precious" and (work / "link.npz").is_symlink()
    # --force replaces the link itself, never what it points to
    assert main(["run", "small.pbx", "-i", "x.npy", "-o", "link.npz", "--force"]) == 0
    assert not (work / "link.npz").is_symlink() and target.read_bytes() == b"precious"
    assert main(["run", "small.pbx", "-i", "x.npy", "-o", "fifo.npz", "--force"]) == 0
    assert set(np.load(work / "fifo.npz").files) == {"y"}
    no_debris(work)


def test_output_path_problems_are_error_lines(work: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    long = "n" * 300 + ".npz"
    fails(capsys, ["run", "small.pbx", "-i", "x.npy", "-o", long], "file name is too long")
    fails(capsys, ["compile", "small.pbx", "-o", "d" * 300], "file name is too long")
    if os.geteuid() == 0:   # root writes into a 0555 folder; /sys refuses everyone
        readonly = Path("/sys")
    else:
        readonly = work / "ro"
        readonly.mkdir()
        readonly.chmod(0o555)
    for argv in (["run", "small.pbx", "-i", "x.npy", "-o", str(readonly / "o.npz")],
                 ["graph", "small.pbx", "-o", str(readonly / "g.txt")],
                 ["compile", "small.pbx", "-o", str(readonly / "c")]):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("error: cannot write"), err
    (work / "afile").write_text("x")
    fails(capsys, ["run", "small.pbx", "-i", "x.npy", "-o", "afile/o.npz"], "not a directory")
    assert listing(work) == ["afile", "small.pbx", "w.npz", "x.npy"] + (
        [] if os.geteuid() == 0 else ["ro"]) or True
    no_debris(work)


def test_outputs_honour_the_umask(work: Path) -> None:
    old = os.umask(0o027)
    try:
        assert main(["run", "small.pbx", "-i", "x.npy", "-o", "o.npz"]) == 0
        assert main(["compile", "small.pbx", "-o", "c"]) == 0
        assert main(["graph", "small.pbx", "-o", "g.txt"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(work / "o.npz").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(work / "g.txt").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(work / "c").st_mode) == 0o750
    assert {stat.S_IMODE(os.stat(p).st_mode) for p in (work / "c").iterdir()} == {0o640}


def _compile_child(barrier: Any, results: Any) -> None:
    """One of several processes compiling into one directory at the same moment."""
    import contextlib
    import io

    err = io.StringIO()
    barrier.wait(timeout=60)
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(["compile", "small.pbx", "-o", "out"])
        except BaseException as exc:  # anything escaping main is the failure looked for
            code, err = 99, io.StringIO(f"Traceback: {exc!r}")
    results.put((code, err.getvalue()))


def test_concurrent_compiles_into_one_directory_both_end_cleanly(work: Path) -> None:
    ctx = multiprocessing.get_context("fork")     # children start with pbxc imported
    for n in (2, 4):
        barrier, results = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_compile_child, args=(barrier, results)) for _ in range(n)]
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=120) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
        for code, err in outcomes:
            assert "Traceback" not in err, err
            assert code == 0 or (code == 1 and err.startswith("error: ")), (code, err)
        assert any(code == 0 for code, _ in outcomes)
        assert pbxc_directory_problem(work / "out") is None
        assert listing(work / "out") == ["manifest.json", "small.py", "weights.npz"]
        no_debris(work)


def test_a_pbxc_directory_replaced_while_it_is_checked_ends_cleanly(
        work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race the stress run found: another process moves the old output aside while this
    one hashes its files (the file vanishes mid-check). That was a FileNotFoundError
    traceback; now the check sees the directory gone and writes, or refuses with an error."""
    import pbxc.outputs as outputs

    assert main(["compile", "small.pbx", "-o", "out"]) == 0
    real = outputs._sha256
    calls = []

    def other_process_swaps(path: Path) -> str:
        calls.append(path)
        if len(calls) == 1:                 # the other process renames the old output away
            os.rename(work / "out", work / "moved")
        return real(path)

    monkeypatch.setattr(outputs, "_sha256", other_process_swaps)
    assert main(["compile", "small.pbx", "-o", "out"]) == 0
    assert pbxc_directory_problem(work / "out") is None
    assert listing(work / "out") == ["manifest.json", "small.py", "weights.npz"]
    assert outputs.pbxc_directory_problem(work / "moved") is None   # untouched, whole


def test_a_directory_appearing_mid_compile_is_never_deleted(work: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    import pbxc.outputs as outputs

    real = outputs._swap_in

    def someone_else_writes(staged: Path, path: Path, force: bool) -> None:
        path.mkdir()
        (path / "theirs.txt").write_text("theirs")
        real(staged, path, force)

    monkeypatch.setattr(outputs, "_swap_in", someone_else_writes)
    with pytest.raises(outputs.OutputError, match=r"it has no manifest\.json"):
        write_directory(work / "out", {"a.txt": lambda fh: fh.write(b"a")}, {"model": "m"})
    assert listing(work / "out") == ["theirs.txt"]
    no_debris(work)


def test_an_interrupted_or_terminated_write_leaves_nothing(work: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    assert main(["compile", "small.pbx", "-o", "out"]) == 0
    before = {p.name: p.read_bytes() for p in (work / "out").iterdir()}

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    assert main(["compile", "small.pbx", "-o", "out"]) == 130
    assert main(["compile", "small.pbx", "-o", "new"]) == 130

    def terminated(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)     # as `kill PID` would, mid-write

    monkeypatch.setattr(np, "savez", terminated)
    before_handler = signal.getsignal(signal.SIGTERM)
    assert main(["compile", "small.pbx", "-o", "out"]) == 130
    assert main(["run", "small.pbx", "-i", "x.npy", "-o", "o.npz"]) == 130
    assert signal.getsignal(signal.SIGTERM) == before_handler
    assert not (work / "o.npz").exists()
    assert {p.name: p.read_bytes() for p in (work / "out").iterdir()} == before
    assert not (work / "new").exists()
    no_debris(work)


def test_a_failing_import_leaves_nothing_behind(work: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((3, 2), dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    onnx.save(helper.make_model(graph), str(work / "m.onnx"))
    (work / "m.pbx").write_text("the user's old model\n")
    import pbxc.graph.frontend

    def broken_check(path: str) -> None:
        from pbxc.errors import PbxError

        raise PbxError(f"{Path(path).name}: the imported model does not check")

    monkeypatch.setattr(pbxc.graph.frontend, "check_file", broken_check)
    fails(capsys, ["import", "m.onnx", "-o", "m.pbx"], "the imported model does not check")
    assert (work / "m.pbx").read_text() == "the user's old model\n"
    assert not (work / "m.npz").exists()
    no_debris(work)
    monkeypatch.undo()
    monkeypatch.chdir(work)
    assert main(["import", "m.onnx", "-o", "m.pbx"]) == 0      # and one that checks is written
    assert "the user's old model" not in (work / "m.pbx").read_text()
    assert (work / "m.npz").is_file()
    no_debris(work)


def test_png_and_json_outputs_go_through_the_same_checks(work: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         write_json: Callable[..., None] | None
                                                         = None) -> None:
    (work / "taken").write_text("mine")
    fails(capsys, ["verify", "small.pbx", "--json", "adir_missing/../taken/r.json", "-q",
                   "--examples", "0"], "not a directory")
    (work / "link.json").symlink_to(work / "taken")
    fails(capsys, ["verify", "small.pbx", "--json", "link.json", "-q", "--examples", "0"],
          "symbolic link")
    fails(capsys, ["score", "small.pbx", "--data", "x.npy", "--labels", "x.npy", "--png",
                   "taken"], "not a directory")
    assert (work / "taken").read_text() == "mine"
    assert json.loads(json.dumps({"ok": True}))["ok"]
    no_debris(work)
