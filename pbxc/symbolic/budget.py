"""Limits on deriving one activation: time, size, kinks and powers (specs/activations.md, "Limits").

sympy's algorithms have no bound of their own: a sum of ten ``abs`` terms folds into 2^10
branches, ``z^1000000`` expands a million-term difference quotient, ``exp(exp(exp(z)))`` asks
mpmath for numbers with 10^56 digits. Before anything is derived, ``check_expression`` refuses
what is known to explode (with the reason); what remains runs under ``deadline``, which
interrupts the derivation when its time is spent. Both raise :class:`DerivationLimit`, which
``derive`` reports as an error at the activation's definition.

The limits are read from the environment when a derivation starts (``PBXC_DERIVE_SECONDS``,
``PBXC_DERIVE_MAX_SIZE``, ``PBXC_DERIVE_MAX_KINKS``, ``PBXC_DERIVE_MAX_EXPONENT``) or set in
Python with :func:`limits_set`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from types import FrameType
from typing import Any

import mpmath
import sympy


@dataclass(frozen=True)
class DerivationLimits:
    #: seconds of CPU time one activation's derivation (with its accuracy check) may take; CPU
    #: time, so that a loaded machine does not refuse what an idle one derives
    seconds: float = 20.0
    #: nodes of f's expression tree, after user activations are inlined
    max_size: int = 400
    #: non-smooth constructs (abs, sign, max, min, where, heaviside, relu, ...) in f
    max_kinks: int = 6
    #: the largest |p| of a power z^p with a numeric exponent
    max_exponent: int = 64


_ENV = {"seconds": "PBXC_DERIVE_SECONDS", "max_size": "PBXC_DERIVE_MAX_SIZE",
        "max_kinks": "PBXC_DERIVE_MAX_KINKS", "max_exponent": "PBXC_DERIVE_MAX_EXPONENT"}
_OVERRIDE: list[DerivationLimits] = []


class DerivationLimit(Exception):
    """The activation exceeds a derivation limit, or is not a real function of every real z."""


class _OutOfTime(BaseException):
    """Raised by the timer inside sympy; a BaseException, so that no ``except Exception``
    inside sympy or mpmath swallows it."""


def current_limits() -> DerivationLimits:
    """The limits in force: ``limits_set`` if active, else the environment, else defaults."""
    if _OVERRIDE:
        return _OVERRIDE[-1]
    base = DerivationLimits()
    changes: dict[str, Any] = {}
    for f in fields(DerivationLimits):
        text = os.environ.get(_ENV[f.name])
        if text is None or not text.strip():
            continue
        try:
            value = float(text) if f.name == "seconds" else int(text)
        except ValueError:
            raise DerivationLimit(f"{_ENV[f.name]}={text!r} is not a number") from None
        if not value > 0:
            raise DerivationLimit(f"{_ENV[f.name]}={text!r} must be positive")
        changes[f.name] = value
    return replace(base, **changes)


@contextlib.contextmanager
def limits_set(**changes: Any) -> Iterator[DerivationLimits]:
    """Derive under other limits, e.g. ``with limits_set(seconds=5): pbxc.load(...)``."""
    limits = replace(current_limits(), **changes)
    _OVERRIDE.append(limits)
    try:
        yield limits
    finally:
        _OVERRIDE.pop()


# ---------------------------------------------------------------------------- static checks
_NON_SMOOTH = (sympy.Piecewise, sympy.Abs, sympy.sign, sympy.Max, sympy.Min, sympy.Heaviside)


def check_expression(f: sympy.Expr, limits: DerivationLimits) -> None:
    """Refuse, with the reason, an f whose derivation is known to explode or be meaningless."""
    kinks = 0
    for size, node in enumerate(sympy.preorder_traversal(f), start=1):
        if size > limits.max_size:
            raise DerivationLimit(f"its expression has more than {limits.max_size} nodes once "
                                  "the activations it calls are inlined (PBXC_DERIVE_MAX_SIZE)")
        if node in (sympy.zoo, sympy.nan) or node.is_infinite:
            raise DerivationLimit("it divides by zero or is infinite for every z "
                                  f"(it simplifies to a term {node})")
        if isinstance(node, _NON_SMOOTH):
            kinks += len(node.args) - 1 if isinstance(node, sympy.Piecewise) else 1
        if isinstance(node, sympy.Pow) and node.exp.is_number:
            exponent = node.exp
            if not exponent.is_real:
                raise DerivationLimit(f"the power {node} has a non-real exponent")
            if abs(float(exponent)) > limits.max_exponent:
                raise DerivationLimit(f"the power {node} has exponent {exponent}; at most "
                                      f"{limits.max_exponent} in magnitude "
                                      "(PBXC_DERIVE_MAX_EXPONENT)")
    if kinks > limits.max_kinks:
        raise DerivationLimit(f"it has {kinks} branch conditions (abs, sign, max, min, where, "
                              f"heaviside, relu, ...); at most {limits.max_kinks} "
                              "(PBXC_DERIVE_MAX_KINKS): each one doubles the work of folding "
                              "them into pieces")


#: where f is probed for real, finite values before it is derived
PROBE_POINTS = ("0", "1", "-1", "0.5", "-0.5", "2", "-2", "3.7", "-3.7", "10", "-10")


def check_values(f: sympy.Expr, z: sympy.Symbol) -> None:
    """f must be real and finite on the real line: probe it at a few points in mpmath."""
    from pbxc.symbolic import mpeval

    fn = mpeval.mp_function(f, z)
    with mpmath.workdps(30):
        for text in PROBE_POINTS:
            mpeval.SATURATED.clear()
            try:
                value = mpmath.mpmathify(fn(mpmath.mpf(text)))
            except (ZeroDivisionError, ValueError, OverflowError, TypeError) as exc:
                raise DerivationLimit(f"it cannot be evaluated at z = {text} "
                                      f"({type(exc).__name__}{': ' if str(exc) else ''}{exc}); "
                                      "an activation must be defined for every real z") from None
            if mpeval.SATURATED and not mpmath.isfinite(value):
                if abs(float(text)) <= 1:
                    raise DerivationLimit(f"f({text}) overflows every float (an exponential "
                                          f"of more than {mpeval.SATURATE}); an activation must "
                                          "be representable at least on [-1, 1]")
                continue  # it overflows float64 far out, as exp(exp(z)) does: allowed
            if isinstance(value, mpmath.mpc):
                if value.imag != 0:
                    raise DerivationLimit(
                        f"it is not real at z = {text} (f({text}) = "
                        f"{mpmath.nstr(value, 6)}); an activation must be real for every real "
                        "z (sqrt, log and fractional powers of a negative number are complex)")
                value = value.real
            if not isinstance(value, mpmath.mpf) or not mpmath.isfinite(value):
                raise DerivationLimit(f"it is not finite at z = {text} (f({text}) = "
                                      f"{value}); an activation must be finite for every real z")


# ---------------------------------------------------------------------------- the deadline
_STATE = threading.local()


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`DerivationLimit` in the body once it has used ``seconds`` of CPU time.

    In the main thread a profiling timer (SIGPROF, process CPU time) interrupts the body;
    elsewhere (where no signal can be set) a trace function checks the thread's CPU clock at
    every Python call. Nested deadlines leave the outermost in charge.
    """
    if getattr(_STATE, "active", False) or not seconds > 0 or seconds == float("inf"):
        yield
        return
    _STATE.active = True
    use_signal = (threading.current_thread() is threading.main_thread()
                  and hasattr(signal, "setitimer"))
    end = time.thread_time() + seconds
    try:
        if use_signal:
            with _alarm(seconds):
                yield
        else:
            with _traced(end):
                yield
    except _OutOfTime:
        raise DerivationLimit(f"its derivation ran past the budget of {seconds:g} s "
                              "(PBXC_DERIVE_SECONDS)") from None
    finally:
        _STATE.active = False


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    def ring(signum: int, frame: FrameType | None) -> None:
        raise _OutOfTime()

    previous = signal.signal(signal.SIGPROF, ring)
    pending, _ = signal.getitimer(signal.ITIMER_PROF)
    started = time.process_time()
    # it rings again every half second, in case the first lands where Python ignores it (a
    # garbage-collector callback) or sympy catches BaseException
    signal.setitimer(signal.ITIMER_PROF, seconds, 0.5)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)
        if pending > 0:  # someone else's timer was set: give it back what remains of it
            signal.setitimer(signal.ITIMER_PROF,
                             max(pending - (time.process_time() - started), 1e-3))


@contextlib.contextmanager
def _traced(end: float) -> Iterator[None]:
    def trace(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and time.thread_time() > end:
            raise _OutOfTime()

    previous = sys.gettrace()
    sys.settrace(trace)  # a trace that checks the clock at each call and traces no lines
    try:
        yield
    finally:
        sys.settrace(previous)
