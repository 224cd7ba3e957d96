"""Stress run (not timed): many processes compile into one directory at the same moment.

Each round forks ``--processes`` children (pbxc already imported) that wait on a barrier and
run ``pbxc compile small.pbx -o out``. Every child must end with exit 0 or an ``error:`` line
and exit 1 (never a traceback), the directory must be one pbxc wrote, whole, and no temporary
or staging folder may be left. Prints how the children ended.

    python bench/stress_concurrent_compile.py --rounds 15 --processes 8
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import multiprocessing
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pbxc.cli import main
from pbxc.outputs import pbxc_directory_problem

MODEL = """model small
weights "w.npz"
input x: float64[3]
h = relu(linear(x, @a))
output y = linear(h, @b)
"""


def child(barrier: Any, results: Any) -> None:
    err = io.StringIO()
    barrier.wait(timeout=120)
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(["compile", "small.pbx", "-o", "out"])
        except BaseException as exc:   # what escapes main is what this run looks for
            code = 99
            err.write(f"Traceback: {exc!r}")
    results.put((code, err.getvalue()))


def run(rounds: int, processes: int) -> collections.Counter[str]:
    os.chdir(tempfile.mkdtemp(prefix="pbxc-stress-"))
    rng = np.random.default_rng(0)
    np.savez("w.npz", **{"a.weight": rng.standard_normal((4, 3)),
                         "a.bias": rng.standard_normal(4),
                         "b.weight": rng.standard_normal((2, 4)),
                         "b.bias": rng.standard_normal(2)})  # type: ignore[arg-type]
    Path("small.pbx").write_text(MODEL, encoding="utf-8")
    assert main(["check", "small.pbx", "-q"]) == 0       # derive once, before forking
    ctx = multiprocessing.get_context("fork")
    outcomes: collections.Counter[str] = collections.Counter()
    for _ in range(rounds):
        barrier, results = ctx.Barrier(processes), ctx.Queue()
        procs = [ctx.Process(target=child, args=(barrier, results)) for _ in range(processes)]
        for proc in procs:
            proc.start()
        ended = [results.get(timeout=300) for _ in procs]
        for proc in procs:
            proc.join()
        for code, err in ended:
            assert "Traceback" not in err and code in (0, 1), (code, err)
            outcomes["exit 0" if code == 0 else err.split(":", 2)[-1].strip()[:70]] += 1
        assert pbxc_directory_problem(Path("out")) is None
        assert not [p for p in os.listdir(".") if p.startswith(".pbxc-")]
    return outcomes


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--processes", type=int, default=8)
    options = parser.parse_args()
    for outcome, count in run(options.rounds, options.processes).most_common():
        print(f"{count:5d}  {outcome}")
