"""The NumPy reference forward pass: each node calls its op kernel with its literal attributes.

The kernels live in ``pbxc.codegen.numpy_kernels`` (and are copied into compiled modules);
``pbxc.lower.calls`` says which kernel a node calls and with what. Activations are the
sympy-printed functions of the model's ``ActivationTable``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from pbxc.codegen import numpy_kernels as K
from pbxc.graph.ir import OpNode
from pbxc.lower.calls import kernel_attrs, kernel_name, require_kernel

Array = np.ndarray
Params = Mapping[str, Array]  # role -> array
ForwardRule = Callable[[OpNode, list[Array], Params], Array]


def forward_rule(node: OpNode) -> ForwardRule:
    kernel = require_kernel(K, node, "forward", "forward (numpy backend)")
    attrs = kernel_attrs(node)
    return lambda n, xs, p: kernel(xs, p, **attrs)


def local_data(node: OpNode, xs: list[Array], params: Params) -> Array | None:
    """What the op's Jacobian needs besides its inputs and output (max pooling: argmax)."""
    kernel = getattr(K, kernel_name(node, "local"), None)
    return None if kernel is None else kernel(xs, params, **kernel_attrs(node))


def forward_with_local(node: OpNode, xs: list[Array], params: Params
                       ) -> tuple[Array, Array | None]:
    """The forward value and local_data together: one kernel call where the op has an
    ``<op>_forward_local`` (max pooling finds its maxima once for both), bit for bit the
    two separate calls."""
    both = getattr(K, kernel_name(node, "forward_local"), None)
    if both is not None:
        value, local = both(xs, params, **kernel_attrs(node))
        return value, local
    return forward_rule(node)(node, xs, params), local_data(node, xs, params)
