"""Symbolic stage: activations as sympy expressions and everything derived from them.

``derive(key, definitions) -> ActivationCalculus`` gives f, f', f'', the kinks and the DFD
multiplier routine of an elementwise activation; ``describe_activation`` reports them;
``softmax`` has the closed-form Jacobians and the DFD rule of softmax and log_softmax.
"""

from pbxc.symbolic.calculus import CONVENTIONS, DEFAULT_CONVENTION, Branch, Kink, PieceCalculus
from pbxc.symbolic.derive import AccuracyWarning, ActivationCalculus, derive, resolve_key
from pbxc.symbolic.describe import describe_activation
from pbxc.symbolic.routine import PrecisionConstant, Routine

__all__ = [
    "CONVENTIONS",
    "DEFAULT_CONVENTION",
    "AccuracyWarning",
    "ActivationCalculus",
    "Branch",
    "Kink",
    "PieceCalculus",
    "PrecisionConstant",
    "Routine",
    "derive",
    "describe_activation",
    "resolve_key",
]
