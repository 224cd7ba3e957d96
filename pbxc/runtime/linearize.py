"""The linearisation of every op at a point: JVP and VJP rules, one per op kind.

As in JAX's ``primitive_jvps`` / ``primitive_transposes``: one rule per op and direction
(the ``<op>_jvp`` and ``<op>_vjp`` kernels of ``pbxc.codegen.numpy_kernels``), and a missing
rule is an error naming the pass and the op.

Tangents carry an extra axis after the batch: (B, K, *shape), K tangent (or cotangent)
directions per sample. Elementwise Jacobians are diagonal and never materialised; softmax uses
its closed form.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from pbxc.codegen import numpy_kernels as K
from pbxc.graph.ir import OpNode
from pbxc.lower.calls import kernel_attrs, require_kernel

Array = np.ndarray


@dataclass
class Point:
    """What a rule needs of the forward pass at the linearisation point."""

    node: OpNode
    inputs: list[Array]           # forward values of the inputs, (B, *in_shape)
    output: Array                 # forward value, (B, *out_shape)
    params: Mapping[str, Array]
    local: Array | None = None    # f'(z) for activations; argmax indices for max pooling


JvpRule = Callable[[Point, list[Array]], Array]
VjpRule = Callable[[Point, Array], list[Array]]


def jvp_rule(node: OpNode, pass_name: str = "jacobian (forward mode)") -> JvpRule:
    kernel = require_kernel(K, node, "jvp", pass_name)
    attrs = kernel_attrs(node)
    return lambda pt, ts: kernel(ts, pt.inputs, pt.output, pt.local, pt.params, **attrs)


def vjp_rule(node: OpNode, pass_name: str = "jacobian (reverse mode)") -> VjpRule:
    kernel = require_kernel(K, node, "vjp", pass_name)
    attrs = kernel_attrs(node)
    return lambda pt, v: kernel(v, pt.inputs, pt.output, pt.local, pt.params, **attrs)
