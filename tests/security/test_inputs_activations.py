"""Issue #10, user activations: each documented-function activation that used to crash or hang
is derived correctly or refused with an error at its line, within the derivation budget.

Each case runs ``pbxc check`` (which derives every activation) in-process and asserts the exit
code, the error text and position, that no canary file appeared and that nothing was left in
the model's folder. The promises are listed in specs/security.md, Inputs.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

import pbxc
from pbxc.cli import main
from pbxc.symbolic import budget
from pbxc.symbolic.budget import DerivationLimit, deadline, limits_set


def model_text(expr: str) -> str:
    return ("model m\ninput x: float64[5]\n"
            f"activation f(z) = {expr}\n"
            "output y = f(x)\n")


def check(tmp_path: Path, capsys: pytest.CaptureFixture[str], expr: str
          ) -> tuple[int, str, str]:
    """``pbxc check`` of a one-activation model; asserts the folder holds only the model."""
    path = tmp_path / "m.pbx"
    path.write_text(model_text(expr), encoding="utf-8")
    code = main(["check", str(path)])
    out, err = capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pbx"]  # no canary, no leftovers
    assert "Traceback" not in err
    return code, out, err


REFUSED = [
    ("sqrt(z)", r"it is not real at z = -1"),
    ("z^(1/3)", r"it is not real at z = -1"),
    ("log(z)", r"it is not finite at z = 0 \(f\(0\) = -inf\)"),
    ("z/0", r"it divides by zero"),
    ("abs(z-0)+abs(z-1)+abs(z-2)+abs(z-3)+abs(z-4)+abs(z-5)+abs(z-6)+abs(z-7)+abs(z-8)"
     "+abs(z-9)", r"it has 10 branch conditions .* at most 6 \(PBXC_DERIVE_MAX_KINKS\)"),
    ("exp(exp(exp(exp(exp(z)))))", r"f\(0\) overflows every float"),
]


@pytest.mark.parametrize(("expr", "reason"), REFUSED, ids=[e[:20] for e, _ in REFUSED])
def test_activation_refused_at_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        expr: str, reason: str) -> None:
    start = time.monotonic()
    code, out, err = check(tmp_path, capsys, expr)
    assert code == 1 and out == ""
    first = err.splitlines()[0]
    assert first.startswith(f"{tmp_path / 'm.pbx'}:3:12: error: activation 'f' cannot be "
                            "derived: "), first
    assert __import__("re").search(reason, first), first
    assert time.monotonic() - start < 60


@pytest.mark.parametrize(("expr", "column", "reason"), [
    ("z^1000000", 19, "exponent 1000000 is too large: at most 64"),
    ("z*1e100000000", 21, "number 1e100000000 is not finite in float64"),
])
def test_huge_powers_and_numbers_refused_where_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], expr: str, column: int,
        reason: str) -> None:
    code, _, err = check(tmp_path, capsys, expr)
    assert code == 1
    assert err.splitlines()[0].startswith(f"{tmp_path / 'm.pbx'}:3:{column}: error: {reason}")


def test_derivation_over_its_time_budget_is_an_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # erf(erfc(erf(z))) sends sympy's assumption system into a recursion that ran 44 s
    monkeypatch.setenv("PBXC_DERIVE_SECONDS", "1.5")
    start = time.process_time()
    code, _, err = check(tmp_path, capsys, "erf(erfc(erf(z)))")
    assert code == 1
    assert "activation 'f' cannot be derived: its derivation ran past the budget of 1.5 s " \
           "(PBXC_DERIVE_SECONDS)" in err.splitlines()[0]
    assert err.startswith(f"{tmp_path / 'm.pbx'}:3:12:")
    assert time.process_time() - start < 1.5 + 5


X = np.array([[-3.0, -0.5, 0.0, 0.75, 4.0], [1e-3, -20.0, 2.0, -1.0, 30.0]])
DERIVED = [
    ("sign(z)", np.sign, lambda x: np.zeros_like(x)),
    ("max(min(z,1),max(z,-1))", lambda x: np.maximum(x, -1.0),
     lambda x: (x > -1).astype(float)),
    ("atan(atan(atan(atan(atan(atan(atan(atan(z))))))))", None, None),
]


@pytest.mark.parametrize(("expr", "value", "slope"), DERIVED, ids=["sign", "maxmin", "atan8"])
def test_activation_derived_correctly(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      expr: str, value: object, slope: object) -> None:
    code, out, err = check(tmp_path, capsys, expr)
    assert code == 0 and "is valid" in out, err
    model = pbxc.load(tmp_path / "m.pbx")
    y = model.forward(X)
    grad = model.jacobian(X).jacobian  # (B, 5, 5), diagonal
    diag = np.einsum("bii->bi", grad)
    if value is None:  # atan applied eight times, and its chain-rule derivative
        ref, dref = X.copy(), np.ones_like(X)
        for _ in range(8):
            dref = dref / (1 + ref**2)
            ref = np.arctan(ref)
    else:
        ref, dref = value(X), slope(X)  # type: ignore[operator]
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-15)
    off_kink = X != 0 if expr.startswith("sign") else X != -1
    np.testing.assert_allclose(diag[off_kink], dref[off_kink], rtol=1e-10, atol=1e-15)
    dfd = model.dfd(X)
    np.testing.assert_allclose(dfd.attributions["x"].sum(axis=1), dfd.delta.ravel(),
                               rtol=1e-10, atol=1e-12)


def test_limits_are_configurable_in_python_and_refuse_bad_settings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with limits_set(max_kinks=1), pytest.raises(pbxc.PbxError,
                                                match=r"2 branch conditions .* at most 1"):
        pbxc.loads(model_text("abs(z) + abs(z - 1)"), "k.pbx")
    monkeypatch.setenv("PBXC_DERIVE_MAX_SIZE", "many")
    with pytest.raises(DerivationLimit, match=r"PBXC_DERIVE_MAX_SIZE='many' is not a number"):
        budget.current_limits()


def test_deadline_interrupts_outside_the_main_thread() -> None:
    # a derivation started from a worker thread (a Dask task, a server) cannot use signals
    outcome: list[str] = []

    def step(n: int) -> int:  # sympy's work is Python calls, where the clock is read
        return sum(range(n))

    def spin() -> None:
        try:
            with deadline(0.3):
                while True:
                    step(100)
        except DerivationLimit as exc:
            outcome.append(str(exc))

    worker = threading.Thread(target=spin, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert outcome and "ran past the budget of 0.3 s" in outcome[0]
