"""The accuracy bar, per floating-point type, and the error budgets derived from it.

``BAR`` is the bar the multipliers must meet (issue 3): the relative error
``|m - m_ref| / (|m_ref| + 1e-8 * s_f)`` of every multiplier on the accuracy grid. A branch of a
multiplier routine is chosen where its own error bound stays below ``BUDGET`` (a quarter of the
bar), so that the few roundings around it (subtraction, division, selection) still fit.
"""

from __future__ import annotations

import numpy as np

DTYPES = (np.dtype(np.float64), np.dtype(np.float32))

#: the accuracy bar of the multipliers and of f' (relative, with the floor of ``FLOOR``)
BAR = {np.dtype(np.float64): 1e-14, np.dtype(np.float32): 1e-6}
#: values this far below the function's own slope scale s_f are judged on absolute error
FLOOR = 1e-8
#: the error one branch of a routine may spend
BUDGET = {dt: bar / 4 for dt, bar in BAR.items()}
#: unit roundoff u = eps / 2 (2**-53, 2**-24)
UNIT = {dt: float(np.finfo(dt).eps) / 2 for dt in DTYPES}

