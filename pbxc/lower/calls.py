"""Lowering a graph node to kernel calls: which op kernel, and its literal attributes.

Kernels live in ``pbxc.codegen.numpy_kernels`` as ``<op>_<pass>`` functions with uniform
signatures. The interpreter (``pbxc.runtime``) and the code generator (``pbxc.codegen``) both
call them through these two functions, so a node means the same thing in both.
"""

from __future__ import annotations

import functools
from typing import Any

from pbxc.errors import UnsupportedOp
from pbxc.graph.ir import OpNode
from pbxc.ops import (
    ADAPTIVE_AVGPOOL,
    AFFINE,
    AVGPOOL,
    CONV_TRANSPOSED,
    CONVOLUTIONS,
    INDEXING,
    MAXPOOL,
    REDUCTIONS,
    SHAPE_ONLY,
    OpKind,
)

#: Passes, by kernel suffix.
PASSES = ("forward", "local", "jvp", "vjp", "dfd")

#: Ops whose DFD multipliers are their weights (seed 004, eq. 7): the DFD rule is the VJP.
DFD_BY_VJP = frozenset(AFFINE | SHAPE_ONLY | {OpKind.ADD, OpKind.CONCAT}
                       | INDEXING | REDUCTIONS)  # issue 12 (helper tensor)


def _pool_fast_2d(node: OpNode) -> bool:
    """The 2-d pools that keep numpy_kernels' own (tiled, bit-stable) kernels."""
    return node.kind in (OpKind.MAXPOOL2D, OpKind.AVGPOOL2D) and not node.attr("ceil_mode") \
        and tuple(node.attr("dilation") or (1, 1)) == (1, 1)


def is_linear_form(node: OpNode) -> bool:
    """add/sub/mul with one input (and a constant), as opposed to a sum or product of values."""
    return len(node.inputs) == 1


def kernel_base(node: OpNode) -> str:
    """The kernel family a node calls: ``<base>_forward``, ``<base>_vjp``, ... Most ops are
    their own; the round-2 families serve several ops (pbxc/codegen/kernels)."""
    kind = node.kind
    if kind in MAXPOOL:
        return "maxpool2d" if _pool_fast_2d(node) else "maxpool"
    if kind in AVGPOOL:
        return "avgpool2d" if _pool_fast_2d(node) else "avgpool"
    if kind in ADAPTIVE_AVGPOOL:
        return "adaptive_avgpool"
    if kind in (OpKind.SQUEEZE, OpKind.UNSQUEEZE) or (kind is OpKind.FLATTEN
                                                       and node.attr("start")):
        return "reshape"
    if kind in (OpKind.ADD, OpKind.SUB):
        if is_linear_form(node):
            return "shift"
        same = len(set(node.attr("in_shapes") or ())) <= 1
        return "add" if kind is OpKind.ADD and same else "signed_sum"
    if kind is OpKind.MUL:
        return "scale" if is_linear_form(node) else "product"
    if kind is OpKind.DIV:
        return "scale"
    return kind.value


def dfd_by_vjp(node: OpNode) -> bool:
    """Whether the node's DFD multipliers are its weights (an affine map: seed 004, eq. 7)."""
    return node.kind in DFD_BY_VJP or kernel_base(node) in ("shift", "scale", "signed_sum")


def _round2_attrs(node: OpNode) -> tuple[tuple[str, Any], ...] | None:
    kind, base = node.kind, kernel_base(node)
    out = tuple((node.shape or ())[1:])
    if base in ("maxpool", "avgpool"):
        kernel = tuple(node.attr("kernel"))
        attrs: list[tuple[str, Any]] = [
            ("kernel", kernel), ("stride", tuple(node.attr("stride") or kernel)),
            ("padding", tuple(node.attr("padding")))]
        if base == "maxpool":
            attrs.append(("dilation", tuple(node.attr("dilation"))))
        else:
            attrs.append(("count_include_pad", bool(node.attr("count_include_pad"))))
        return (*attrs, ("out", out))
    if base == "adaptive_avgpool":
        return (("output_size", out),)
    if kind is OpKind.UPSAMPLE:
        scale = node.attr("scale")
        spatial = len(out)
        if scale is not None and len(scale) == 1:
            scale = tuple(scale) * spatial
        return (("mode", node.attr("mode")), ("out", out), ("scale", scale),
                ("align_corners", bool(node.attr("align_corners"))))
    if base == "reshape":   # squeeze, unsqueeze, flatten from an inner axis
        return (("shape", tuple(node.shape or ())),)
    if base == "signed_sum":
        return (("signs", (1,) + ((-1,) if kind is OpKind.SUB else (1,)) * (len(node.inputs) - 1)),)
    if base == "shift":
        return (("sign", -1 if kind is OpKind.SUB else 1), ("value", node.attr("value")))
    if base == "scale":
        return (("inverse", kind is OpKind.DIV), ("value", node.attr("value")))
    if base == "product":
        return (("lrp", node.attr("lrp") or "gate"),)
    # issue 12 (helper tensor): tensor ops, per-sample axes made non-negative
    if kind in (OpKind.TRANSPOSE, OpKind.SLICE, OpKind.SELECT, OpKind.MEAN, OpKind.SUM):
        return _tensor_attrs(node)
    if kind is OpKind.PAD:
        return (("pads", tuple(node.attr("pad_pairs"))), ("value", float(node.attr("value"))))
    return None


def _tensor_attrs(node: OpNode) -> tuple[tuple[str, Any], ...]:
    """Literal attributes of transpose/slice/select/mean/sum (issue 12, helper tensor)."""
    kind = node.kind
    if kind is OpKind.TRANSPOSE:
        return (("perm", tuple(int(i) for i in node.attr("perm"))),)
    in_shape = tuple((node.attr("in_shapes") or ((),))[0])
    rank = len(in_shape)
    if kind in (OpKind.MEAN, OpKind.SUM):
        axes = node.attr("axes")
        norm = tuple(range(rank)) if axes is None else tuple(sorted(int(a) % rank for a in axes))
        return (("axes", norm), ("keepdims", bool(node.attr("keepdims"))))
    axis = int(node.attr("axis")) % rank
    if kind is OpKind.SELECT:
        return (("axis", axis), ("index", int(node.attr("index")) % in_shape[axis]))
    start, stop, step = slice(node.attr("start"), node.attr("stop"),
                              node.attr("step")).indices(in_shape[axis])
    return (("axis", axis), ("start", start), ("stop", stop if stop >= 0 else None),
            ("step", step))


@functools.lru_cache(maxsize=4096)
def _kernel_attrs(node: OpNode) -> tuple[tuple[str, Any], ...]:
    kind = node.kind
    round2 = _round2_attrs(node)
    if round2 is not None:
        return round2
    if kind in CONVOLUTIONS:
        return conv_kernel_attrs(node)
    if kind in (OpKind.MAXPOOL2D, OpKind.AVGPOOL2D):
        kernel = node.attr("kernel")
        attrs = [("kernel", kernel), ("stride", node.attr("stride") or kernel),
                 ("padding", node.attr("padding"))]
        if kind is OpKind.AVGPOOL2D:
            attrs.append(("count_include_pad", bool(node.attr("count_include_pad"))))
        return tuple(attrs)
    if kind is OpKind.RESHAPE:
        return (("shape", tuple(node.shape or ())),)
    if kind is OpKind.CONCAT:   # operands in written order: value indices, constants' roles
        rank = len(node.shape or ())
        return (("axis", int(node.attr("axis")) % max(rank, 1)),
                ("slots", node.operand_slots()))
    if kind in (OpKind.SOFTMAX, OpKind.LOG_SOFTMAX):
        rank = len(node.shape or ())
        return (("axis", int(node.attr("axis")) % max(rank, 1)),)
    if kind is OpKind.BATCHNORM:
        return (("eps", float(node.attr("eps"))),)
    if kind is OpKind.LAYERNORM:   # issue 12 (norm)
        return (("eps", float(node.attr("eps"))), ("last", int(node.attr("last"))))
    return ()


def conv_pad_pairs(node: OpNode) -> tuple[tuple[int, int], ...]:
    """A convolution's padding as ((begin, end), ...) per spatial axis (stored flat, per side)."""
    flat = tuple(node.attr("padding"))
    return tuple((flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2))


def conv_kernel_attrs(node: OpNode) -> tuple[tuple[str, Any], ...]:
    attrs: list[tuple[str, Any]] = [("stride", tuple(node.attr("stride"))),
                                    ("padding", conv_pad_pairs(node))]
    if node.kind in CONV_TRANSPOSED:
        attrs.append(("output_padding", tuple(node.attr("output_padding"))))
    attrs += [("dilation", tuple(node.attr("dilation"))), ("groups", int(node.attr("groups")))]
    return tuple(attrs)


def kernel_attrs(node: OpNode) -> dict[str, Any]:
    """The node's attributes as the kernel's keyword arguments (literals only)."""
    return dict(_kernel_attrs(node))


def kernel_name(node: OpNode, pass_suffix: str) -> str:
    """``<base>_<pass>`` (see :func:`kernel_base`)."""
    return f"{kernel_base(node)}_{pass_suffix}"


def require_kernel(module: Any, node: OpNode, pass_suffix: str, pass_name: str) -> Any:
    fn = getattr(module, kernel_name(node, pass_suffix), None)
    if fn is None:
        raise UnsupportedOp(f"the {pass_name} pass has no rule for op '{node.kind.value}'",
                            node.pos)
    return fn
