"""LRP rules and composites: each rule is a few lines on one engine (as Zennit's ``BasicHook``).

A rule is a tuple of *groups*; a group is a coefficient and a tuple of *terms*; a term is an
input modifier, a parameter modifier rho (applied to the weight, and to the bias unless the
term drops it) and a sign. For a layer z = W a + b, with relevance R_k at its output, the
engine (``pbxc.runtime.lrp``) computes, per group g, in four steps (Montavon et al. 2019):

    z_gk = sum_t sign_t [ rho_t(W) in_t(a) + rho_t(b) ]_k     (forward)
    s_gk = R_k / stab(z_gk)                                     (element-wise division)
    c_tj = [ rho_t(W)^T s_g ]_j                                 (backward, the VJP kernels)
    R_j  = sum_g coef_g sum_t sign_t in_t(a)_j c_tj             (element-wise product)

which is the generic rule of the slides, R_j = sum_k a_j rho(w_jk) / (eps + sum_j a_j rho(w_jk))
R_k, for one group of one term. Parameters are validated when a rule is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pbxc.codegen import numpy_kernels as K
from pbxc.errors import PbxError
from pbxc.ops import (
    CONVOLUTIONS,
    LRP_COMPOSITES,
    LRP_RULE_KINDS,
    LRP_RULES,
    UNWEIGHTED_LINEAR,
    OpKind,
)

Array = np.ndarray
Modifier = tuple[str, Any]  # (name, parameter): see numpy_kernels.lrp_modify

PLACEMENTS = ("sign", "slides")
DEFAULT_PLACEMENT = "sign"


class LrpConfigError(PbxError, ValueError):
    """A rule's parameters, a composite's name or an override does not make sense."""


# Modifiers are data, (name, parameter), applied by numpy_kernels.lrp_modify, so that a rule
# can be printed into generated code as well as run here.
SAME: Modifier = ("same", None)
POS: Modifier = ("pos", None)
NEG: Modifier = ("neg", None)
ONES: Modifier = ("ones", None)
SQUARE: Modifier = ("square", None)


@dataclass(frozen=True)
class Term:
    """One forward pass of the engine: z_t = sign * (rho(W) in(a) + rho(b)); bias=None drops b."""

    input: Modifier
    weight: Modifier
    bias: Modifier | None
    sign: float = 1.0

    def as_data(self) -> tuple[float, Modifier, Modifier, Modifier | None]:
        return (self.sign, self.input, self.weight, self.bias)


@dataclass(frozen=True)
class Group:
    """Terms sharing one stabilised denominator; the group's relevance is scaled by coef."""

    coef: float
    terms: tuple[Term, ...]

    def as_data(self) -> tuple[float, tuple[tuple[float, Modifier, Modifier, Modifier | None],
                                            ...]]:
        return (self.coef, tuple(t.as_data() for t in self.terms))


def _check_epsilon(epsilon: float, placement: str) -> None:
    if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon >= 0):
        raise LrpConfigError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    if placement not in PLACEMENTS:
        raise LrpConfigError(f"epsilon placement must be one of {PLACEMENTS}, got {placement!r}")


@dataclass(frozen=True)
class Rule:
    """Base of every rule: the stabiliser and the groups the engine runs.

    Stabiliser: ``placement="sign"`` gives z + eps * sign(z) with sign(0) = +1 (Zennit,
    Captum); ``placement="slides"`` gives z + eps. A zero denominator (eps = 0) yields s = 0:
    that relevance is recorded as absorbed by the stabiliser.
    """

    epsilon: float = 1e-6
    placement: str = DEFAULT_PLACEMENT
    name = "rule"

    def __post_init__(self) -> None:
        _check_epsilon(self.epsilon, self.placement)

    def groups(self) -> tuple[Group, ...]:
        raise NotImplementedError

    def stabilise(self, z: Array) -> Array:
        return K.lrp_stabilise(z, self.epsilon, self.placement)

    def groups_data(self) -> tuple[Any, ...]:
        """The groups as plain data for ``numpy_kernels.lrp_rule_step``."""
        return tuple(g.as_data() for g in self.groups())

    def describe(self) -> str:
        return f"{self.name}(epsilon={self.epsilon:g}, placement={self.placement})"


@dataclass(frozen=True)
class Epsilon(Rule):
    """LRP-epsilon: R_j = sum_k a_j w_jk / (eps + sum_j a_j w_jk + b_k) R_k (whole bias in z)."""

    epsilon: float = 1e-6
    name = "epsilon"

    def groups(self) -> tuple[Group, ...]:
        return (Group(1.0, (Term(SAME, SAME, SAME),)),)


@dataclass(frozen=True)
class LRP0(Epsilon):
    """LRP-0: R_j = sum_k a_j w_jk / (sum_j a_j w_jk + b_k) R_k; equals input x gradient
    on ReLU nets without bias. Epsilon with eps = 0 (a zero z_k passes no relevance)."""

    epsilon: float = 0.0
    name = "lrp0"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epsilon != 0:
            raise LrpConfigError("LRP0 has epsilon = 0; use Epsilon(epsilon) for eps > 0")

    def describe(self) -> str:
        return "lrp0"


@dataclass(frozen=True)
class Norm(Epsilon):
    """Parameter-free linear maps (sum pooling, residual add): R_i = a_i / stab(sum a) R, as
    Zennit's ``Norm``; the epsilon rule with unit weights."""

    name = "norm"


@dataclass(frozen=True)
class Gamma(Rule):
    """LRP-gamma (slides): rho(w) = w + gamma w+, rho(b) = b + gamma b+,
    R_j = sum_k a_j (w_jk + gamma w_jk^+) / (eps + sum_j a_j (w_jk + gamma w_jk^+) + rho(b_k)) R_k.
    For a >= 0 and z_k > 0 this is Zennit 0.5's generalised Gamma; Zennit differs for z_k < 0."""

    gamma: float = 0.25
    name = "gamma"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise LrpConfigError(f"gamma must be a finite number >= 0, got {self.gamma!r}")

    def groups(self) -> tuple[Group, ...]:
        rho: Modifier = ("gamma", self.gamma)
        return (Group(1.0, (Term(SAME, rho, rho),)),)

    def describe(self) -> str:
        return f"gamma(gamma={self.gamma:g}, epsilon={self.epsilon:g})"


@dataclass(frozen=True)
class ZPlus(Rule):
    """z+ (slides): R_j = sum_k (a_j^+ w_jk^+ + a_j^- w_jk^-) / (sum_j (...) + max(0, b_k)) R_k.
    Only b+ enters the denominator; for a >= 0 the a^- term vanishes."""

    name = "zplus"

    def groups(self) -> tuple[Group, ...]:
        return (Group(1.0, (Term(POS, POS, POS), Term(NEG, NEG, None))),)


@dataclass(frozen=True)
class AlphaBeta(Rule):
    """LRP-alpha-beta: R_j = sum_k (alpha z+_jk / z+_k - beta z-_jk / z-_k) R_k with
    z+_jk = a_j^+ w_jk^+ + a_j^- w_jk^- (z+_k adds b_k^+), z-_jk = a_j^+ w_jk^- + a_j^- w_jk^+
    (z-_k adds b_k^-). Conserves only when alpha - beta = 1, which is checked."""

    alpha: float = 2.0
    beta: float = 1.0
    name = "alphabeta"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.alpha >= 0 and self.beta >= 0):
            raise LrpConfigError(f"AlphaBeta needs alpha >= 0 and beta >= 0, got "
                                 f"alpha={self.alpha!r}, beta={self.beta!r}")
        if abs(self.alpha - self.beta - 1.0) > 1e-12:
            raise LrpConfigError(f"AlphaBeta needs alpha - beta = 1 to conserve relevance, got "
                                 f"alpha={self.alpha!r}, beta={self.beta!r} "
                                 f"(alpha - beta = {self.alpha - self.beta!r})")

    def groups(self) -> tuple[Group, ...]:
        plus = (Term(POS, POS, POS), Term(NEG, NEG, None))
        minus = (Term(POS, NEG, NEG), Term(NEG, POS, None))
        return (Group(self.alpha, plus), Group(-self.beta, minus))

    def describe(self) -> str:
        return f"alphabeta(alpha={self.alpha:g}, beta={self.beta:g})"


@dataclass(frozen=True)
class WSquare(Rule):
    """w^2 (slides): R_i = sum_j w_ij^2 / (sum_i w_ij^2) R_j; inputs and biases are ignored."""

    name = "wsquare"

    def groups(self) -> tuple[Group, ...]:
        return (Group(1.0, (Term(ONES, SQUARE, None),)),)


@dataclass(frozen=True)
class Flat(Rule):
    """Flat: R_i = sum_j 1 / (sum_i 1) R_j over each output's receptive field; biases ignored."""

    name = "flat"

    def groups(self) -> tuple[Group, ...]:
        return (Group(1.0, (Term(ONES, ONES, None),)),)


@dataclass(frozen=True)
class ZBox(Rule):
    """z^B for a bounded input l <= x <= h (Montavon et al. 2017):
    R_j = sum_k (x_j w_jk - l_j w_jk^+ - h_j w_jk^-) / sum_j (x_j w_jk - l_j w_jk^+ - h_j w_jk^-) R_k.
    The bias enters all three terms and cancels. ``low``/``high``: numbers or arrays that
    broadcast against the layer's per-sample input."""

    low: float | Array = 0.0
    high: float | Array = 1.0
    name = "zbox"

    def __post_init__(self) -> None:
        super().__post_init__()
        low, high = np.asarray(self.low, dtype=float), np.asarray(self.high, dtype=float)
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise LrpConfigError("ZBox bounds must be finite")
        try:
            bad = np.any(low > high)
        except ValueError:
            raise LrpConfigError(f"ZBox bounds do not broadcast: low {low.shape}, "
                                 f"high {high.shape}") from None
        if bad:
            raise LrpConfigError("ZBox needs low <= high everywhere")

    def groups(self) -> tuple[Group, ...]:
        lo: Modifier = ("const", self.low)
        hi: Modifier = ("const", self.high)
        return (Group(1.0, (Term(SAME, SAME, SAME), Term(lo, POS, POS, -1.0),
                            Term(hi, NEG, NEG, -1.0))),)

    def describe(self) -> str:
        return "zbox"


# ---------------------------------------------------------------- composites

#: Ops the engine runs a rule on; the other ops route relevance (see ``pbxc.runtime.lrp``).
WEIGHTED_KINDS = frozenset({OpKind.LINEAR}) | CONVOLUTIONS
# every convolution, transposed ones included, as Zennit's ``types.Convolution`` (its
# composites give ConvTranspose*d the same rule as Conv*d, applied through modified weights)
CONV_KINDS = CONVOLUTIONS
NORM_KINDS = UNWEIGHTED_LINEAR | frozenset({OpKind.ADD, OpKind.SUB})
# per-element affine maps whose weights come from the model (mul and div by a constant)
AFFINE_KINDS = frozenset({OpKind.BATCHNORM, OpKind.NORMALIZE, OpKind.MUL, OpKind.DIV,
                          OpKind.LAYERNORM})   # issue 12 (norm): AttnLRP identity rule
RULE_KINDS = WEIGHTED_KINDS | NORM_KINDS | AFFINE_KINDS
assert RULE_KINDS == LRP_RULE_KINDS


@dataclass(frozen=True)
class Composite:
    """Rules by op kind; ``first`` (if set) replaces the rule of the first weighted layer in
    topological order (the layer reading the data, as Zennit's SpecialFirstLayerMapComposite)."""

    name: str
    rules: Mapping[OpKind, Rule]
    first: Rule | None = None
    default: Rule = field(default_factory=Norm)
    #: how a product of two values (matmul, mul) shares relevance: "" keeps each op's own
    #: rule (matmul uniform, mul its ``lrp=`` attribute); "uniform" is AttnLRP's uniform
    #: epsilon rule for both; "cp" treats an operand computed by a softmax (attention
    #: weights) as a constant (CP-LRP) and shares the rest uniformly
    products: str = ""
    #: the stabiliser of the rules that are not a Rule on the engine: matmul of two values
    #: (AttnLRP's uniform epsilon rule, CP-LRP's constant rules) and mean/sum over axes; the
    #: composite's ``epsilon`` parameter (LXT's default for matmul and mean is 1e-6, which is
    #: pbxc's default too) and its placement (``"sign"``: z + eps sign(z); ``"slides"``:
    #: z + eps, as LXT's ``_stabilize``)
    epsilon: float = 1e-6
    placement: str = DEFAULT_PLACEMENT

    def __post_init__(self) -> None:
        _check_epsilon(self.epsilon, self.placement)

    def rule_for(self, kind: OpKind, is_first: bool) -> Rule:
        if is_first and self.first is not None:
            return self.first
        return self.rules.get(kind, self.default)


def _kinds(rules: Mapping[frozenset[OpKind], Rule]) -> dict[OpKind, Rule]:
    return {k: r for kinds, r in rules.items() for k in kinds}


def epsilon_composite(epsilon: float = 1e-6) -> Composite:
    """Epsilon on every weighted and affine layer; Norm on pooling and add."""
    return Composite("epsilon", _kinds({WEIGHTED_KINDS | AFFINE_KINDS: Epsilon(epsilon)}),
                     epsilon=epsilon)


def lrp0_composite() -> Composite:
    """LRP-0 everywhere, pooling and add included."""
    return Composite("lrp0", _kinds({RULE_KINDS: LRP0()}), default=LRP0(), epsilon=0.0)


def epsilon_plus_composite(epsilon: float = 1e-6) -> Composite:
    """z+ on convolutions, epsilon on dense and affine layers (Zennit's EpsilonPlus)."""
    return Composite("epsilon-plus", _kinds({CONV_KINDS: ZPlus(),
                                             AFFINE_KINDS | {OpKind.LINEAR}: Epsilon(epsilon)}),
                     epsilon=epsilon)


def epsilon_gamma_box_composite(low: float | Array = 0.0, high: float | Array = 1.0,
                                gamma: float = 0.25, epsilon: float = 1e-6) -> Composite:
    """ZBox(low, high) on the first weighted layer, gamma on convolutions, epsilon on dense
    and affine layers (Zennit's EpsilonGammaBox). Bounds are in the first weighted layer's
    input space."""
    return Composite("epsilon-gamma-box",
                     _kinds({CONV_KINDS: Gamma(gamma=gamma),
                             AFFINE_KINDS | {OpKind.LINEAR}: Epsilon(epsilon)}),
                     first=ZBox(low=low, high=high), epsilon=epsilon)


def attnlrp_composite(epsilon: float = 1e-6, placement: str = DEFAULT_PLACEMENT) -> Composite:
    """AttnLRP (Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation
    for Transformers", ICML 2024): epsilon on linear and affine layers; LayerNorm by the
    identity rule on its normalisation (its divisor a constant, sec. 3.3.3), which is
    layernorm's affine rule; GELU, SiLU and other elementwise activations by the identity rule
    (sec. 3.3.2: relevance passes unchanged, as pbxc routes activations); products of two
    values by the uniform rule: matmul by the uniform epsilon rule (Prop. 3.3, eq. 14), an
    elementwise product by halves (Prop. 3.2, eq. 7); softmax by its rule
    R_in = x (R - s sum R) (Prop. 3.1, eq. 13), which pbxc applies to every interior softmax.

    ``epsilon`` is every stabiliser of the composite: the linear, affine and layernorm rules,
    the residual add and pooling (Norm), matmul and mean/sum. ``placement="slides"`` adds it
    as z + eps, LXT's placement (lxt.explicit.functional._stabilize); the default "sign"
    adds eps sign(z), which never moves a denominator towards zero."""
    rule = Epsilon(epsilon, placement)
    return Composite("attnlrp", _kinds({WEIGHTED_KINDS | AFFINE_KINDS: rule}),
                     default=Norm(epsilon, placement), products="uniform", epsilon=epsilon,
                     placement=placement)


def cp_lrp_composite(epsilon: float = 1e-6, placement: str = DEFAULT_PLACEMENT) -> Composite:
    """CP-LRP (Ali et al., "XAI for Transformers: Better Explanations through Conservative
    Propagation", ICML 2022, sec. 3.2-3.3): as attnlrp, but in a product whose operand is a
    softmax's output (the attention weights, possibly reshaped or transposed) that operand is
    a constant: it takes no relevance and the other operand takes all of it (the epsilon rule
    of a linear map with the attention weights as its weights). LayerNorm by the identity
    rule, as in both papers. ``epsilon`` and ``placement`` as attnlrp's."""
    rule = Epsilon(epsilon, placement)
    return Composite("cp-lrp", _kinds({WEIGHTED_KINDS | AFFINE_KINDS: rule}),
                     default=Norm(epsilon, placement), products="cp", epsilon=epsilon,
                     placement=placement)


COMPOSITES: dict[str, Callable[..., Composite]] = {
    "epsilon": epsilon_composite,
    "lrp0": lrp0_composite,
    "epsilon-plus": epsilon_plus_composite,
    "epsilon-gamma-box": epsilon_gamma_box_composite,
    "attnlrp": attnlrp_composite,
    "cp-lrp": cp_lrp_composite,
}


def register_composite(name: str, factory: Callable[..., Composite]) -> None:
    COMPOSITES[name] = factory


def get_composite(name: str, **kwargs: object) -> Composite:
    """The registered composite ``name``, built with ``kwargs`` (e.g. low/high, epsilon)."""
    # specs/language.md: composite names are written with '_' or '-' (epsilon_plus)
    factory = COMPOSITES.get(name) or COMPOSITES.get(name.replace("_", "-"))
    if factory is None:
        raise LrpConfigError(f"unknown LRP composite '{name}'; known: "
                             f"{', '.join(sorted(COMPOSITES))}")
    return factory(**kwargs)


RULES_BY_NAME: dict[str, tuple[type[Rule], tuple[str, ...]]] = {
    "lrp0": (LRP0, ()),
    "epsilon": (Epsilon, ("epsilon",)),
    "gamma": (Gamma, ("gamma",)),
    "zplus": (ZPlus, ()),
    "alphabeta": (AlphaBeta, ("alpha", "beta")),
    "wsquare": (WSquare, ()),
    "flat": (Flat, ()),
    "zbox": (ZBox, ("low", "high")),
}


assert {n: p for n, (_, p) in RULES_BY_NAME.items()} == LRP_RULES
assert set(COMPOSITES) == set(LRP_COMPOSITES)


def rule_from_spec(spec: str) -> Rule:
    """A rule from text such as ``epsilon``, ``epsilon:0.25``, ``gamma:0.5``,
    ``alphabeta:2:1`` or ``zbox:-1:1``: the name, then its parameters in order."""
    name, *values = spec.split(":")
    if name not in RULES_BY_NAME:
        raise LrpConfigError(f"unknown LRP rule '{name}'; known rules: "
                             + ", ".join(sorted(RULES_BY_NAME)))
    cls, params = RULES_BY_NAME[name]
    if len(values) > len(params):
        raise LrpConfigError(f"rule '{name}' takes {len(params)} parameter(s) "
                             f"({', '.join(params) or 'none'}), got {len(values)}")
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        raise LrpConfigError(f"rule parameters must be numbers, got '{spec}'") from None
    return cls(**dict(zip(params, numbers)))  # type: ignore[arg-type]
