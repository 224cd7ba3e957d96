"""Fuzzing user activations: random math over the documented functions is derived or refused.

Every case writes ``activation f(z, a = 0.5) = EXPR`` over the functions of specs/language.md
(``MATH_FUNCTIONS``, the built-in activations, ``+ - * / ^``, numbers, ``pi``, ``e``), loads the
model and runs its forward pass, gradient and DFD on a small batch. The only outcomes allowed
are success or a :class:`pbxc.PbxError` naming the activation's line, and each case must end
within the derivation budget (CPU time, plus the time of the passes).

A larger run, on demand (figures in specs/security.md, Inputs)::

    python tests/property/test_fuzz_activations.py --cases 10000 --seconds 5
"""

from __future__ import annotations

import sys
import time
import warnings
from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import pbxc
from pbxc.ops import BUILTIN_ACTIVATIONS, MATH_FUNCTIONS
from pbxc.symbolic.budget import limits_set

#: the CI derivation budget per case; the passes on a 2 x 5 batch take well under a second more
CI_SECONDS = 4.0
SLACK = 3.0

UNARY = sorted(n for n, k in MATH_FUNCTIONS.items() if k == 1)
BINARY = sorted(n for n, k in MATH_FUNCTIONS.items() if k == 2)
BUILTINS = sorted(BUILTIN_ACTIVATIONS)
NUMBERS = ["0", "1", "2", "3", "0.5", "0.1", "1e-3", "10", "100", "1.5", "7", "1e-8", "1e8"]
LEAVES = st.sampled_from(["z", "z", "z", "a", "pi", "e", *NUMBERS])


def _expressions(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(st.sampled_from(UNARY), children).map(lambda t: f"{t[0]}({t[1]})"),
        st.tuples(st.sampled_from(BINARY), children, children).map(
            lambda t: f"{t[0]}({t[1]}, {t[2]})"),
        st.tuples(st.sampled_from(BUILTINS), children).map(lambda t: f"{t[0]}({t[1]})"),
        st.tuples(children, st.sampled_from(["+", "-", "*", "/", "^"]), children).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(children, st.sampled_from(["<", "<=", ">", ">="]), st.sampled_from(NUMBERS),
                  children, children).map(
            lambda t: f"where({t[0]} {t[1]} {t[2]}, {t[3]}, {t[4]})"),
        children.map(lambda c: f"-{c}"),
    )


EXPRESSIONS = st.recursive(LEAVES, _expressions, max_leaves=6)


def program(expr: str) -> str:
    return ("model fuzz\ninput x: float64[5]\n"
            f"activation f(z, a = 0.5) = {expr}\n"
            "output y = f(x)\n")


BATCH = np.array([[-3.0, -0.5, 0.0, 0.75, 4.0], [1e-3, -20.0, 2.0, -1.0, 30.0]])


def run_case(expr: str, seconds: float) -> str:
    """One activation through load, forward, gradient and DFD; returns the outcome's name."""
    text = program(expr)
    with warnings.catch_warnings(), limits_set(seconds=seconds):
        warnings.simplefilter("ignore")
        try:
            model = pbxc.loads(text, "fuzz.pbx")
            model.forward(BATCH)
            model.gradient(BATCH, target=0)
            model.dfd(BATCH)
        except pbxc.PbxError as err:
            assert err.diagnostics, "a PbxError must carry a diagnostic"
            rendered = err.render()
            if "activation 'f'" in rendered:
                assert rendered.startswith("fuzz.pbx:3:"), rendered  # the activation's line
            return _reason(rendered)
    return "derived"


def _reason(rendered: str) -> str:
    for marker, name in (("budget", "refused: over the time budget"),
                         ("not real", "refused: not real"),
                         ("not finite", "refused: not finite"),
                         ("overflows", "refused: overflows"),
                         ("sympy failed", "refused: sympy failed"),
                         ("PBXC_DERIVE", "refused: a size limit"),
                         ("cannot be derived", "refused: other reason")):
        if marker in rendered:
            return name
    return "refused: input or other error"


@settings(max_examples=12)
@given(EXPRESSIONS)
def test_random_activations_derive_or_refuse_within_budget(expr: str) -> None:
    start = time.process_time()  # the budget is CPU time: a loaded CI machine is not a hang
    run_case(expr, CI_SECONDS)
    elapsed = time.process_time() - start
    assert elapsed < CI_SECONDS + SLACK, f"{expr!r} took {elapsed:.1f} s of CPU time"


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--seconds", type=float, default=5.0, help="derivation budget")
    args = parser.parse_args(argv)
    outcomes: Counter[str] = Counter()
    slowest = [0.0, ""]
    start = time.monotonic()

    @settings(max_examples=args.cases, derandomize=False, database=None, deadline=None)
    @given(EXPRESSIONS)
    def one(expr: str) -> None:
        t0 = time.process_time()
        try:
            outcomes[run_case(expr, args.seconds)] += 1
        except Exception as exc:  # counted and printed: the figure the test promises is 0
            outcomes["UNCAUGHT " + type(exc).__name__] += 1
            print(f"UNCAUGHT {type(exc).__name__}: {expr}", flush=True)
        elapsed = time.process_time() - t0
        if elapsed > slowest[0]:
            slowest[:] = [elapsed, expr]
        if elapsed > args.seconds + SLACK:
            outcomes["OVER BUDGET"] += 1
            print(f"OVER BUDGET {elapsed:.1f} s: {expr}", flush=True)
        total = sum(v for k, v in outcomes.items() if k != "OVER BUDGET")
        if total % 100 == 0:
            print(f"{total} cases, {time.monotonic() - start:.0f} s: {dict(outcomes)}",
                  flush=True)

    one()
    total = sum(v for k, v in outcomes.items() if k != "OVER BUDGET")
    print(f"{total} cases in {time.monotonic() - start:.0f} s: {dict(outcomes)}; slowest "
          f"{slowest[0]:.1f} s ({slowest[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
