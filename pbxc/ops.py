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
    # round 2 (issue 11): pooling in 1-3 d, upsampling, products, constants, shape ops
    MAXPOOL1D = "maxpool1d"
    MAXPOOL3D = "maxpool3d"
    AVGPOOL1D = "avgpool1d"
    AVGPOOL3D = "avgpool3d"
    ADAPTIVE_AVGPOOL1D = "adaptive_avgpool1d"
    ADAPTIVE_AVGPOOL2D = "adaptive_avgpool2d"
    ADAPTIVE_AVGPOOL3D = "adaptive_avgpool3d"
    UPSAMPLE = "upsample"
    PRELU = "prelu"
    MUL = "mul"
    SUB = "sub"
    DIV = "div"
    SQUEEZE = "squeeze"
    UNSQUEEZE = "unsqueeze"
    PAD = "pad"
    # issue 12 (norm): layer normalisation
    LAYERNORM = "layernorm"
    # issue 12 (helper tensor): tensor ops for transformers (SYNTAX-12.md)
    MATMUL = "matmul"
    TRANSPOSE = "transpose"
    SLICE = "slice"
    SELECT = "select"
    MEAN = "mean"
    SUM = "sum"


# Kind groups, used by passes to share rules.
CONV_STANDARD = frozenset({OpKind.CONV1D, OpKind.CONV2D, OpKind.CONV3D})
CONV_TRANSPOSED = frozenset({OpKind.CONV_TRANSPOSE1D, OpKind.CONV_TRANSPOSE2D,
                             OpKind.CONV_TRANSPOSE3D})
CONVOLUTIONS = CONV_STANDARD | CONV_TRANSPOSED
MAXPOOL = frozenset({OpKind.MAXPOOL1D, OpKind.MAXPOOL2D, OpKind.MAXPOOL3D})
AVGPOOL = frozenset({OpKind.AVGPOOL1D, OpKind.AVGPOOL2D, OpKind.AVGPOOL3D})
ADAPTIVE_AVGPOOL = frozenset({OpKind.ADAPTIVE_AVGPOOL1D, OpKind.ADAPTIVE_AVGPOOL2D,
                              OpKind.ADAPTIVE_AVGPOOL3D})
# Constant linear maps without weights: their LRP rule sees unit weights (Zennit's Norm)
UNWEIGHTED_LINEAR = AVGPOOL | ADAPTIVE_AVGPOOL | frozenset({OpKind.GLOBAL_AVGPOOL,
                                                           OpKind.UPSAMPLE, OpKind.PAD})
ELEMENTWISE = frozenset({OpKind.ACTIVATION, OpKind.PRELU})
AFFINE = UNWEIGHTED_LINEAR | CONVOLUTIONS | frozenset({
    OpKind.LINEAR, OpKind.BATCHNORM, OpKind.NORMALIZE, OpKind.SUB, OpKind.DIV,
})
WEIGHTED = frozenset({OpKind.LINEAR}) | CONVOLUTIONS
POOLING = MAXPOOL | AVGPOOL | ADAPTIVE_AVGPOOL | frozenset({OpKind.GLOBAL_AVGPOOL})
SHAPE_ONLY = frozenset({OpKind.FLATTEN, OpKind.RESHAPE, OpKind.SQUEEZE, OpKind.UNSQUEEZE})
MERGE = frozenset({OpKind.ADD, OpKind.CONCAT})
MULTIVARIATE = frozenset({OpKind.SOFTMAX, OpKind.LOG_SOFTMAX})
# issue 12 (helper tensor): ops that move values without arithmetic (LRP routes relevance,
# DFD and the Hessian pass take them as linear maps), and linear reductions
INDEXING = frozenset({OpKind.TRANSPOSE, OpKind.SLICE, OpKind.SELECT})
REDUCTIONS = frozenset({OpKind.MEAN, OpKind.SUM})
# Ops the LRP engine runs a rule on; the others route relevance (specs/lrp.md)
# (mul takes a rule when it scales by a constant; a product of two values routes relevance)
LRP_RULE_KINDS = WEIGHTED | UNWEIGHTED_LINEAR | frozenset({
    OpKind.ADD, OpKind.SUB, OpKind.MUL, OpKind.DIV, OpKind.BATCHNORM, OpKind.NORMALIZE,
    OpKind.LAYERNORM})   # issue 12 (norm): layernorm by AttnLRP's identity rule (sigma constant)


class AttrType(enum.Enum):
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    INTS = "ints"      # an int, or a tuple of exactly `arity` ints (any number if arity 0)
    PADS = "pads"      # an int, `arity` ints (both sides), or 2*`arity` ints (begin, end) per axis
    SHAPE = "shape"    # a list of ints, one of which may be -1
    FLOATS = "floats"  # a number, or a tuple of numbers (any number if arity 0)
    STRING = "string"  # a quoted string, one of `choices`


@dataclass(frozen=True)
class AttrSpec:
    name: str
    type: AttrType
    default: object = None
    required: bool = False
    arity: int = 1
    minimum: int | float | None = None
    choices: tuple[str, ...] = ()


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
    # concat: a positional operand may be a weight reference ``@key``, a constant tensor of the
    # per-sample shape (a class token), bound under the role ``operand_role(k)``
    constant_operands: bool = False

    @property
    def variadic(self) -> bool:
        return self.max_inputs is None or self.max_inputs != self.min_inputs

    def attr(self, name: str) -> AttrSpec | None:
        return next((a for a in self.attrs if a.name == name), None)

    def param(self, role: str) -> ParamSpec | None:
        return next((p for p in self.params if p.role == role), None)

    def usage(self) -> str:
        parts = ["x"] if self.max_inputs == 1 else ["a", "b", "..."] if self.variadic else ["a", "b"]
        if self.constant_operands:
            parts = ["a", "@constant", "..."]
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
    if isinstance(value, str):
        return f'"{value}"'
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


def _maxpool_attrs(arity: int) -> tuple[AttrSpec, ...]:
    return (
        AttrSpec("kernel", AttrType.INTS, required=True, arity=arity, minimum=1),
        AttrSpec("stride", AttrType.INTS, None, arity=arity, minimum=1),
        AttrSpec("padding", AttrType.INTS, 0, arity=arity, minimum=0),
        AttrSpec("dilation", AttrType.INTS, 1, arity=arity, minimum=1),
        AttrSpec("ceil_mode", AttrType.BOOL, False),
    )


def _avgpool_attrs(arity: int) -> tuple[AttrSpec, ...]:
    return (
        AttrSpec("kernel", AttrType.INTS, required=True, arity=arity, minimum=1),
        AttrSpec("stride", AttrType.INTS, None, arity=arity, minimum=1),
        AttrSpec("padding", AttrType.INTS, 0, arity=arity, minimum=0),
        AttrSpec("count_include_pad", AttrType.BOOL, True),
        AttrSpec("ceil_mode", AttrType.BOOL, False),
    )


def operand_role(position: int) -> str:
    """The weight role of a constant operand of concat at ``position`` (0-based, written order)."""
    return f"operand{position}"


_LAYOUT = {1: "[C, L]", 2: "[C, H, W]", 3: "[C, D, H, W]"}
_CONSTANT = (ParamSpec("constant", "", optional=True),)
_NUMBER = (AttrSpec("value", AttrType.FLOAT, None),)

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
        *(OpSignature(OpKind(f"maxpool{d}d"), f"maxpool{d}d", attrs=_maxpool_attrs(d),
                      summary=f"{d}-d max pooling of {_LAYOUT[d]}; stride defaults to the "
                              "kernel size") for d in (1, 2, 3)),
        *(OpSignature(OpKind(f"avgpool{d}d"), f"avgpool{d}d", attrs=_avgpool_attrs(d),
                      summary=f"{d}-d average pooling of {_LAYOUT[d]}; stride defaults to "
                              "the kernel size") for d in (1, 2, 3)),
        *(OpSignature(OpKind(f"adaptive_avgpool{d}d"), f"adaptive_avgpool{d}d", attrs=(
            AttrSpec("output_size", AttrType.INTS, required=True, arity=d, minimum=1),),
            summary=f"{d}-d adaptive average pooling to output_size (torch's bins)")
          for d in (1, 2, 3)),
        OpSignature(OpKind.UPSAMPLE, "upsample", attrs=(
            AttrSpec("mode", AttrType.STRING, "nearest", choices=("nearest", "linear")),
            AttrSpec("scale", AttrType.FLOATS, None, arity=0, minimum=0.0),
            AttrSpec("size", AttrType.INTS, None, arity=0, minimum=1),
            AttrSpec("align_corners", AttrType.BOOL, False),
        ), summary="resize 1-3 spatial axes (torch's interpolate; ONNX Resize): nearest, or "
                   "(bi/tri)linear; give scale or size"),
        OpSignature(OpKind.PRELU, "prelu", params=(ParamSpec("weight", "weight"),),
                    summary="x if x > 0 else a x; weight [C] (per channel) or [1]"),
        OpSignature(OpKind.MUL, "mul", max_inputs=2, params=_CONSTANT, attrs=(
            *_NUMBER, AttrSpec("lrp", AttrType.STRING, "gate", choices=("gate", "uniform"))),
            summary="elementwise product of two values (broadcasting), or by a constant"),
        OpSignature(OpKind.SUB, "sub", max_inputs=2, params=_CONSTANT, attrs=_NUMBER,
                    summary="a - b (broadcasting), or a - constant"),
        OpSignature(OpKind.DIV, "div", params=_CONSTANT, attrs=_NUMBER,
                    summary="x / constant (a number or a weight tensor, broadcasting)"),
        OpSignature(OpKind.SQUEEZE, "squeeze", attrs=(
            AttrSpec("axes", AttrType.INTS, None, arity=0),),
            summary="drop axes of size 1 (all of them by default)"),
        OpSignature(OpKind.UNSQUEEZE, "unsqueeze", attrs=(
            AttrSpec("axes", AttrType.INTS, required=True, arity=0),),
            summary="insert axes of size 1 at the positions of the output"),
        OpSignature(OpKind.PAD, "pad", attrs=(
            AttrSpec("pads", AttrType.INTS, required=True, arity=0, minimum=0),
            AttrSpec("value", AttrType.FLOAT, 0.0),
        ), summary="constant padding of the trailing axes; pads as torch.nn.functional.pad"),
        OpSignature(OpKind.GLOBAL_AVGPOOL, "global_avgpool",
                    summary="mean over every axis after the channel axis: [C, ...] -> [C]"),
        OpSignature(OpKind.FLATTEN, "flatten", attrs=(
            AttrSpec("start", AttrType.INT, 0, minimum=0),),
            summary="[d1, d2, ...] -> [d1*d2*...]; from per-sample axis start (default 0)"),
        OpSignature(OpKind.RESHAPE, "reshape", attrs=(
            AttrSpec("shape", AttrType.SHAPE, required=True),
        ), summary="reshape the per-sample shape; one dimension may be -1"),
        OpSignature(OpKind.ADD, "add", max_inputs=None, params=_CONSTANT, attrs=_NUMBER,
                    summary="elementwise sum of values (broadcasting), or x + constant"),
        OpSignature(OpKind.CONCAT, "concat", min_inputs=2, max_inputs=None, attrs=(
            AttrSpec("axis", AttrType.INT, 0),
        ), constant_operands=True,
            summary="join values and constant tensors (@key, per-sample shape: a class "
                    "token) in written order along a per-sample axis (0 = channels/features)"),
        OpSignature(OpKind.BATCHNORM, "batchnorm", params=(
            ParamSpec("weight", "weight"), ParamSpec("bias", "bias"),
            ParamSpec("running_mean", "running_mean"), ParamSpec("running_var", "running_var"),
        ), attrs=(AttrSpec("eps", AttrType.FLOAT, 1e-5, minimum=0.0),),
            summary="inference batch norm over the channel axis 0, with running statistics"),
        OpSignature(OpKind.NORMALIZE, "normalize", params=(
            ParamSpec("mean", "mean"), ParamSpec("std", "std"),
        ), summary="(x - mean) / std, e.g. a saved standardisation of raw features"),
        # issue 12 (helper tensor): tensor ops (SYNTAX-12.md)
        OpSignature(OpKind.MATMUL, "matmul", min_inputs=2, max_inputs=2,
                    summary="a [..., n, k] @ b [..., k, m] of two values; leading axes broadcast"),
        OpSignature(OpKind.TRANSPOSE, "transpose", attrs=(
            AttrSpec("perm", AttrType.INTS, required=True, arity=0, minimum=0),),
            summary="permute the per-sample axes; perm a permutation of 0..rank-1"),
        OpSignature(OpKind.SLICE, "slice", attrs=(
            AttrSpec("axis", AttrType.INT, required=True),
            AttrSpec("start", AttrType.INT, None),
            AttrSpec("stop", AttrType.INT, None),
            AttrSpec("step", AttrType.INT, 1, minimum=1),
        ), summary="x[start:stop:step] on one per-sample axis (Python slice semantics)"),
        OpSignature(OpKind.SELECT, "select", attrs=(
            AttrSpec("axis", AttrType.INT, required=True),
            AttrSpec("index", AttrType.INT, required=True),
        ), summary="pick one index of a per-sample axis and drop the axis"),
        OpSignature(OpKind.MEAN, "mean", attrs=(
            AttrSpec("axes", AttrType.INTS, None, arity=0),
            AttrSpec("keepdims", AttrType.BOOL, False),
        ), summary="mean over per-sample axes (all of them by default)"),
        OpSignature(OpKind.SUM, "sum", attrs=(
            AttrSpec("axes", AttrType.INTS, None, arity=0),
            AttrSpec("keepdims", AttrType.BOOL, False),
        ), summary="sum over per-sample axes (all of them by default)"),
        OpSignature(OpKind.SOFTMAX, "softmax", attrs=(AttrSpec("axis", AttrType.INT, -1),),
                    summary="softmax over a per-sample axis"),
        OpSignature(OpKind.LOG_SOFTMAX, "log_softmax", attrs=(AttrSpec("axis", AttrType.INT, -1),),
                    summary="log-softmax over a per-sample axis"),
        # issue 12 (norm): layer normalisation over the trailing `last` per-sample axes
        OpSignature(OpKind.LAYERNORM, "layernorm", params=_WB, attrs=(
            AttrSpec("eps", AttrType.FLOAT, 1e-5, minimum=0.0),
            AttrSpec("last", AttrType.INT, 1, minimum=1),
        ), summary="(x - mean) / sqrt(var + eps) * weight + bias over the last `last` axes"),
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
        ActivationSpec("hardsigmoid", summary="clip(z/6 + 1/2, 0, 1) = relu6(z + 3) / 6"),
        ActivationSpec("relu6", summary="min(max(z, 0), 6); f'(0) = f'(6) = 0 (torch's ReLU6)"),
        ActivationSpec("clip", (("min", -1.0), ("max", 1.0)),
                       "min(max(z, min), max); f' = 0 at both bounds (torch.clamp)"),
        ActivationSpec("hardswish", summary="z * relu6(z + 3) / 6"),
        ActivationSpec("gelu_tanh", summary="z/2 (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))"),
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
    # issue 12: transformers (specs/transformers.md)
    "attnlrp": ("epsilon",), "cp-lrp": ("epsilon",),
}


def op_names() -> list[str]:
    return sorted([*SIGNATURES, *BUILTIN_ACTIVATIONS])
