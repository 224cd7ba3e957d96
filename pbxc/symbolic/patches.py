"""Taylor patches: the multiplier near a critical point, where the difference form cancels.

Near a point r where g'(r) = 0, the multiplier m(z0, z) is small while the terms of its
divided-difference form (``difference.py``) are not: silu's [z s(z)] = s(z) + z0 [s] adds two
numbers of opposite sign. There pbxc uses the Taylor series of g about a centre c near r
(c representable in float32, so one float holds it exactly in both precisions):

    g(c + u) = g(c) + sum_k a_k u^k      =>      m(z0, z) = sum_k a_k h_(k-1)(u0, u)

with u0 = z0 - c, u = z - c and h_k(u0, u) = (u^(k+1) - u0^(k+1)) / (u - u0) the complete
symmetric polynomials, which satisfy h_k = s h_(k-1) - p h_(k-2) (s = u0 + u, p = u0 u). The
sum is evaluated by Clenshaw's backward recurrence y_k = a_k + s y_(k+1) - p y_(k+2), m = y_1,
in double-word arithmetic (``SeriesPatch``): the pairs in the patch include those close to the
level set f(z) = f(z0), where m is small and its terms cancel, and there working precision
alone would lose the relative accuracy. At z = z0 the same sum is g'(z). The coefficients
a_k = g^(k)(c) / k! come from Cauchy's integral in mpmath (40 digits); a_1 = g'(c) is tiny but
kept, so m(c, c) is exact.

Where: the patch covers at least the region in which the condition number of the difference
form at z0 = z, (sum |terms|) / |sum of terms|, exceeds ``condition_limit`` (its error would
break the float32 bar), and reaches out to ``REACH`` (or half the radius of convergence of the
series) to contain the valley of f, where pairs with z - z0 of order 1 straddle the critical
point. Degree: the first n at which the tail bound sum_(k>n) |a_k| k rho^(k-1) (|h_(k-1)| <=
k rho^(k-1) on the square) is below ``TAIL`` times the largest term there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mpmath
import numpy as np
import sympy

from pbxc.symbolic.activations import Z
from pbxc.symbolic.evaluate import evaluate
from pbxc.symbolic.functions import SeriesPatch
from pbxc.symbolic.mpeval import mp_function

#: critical points are searched on [-WINDOW, WINDOW]
WINDOW = 40.0
#: the patch radius reaches out this far (at most half the radius of convergence)
REACH = 1.5
#: the truncated tail of the series, relative to its largest term on the square: far below
#: the double-word rounding, even where the terms cancel a hundred-thousand-fold
TAIL = 1e-21
#: at most this many Taylor terms; the radius shrinks when more would be needed
MAX_TERMS = 96


@dataclass(frozen=True)
class Patch:
    """m(z0, z) = sum_k a_k h_(k-1)(z0 - c, z - c) for |z0 - c|, |z - c| <= radius."""

    center: float
    radius: float
    coefficients: tuple[float, ...]  # a_1 .. a_n, rounded (for reports)
    critical_point: float            # where g' = 0 (or |g'| is least), to 17 digits
    node: SeriesPatch                # the double-word evaluation, with hi/lo coefficients
    #: f'(z) = m(z, z) needs the series only where the derivative's own condition number
    #: exceeds the limit (the region found on the grid, one grid step wider); the square
    #: reaches further for the multiplier's pairs that straddle the valley. On a batch of
    #: typical pre-activations that is a few percent of the entries instead of a third.
    core_radius: float = 0.0

    @property
    def degree(self) -> int:
        return len(self.coefficients)


def _exact(x: float) -> sympy.Float:
    return sympy.Float(x, 17)  # 17 digits hold any double exactly


def _series_node(coeffs: Sequence[Any], centre: float, radius: float) -> SeriesPatch:
    parts: dict[str, list[float]] = {"hi64": [], "lo64": [], "hi32": [], "lo32": []}
    with mpmath.workdps(40):
        for a in coeffs:
            hi64 = float(a)
            hi32 = float(np.float32(hi64))
            parts["hi64"].append(hi64)
            parts["lo64"].append(float(a - mpmath.mpf(hi64)))
            parts["hi32"].append(hi32)
            parts["lo32"].append(float(np.float32(float(a - mpmath.mpf(hi32)))))
    z0 = sympy.Symbol("z0", real=True)
    z = sympy.Symbol("z", real=True)
    return SeriesPatch(z0, z, _exact(centre), _exact(radius),
                       *(sympy.Tuple(*[_exact(x) for x in parts[k]])
                         for k in ("hi64", "lo64", "hi32", "lo32")))


def patch_value(patch: Patch, z0: sympy.Expr, z: sympy.Expr, core: bool = False
                ) -> tuple[sympy.Expr, sympy.Boolean]:
    """(value, condition) of ``patch`` at (z0, z); with ``core`` on the derivative's core
    square (``Patch.core_radius``) instead of the whole one."""
    node = patch.node
    c, radius = node.args[2], node.args[3]
    if core and 0 < patch.core_radius < patch.radius:
        radius = _exact(patch.core_radius)
    value = node.func(z0, z, c, radius, *node.args[4:])
    inside = sympy.And(sympy.Abs(z0 - c) <= radius, sympy.Abs(z - c) <= radius)
    return value, inside


def _components(mask: np.ndarray) -> list[tuple[int, int]]:
    out = []
    start = None
    for i, flag in enumerate(mask):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            out.append((start, i - 1))
            start = None
    if start is not None:
        out.append((start, len(mask) - 1))
    return out


def find_patches(g: sympy.Expr, terms: Sequence[sympy.Expr], lower: float, upper: float,
                 condition_limit: float, slope_scale: float) -> tuple[list[Patch], list[str]]:
    """Patches for the smooth piece ``g`` on (lower, upper), given the derivative's terms.

    Returns the patches and notes on regions that could not be patched.
    """
    lo, hi = max(lower, -WINDOW), min(upper, WINDOW)
    if not terms or hi <= lo:
        return [], []
    grid = np.linspace(lo, hi, round((hi - lo) / 0.005) + 1)[1:-1]
    values = np.array([evaluate(t, {Z: grid}) for t in terms])
    total = values.sum(axis=0)
    with np.errstate(all="ignore"):
        cond = np.abs(values).sum(axis=0) / np.abs(total)
    cond = np.where(np.isnan(cond), 1.0, cond)
    patches: list[Patch] = []
    notes: list[str] = []
    for i, j in _components(cond > condition_limit):
        if (i == 0 and lo == -WINDOW) or (j == len(grid) - 1 and hi == WINDOW):
            continue  # a trend towards infinity, not a critical point: nothing to centre on
        peak = i + int(np.argmax(cond[i:j + 1]))
        r = _refine_root(g, float(grid[peak]), float(grid[1] - grid[0]))
        centre = float(np.float32(r))
        step = float(grid[1] - grid[0])
        half_width = max(abs(grid[i] - r), abs(grid[j] - r), step)
        patch = _build(g, centre, r, half_width)
        if patch is None:
            notes.append(f"cancellation near z = {r:.6g} over a region too wide to patch")
            continue
        # the region's true ends lie within a grid step beyond its last grid points, and
        # the centre is r rounded to float32
        core = half_width + step + abs(centre - r)
        patches.append(dataclasses.replace(patch, core_radius=float(np.float32(core))))
    return patches, notes


def _refine_root(g: sympy.Expr, guess: float, step: float) -> float:
    dg = mp_function(sympy.diff(g, Z))
    with mpmath.workdps(40):
        try:
            root = mpmath.findroot(dg, (mpmath.mpf(guess) - step, mpmath.mpf(guess) + step),
                                   solver="anderson")
            if abs(root - guess) <= 4 * step:
                return float(root)
        except (ValueError, ZeroDivisionError):
            pass
    return guess


def taylor_coefficients(fn: Callable[[Any], Any], centre: float, count: int,
                        radius: float) -> list[mpmath.mpf]:
    """a_0 .. a_(count-1) of fn about ``centre`` by Cauchy's integral on a circle.

    a_k = (1 / (N r^k)) sum_j f(c + r w^j) w^(-jk), w = exp(2 pi i / N), by a radix-2 FFT in
    mpmath: exact up to the aliased terms a_(k+N) r^N, negligible for N >= 2 * count and r
    inside the disc of convergence. fn must accept complex mpmath numbers.
    """
    n = 1
    while n < 2 * count + 16:
        n *= 2
    with mpmath.workdps(40):
        c, r = mpmath.mpf(centre), mpmath.mpf(radius)
        roots = [mpmath.expjpi(mpmath.mpf(2 * j) / n) for j in range(n)]
        samples = [fn(c + r * w) for w in roots]
        spectrum = _fft([mpmath.conj(x) for x in samples], roots)  # sum_j f_j w^(-jk)
        return [mpmath.re(mpmath.conj(spectrum[k])) / (n * r**k) for k in range(count)]


def _fft(values: list[Any], roots: list[Any]) -> list[Any]:
    """sum_j values[j] w^(jk) for k < n (n a power of two, roots[j] = w^j)."""
    n = len(values)
    if n == 1:
        return list(values)
    step = len(roots) // n
    even = _fft(values[0::2], roots)
    odd = _fft(values[1::2], roots)
    out = [mpmath.mpc(0)] * n
    for k in range(n // 2):
        t = roots[(k * step) % len(roots)] * odd[k]
        out[k] = even[k] + t
        out[k + n // 2] = even[k] - t
    return out


def _build(g: sympy.Expr, centre: float, root: float, least: float) -> Patch | None:
    fn = mp_function(g)
    count = MAX_TERMS + 16
    contour = 1.0
    for _ in range(12):
        coeffs = taylor_coefficients(fn, centre, count, contour)
        a = [abs(x) for x in coeffs[1:]]
        # radius of convergence from the root test on the coefficients of middle order; a
        # contour that encloses a singularity gives coefficients growing like contour**-k
        middle = [(k, x) for k, x in enumerate(a[count // 4: count // 2], count // 4 + 1) if x > 0]
        convergence = min((float(x) ** (-1.0 / k) for k, x in middle), default=float("inf"))
        if contour <= 0.6 * convergence and _agrees(fn, coeffs, centre, 0.9 * contour):
            break
        contour *= 0.6
    else:
        return None
    rho = max(least, min(0.5 * convergence, REACH, 0.9 * contour))
    while rho >= least:
        largest = max(float(a[k - 1]) * k * rho ** (k - 1) for k in range(1, len(a) + 1))
        for n in range(2, MAX_TERMS + 1):
            tail = sum(float(a[k - 1]) * k * rho ** (k - 1) for k in range(n + 1, len(a) + 1))
            if tail <= TAIL * largest:
                kept = coeffs[1:n + 1]
                if not _agrees(fn, coeffs[:n + 1], centre, rho):
                    break
                return Patch(centre, float(rho), tuple(float(x) for x in kept), root,
                             _series_node(kept, centre, float(rho)))
        rho *= 0.8
    return None


def _agrees(fn: Callable[[Any], Any], coeffs: Sequence[Any], centre: float, rho: float) -> bool:
    """The series matches f at the ends of the square, in value differences and slope."""
    with mpmath.workdps(40):
        c = mpmath.mpf(centre)
        for u0, u in ((-rho, rho), (-rho, rho / 3), (rho / 2, rho), (-rho, -rho / 2)):
            u0m, um = mpmath.mpf(u0), mpmath.mpf(u)
            exact = (fn(c + um) - fn(c + u0m)) / (um - u0m)
            series = mpmath.fsum(a * (um**k - u0m**k) for k, a in enumerate(coeffs)) / (um - u0m)
            scale = mpmath.fsum(abs(a) * k * mpmath.mpf(rho) ** (k - 1)
                                for k, a in enumerate(coeffs) if k)
            if abs(series - exact) > mpmath.mpf(10) ** -20 * scale:
                return False
    return True
