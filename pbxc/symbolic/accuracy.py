"""Measured accuracy of multipliers and derivatives against 50-digit mpmath references.

The grid (issue 3): z0 on [-30, 30] (``z0_grid``: steps of ``step``, exact multiples), and for
each z0 the pairs z = fl(z0 + delta) with delta = +-10^k, k = -300 .. 2, and z = z0 itself. The
reference uses the exact delta z - z0 of the two floats. The error of a value m is

    err = |m - m_ref| / (|m_ref| + 1e-8 * s_f),    s_f = max |f'| over [-30, 30],

so only values eight orders of magnitude below the function's own slope scale are judged on
absolute error. Pairs where f(z), f(z0) or m_ref overflow the floating-point type are left out
of the measure and counted (``excluded``): exp at z0 = 30, delta = 100 is e^130, beyond float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mpmath
import numpy as np
import sympy

from pbxc.symbolic.activations import Z
from pbxc.symbolic.mpeval import mp_function
from pbxc.symbolic.precision import BAR, FLOOR

#: exponents k of the grid's increments delta = +-10^k
EXPONENTS = range(-300, 3)
#: decimal digits of the references
DIGITS = 50


def z0_grid(step: float = 0.1, half_width: float = 30.0) -> np.ndarray:
    """z0 values i * step on [-half_width, half_width] (0 included exactly)."""
    n = round(half_width / step)
    return np.arange(-n, n + 1) * step if step >= 1 else np.arange(-n, n + 1) / round(1 / step)


def grid_pairs(dtype: Any, z0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All distinct (z0, z) pairs of the grid in ``dtype``, z = fl(z0 + delta) or z0."""
    dt = np.dtype(dtype)
    base = z0.astype(dt)
    deltas = np.array([0.0] + [s * 10.0**k for k in EXPONENTS for s in (1.0, -1.0)])
    with np.errstate(over="ignore"):
        zs = (base.astype(np.float64)[:, None] + deltas[None, :]).astype(dt)
    z0s = np.broadcast_to(base[:, None], zs.shape)
    pairs = np.unique(np.stack([z0s.ravel(), zs.ravel()]), axis=1)
    return pairs[0].copy(), pairs[1].copy()


@dataclass(frozen=True)
class Measure:
    """The largest error over a set of pairs, where it occurs, and what was left out."""

    dtype: str
    max_error: float
    worst: tuple[float, float] | None  # (z0, z) of the largest error
    pairs: int
    excluded: int

    @property
    def bar(self) -> float:
        return BAR[np.dtype(self.dtype)]

    @property
    def passed(self) -> bool:
        return self.max_error <= self.bar


class Reference:
    """High-precision f, f' and m of one activation (with its kink convention)."""

    def __init__(self, f: sympy.Expr, kink_slopes: dict[float, sympy.Expr] | None = None
                 ) -> None:
        self.f = mp_function(f)
        self.df = mp_function(sympy.diff(f, Z))
        self.kink_slopes = dict(kink_slopes or {})
        self._values: dict[tuple[float, int], Any] = {}

    def value(self, x: float, dps: int) -> Any:
        key = (x, dps)
        hit = self._values.get(key)
        if hit is None:
            with mpmath.workdps(dps):
                hit = self.f(mpmath.mpf(x))
            self._values[key] = hit
        return hit

    def slope(self, x: float) -> Any:
        if x in self.kink_slopes:
            with mpmath.workdps(DIGITS):
                return mpmath.mpf(sympy.N(self.kink_slopes[x], DIGITS))
        with mpmath.workdps(DIGITS):
            return self.df(mpmath.mpf(x))

    def multiplier(self, z0: float, z: float) -> Any:
        if z == z0:
            return self.slope(z0)
        delta = mpmath.mpf(z) - mpmath.mpf(z0)  # exact: mpf holds any double
        scale = max(abs(z0), abs(z), 1.0)
        dps = DIGITS + 10 + max(0, math.ceil(math.log10(scale / abs(float(delta)))))
        with mpmath.workdps(dps):
            return (self.value(z, dps) - self.value(z0, dps)) / delta


def relative_errors(values: np.ndarray, refs: list[Any], slope_scale: float, limit: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair errors, and which pairs are excluded (the reference overflows the type)."""
    floor = FLOOR * slope_scale
    err = np.zeros(len(refs))
    excluded = np.zeros(len(refs), dtype=bool)
    for i, (v, r) in enumerate(zip(values, refs)):
        if not mpmath.isfinite(r) or abs(r) > limit:
            excluded[i] = True
            continue
        v = float(v)
        if not math.isfinite(v):
            err[i] = math.inf
            continue
        err[i] = float(abs(mpmath.mpf(v) - r) / (abs(r) + floor))
    return err, excluded


def reference_values(ref: Reference, a: np.ndarray, b: np.ndarray,
                     keep: np.ndarray | None = None) -> list[Any]:
    """m_ref for each pair (a[i], b[i]); infinity (excluded) where ``keep`` is False."""
    if keep is None:
        keep = np.ones(a.shape, dtype=bool)
    return [ref.multiplier(float(x), float(y)) if k else mpmath.mpf("inf")
            for x, y, k in zip(a, b, keep)]


def measure_multiplier(compute: Callable[[np.ndarray, np.ndarray], np.ndarray], ref: Reference,
                       slope_scale: float, dtype: Any, z0: np.ndarray,
                       value: Callable[[np.ndarray], np.ndarray] | None = None) -> Measure:
    """The error of ``compute(z0, z)`` (arrays of ``dtype``) over the grid pairs of ``z0``.

    ``value``, when given, evaluates f in ``dtype``: pairs where f(z) or f(z0) overflow are
    excluded too (nothing can be said about m there in that type).
    """
    dt = np.dtype(dtype)
    a, b = grid_pairs(dt, z0)
    limit = float(np.finfo(dt).max)
    keep = np.ones(a.shape, dtype=bool)
    if value is not None:
        with np.errstate(all="ignore"):
            keep = np.isfinite(value(a)) & np.isfinite(value(b))
    computed = compute(a, b)
    refs = reference_values(ref, a, b, keep)
    err, excluded = relative_errors(computed, refs, slope_scale, limit)
    worst = int(np.argmax(err)) if err.size else None
    return Measure(dt.name, float(err.max()) if err.size else 0.0,
                   (float(a[worst]), float(b[worst])) if worst is not None else None,
                   int((~excluded).sum()), int(excluded.sum()))


def measure_derivative(compute: Callable[[np.ndarray], np.ndarray], ref: Reference,
                       slope_scale: float, dtype: Any, z: np.ndarray,
                       kinks: tuple[float, ...] = ()) -> Measure:
    """The error of f'(z) on the points ``z`` away from kinks (one grid step from each)."""
    dt = np.dtype(dtype)
    pts = np.unique(z.astype(dt))
    if kinks and len(pts) > 1:
        step = float(np.min(np.diff(pts)))
        far = np.all([np.abs(pts - k) > 0.5 * step for k in kinks], axis=0)
        pts = pts[far]
    computed = compute(pts)
    refs = [ref.slope(float(x)) for x in pts]
    err, excluded = relative_errors(computed, refs, slope_scale, float(np.finfo(dt).max))
    worst = int(np.argmax(err)) if err.size else None
    return Measure(dt.name, float(err.max()) if err.size else 0.0,
                   (float(pts[worst]), float(pts[worst])) if worst is not None else None,
                   int((~excluded).sum()), int(excluded.sum()))
