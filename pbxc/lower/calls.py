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
from pbxc.ops import AFFINE, CONV_TRANSPOSED, CONVOLUTIONS, SHAPE_ONLY, OpKind

#: Passes, by kernel suffix.
PASSES = ("forward", "local", "jvp", "vjp", "dfd")

#: Ops whose DFD multipliers are their weights (seed 004, eq. 7): the DFD rule is the VJP.
DFD_BY_VJP = frozenset(AFFINE | SHAPE_ONLY | {OpKind.ADD, OpKind.CONCAT})


@functools.lru_cache(maxsize=4096)
def _kernel_attrs(node: OpNode) -> tuple[tuple[str, Any], ...]:
    kind = node.kind
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
    if kind in (OpKind.CONCAT, OpKind.SOFTMAX, OpKind.LOG_SOFTMAX):
        rank = len(node.shape or ())
        return (("axis", int(node.attr("axis")) % max(rank, 1)),)
    if kind is OpKind.BATCHNORM:
        return (("eps", float(node.attr("eps"))),)
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
    """``<op>_<pass>``."""
    return f"{node.kind.value}_{pass_suffix}"


def require_kernel(module: Any, node: OpNode, pass_suffix: str, pass_name: str) -> Any:
    fn = getattr(module, kernel_name(node, pass_suffix), None)
    if fn is None:
        raise UnsupportedOp(f"the {pass_name} pass has no rule for op '{node.kind.value}'",
                            node.pos)
    return fn
