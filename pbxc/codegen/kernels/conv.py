"""The convolution family on NumPy: conv1d/2d/3d and conv_transpose1d/2d/3d, every pass.

One pair of kernels serves all six ops and all their passes:

* ``conv_nd``: cross-correlation as im2col then one GEMM per group (PyTorch's conv, weight
  ``[out, in/groups, *k]``). It is the forward of ``conv*d``, its JVP, and the VJP of
  ``conv_transpose*d`` (whose adjoint is the convolution with the same weight).
* ``conv_nd_transpose``: the adjoint of ``conv_nd`` with respect to its input, as one GEMM per
  group (W^T times the cotangent, giving columns) then col2im (each kernel offset's column is
  added into a strided slice of the input). It is the VJP of ``conv*d`` and the forward and
  JVP of ``conv_transpose*d`` (PyTorch defines ConvTranspose as exactly this map, weight
  ``[in, out/groups, *k]``). Nothing is zero-stuffed: the stride is a slice step.

Padding is per side, ``((begin, end), ...)`` per spatial axis (an int per axis means both
sides); positions in the padding are never materialised: each kernel offset reads (im2col) or
writes (col2im) only the range of output positions whose input lies inside the array, and the
rest of the column stays zero.

Workspace: both kernels run tile by tile over the batch and, when one sample alone would
exceed it, over the rows of the first output axis, so the columns, the GEMM result and its
transposed copy together stay within ``conv_workspace()`` bytes (where _per_sample_gemms
admits it, sample by sample instead: one sample's columns, one buffer for all samples, and
the GEMM writes the output in place) (default 256 MiB; the
environment variable ``PBXC_WORKSPACE_MB`` or ``set_conv_workspace(nbytes)`` change it). Only a
single output row of a single sample is never split. Tiling over the batch is exact (every
output element is the same GEMM dot product); tiling over rows changes the order in which
col2im adds the contributions of different kernel offsets to one input element, so the
transposed kernel then agrees with the untiled one to rounding (tests: within 1e-15
relative to the sum of the magnitudes).

This module imports only numpy and os: ``pbxc compile`` copies its source verbatim into
standalone generated modules, before ``numpy_kernels``.
"""

import os
import warnings

import numpy as np

_ALL = slice(None)
WORKSPACE_ENV = "PBXC_WORKSPACE_MB"
DEFAULT_WORKSPACE_MB = 256


def _workspace_from_env():
    text = os.environ.get(WORKSPACE_ENV, "").strip()
    if not text:
        return DEFAULT_WORKSPACE_MB << 20
    try:
        mb = float(text)
    except ValueError:
        mb = -1.0
    if not mb > 0 or mb != mb or mb == float("inf"):
        warnings.warn(f"{WORKSPACE_ENV}={text!r} is not a positive number of megabytes; "
                      f"using {DEFAULT_WORKSPACE_MB}", stacklevel=2)
        return DEFAULT_WORKSPACE_MB << 20
    return max(1, int(mb * (1 << 20)))


_WORKSPACE = [_workspace_from_env()]


def conv_workspace():
    """The byte limit of one convolution tile's temporaries (columns and GEMM results)."""
    return _WORKSPACE[0]


def set_conv_workspace(nbytes):
    """Set the convolution workspace limit in bytes; returns the previous limit."""
    nbytes = int(nbytes)
    if nbytes < 1:
        raise ValueError(f"the convolution workspace must be at least 1 byte, got {nbytes}")
    previous, _WORKSPACE[0] = _WORKSPACE[0], nbytes
    return previous


def conv_pads(padding):
    """Per-axis padding as ((begin, end), ...): an int means the same on both sides."""
    out = []
    for p in padding:
        if isinstance(p, (int, np.integer)):
            out.append((int(p), int(p)))
        else:
            out.append((int(p[0]), int(p[1])))
    return tuple(out)


def conv_out_size(size, kernel, stride, pads, dilation):
    """PyTorch's floor((n + begin + end - dilation*(k-1) - 1) / stride) + 1."""
    return (size + pads[0] + pads[1] - dilation * (kernel - 1) - 1) // stride + 1


def conv_transpose_out_size(size, kernel, stride, pads, dilation, output_padding):
    """(n - 1)*stride - begin - end + dilation*(k-1) + output_padding + 1, as PyTorch/ONNX."""
    return (size - 1) * stride - pads[0] - pads[1] + dilation * (kernel - 1) + output_padding + 1


def _kernel_offsets(kernel):
    """Every kernel offset, in row-major order (np.ndindex's order; a plain list is far
    cheaper to build than an ndindex, which costs more than a small convolution)."""
    out: list = [()]
    for k in kernel:
        out = [(*o, i) for o in out for i in range(k)]
    return out


def _pointwise(kernel, stride, pads):
    """A 1x1 (x 1) kernel with stride 1 and no padding: im2col and col2im are the identity."""
    return (all(k == 1 for k in kernel) and all(s == 1 for s in stride)
            and not any(b or e for b, e in pads))


def _conv_valid_range(offset, size, out, stride, pad_begin, dilation):
    """Output positions r whose input r*stride + offset*dilation - pad_begin lies in [0, size)."""
    shift = offset * dilation - pad_begin
    lo = max(0, -(shift // stride))                          # ceil(-shift / stride)
    hi = min(out, max(0, (size - 1 - shift) // stride + 1))
    return lo, hi


def _conv_slices(offset, in_spatial, out, stride, pads, dilation, rows):
    """For one kernel offset and output rows [r0, r1) of the first axis: (input slices,
    column slices), or None when no output position of the tile reads inside the input."""
    r0, r1 = rows
    src, dst = [], []
    for ax, o in enumerate(offset):
        lo, hi = _conv_valid_range(o, in_spatial[ax], out[ax], stride[ax], pads[ax][0], dilation[ax])
        base = 0
        if ax == 0:
            lo, hi, base = max(lo, r0), min(hi, r1), r0
        if lo >= hi:
            return None
        start = lo * stride[ax] + o * dilation[ax] - pads[ax][0]
        src.append(slice(start, start + (hi - lo - 1) * stride[ax] + 1, stride[ax]))
        dst.append(slice(lo - base, hi - base))
    return tuple(src), tuple(dst)


def _conv_plan(kernel, in_spatial, out, stride, pads, dilation, rows):
    """Every kernel offset with its _conv_slices (None: it reads nothing in these rows)."""
    return [(offset, _conv_slices(offset, in_spatial, out, stride, pads, dilation, rows))
            for offset in _kernel_offsets(kernel)]


def _conv_tiles(batch, rows, row_bytes):
    """(b0, b1, r0, r1) tiles: whole samples while one fits the workspace, else row blocks."""
    limit = _WORKSPACE[0]
    sample = rows * row_bytes
    if sample <= limit:
        per = max(1, min(batch, limit // max(sample, 1)))
        return [(b, min(b + per, batch), 0, rows) for b in range(0, batch, per)]
    per_rows = max(1, limit // max(row_bytes, 1))
    return [(b, b + 1, r, min(r + per_rows, rows))
            for b in range(batch) for r in range(0, rows, per_rows)]


def _zero_outside(cols, lead, dst, tile):
    """Zero the positions of one kernel offset's column block ``cols[lead]`` (spatial shape
    ``tile``) that lie outside the box ``dst`` im2col wrote: one slab per axis and side,
    the earlier axes restricted to the box (the slabs are disjoint)."""
    for ax, d in enumerate(dst):
        before = (*lead, *dst[:ax])
        if d.start > 0:
            low = (*before, slice(0, d.start))
            cols[low] = 0
        if d.stop < tile[ax]:
            high = (*before, slice(d.stop, None))
            cols[high] = 0


def _buffer(work, shape, dtype):
    """A view of the reusable flat buffer ``work`` (or a new array) with this shape."""
    size = int(np.prod(shape))
    if work is None or work.size < size or work.dtype != dtype:
        return np.empty(shape, dtype=dtype)
    return work[:size].reshape(shape)


def im2col_nd(x, kernel, stride, pads, dilation, out, rows=None, sample_major=False,
              work=None, plan=None):
    """(n, C, *in) -> columns (C, *kernel, n, r1 - r0, *out[1:]) for output rows [r0, r1) of
    the first spatial axis: one strided copy per kernel offset; padding reads as zero.

    ``sample_major`` gives the layout (n, C, *kernel, r1 - r0, *out[1:]) instead (one
    sample's columns contiguous: per-sample GEMMs). ``work``, a flat array, is reused for
    the columns when it is large enough; ``plan`` is _conv_plan's for these rows. Only the
    positions no input reaches are zeroed."""
    n, c = x.shape[:2]
    rows = (0, out[0]) if rows is None else rows
    tile = (rows[1] - rows[0], *out[1:])
    shape = (n, c, *kernel, *tile) if sample_major else (c, *kernel, n, *tile)
    cols = _buffer(work, shape, x.dtype)
    xt = x if sample_major else x.swapaxes(0, 1)   # (C, n, *in), a view
    if plan is None:
        plan = _conv_plan(kernel, x.shape[2:], out, stride, pads, dilation, rows)
    for offset, found in plan:
        lead = (_ALL, _ALL, *offset) if sample_major else (_ALL, *offset, _ALL)
        if found is None:
            cols[lead] = 0
            continue
        src, dst = found
        into, start = (*lead, *dst), (_ALL, _ALL, *src)
        cols[into] = xt[start]
        _zero_outside(cols, lead, dst, tile)
    return cols


def col2im_add_nd(cols, dest, stride, pads, dilation, out, rows=None, sample_major=False,
                  plan=None):
    """The adjoint of im2col_nd: add each offset's columns into ``dest`` (n, C, *in) in place
    (``cols`` in im2col_nd's layout, ``sample_major`` and ``plan`` as there)."""
    kernel = cols.shape[2:cols.ndim - len(out)] if sample_major else \
        cols.shape[1:cols.ndim - len(out) - 1]
    rows = (0, out[0]) if rows is None else rows
    dt = dest if sample_major else dest.swapaxes(0, 1)   # (C, n, *in), a view
    if plan is None:
        plan = _conv_plan(kernel, dest.shape[2:], out, stride, pads, dilation, rows)
    for offset, found in plan:
        if found is None:
            continue
        src, dst = found
        lead = (_ALL, _ALL, *offset) if sample_major else (_ALL, *offset, _ALL)
        into, start = (_ALL, _ALL, *src), (*lead, *dst)
        dt[into] += cols[start]


# Per-sample GEMMs: each sample's columns (or, transposed, its cotangent as it lies) in one
# GEMM writing that sample's block of the result in place, instead of one GEMM of
# (rows, n * positions) over the tile's samples and a batch-major copy. Only where it is
# faster (from DIRECT_MIN_POSITIONS output positions per sample: below, at ResNet's 14x14
# and 7x7, the batched GEMM's wider shape runs faster) and where OpenBLAS gives bit for bit
# the batched GEMM's values: the GEMM computes every element as the same dot product in
# the same order, except in the micro-kernels of a ragged last column block and in its
# small-matrix kernels, so the positions are a multiple of DIRECT_POSITION_MULTIPLE and
# the per-sample M*N*K at least DIRECT_MIN_MNK (measured on random shapes in both
# precisions: tests/unit/runtime/test_conv_family.py checks bit equality on every path).
DIRECT_MIN_POSITIONS = [256]
DIRECT_POSITION_MULTIPLE = 16
DIRECT_MIN_MNK = 1 << 21


def _per_sample_gemms(rows, depth, positions):
    """Whether per-sample GEMMs of (rows, depth) x (depth, positions) replace the batched one."""
    return (positions >= DIRECT_MIN_POSITIONS[0] and positions % DIRECT_POSITION_MULTIPLE == 0
            and rows * depth * positions >= DIRECT_MIN_MNK)


def conv_nd(x, weight, bias, stride, padding, dilation, groups, out_spatial=None):
    """PyTorch's conv1d/2d/3d (cross-correlation): (n, C, *in) -> (n, O, *out).

    ``out_spatial`` crops the output to a given size (the adjoint of a transposed convolution
    whose output_padding reaches past the last full window)."""
    pads = conv_pads(padding)
    n, c = x.shape[:2]
    o, cpg = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    if out_spatial is None:
        out_spatial = tuple(conv_out_size(s, k, st, p, d) for s, k, st, p, d in
                            zip(x.shape[2:], kernel, stride, pads, dilation))
    out = tuple(out_spatial)
    opg, ksize = o // groups, int(np.prod(kernel))
    dtype = np.result_type(x, weight)
    y = np.empty((n, o, *out), dtype=dtype)
    rest = int(np.prod(out[1:]))
    w2 = weight.reshape(groups, opg, cpg * ksize)
    pointwise = _pointwise(kernel, stride, pads) and tuple(x.shape[2:]) == out
    # per-sample GEMMs: the workspace holds the columns only (none when pointwise)
    direct_bytes = 0 if pointwise else dtype.itemsize * rest * c * ksize
    if (groups == 1 and x.dtype == dtype and _per_sample_gemms(o, c * ksize, out[0] * rest)
            and out[0] * direct_bytes <= _WORKSPACE[0]
            and (x.flags.c_contiguous or not pointwise)):   # (views, not copies, of x)
        positions = out[0] * rest
        if pointwise:   # the columns are the input itself: one stacked GEMM per tile
            for b0, b1, _, _ in _conv_tiles(n, out[0], 0):
                np.matmul(w2[0], x[b0:b1].reshape(b1 - b0, c, positions),
                          out=y[b0:b1].reshape(b1 - b0, o, positions))
        else:   # sample by sample: one sample's columns, reused, stay in cache for its GEMM
            work = None
            plan = _conv_plan(kernel, x.shape[2:], out, stride, pads, dilation, (0, out[0]))
            for b in range(n):
                cols = im2col_nd(x[b:b + 1], kernel, stride, pads, dilation, out,
                                 sample_major=True, work=work, plan=plan)
                work = cols.reshape(-1)
                np.matmul(w2[0], work.reshape(c * ksize, positions), out=y[b].reshape(o, positions))
                del cols
            del work
    else:
        # the columns, the GEMM result and its batch-major copy, per sample and output row
        row_bytes = dtype.itemsize * rest * (c * ksize + 2 * o)
        work = None
        for b0, b1, r0, r1 in _conv_tiles(n, out[0], row_bytes):
            if pointwise:   # the columns are the input itself (a view for one sample)
                cols = x[b0:b1, :, r0:r1].swapaxes(0, 1)
            else:
                cols = im2col_nd(x[b0:b1], kernel, stride, pads, dilation, out, (r0, r1),
                                 work=work)
                if work is None:
                    work = cols.reshape(-1)
            cols = cols.reshape(groups, cpg * ksize, -1)
            if groups == 1 and b1 - b0 == 1 and (r0, r1) == (0, out[0]):
                # one whole sample: the GEMM writes its (O, *out) block of y in place
                np.matmul(w2[0], cols[0], out=y[b0].reshape(o, -1))
            else:
                prod = w2[0] @ cols[0] if groups == 1 else np.matmul(w2, cols)
                y[b0:b1, :, r0:r1] = prod.reshape(o, b1 - b0, r1 - r0, *out[1:]).swapaxes(0, 1)
                del prod
            del cols
        del work
    if bias is not None:
        y += bias.reshape(1, -1, *(1,) * len(out))
    return y


def conv_nd_transpose(g, weight, in_spatial, stride, padding, dilation, groups):
    """The adjoint of conv_nd (no bias) wrt its input: (n, O, *out) -> (n, C, *in_spatial).

    GEMM then col2im, tile by tile; input positions no window reads get zero."""
    pads = conv_pads(padding)
    n, o = g.shape[:2]
    out = tuple(g.shape[2:])
    cpg = weight.shape[1]
    kernel = tuple(weight.shape[2:])
    c, opg, ksize = cpg * groups, o // groups, int(np.prod(kernel))
    dtype = np.result_type(g, weight)
    rest = int(np.prod(out[1:]))
    positions = out[0] * rest
    w2t = weight.reshape(groups, opg, cpg * ksize).transpose(0, 2, 1)   # (g, cpg*K, opg)
    if groups == 1 and _pointwise(kernel, stride, pads) and tuple(in_spatial) == out:
        # col2im is the identity: per sample, one GEMM straight into the result (no
        # workspace: nothing but the result is written)
        result = np.empty((n, c, *in_spatial), dtype=dtype)
        if g.dtype == dtype and g.flags.c_contiguous:   # the same per-sample GEMMs, in one call
            np.matmul(w2t[0], g.reshape(n, o, positions), out=result.reshape(n, c, positions))
        else:
            for b in range(n):
                np.matmul(w2t[0], g[b].reshape(o, -1), out=result[b].reshape(c, -1))
        return result
    result = np.zeros((n, c, *in_spatial), dtype=dtype)
    # per-sample GEMMs: each sample's cotangent is already (O, positions); the workspace
    # holds the columns only
    direct_bytes = dtype.itemsize * rest * c * ksize
    work = None
    if (groups == 1 and g.dtype == dtype and _per_sample_gemms(c * ksize, o, positions)
            and out[0] * direct_bytes <= _WORKSPACE[0]):
        plan = _conv_plan(kernel, tuple(in_spatial), out, stride, pads, dilation, (0, out[0]))
        for b in range(n):   # one sample's columns, reused, stay in cache for col2im
            cols = _buffer(work, (c * ksize, positions), dtype)
            work = cols.reshape(-1)
            np.matmul(w2t[0], g[b].reshape(o, positions), out=cols)
            col2im_add_nd(cols.reshape(1, c, *kernel, *out), result[b:b + 1], stride, pads,
                          dilation, out, sample_major=True, plan=plan)
            del cols
        del work
        return result
    # the cotangent's channel-major copy and the columns, per sample and output row
    row_bytes = dtype.itemsize * rest * (o + c * ksize)
    for b0, b1, r0, r1 in _conv_tiles(n, out[0], row_bytes):
        gt = np.ascontiguousarray(g[b0:b1, :, r0:r1].swapaxes(0, 1)).reshape(groups, opg, -1)
        cols = w2t[0] @ gt[0] if groups == 1 else np.matmul(w2t, gt)
        del gt
        cols = cols.reshape(c, *kernel, b1 - b0, r1 - r0, *out[1:])
        col2im_add_nd(cols, result[b0:b1], stride, pads, dilation, out, (r0, r1))
        del cols
    return result


def conv_transpose_nd(x, weight, bias, stride, padding, output_padding, dilation, groups):
    """PyTorch's conv_transpose1d/2d/3d: weight [in, out/groups, *k]; (n, in, *s) -> (n, out, *s').

    The adjoint of the convolution with the same weight, onto the output size that
    stride, padding, dilation and output_padding give."""
    pads = conv_pads(padding)
    kernel = weight.shape[2:]
    out = tuple(conv_transpose_out_size(s, k, st, p, d, op) for s, k, st, p, d, op in
                zip(x.shape[2:], kernel, stride, pads, dilation, output_padding))
    y = conv_nd_transpose(x, weight, out, stride, pads, dilation, groups)
    if bias is not None:
        y += bias.reshape(1, -1, *(1,) * len(out))
    return y


def conv_dense_matrix(weight, in_spatial, stride, padding, dilation, groups, out_spatial=None):
    """The (out, in) matrix of conv_nd without bias, scattered directly from the weights:
    entry ((o, r), (c, i)) is w[o, c mod cpg, k] where i = r*stride + k*dilation - pad_begin.
    Costs one zero-filled allocation and, per kernel offset, one strided broadcast write of
    the offset's weights; no im2col. ``out_spatial`` crops the output as in conv_nd."""
    pads = conv_pads(padding)
    o, cpg = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    c, opg = cpg * groups, o // groups
    out = tuple(out_spatial) if out_spatial is not None else tuple(
        conv_out_size(s, k, st, p, d) for s, k, st, p, d in
        zip(in_spatial, kernel, stride, pads, dilation))
    n_out, n_in = int(np.prod(out)), int(np.prod(in_spatial))
    dense = np.zeros((o, n_out, c, n_in), dtype=weight.dtype)
    flat = dense.reshape(-1)
    item = dense.itemsize
    # element strides of dense seen as (O, *out, C, *in)
    out_strides = [int(np.prod(out[ax + 1:])) * c * n_in for ax in range(len(out))]
    in_strides = [int(np.prod(in_spatial[ax + 1:])) for ax in range(len(in_spatial))]
    for offset in _kernel_offsets(kernel):
        found = _conv_slices(offset, in_spatial, out, stride, pads, dilation, (0, out[0]))
        if found is None:
            continue
        src, dst = found
        # for this offset, entry (o, c, r) sits at a fixed linear address in (o, c, r): one
        # strided view of dense takes the whole offset's weights in one broadcast write
        base = sum(d.start * so + sl.start * si
                   for d, sl, so, si in zip(dst, src, out_strides, in_strides))
        shape = (o, c, *(d.stop - d.start for d in dst))
        strides = (n_out * c * n_in, n_in,
                   *(so + st * si for so, st, si in zip(out_strides, stride, in_strides)))
        view = np.lib.stride_tricks.as_strided(flat[base:], shape,
                                               tuple(x * item for x in strides), writeable=True)
        which = (_ALL, _ALL, *offset)
        values = weight[which].reshape(o, cpg, *(1,) * len(out))
        for grp in range(groups):
            view[grp * opg:(grp + 1) * opg, grp * cpg:(grp + 1) * cpg] = \
                values[grp * opg:(grp + 1) * opg]
    return dense.reshape(o * n_out, c * n_in)


# ---- pbxc's kernel-table entries (``<op>_<pass>``, uniform signatures; see numpy_kernels)
def _conv_flat(t):
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _conv_unflat(t, like):
    return t.reshape(like.shape[0], like.shape[1], *t.shape[1:])


def conv_forward(xs, p, stride, padding, dilation, groups):
    return conv_nd(xs[0], p["weight"], p.get("bias"), stride, padding, dilation, groups)


def conv_jvp(ts, xs, y, local, p, stride, padding, dilation, groups):
    t = ts[0]
    return _conv_unflat(conv_nd(_conv_flat(t), p["weight"], None, stride, padding, dilation, groups), t)


def conv_vjp(v, xs, y, local, p, stride, padding, dilation, groups):
    g = conv_nd_transpose(_conv_flat(v), p["weight"], xs[0].shape[2:], stride, padding, dilation,
                          groups)
    return [_conv_unflat(g, v)]


def conv_lrp_params(p, xs, **attrs):
    return p["weight"], p.get("bias")


def conv_lrp_bias(b, z):
    return b.reshape(-1, *(1,) * (z.ndim - 2))


def conv_lrp_forward(ins, w, stride, padding, dilation, groups):
    return conv_nd(ins[0], w, None, stride, padding, dilation, groups)


def conv_lrp_transpose(s, w, xs, stride, padding, dilation, groups):
    return [conv_nd_transpose(s, w, xs[0].shape[2:], stride, padding, dilation, groups)]


def conv_transpose_forward(xs, p, stride, padding, output_padding, dilation, groups):
    return conv_transpose_nd(xs[0], p["weight"], p.get("bias"), stride, padding,
                             output_padding, dilation, groups)


def conv_transpose_jvp(ts, xs, y, local, p, stride, padding, output_padding, dilation,
                       groups):
    t = ts[0]
    out = _conv_flat(t)
    return _conv_unflat(conv_nd_transpose(out, p["weight"], y.shape[2:], stride, padding, dilation,
                                     groups), t)


def conv_transpose_vjp(v, xs, y, local, p, stride, padding, output_padding, dilation,
                       groups):
    g = conv_nd(_conv_flat(v), p["weight"], None, stride, padding, dilation, groups,
                out_spatial=xs[0].shape[2:])
    return [_conv_unflat(g, v)]


def conv_transpose_lrp_forward(ins, w, stride, padding, output_padding, dilation, groups):
    return conv_transpose_nd(ins[0], w, None, stride, padding, output_padding, dilation, groups)


def conv_transpose_lrp_transpose(s, w, xs, stride, padding, output_padding, dilation, groups):
    return [conv_nd(s, w, None, stride, padding, dilation, groups, out_spatial=xs[0].shape[2:])]


conv1d_forward = conv2d_forward = conv3d_forward = conv_forward
conv1d_jvp = conv2d_jvp = conv3d_jvp = conv_jvp
conv1d_vjp = conv2d_vjp = conv3d_vjp = conv_vjp
conv1d_lrp_params = conv2d_lrp_params = conv3d_lrp_params = conv_lrp_params
conv1d_lrp_bias = conv2d_lrp_bias = conv3d_lrp_bias = conv_lrp_bias
conv1d_lrp_forward = conv2d_lrp_forward = conv3d_lrp_forward = conv_lrp_forward
conv1d_lrp_transpose = conv2d_lrp_transpose = conv3d_lrp_transpose = conv_lrp_transpose
conv_transpose1d_forward = conv_transpose2d_forward = conv_transpose3d_forward = (
    conv_transpose_forward)
conv_transpose1d_jvp = conv_transpose2d_jvp = conv_transpose3d_jvp = conv_transpose_jvp
conv_transpose1d_vjp = conv_transpose2d_vjp = conv_transpose3d_vjp = conv_transpose_vjp
conv_transpose1d_lrp_params = conv_transpose2d_lrp_params = conv_transpose3d_lrp_params = (
    conv_lrp_params)
conv_transpose1d_lrp_bias = conv_transpose2d_lrp_bias = conv_transpose3d_lrp_bias = (
    conv_lrp_bias)
conv_transpose1d_lrp_forward = conv_transpose2d_lrp_forward = conv_transpose3d_lrp_forward = (
    conv_transpose_lrp_forward)
conv_transpose1d_lrp_transpose = conv_transpose2d_lrp_transpose = (
    conv_transpose3d_lrp_transpose) = conv_transpose_lrp_transpose


# ---- the 2-d and 1-d names of earlier releases
def conv2d(x, weight, bias, stride, padding, dilation, groups):
    """PyTorch's conv2d (cross-correlation); weight [out, in/groups, kh, kw]."""
    return conv_nd(x, weight, bias, stride, padding, dilation, groups)


def conv2d_transpose(g, weight, in_hw, stride, padding, dilation, groups):
    """The adjoint of conv2d without bias: cotangent (N, O, OH, OW) -> (N, C, H, W)."""
    return conv_nd_transpose(g, weight, tuple(in_hw), stride, padding, dilation, groups)


def conv1d(x, weight, bias, stride, padding, dilation, groups):
    return conv_nd(x, weight, bias, stride, padding, dilation, groups)


def conv1d_transpose(g, weight, in_len, stride, padding, dilation, groups):
    return conv_nd_transpose(g, weight, (int(in_len),), stride, padding, dilation, groups)
