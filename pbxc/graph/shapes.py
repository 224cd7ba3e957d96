"""Shape inference and weight binding: every node's per-sample shape, every weight's checks.

Weights decide the widths of linear and conv layers (as in ONNX), so shapes are inferred with
the weight store in hand. Each rule states the shapes it expected and got.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from pbxc.errors import DiagnosticBag, PbxValidationError, SourcePos, WeightError
from pbxc.graph.ir import ModelGraph, OpNode
from pbxc.ops import OpKind
from pbxc.weights.limits import describe_bytes, max_sample_bytes
from pbxc.weights.store import WeightStore

Shape = tuple[int, ...]


def fmt(shape: Shape | None) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]" if shape is not None else "[?]"


class ShapeError(Exception):
    def __init__(self, message: str, pos: SourcePos | None = None) -> None:
        super().__init__(message)
        self.message, self.pos = message, pos


@dataclass
class _Ctx:
    node: OpNode
    inputs: list[Shape]
    weights: Mapping[str, np.ndarray]

    def weight(self, role: str, rank: int | None = None) -> Shape | None:
        key = self.node.param_key(role)
        if key is None:
            return None
        shape = tuple(self.weights[key].shape)
        if rank is not None and len(shape) != rank:
            raise ShapeError(f"weight '{key}' ({role} of {self.node.kind.value}) must have "
                             f"{rank} dimensions, got {fmt(shape)}", self.node.param_pos(role))
        return shape

    def expect_weight(self, role: str, expected: Shape) -> None:
        key = self.node.param_key(role)
        if key is None:
            return
        shape = tuple(self.weights[key].shape)
        if shape != expected:
            raise ShapeError(f"weight '{key}' ({role} of {self.node.kind.value}) has shape "
                             f"{fmt(shape)}, expected {fmt(expected)}", self.node.param_pos(role))

    def fail(self, message: str) -> ShapeError:
        return ShapeError(f"{self.node.kind.value} '{self.node.name}': {message}", self.node.pos)

    def rank(self, expected: int, layout: str) -> Shape:
        x = self.inputs[0]
        if len(x) != expected:
            raise self.fail(f"expects input of shape {layout} per sample, got {fmt(x)} "
                            f"from '{self.node.inputs[0]}'")
        return x


_LAYOUTS = {1: "[C, L]", 2: "[C, H, W]", 3: "[C, D, H, W]"}


def _conv(ctx: _Ctx, spatial: int, transposed: bool = False) -> Shape:
    """conv*d: weight [out, in/groups, *k]; conv_transpose*d: weight [in, out/groups, *k]."""
    x = ctx.rank(spatial + 1, _LAYOUTS[spatial])
    w = ctx.weight("weight", spatial + 2)
    assert w is not None
    groups = ctx.node.attr("groups")
    key = ctx.node.param_key("weight")
    c_in = x[0]
    if transposed:
        c_out = w[1] * groups
        if w[0] != c_in or c_in % groups:
            raise ShapeError(f"weight '{key}' has shape {fmt(w)}: a transposed convolution's "
                             f"weight is [in, out/groups, *kernel], and the input has {c_in} "
                             f"channels (groups={groups}, which must divide them)",
                             ctx.node.param_pos("weight"))
    else:
        c_out = w[0]
        if c_in % groups or c_out % groups:
            raise ctx.fail(f"groups={groups} must divide both the {c_in} input and {c_out} "
                           "output channels")
        if w[1] * groups != c_in:
            raise ShapeError(f"weight '{key}' has shape {fmt(w)}: expected {c_in // groups} "
                             f"input channels per group (input has {c_in} channels, "
                             f"groups={groups}), got {w[1]}", ctx.node.param_pos("weight"))
    ctx.expect_weight("bias", (c_out,))
    pads = ctx.node.attr("padding")
    out = [c_out]
    for i in range(spatial):
        stride, dilation = ctx.node.attr("stride")[i], ctx.node.attr("dilation")[i]
        begin, end = pads[2 * i], pads[2 * i + 1]
        if transposed:
            extra = ctx.node.attr("output_padding")[i]
            if extra >= max(stride, dilation):
                raise ctx.fail(f"output_padding {extra} must be smaller than the stride "
                               f"({stride}) or the dilation ({dilation})")
            n = (x[1 + i] - 1) * stride - begin - end + dilation * (w[2 + i] - 1) + extra + 1
            if n < 1:
                raise ctx.fail(f"padding ({begin}, {end}) leaves no output on axis {i + 1} "
                               f"(input {x[1 + i]}, kernel {w[2 + i]}, stride {stride})")
        else:
            n = _window_out(ctx, x[1 + i], w[2 + i], stride, (begin, end), dilation)
        out.append(n)
    return tuple(out)


def _window_out(ctx: _Ctx, size: int, kernel: int, stride: int, pad: int | tuple[int, int],
                dilation: int = 1) -> int:
    """Windows along one axis; ``pad`` is both sides or (begin, end)."""
    span = dilation * (kernel - 1) + 1
    begin, end = (pad, pad) if isinstance(pad, int) else pad
    n = (size + begin + end - span) // stride + 1
    if n < 1:
        raise ctx.fail(f"window of {span} (kernel {kernel}, dilation {dilation}) does not fit "
                       f"an axis of {size} with padding {pad}")
    return n


def _pool(ctx: _Ctx, spatial: int = 2) -> Shape:
    """PyTorch's pooling sizes, ``ceil_mode`` included: the ceiling, less one where the last
    window would start in the right padding."""
    x = ctx.rank(spatial + 1, {1: "[C, L]", 2: "[C, H, W]", 3: "[C, D, H, W]"}[spatial])
    kernel, pad = ctx.node.attr("kernel"), ctx.node.attr("padding")
    stride = ctx.node.attr("stride") or kernel
    dilation = ctx.node.attr("dilation") or (1,) * spatial
    for k, p in zip(kernel, pad):
        if p > k // 2:
            raise ctx.fail(f"padding {p} must be at most half the kernel size {k}")
    out = [x[0]]
    for i in range(spatial):
        n = _window_out(ctx, x[1 + i], kernel[i], stride[i], pad[i], dilation[i])
        if ctx.node.attr("ceil_mode"):
            span = dilation[i] * (kernel[i] - 1) + 1
            n = -(-(x[1 + i] + 2 * pad[i] - span) // stride[i]) + 1
            if (n - 1) * stride[i] >= x[1 + i] + pad[i]:
                n -= 1
        out.append(n)
    return tuple(out)


def _adaptive(ctx: _Ctx, spatial: int) -> Shape:
    x = ctx.rank(spatial + 1, {1: "[C, L]", 2: "[C, H, W]", 3: "[C, D, H, W]"}[spatial])
    return (x[0], *ctx.node.attr("output_size"))


def _upsample(ctx: _Ctx) -> Shape:
    """torch.nn.functional.interpolate's sizes: ``size``, or floor(n * scale) per axis."""
    x = ctx.inputs[0]
    spatial = len(x) - 1
    if not 1 <= spatial <= 3:
        raise ctx.fail(f"expects [C, L], [C, H, W] or [C, D, H, W] per sample, got {fmt(x)}")
    size, scale = ctx.node.attr("size"), ctx.node.attr("scale")
    if (size is None) == (scale is None):
        raise ctx.fail("give exactly one of size=... and scale=...")
    given = size if size is not None else scale
    if len(given) not in (1, spatial):
        raise ctx.fail(f"{'size' if size is not None else 'scale'} has {len(given)} entries; "
                       f"expected 1 or {spatial} (one per spatial axis)")
    if len(given) == 1:
        given = tuple(given) * spatial
    if size is not None:
        out = tuple(int(v) for v in given)
    else:
        out = tuple(int(np.floor(n * float(f))) for n, f in zip(x[1:], given))
        if min(out) < 1:
            raise ctx.fail(f"scale {tuple(given)} leaves an empty axis of {fmt(x)}")
    if ctx.node.attr("mode") == "nearest" and ctx.node.attr("align_corners"):
        raise ctx.fail("align_corners applies to mode=\"linear\" only (as in PyTorch)")
    return (x[0], *out)


def _broadcast(ctx: _Ctx, shapes: list[Shape]) -> Shape:
    """NumPy's (and PyTorch's) broadcast of per-sample shapes, aligned on the right."""
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        names = [*ctx.node.inputs, ctx.node.param_key("constant") or "the constant"]
        parts = " but ".join(f"'{n}' is {fmt(s)}" for n, s in zip(names, shapes))
        raise ctx.fail(f"shapes differ: {parts}, which do not broadcast (aligned on the "
                       "right, each axis equal or 1)") from None


def _elementwise(ctx: _Ctx) -> Shape:
    """add/sub/mul/div: values of broadcastable shapes, or one value and a constant (a number
    ``value=`` or a weight tensor ``@c``), never both."""
    node = ctx.node
    constant = node.param_key("constant")
    value = node.attr("value")
    op = node.kind.value
    if len(ctx.inputs) == 1:
        if (constant is None) == (value is None):
            raise ctx.fail(f"{op}() of one value takes a constant: a number or @tensor")
        if node.kind is OpKind.DIV and value == 0:
            raise ctx.fail("division by zero")
        if constant is None:
            return ctx.inputs[0]
        c = ctx.weight("constant")
        assert c is not None
        if node.kind is OpKind.DIV and np.any(np.asarray(ctx.weights[constant]) == 0):
            raise ShapeError(f"weight '{constant}' (divisor of div) has zero entries; division "
                             "by zero", node.param_pos("constant"))
        return _broadcast(ctx, [ctx.inputs[0], c])
    if constant is not None or value is not None:
        raise ctx.fail(f"{op}() takes two values or one value and a constant, not both")
    if node.kind is OpKind.MUL and len(ctx.inputs) != 2:
        raise ctx.fail("mul() multiplies two values")
    return _broadcast(ctx, list(ctx.inputs))


def _prelu(ctx: _Ctx) -> Shape:
    x = ctx.inputs[0]
    w = ctx.weight("weight", 1)
    assert w is not None
    if w[0] not in (1, x[0]):
        key = ctx.node.param_key("weight")
        raise ShapeError(f"weight '{key}' (slope of prelu) has shape {fmt(w)}; expected "
                         f"[{x[0]}] (per channel) or [1]", ctx.node.param_pos("weight"))
    return x


def _axes(ctx: _Ctx, rank: int, axes: tuple[int, ...]) -> list[int]:
    out = []
    for a in axes:
        if not -rank <= a < rank:
            raise ctx.fail(f"axis {a} is out of range for per-sample rank {rank} (the batch "
                           "axis is implicit and not counted)")
        out.append(a % rank)
    if len(set(out)) != len(out):
        raise ctx.fail(f"axes {tuple(axes)} repeat an axis")
    return out


def _squeeze(ctx: _Ctx) -> Shape:
    x = ctx.inputs[0]
    axes = ctx.node.attr("axes")
    if axes is None:
        return tuple(d for d in x if d != 1)
    drop = _axes(ctx, len(x), axes)
    for a in drop:
        if x[a] != 1:
            raise ctx.fail(f"axis {a} of {fmt(x)} has size {x[a]}, not 1")
    return tuple(d for i, d in enumerate(x) if i not in drop)


def _unsqueeze(ctx: _Ctx) -> Shape:
    x = ctx.inputs[0]
    rank = len(x) + len(ctx.node.attr("axes"))
    where = set(_axes(ctx, rank, ctx.node.attr("axes")))
    rest = iter(x)
    return tuple(1 if i in where else next(rest) for i in range(rank))


def _pad(ctx: _Ctx) -> Shape:
    """torch.nn.functional.pad's order: (last_before, last_after, second_last_before, ...)."""
    x = ctx.inputs[0]
    pads = ctx.node.attr("pads")
    if len(pads) % 2 or len(pads) // 2 > len(x):
        raise ctx.fail(f"pads {tuple(pads)} must be pairs (before, after) for at most the "
                       f"{len(x)} per-sample axes, last axis first")
    return tuple(d + sum(pair) for d, pair in zip(x, pad_pairs(pads, len(x))))


def pad_pairs(pads: tuple[int, ...], rank: int) -> tuple[tuple[int, int], ...]:
    """torch's flat pads -> ((before, after), ...) for every per-sample axis, first to last."""
    pairs = [(0, 0)] * rank
    for i in range(len(pads) // 2):
        pairs[rank - 1 - i] = (pads[2 * i], pads[2 * i + 1])
    return tuple(pairs)


def _linear(ctx: _Ctx) -> Shape:
    x = ctx.inputs[0]
    w = ctx.weight("weight", 2)
    assert w is not None
    if w[1] != x[-1]:
        key = ctx.node.param_key("weight")
        raise ShapeError(f"weight '{key}' has shape {fmt(w)} = [out, in], but the input "
                         f"'{ctx.node.inputs[0]}' has {x[-1]} features (shape {fmt(x)}); "
                         f"expected [{w[0]}, {x[-1]}]", ctx.node.param_pos("weight"))
    ctx.expect_weight("bias", (w[0],))
    return (*x[:-1], w[0])


def _axis(ctx: _Ctx, rank: int) -> int:
    axis = ctx.node.attr("axis")
    if not -rank <= axis < rank:
        raise ctx.fail(f"axis {axis} is out of range for per-sample shape of rank {rank} "
                       "(the batch axis is implicit and not counted)")
    return axis % rank


def _concat(ctx: _Ctx) -> Shape:
    """Values and constant tensors (``@key``, of the per-sample shape, the same for every
    sample) in written order; equal shapes off the (per-sample) axis."""
    node = ctx.node
    operands: list[tuple[str, Shape, str | None]] = []   # (what, shape, constant's role)
    for slot in node.operand_slots():
        if isinstance(slot, int):
            operands.append((f"'{node.inputs[slot]}'", ctx.inputs[slot], None))
        else:
            key = node.param_key(slot)
            assert key is not None   # every constant slot is a bound role
            operands.append((f"constant '{key}'", tuple(ctx.weights[key].shape), slot))
    reference = next(o for o in operands if o[2] is None)   # a value: constants are checked
    first = reference[1]
    axis = _axis(ctx, len(first))
    total = 0
    for what, shape, role in operands:
        if len(shape) != len(first) or any(
                a != b for i, (a, b) in enumerate(zip(shape, first)) if i != axis):
            message = (f"{what} has shape {fmt(shape)}, which does not match "
                       f"{fmt(first)} of {reference[0]} off axis {axis}")
            if role is None:
                raise ctx.fail(message)
            raise ShapeError(f"concat '{node.name}': {message}; a constant operand has the "
                             "per-sample shape (no batch axis)", node.param_pos(role))
        total += shape[axis]
    return (*first[:axis], total, *first[axis + 1:])


def _reshape(ctx: _Ctx) -> Shape:
    x = ctx.inputs[0]
    size = math.prod(x)
    target = list(ctx.node.attr("shape"))
    known = math.prod([d for d in target if d != -1])
    if -1 in target:
        if size % known:
            raise ctx.fail(f"cannot reshape {fmt(x)} ({size} elements) to {fmt(tuple(target))}")
        target[target.index(-1)] = size // known
    elif known != size:
        raise ctx.fail(f"cannot reshape {fmt(x)} ({size} elements) to {fmt(tuple(target))} "
                       f"({known} elements)")
    return tuple(target)


def _flatten(ctx: _Ctx) -> Shape:
    x = ctx.inputs[0]
    start = ctx.node.attr("start") or 0
    if start >= max(len(x), 1):
        raise ctx.fail(f"start {start} is out of range for per-sample shape {fmt(x)}")
    return (*x[:start], math.prod(x[start:]))


def _batchnorm(ctx: _Ctx) -> Shape:
    x = ctx.inputs[0]
    for role in ("weight", "bias", "running_mean", "running_var"):
        ctx.expect_weight(role, (x[0],))
    key = ctx.node.param_key("running_var")
    if key is not None and np.any(np.asarray(ctx.weights[key]) < 0):
        raise ShapeError(f"weight '{key}' (running_var of batchnorm) has negative entries",
                         ctx.node.param_pos("running_var"))
    return x


def _normalize(ctx: _Ctx) -> Shape:
    x = ctx.inputs[0]
    allowed = {x, (), (x[0],)}
    for role in ("mean", "std"):
        shape = ctx.weight(role)
        if shape is not None and shape not in allowed:
            key = ctx.node.param_key(role)
            options = [f"{fmt(x)} (per element)"]
            if len(x) > 1:
                options.append(f"[{x[0]}] (per channel)")
            raise ShapeError(f"weight '{key}' ({role} of normalize) has shape {fmt(shape)}; "
                             f"expected {', '.join(options)} or [] (scalar)",
                             ctx.node.param_pos(role))
    key = ctx.node.param_key("std")
    if key is not None and np.any(np.asarray(ctx.weights[key]) == 0):
        raise ShapeError(f"weight '{key}' (std of normalize) has zero entries; division by zero",
                         ctx.node.param_pos("std"))
    return x


def _global_avgpool(ctx: _Ctx) -> Shape:
    x = ctx.inputs[0]
    if len(x) < 2:
        raise ctx.fail(f"expects [C, ...] with at least one spatial axis, got {fmt(x)}")
    return (x[0],)


def _softmax(ctx: _Ctx) -> Shape:
    _axis(ctx, len(ctx.inputs[0]))
    return ctx.inputs[0]


# issue 12 (norm): layernorm's weight and bias span the normalised trailing axes
def _layernorm(ctx: _Ctx) -> Shape:
    x = ctx.inputs[0]
    last = int(ctx.node.attr("last"))
    if last > len(x):
        raise ctx.fail(f"last={last} exceeds the per-sample rank of {fmt(x)}")
    for role in ("weight", "bias"):
        ctx.expect_weight(role, tuple(x[len(x) - last:]))
    return x


# ---- issue 12 (helper tensor): tensor ops
def _matmul(ctx: _Ctx) -> Shape:
    a, b = ctx.inputs
    na, nb = ctx.node.inputs
    if len(a) < 2 or len(b) < 2:
        raise ctx.fail(f"expects two values of rank >= 2 per sample ([..., n, k] and "
                       f"[..., k, m]), got '{na}' {fmt(a)} and '{nb}' {fmt(b)}")
    if a[-1] != b[-2]:
        raise ctx.fail(f"inner sizes differ: '{na}' is {fmt(a)} ([..., n, k], k = {a[-1]}) but "
                       f"'{nb}' is {fmt(b)} ([..., k, m], k = {b[-2]})")
    try:
        lead = tuple(np.broadcast_shapes(a[:-2], b[:-2]))
    except ValueError:
        raise ctx.fail(f"leading axes of '{na}' {fmt(a)} and '{nb}' {fmt(b)} do not "
                       "broadcast") from None
    return (*lead, a[-2], b[-1])


def _transpose(ctx: _Ctx) -> Shape:
    x = ctx.inputs[0]
    perm = tuple(ctx.node.attr("perm"))
    if sorted(perm) != list(range(len(x))):
        raise ctx.fail(f"perm {perm} is not a permutation of 0..{len(x) - 1} for the "
                       f"per-sample shape {fmt(x)} of '{ctx.node.inputs[0]}'")
    return tuple(x[i] for i in perm)


def _slice(ctx: _Ctx) -> Shape:
    x = ctx.inputs[0]
    axis = _axis(ctx, len(x))
    start, stop, step = (ctx.node.attr(k) for k in ("start", "stop", "step"))
    n = len(range(*slice(start, stop, step).indices(x[axis])))
    if n == 0:
        raise ctx.fail(f"slice {start}:{stop}:{step} of axis {axis} (size {x[axis]}) of "
                       f"'{ctx.node.inputs[0]}' {fmt(x)} is empty")
    return (*x[:axis], n, *x[axis + 1:])


def _select(ctx: _Ctx) -> Shape:
    x = ctx.inputs[0]
    axis = _axis(ctx, len(x))
    index = ctx.node.attr("index")
    if not -x[axis] <= index < x[axis]:
        raise ctx.fail(f"index {index} is out of range for axis {axis} of size {x[axis]} of "
                       f"'{ctx.node.inputs[0]}' {fmt(x)}")
    return (*x[:axis], *x[axis + 1:])


def reduction_axes(node: OpNode, rank: int) -> tuple[int, ...]:
    """The reduced per-sample axes of mean/sum, non-negative and sorted (all if omitted)."""
    axes = node.attr("axes")
    if axes is None:
        return tuple(range(rank))
    return tuple(sorted(int(a) % rank for a in axes))


def _reduce(ctx: _Ctx) -> Shape:
    x = ctx.inputs[0]
    axes = ctx.node.attr("axes")
    drop = set(_axes(ctx, len(x), tuple(axes))) if axes is not None else set(range(len(x)))
    if ctx.node.attr("keepdims"):
        return tuple(1 if i in drop else d for i, d in enumerate(x))
    return tuple(d for i, d in enumerate(x) if i not in drop)


SHAPE_RULES: dict[OpKind, Callable[[_Ctx], Shape]] = {
    # issue 12 (helper tensor)
    OpKind.MATMUL: _matmul,
    OpKind.TRANSPOSE: _transpose,
    OpKind.SLICE: _slice,
    OpKind.SELECT: _select,
    OpKind.MEAN: _reduce,
    OpKind.SUM: _reduce,
    OpKind.LINEAR: _linear,
    OpKind.CONV1D: lambda c: _conv(c, 1),
    OpKind.CONV2D: lambda c: _conv(c, 2),
    OpKind.MAXPOOL1D: lambda c: _pool(c, 1),
    OpKind.CONV3D: lambda c: _conv(c, 3),
    OpKind.CONV_TRANSPOSE1D: lambda c: _conv(c, 1, transposed=True),
    OpKind.CONV_TRANSPOSE2D: lambda c: _conv(c, 2, transposed=True),
    OpKind.CONV_TRANSPOSE3D: lambda c: _conv(c, 3, transposed=True),
    OpKind.MAXPOOL2D: _pool,
    OpKind.MAXPOOL3D: lambda c: _pool(c, 3),
    OpKind.AVGPOOL1D: lambda c: _pool(c, 1),
    OpKind.AVGPOOL2D: _pool,
    OpKind.AVGPOOL3D: lambda c: _pool(c, 3),
    OpKind.ADAPTIVE_AVGPOOL1D: lambda c: _adaptive(c, 1),
    OpKind.ADAPTIVE_AVGPOOL2D: lambda c: _adaptive(c, 2),
    OpKind.ADAPTIVE_AVGPOOL3D: lambda c: _adaptive(c, 3),
    OpKind.UPSAMPLE: _upsample,
    OpKind.PRELU: _prelu,
    OpKind.SUB: _elementwise,
    OpKind.MUL: _elementwise,
    OpKind.DIV: _elementwise,
    OpKind.SQUEEZE: _squeeze,
    OpKind.UNSQUEEZE: _unsqueeze,
    OpKind.PAD: _pad,
    OpKind.GLOBAL_AVGPOOL: _global_avgpool,
    OpKind.FLATTEN: _flatten,
    OpKind.RESHAPE: _reshape,
    OpKind.ADD: _elementwise,
    OpKind.CONCAT: _concat,
    OpKind.BATCHNORM: _batchnorm,
    OpKind.NORMALIZE: _normalize,
    OpKind.SOFTMAX: _softmax,
    OpKind.LOG_SOFTMAX: _softmax,
    OpKind.ACTIVATION: lambda c: c.inputs[0],
    OpKind.LAYERNORM: _layernorm,   # issue 12 (norm)
}


def _check_weight(key: str, role: str, node: OpNode, store: WeightStore,
                  bag: DiagnosticBag, checked: set[str]) -> bool:
    pos = node.param_pos(role)
    if key not in store:
        near = store.nearest_keys(key)
        notes = [f"nearest keys: {', '.join(near)}"] if near else []
        if not store:
            notes.append("the model names no weight file; add: weights \"file.npz\"")
        bag.error(f"missing weight '{key}' ({role} of {node.kind.value} '{node.name}')",
                  pos, notes)
        return False
    if key in checked:
        return True
    checked.add(key)
    try:
        array = store[key]  # read from its file now: only the keys a model binds are read
    except WeightError as err:
        bag.diagnostics.extend(err.diagnostics)
        return False
    if not np.issubdtype(array.dtype, np.floating):
        bag.error(f"weight '{key}' has dtype {array.dtype}; expected a floating dtype "
                  "(float16, float32 or float64)", pos, [f"in '{store.file_of(key)}'"])
        return False
    bad = ~np.isfinite(array)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        bag.error(f"weight '{key}' has {int(bad.sum())} non-finite value(s), the first "
                  f"{array[first]} at index {list(first)}", pos, [f"in '{store.file_of(key)}'"])
        return False
    return True


#: ops whose kernels depend on their inputs' shapes (broadcasting) or on derived settings
_RECORD_INPUTS = frozenset({OpKind.ADD, OpKind.SUB, OpKind.MUL,
                            # issue 12 (helper tensor): axes are normalised against the input
                            OpKind.SLICE, OpKind.SELECT, OpKind.MEAN, OpKind.SUM})


def _with_inputs(node: OpNode, ctx: _Ctx) -> OpNode:
    """The node with what lowering needs of its inputs' shapes, as derived attributes
    (replaced, never appended twice, when shapes are inferred again)."""
    extra: dict[str, object] = {}
    if node.kind in _RECORD_INPUTS:
        extra["in_shapes"] = tuple(tuple(int(d) for d in s) for s in ctx.inputs)
    if node.kind is OpKind.PAD:
        extra["pad_pairs"] = pad_pairs(tuple(node.attr("pads")), len(ctx.inputs[0]))
    if not extra:
        return node
    kept = tuple((k, v) for k, v in node.attrs if k not in extra)
    return replace(node, attrs=kept + tuple(extra.items()))


def infer_shapes(graph: ModelGraph, store: WeightStore) -> ModelGraph:
    """Check every weight and infer every node's shape, in place; raise all errors together."""
    bag = DiagnosticBag()
    checked: set[str] = set()
    broken: set[str] = set()
    for node in graph.topological():
        if node.kind is OpKind.INPUT:
            continue
        ok = all([_check_weight(key, role, node, store, bag, checked)  # report every one
                  for role, key, _ in node.params])
        if not ok or any(i in broken for i in node.inputs):
            broken.add(node.name)
            continue
        rule = SHAPE_RULES.get(node.kind)
        if rule is None:
            bag.error(f"shape inference has no rule for op '{node.kind.value}'", node.pos)
            broken.add(node.name)
            continue
        for _, key, _ in node.params:
            graph.param_shapes[key] = tuple(store[key].shape)
        ctx = _Ctx(node, [graph.shape_of(i) for i in node.inputs], store)
        try:
            shape = rule(ctx)
        except ShapeError as err:
            bag.error(err.message, err.pos)
            broken.add(node.name)
            continue
        graph.replace_node(_with_inputs(node, ctx).with_shape(tuple(int(d) for d in shape)))
    for out in graph.outputs:
        out_shape = graph.node(out.name).shape
        if out.classes is not None and out_shape is not None and \
                len(out.classes) != math.prod(out_shape):
            bag.error(f"output '{out.name}' has {math.prod(out_shape)} elements but "
                      f"{len(out.classes)} class names", out.pos)
    bag.raise_if_any(PbxValidationError)
    _check_sample_memory(graph)
    return graph


def _check_sample_memory(graph: ModelGraph) -> None:
    """The values of one sample's forward pass, in float64, against ``PBXC_MAX_SAMPLE_BYTES``:
    a declared ``float64[100000000000]`` or a ``padding=1000000000`` is refused here, naming
    its node, before any pass allocates an array for it."""
    limit = max_sample_bytes()
    total = 0
    largest: tuple[int, OpNode] | None = None
    for node in graph.topological():
        nbytes = math.prod(node.shape or ()) * 8
        total += nbytes
        if largest is None or nbytes > largest[0]:
            largest = (nbytes, node)
    if total > limit and largest is not None:
        nbytes, node = largest
        what = "input" if node.kind is OpKind.INPUT else node.kind.value
        raise PbxValidationError(
            f"one sample needs {describe_bytes(total)} of values in float64, over the limit of "
            f"{describe_bytes(limit)} (PBXC_MAX_SAMPLE_BYTES); the largest is {what} "
            f"'{node.name}' of shape {fmt(node.shape)} ({describe_bytes(nbytes)})", node.pos)
