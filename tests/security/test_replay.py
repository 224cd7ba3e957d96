"""``pbxc verify --replay FILE``: the file is checked against its schema, runs nothing, names
only the model it was saved for, and re-checks exactly as the check ran (its dtype too).

Each hostile file gives an ``error:`` line and exit 1, creates no canary, and leaves the
folder as it was.
"""

from __future__ import annotations

import json
import shlex
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pbxc.cli import main

#: a model whose float32 DFD contributions miss a float64-sized tolerance: the property is
#: violated in float32 and holds in float64, so the dtype decides the replay
MODEL = """model tiny
weights "w.npz"
input x: float64[3]
h = relu(linear(x, @a))
output y = linear(h, @b)
verify {
    domain x in [0.5, 1]
    summation_to_delta(tol=1e-10)
}
"""


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "w.npz", **{"a.weight": rng.standard_normal((4, 3)),
                                    "a.bias": np.abs(rng.standard_normal(4)),
                                    "b.weight": rng.standard_normal((2, 4)),
                                    "b.bias": rng.standard_normal(2)})
    (tmp_path / "tiny.pbx").write_text(MODEL, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def saved(work: Path, capsys: pytest.CaptureFixture[str], dtype: str = "float32"
          ) -> tuple[Path, str]:
    """Run verify until it saves a counterexample; return it and the printed replay line."""
    code = main(["verify", "tiny.pbx", "--dtype", dtype, "--examples", "3", "-q",
                 "--counterexamples", "cx"])
    out = capsys.readouterr().out
    assert code == 1, out
    replay = next(line.strip() for line in out.splitlines() if line.strip().startswith(
        "replay: "))
    return work / "cx" / "tiny.summation_to_delta.npz", replay[len("replay: "):]


def fields(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def rejected(capsys: pytest.CaptureFixture[str], argv: list[str], message: str,
             folder: Path) -> None:
    before = sorted(p.name for p in folder.rglob("*"))
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 1, captured
    assert captured.err.startswith("error: ") and message in captured.err, captured.err
    assert "Traceback" not in captured.err
    assert not (folder / "CANARY").exists()
    assert sorted(p.name for p in folder.rglob("*")) == before


def test_a_float32_counterexample_replays_in_float32_and_its_hint_reproduces_it(
        work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cx, hint = saved(work, capsys)
    stored = fields(cx)
    assert str(stored["dtype"]) == "float32" and str(stored["model_name"]) == "tiny"
    argv = shlex.split(hint)
    assert argv[:2] == ["pbxc", "verify"] and "tiny.pbx" in argv[2]
    assert main([*argv[1:], "--json", "-"]) == 1            # the printed hint, as given
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "float32" and not report["holds"]
    assert report["properties"][0]["status"] == "violated"
    # the same inputs in float64 hold: the dtype, not the inputs, made the violation
    assert main(["verify", "tiny.pbx", "--replay", str(cx), "--dtype", "float64", "-q"]) == 0
    capsys.readouterr()
    # the table's worst and the line below it agree
    main(["verify", "tiny.pbx", "--replay", str(cx), "-q"])
    table = capsys.readouterr().out
    worst = next(line.split()[2] for line in table.splitlines()
                 if line.strip().startswith("summation_to_delta"))
    assert f"measured {worst} at the counterexample" in table


def _rewrite(path: Path, out: Path, **changes: Any) -> Path:
    """A copy of a counterexample with fields replaced (None: removed)."""
    arrays = fields(path)
    for key, value in changes.items():
        if value is None:
            arrays.pop(key, None)
        else:
            arrays[key] = np.asarray(value)
    np.savez(out, **arrays)
    return out


def test_hostile_replay_files_are_rejected_with_error_lines(
        work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cx, _ = saved(work, capsys)
    evil_dir = work / "elsewhere"
    evil_dir.mkdir()
    (evil_dir / 'x""";__import__("os").system("touch CANARY");"""y.pbx').write_text(MODEL)
    bad = work / "bad"
    bad.mkdir()
    base = ["verify", "tiny.pbx", "--replay"]
    deep = "[" * 20_000 + "]" * 20_000
    cases: list[tuple[dict[str, Any], str]] = [
        ({"property": "no_such_property"}, "unknown property 'no_such_property'"),
        ({"property": np.array([1, 2])}, "'property' must be a text scalar"),
        ({"settings": "{not json"}, "'settings' is not valid JSON"),
        ({"settings": deep}, "'settings' is not valid JSON (RecursionError)"),
        ({"settings": "[1, 2]"}, "'settings' must be a JSON object"),
        ({"settings": '{"nope": 1}'}, "summation_to_delta has no setting 'nope'"),
        ({"settings": '{"baseline": [1]}'}, "setting 'baseline' must be a number"),
        ({"tol": "small"}, "'tol' must be a number"),
        ({"tol": np.inf}, "'tol' must be a finite number >= 0"),
        ({"dtype": "float16"}, "'dtype' must be float32 or float64"),
        ({"format": "something-else"}, "is not a pbxc verify counterexample"),
        ({"format": None}, "the field 'format' is missing"),
        ({"nodes": "{"}, "'nodes' is not valid JSON"),
        ({"input__x": np.ones((1, 3), dtype=np.complex128)}, "'input__x' must be a real"),
        ({"input__x": np.array([["a", "b", "c"]])}, "'input__x' must be a real"),
        ({"input__x": np.full((1, 3), np.nan)}, "'input__x' has non-finite values"),
        ({"input__x": np.ones((2, 3))}, "must hold one sample"),
        ({"input__x": np.ones((1, 4))}, "needs [1, 3]"),
        ({"input__x": None, "input__z": np.ones((1, 3))}, "holds inputs ['z']"),
        ({"model_name": "other"}, "was saved for model 'other', not 'tiny'"),
        ({"surprise": np.ones(2)}, "unknown field 'surprise'"),
        ({"scale__x": np.ones(5)}, "'scale__x' has shape [5]"),
    ]
    for k, (changes, message) in enumerate(cases):
        rejected(capsys, [*base, str(_rewrite(cx, bad / f"{k}.npz", **changes))], message, work)
    # the model it names must be the one given, or lie beside the file
    evil = _rewrite(cx, bad / "evil.npz",
                    model=str(next(evil_dir.iterdir())), model_name="tiny")
    rejected(capsys, ["verify", "--replay", str(evil)], "does not lie beside it", work)
    # object arrays need pickle, which is refused
    np.savez(bad / "pickled.npz", **{**fields(cx), "input__x": np.array([None], dtype=object)})
    rejected(capsys, [*base, str(bad / "pickled.npz")], "pickled", work)
    # a member that claims more than the limit is refused before it is read
    with zipfile.ZipFile(bad / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("format.npy", b"\0" * (300 * 2**20))
    rejected(capsys, [*base, str(bad / "bomb.npz")], "over the limit", work)
    np.save(bad / "single.npy", np.ones(3))
    rejected(capsys, [*base, str(bad / "single.npy")], "not an .npz archive", work)
    (bad / "text.npz").write_text("not a zip")
    rejected(capsys, [*base, str(bad / "text.npz")], "not an .npz archive", work)
    rejected(capsys, [*base, str(bad / "missing.npz")], "counterexample file not found", work)
    # the untouched file still replays
    assert main([*base, str(cx), "-q"]) == 1
