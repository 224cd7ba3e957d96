"""Constant padding (torch.nn.functional.pad with mode="constant", ONNX Pad).

``pads`` arrive per per-sample axis as ((before, after), ...). The map is affine: its linear
part pads with zeros (JVP) and crops (VJP); ``value`` is its offset, which LRP books as a
bias. (squeeze and unsqueeze are reshapes and use the reshape kernels.)
"""

import numpy as np


def pad_apply(x, pads, value, lead):
    return np.pad(x, [(0, 0)] * lead + [tuple(p) for p in pads], constant_values=value)


def pad_crop(g, pads, lead):
    index = tuple(slice(lo, g.shape[lead + i] - hi) for i, (lo, hi) in enumerate(pads))
    return np.ascontiguousarray(g[(slice(None),) * lead + index])


def pad_forward(xs, p, pads, value):
    return pad_apply(xs[0], pads, value, 1)


def pad_jvp(ts, xs, y, local, p, pads, value):
    return pad_apply(ts[0], pads, 0.0, 2)


def pad_vjp(v, xs, y, local, p, pads, value):
    return [pad_crop(v, pads, 2)]


def pad_lrp_params(p, xs, pads, value):
    """A unit weight; the padding value is the bias of the padded positions, which keeps
    their relevance (Zennit routes nothing there either)."""
    shape = xs[0].shape[1:]
    bias = pad_apply(np.zeros((1, *shape), dtype=xs[0].dtype), pads, value, 1)[0]
    return np.ones((), dtype=xs[0].dtype), bias if value != 0 else None


def pad_lrp_bias(b, z):
    return b[None]


def pad_lrp_forward(ins, w, pads, value):
    return w * pad_apply(ins[0], pads, 0.0, 1)


def pad_lrp_transpose(s, w, xs, pads, value):
    return [w * pad_crop(s, pads, 1)]
