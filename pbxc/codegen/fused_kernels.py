"""Fused elementwise kernels for LRP and DFD, through numexpr (the optional ``fast`` extra).

NumPy runs one pass over memory per operation: LRP's epsilon step (stabilise z, divide,
the stabiliser's share R - s z) is six passes and four temporaries per layer, DFD's secant
multiplier about ten. numexpr evaluates each expression in one blocked pass. The plain NumPy
kernels (``pbxc.codegen.numpy_kernels``, ``pbxc.runtime.model.ActivationTable``) stay the
reference semantics; these evaluate the same IEEE operations in the same order on the same
dtype (constants enter as 0-d arrays of the arrays' dtype, so float32 stays float32), and
the tests check that they agree bit for bit.

Opt-in, ``PBXC_FUSED=1``: measured on the 2-core development machine (numexpr 2.14, NumPy
2, 8x64x56x56 float32), NumPy's SIMD loops beat numexpr's blocked interpreter, 2.8 ms
against 25 ms for the whole epsilon step (1.6 ms against 30 ms for the quotient alone;
float64 17.6 against 23 ms), so the default is the plain path. numexpr's threads may pay
on machines with many cores and little memory bandwidth per core; measure there first
(``bench/passes.py`` with and without ``PBXC_FUSED=1``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

FUSED_ENV = "PBXC_FUSED"


class NumexprKernels:
    """The fused kernels; ``ne`` is the numexpr module."""

    def __init__(self, ne: Any) -> None:
        self.ne = ne

    def quotient(self, relevance: np.ndarray, z: np.ndarray, epsilon: float) -> np.ndarray:
        """s = R / (z + eps sign(z)), sign(0) = +1: ``lrp_divide(R, lrp_stabilise(z))`` for
        the sign placement with eps > 0 in z's dtype (z + eps and z - eps, each rounded
        once, exactly as the reference's (z >= 0) * 2 eps - eps + z)."""
        eps = np.asarray(epsilon, dtype=z.dtype)
        return self.ne.evaluate("R / where(z >= 0, z + eps, z - eps)",
                                local_dict={"R": relevance, "z": z, "eps": eps})

    def residual(self, relevance: np.ndarray, s: np.ndarray, z: np.ndarray) -> np.ndarray:
        """R - s z, what the stabiliser absorbed, per element."""
        return self.ne.evaluate("R - s * z", local_dict={"R": relevance, "s": s, "z": z})

    def secant(self, z0: np.ndarray, z: np.ndarray, f0: np.ndarray, f1: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
        """DFD's secant (f1 - f0) / (z - z0) and where it may not be trusted (the entries
        ``ActivationTable.multiplier`` hands to the full routine): the same tests as the
        reference, |df| < (|f1| + |f0|) / 4, |df| or |dz| <= tiny / eps, non-finite."""
        dtype = z.dtype
        info = np.finfo(dtype)
        consts = {"quarter": np.asarray(0.25, dtype), "big": np.asarray(info.max, dtype),
                  "lowest": np.asarray(info.tiny / info.eps, dtype)}
        arrays = {"z0": z0, "z": z, "f0": f0, "f1": f1, **consts}
        out = self.ne.evaluate("(f1 - f0) / (z - z0)", local_dict=arrays)
        rest = self.ne.evaluate(
            "(abs(f1 - f0) < (abs(f1) + abs(f0)) * quarter) | (abs(f1 - f0) <= lowest)"
            " | (abs(z - z0) <= lowest) | ~(abs(out) <= big)",
            local_dict={**arrays, "out": out})
        return out, rest


def available() -> NumexprKernels | None:
    """The fused kernels when ``PBXC_FUSED=1`` and numexpr imports, else None."""
    if os.environ.get(FUSED_ENV, "0") != "1":
        return None
    try:
        import numexpr
    except ImportError:
        return None
    return NumexprKernels(numexpr)
