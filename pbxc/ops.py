"""The op vocabulary: every op kind pbxc knows, with its call signature. A leaf module.

Every pass keeps one rule table keyed by :class:`OpKind`; a kind without a rule is an
error naming the pass and the op, never a silent fallback.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class OpKind(enum.Enum):
    INPUT = "input"
    LINEAR = "linear"
    CONV1D = "conv1d"
    CONV2D = "conv2d"
    CONV3D = "conv3d"
    CONV_TRANSPOSE1D = "conv_transpose1d"
    CONV_TRANSPOSE2D = "conv_transpose2d"
    CONV_TRANSPOSE3D = "conv_transpose3d"
    MAXPOOL2D = "maxpool2d"
    AVGPOOL2D = "avgpool2d"
    GLOBAL_AVGPOOL = "global_avgpool"
    FLATTEN = "flatten"
    RESHAPE = "reshape"
    ADD = "add"
    CONCAT = "concat"
    BATCHNORM = "batchnorm"
    NORMALIZE = "normalize"
    SOFTMAX = "softmax"
    LOG_SOFTMAX = "log_softmax"
    ACTIVATION = "activation"


# Kind groups, used by passes to share rules.
CONV_STANDARD = frozenset({OpKind.CONV1D, OpKind.CONV2D, OpKind.CONV3D})
CONV_TRANSPOSED = frozenset({OpKind.CONV_TRANSPOSE1D, OpKind.CONV_TRANSPOSE2D,
                             OpKind.CONV_TRANSPOSE3D})
CONVOLUTIONS = CONV_STANDARD | CONV_TRANSPOSED
ELEMENTWISE = frozenset({OpKind.ACTIVATION})
AFFINE = frozenset({
    OpKind.LINEAR, OpKind.AVGPOOL2D, OpKind.GLOBAL_AVGPOOL, OpKind.BATCHNORM, OpKind.NORMALIZE,
}) | CONVOLUTIONS
WEIGHTED = frozenset({OpKind.LINEAR}) | CONVOLUTIONS
POOLING = frozenset({OpKind.MAXPOOL2D, OpKind.AVGPOOL2D, OpKind.GLOBAL_AVGPOOL})
SHAPE_ONLY = frozenset({OpKind.FLATTEN, OpKind.RESHAPE})
MERGE = frozenset({OpKind.ADD, OpKind.CONCAT})
MULTIVARIATE = frozenset({OpKind.SOFTMAX, OpKind.LOG_SOFTMAX})
# Ops the LRP engine runs a rule on; the others route relevance (specs/lrp.md)
LRP_RULE_KINDS = WEIGHTED | frozenset({OpKind.AVGPOOL2D, OpKind.GLOBAL_AVGPOOL, OpKind.ADD,
                                       OpKind.BATCHNORM, OpKind.NORMALIZE})


class AttrType(enum.Enum):
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    INTS = "ints"      # an int, or a tuple of exactly `arity` ints
    PADS = "pads"      # an int, `arity` ints (both sides), or 2*`arity` ints (begin, end) per axis
    SHAPE = "shape"    # a list of ints, one of which may be -1


@dataclass(frozen=True)
class AttrSpec:
    name: str
    type: AttrType
    default: object = None
    required: bool = False
    arity: int = 1
    minimum: int | float | None = None


@dataclass(frozen=True)
class ParamSpec:
    """A weight tensor an op reads; ``suffix`` completes a prefix reference (``@fc1`` -> ``fc1.weight``)."""

    role: str
    suffix: str
    optional: bool = False


@dataclass(frozen=True)
class OpSignature:
    kind: OpKind
    name: str
    min_inputs: int = 1
    max_inputs: int | None = 1
    params: tuple[ParamSpec, ...] = ()
    attrs: tuple[AttrSpec, ...] = ()
    summary: str = ""

    @property
    def variadic(self) -> bool:
        return self.max_inputs is None or self.max_inputs != self.min_inputs

    def attr(self, name: str) -> AttrSpec | None:
        return next((a for a in self.attrs if a.name == name), None)

    def param(self, role: str) -> ParamSpec | None:
        return next((p for p in self.params if p.role == role), None)

    def usage(self) -> str:
        parts = ["x"] if self.max_inputs == 1 else ["a", "b", "..."] if self.variadic else ["a", "b"]
        if self.params:
            parts.append("@prefix")
        for a in self.attrs:
            parts.append(f"{a.name}=..." if a.required else f"{a.name}={_fmt_default(a.default)}")
        return f"{self.name}({', '.join(parts)})"


def _fmt_default(value: object) -> str:
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


_WB = (ParamSpec("weight", "weight"), ParamSpec("bias", "bias", optional=True))


def _conv_attrs(arity: int, transposed: bool = False) -> tuple[AttrSpec, ...]:
    """Convolution attributes; ``padding`` is stored per side, (begin_1, end_1, begin_2, ...)."""
    extra = (AttrSpec("output_padding", AttrType.INTS, 0, arity=arity, minimum=0),
             ) if transposed else ()
    return (
        AttrSpec("stride", AttrType.INTS, 1, arity=arity, minimum=1),
        AttrSpec("padding", AttrType.PADS, 0, arity=arity, minimum=0),
        *extra,
        AttrSpec("dilation", AttrType.INTS, 1, arity=arity, minimum=1),
        AttrSpec("groups", AttrType.INT, 1, minimum=1),
    )


SIGNATURES: dict[str, OpSignature] = {
    s.name: s
    for s in (
        OpSignature(OpKind.LINEAR, "linear", params=_WB,
                    summary="y = x W^T + b; weight [out, in], bias [out]"),
        OpSignature(OpKind.CONV1D, "conv1d", params=_WB, attrs=_conv_attrs(1),
                    summary="1-d convolution; weight [out, in/groups, k]"),
        OpSignature(OpKind.CONV2D, "conv2d", params=_WB, attrs=_conv_attrs(2),
                    summary="2-d convolution; weight [out, in/groups, kh, kw]"),
        OpSignature(OpKind.CONV3D, "conv3d", params=_WB, attrs=_conv_attrs(3),
                    summary="3-d convolution; weight [out, in/groups, kd, kh, kw]"),
        OpSignature(OpKind.CONV_TRANSPOSE1D, "conv_transpose1d", params=_WB,
                    attrs=_conv_attrs(1, transposed=True),
                    summary="1-d transposed convolution; weight [in, out/groups, k]"),
        OpSignature(OpKind.CONV_TRANSPOSE2D, "conv_transpose2d", params=_WB,
                    attrs=_conv_attrs(2, transposed=True),
                    summary="2-d transposed convolution; weight [in, out/groups, kh, kw]"),
        OpSignature(OpKind.CONV_TRANSPOSE3D, "conv_transpose3d", params=_WB,
                    attrs=_conv_attrs(3, transposed=True),
                    summary="3-d transposed convolution; weight [in, out/groups, kd, kh, kw]"),
        OpSignature(OpKind.MAXPOOL2D, "maxpool2d", attrs=(
            AttrSpec("kernel", AttrType.INTS, required=True, arity=2, minimum=1),
            AttrSpec("stride", AttrType.INTS, None, arity=2, minimum=1),
            AttrSpec("padding", AttrType.INTS, 0, arity=2, minimum=0),
        ), summary="2-d max pooling; stride defaults to the kernel size"),
        OpSignature(OpKind.AVGPOOL2D, "avgpool2d", attrs=(
            AttrSpec("kernel", AttrType.INTS, required=True, arity=2, minimum=1),
            AttrSpec("stride", AttrType.INTS, None, arity=2, minimum=1),
            AttrSpec("padding", AttrType.INTS, 0, arity=2, minimum=0),
            AttrSpec("count_include_pad", AttrType.BOOL, True),
        ), summary="2-d average pooling; stride defaults to the kernel size"),
        OpSignature(OpKind.GLOBAL_AVGPOOL, "global_avgpool",
                    summary="mean over every axis after the channel axis: [C, ...] -> [C]"),
        OpSignature(OpKind.FLATTEN, "flatten", summary="[d1, d2, ...] -> [d1*d2*...]"),
        OpSignature(OpKind.RESHAPE, "reshape", attrs=(
            AttrSpec("shape", AttrType.SHAPE, required=True),
        ), summary="reshape the per-sample shape; one dimension may be -1"),
        OpSignature(OpKind.ADD, "add", min_inputs=2, max_inputs=None,
                    summary="elementwise sum of two or more values of one shape"),
        OpSignature(OpKind.CONCAT, "concat", min_inputs=2, max_inputs=None, attrs=(
            AttrSpec("axis", AttrType.INT, 0),
        ), summary="join along a per-sample axis (0 = channels/features)"),
        OpSignature(OpKind.BATCHNORM, "batchnorm", params=(
            ParamSpec("weight", "weight"), ParamSpec("bias", "bias"),
            ParamSpec("running_mean", "running_mean"), ParamSpec("running_var", "running_var"),
        ), attrs=(AttrSpec("eps", AttrType.FLOAT, 1e-5, minimum=0.0),),
            summary="inference batch norm over the channel axis 0, with running statistics"),
        OpSignature(OpKind.NORMALIZE, "normalize", params=(
            ParamSpec("mean", "mean"), ParamSpec("std", "std"),
        ), summary="(x - mean) / std, e.g. a saved standardisation of raw features"),
        OpSignature(OpKind.SOFTMAX, "softmax", attrs=(AttrSpec("axis", AttrType.INT, -1),),
                    summary="softmax over a per-sample axis"),
        OpSignature(OpKind.LOG_SOFTMAX, "log_softmax", attrs=(AttrSpec("axis", AttrType.INT, -1),),
                    summary="log-softmax over a per-sample axis"),
    )
}


@dataclass(frozen=True)
class ActivationSpec:
    """A built-in elementwise activation: its name and its named parameters with defaults."""

    name: str
    params: tuple[tuple[str, float], ...] = ()
    summary: str = ""


BUILTIN_ACTIVATIONS: dict[str, ActivationSpec] = {
    a.name: a
    for a in (
        ActivationSpec("identity", summary="f(z) = z"),
        ActivationSpec("relu", summary="max(z, 0)"),
        ActivationSpec("leaky_relu", (("alpha", 0.01),), "z if z > 0 else alpha*z"),
        ActivationSpec("elu", (("alpha", 1.0),), "z if z > 0 else alpha*(exp(z) - 1)"),
        ActivationSpec("selu", summary="scale * elu(z, alpha) with the SELU constants"),
        ActivationSpec("gelu", summary="z * Phi(z), the erf form"),
        ActivationSpec("silu", summary="z * sigmoid(z)"),
        ActivationSpec("mish", summary="z * tanh(softplus(z))"),
        ActivationSpec("softplus", (("beta", 1.0),), "log(1 + exp(beta*z)) / beta"),
        ActivationSpec("sigmoid", summary="1 / (1 + exp(-z))"),
        ActivationSpec("tanh", summary="tanh(z)"),
        ActivationSpec("hardtanh", (("min_val", -1.0), ("max_val", 1.0)),
                       "clip(z, min_val, max_val)"),
        ActivationSpec("hardsigmoid", summary="clip(z/6 + 1/2, 0, 1)"),
        ActivationSpec("abs", summary="|z|"),
        ActivationSpec("exp", summary="exp(z)"),
        ActivationSpec("log_sigmoid", summary="log(sigmoid(z)) = -softplus(-z)"),
    )
}

# Functions a user-defined activation may call, with their arity. Every built-in
# activation may be called too (with its parameters as extra positional arguments).
MATH_FUNCTIONS: dict[str, int] = {
    "exp": 1, "log": 1, "log1p": 1, "expm1": 1, "sqrt": 1, "erf": 1, "erfc": 1,
    "sin": 1, "cos": 1, "tanh": 1, "sinh": 1, "cosh": 1, "atan": 1,
    "abs": 1, "sign": 1, "heaviside": 1, "max": 2, "min": 2, "where": 3,
}

MATH_CONSTANTS: dict[str, str] = {"pi": "pi", "e": "E"}

COMPARISONS = ("<", "<=", ">", ">=")


# LRP rules and composites by name, with their parameters in positional order (specs/lrp.md).
# The rule objects live in pbxc.runtime.lrp_rules, which checks that it implements exactly these;
# the names are here so that an ``lrp { ... }`` block is checked with the rest of the file.
LRP_RULES: dict[str, tuple[str, ...]] = {
    "lrp0": (), "epsilon": ("epsilon",), "gamma": ("gamma",), "zplus": (),
    "alphabeta": ("alpha", "beta"), "wsquare": (), "flat": (), "zbox": ("low", "high"),
}
LRP_COMPOSITES: dict[str, tuple[str, ...]] = {
    "epsilon": ("epsilon",), "lrp0": (), "epsilon-plus": ("epsilon",),
    "epsilon-gamma-box": ("low", "high", "gamma", "epsilon"),
}


def op_names() -> list[str]:
    return sorted([*SIGNATURES, *BUILTIN_ACTIVATIONS])
