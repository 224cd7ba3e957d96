"""Where the batch axis sits: ONNX import of graphs that move or merge it (issue 12).

`torch.onnx.export` of a ``batch_first`` attention block transposes to sequence-first inside
the graph ([N, L, E] -> [L, N, E]), merges the batch with the heads ([L, N*H, d], then
[N*H, L, d]) and with the tokens ([L*N, E] for the output projection), and moves it back at
the end. pbxc keeps the batch first and implicit, so the importer tracks, per ONNX value, a
:class:`Layout`: which ONNX axis holds the batch, and which per-sample factors share that axis
with it. The pbxc value is always the ONNX tensor with the batch factor taken out, its other
factors in ONNX's row-major order (the "tidy" form): a ``Transpose`` becomes a per-sample
``transpose`` (the batch's axis group moves as a block), a ``Reshape`` that keeps the batch
factor whole becomes a per-sample ``reshape`` (the row-major order of the other factors is
unchanged), and ``MatMul``/``Softmax``/``Gather``/linear layers act on per-sample axes. An
op that would split the batch factor, reduce over it, or mix it with another sample is an
error naming the node; a value that reaches any other op (or a graph output) with its batch
moved is an error naming that node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Layout:
    """An ONNX value whose batch is not (alone) at axis 0.

    ``dims``: the ONNX dims, with ``dims[bax]`` the per-sample part of the batch's axis
    (``prod(pre) * prod(post)``); ``pre``/``post``: the factor of that axis before (major)
    and after (minor) the batch, ``()`` when there is none. The pbxc value's shape is
    ``dims[:bax] + pre + post + dims[bax + 1:]``."""

    dims: tuple[int, ...]
    bax: int
    pre: tuple[int, ...] = ()
    post: tuple[int, ...] = ()

    @property
    def canonical(self) -> bool:
        return self.bax == 0 and not self.pre and not self.post

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.dims[:self.bax], *self.pre, *self.post, *self.dims[self.bax + 1:])

    def full(self, batch: int) -> tuple[int, ...]:
        d = list(self.dims)
        d[self.bax] *= batch
        return tuple(d)

    def block(self, j: int) -> list[int]:
        """The pbxc axes that ONNX axis ``j`` holds."""
        k = len(self.pre) + len(self.post)
        if j < self.bax:
            return [j]
        if j == self.bax:
            return list(range(j, j + k))
        return [j - 1 + k]

    def describe(self) -> str:
        parts = [str(d) for d in self.dims]
        inner = [*map(str, self.pre), "N", *map(str, self.post)]
        parts[self.bax] = "*".join(inner)
        return "[" + ", ".join(parts) + "]"


def _factor(n: int) -> tuple[int, ...]:
    return () if n == 1 else (n,)


class LayoutOps:
    """Handlers (``lay_<Op>``) for values whose batch has moved; a mixin of Converter."""

    # ---- helpers provided by Converter (declared for readers and mypy)
    fail: Any
    values: dict[str, Any]
    alias_out: dict[str, str]
    failed: set[str]
    consts: dict[str, np.ndarray]
    batch_consts: dict[str, tuple[np.ndarray, np.ndarray]]
    batch: int | None
    fresh: Any
    emit: Any
    out_name: Any
    check_attrs: Any
    const: Any
    is_const: Any
    weight: Any
    prefix: Any
    weights: dict[str, np.ndarray]
    linear: Any
    inferred_full: dict[str, tuple[int | None, ...]]
    dtype: str

    # ------------------------------------------------------------ values

    def raw_value(self, node: Any, name: str, layout: str = "onnx") -> Any:
        """The Value of ``name`` as it is (a moved batch kept); canonical values in their
        ONNX layout (a pending reshape written)."""
        from pbxc.interop.onnx_import import _Cascade

        key = self.alias_out.get(name, name)
        if key in self.failed:
            raise _Cascade()
        v = self.values.get(key)
        if v is not None and v.layout is not None:
            return v
        return self.value(node, name, layout)  # type: ignore[attr-defined]

    def lay_in(self, node: Any, name: str) -> tuple[Any, Layout]:
        v = self.raw_value(node, name)
        if v.layout is not None:
            return v, v.layout
        return v, Layout((1, *v.shape), 0)

    def has_layout(self, name: str) -> bool:
        v = self.values.get(self.alias_out.get(name, name))
        return v is not None and getattr(v, "layout", None) is not None

    def probes(self) -> tuple[int, ...]:
        from pbxc.interop.onnx_import import BATCH_PROBES

        return (self.batch,) if self.batch is not None else BATCH_PROBES

    def check_full(self, node: Any, lay: Layout, tensor: str | None = None) -> None:
        """The output's ONNX shape (batch included) against onnx's shape inference."""
        got = self.inferred_full.get(tensor or node.output[0])
        if got is None or len(got) != len(lay.dims):
            if got is not None:
                raise self.fail(node, f"output rank {len(lay.dims)} disagrees with onnx's "
                                f"shape inference {list(got)}")
            return
        for j, (g, d) in enumerate(zip(got, lay.dims)):
            if j == lay.bax:
                if g is not None and self.batch is not None and g != d * self.batch:
                    raise self.fail(node, f"output shape {lay.describe()} disagrees with "
                                    f"onnx's shape inference {list(got)}")
            elif g is not None and g != d:
                raise self.fail(node, f"output shape {lay.describe()} disagrees with onnx's "
                                f"shape inference {list(got)}")

    def lay_define(self, node: Any, expr: str | None, src: Any, lay: Layout,
                   tensor: str | None = None) -> None:
        """Define the node's output: ``expr`` (None: the same pbxc value as ``src``)."""
        from pbxc.interop.onnx_import import Value

        tensor = tensor or node.output[0]
        self.check_full(node, lay, tensor)
        if any(d <= 0 for d in lay.dims):
            raise self.fail(node, f"output shape {lay.describe()} is empty")
        keep = None if lay.canonical else lay
        shape = lay.shape
        if expr is None:
            self.values[tensor] = Value(src.name, shape, shape, keep)
            return
        name = self.out_name(node, tensor)
        self.emit(name, expr)
        self.values[tensor] = Value(name, shape, shape, keep)

    def step(self, v: Any, expr: str, shape: tuple[int, ...], stem: str) -> Any:
        """An intermediate pbxc statement (a transpose or reshape to bring axes in place)."""
        from pbxc.interop.onnx_import import Value

        name = self.fresh(f"{v.name}_{stem}")
        self.emit(name, expr.format(x=v.name))
        return Value(name, shape, shape)

    @staticmethod
    def reshape_expr(v: Any, shape: tuple[int, ...]) -> str | None:
        if tuple(v.shape) == tuple(shape):
            return None
        return f"reshape({v.name}, [{', '.join(map(str, shape))}])"

    @staticmethod
    def transpose_expr(v: Any, perm: list[int]) -> str | None:
        if perm == list(range(len(perm))):
            return None
        text = ", ".join(map(str, perm)) + ("," if len(perm) == 1 else "")
        return f"transpose({v.name}, perm=({text}))"

    def batch_error(self, node: Any, lay: Layout, what: str) -> Any:
        return self.fail(node, f"{what} (the batch is in ONNX axis {lay.bax} of "
                         f"{lay.describe()}, N the batch)")

    def onnx_axis(self, node: Any, axis: int, lay: Layout) -> int:
        r = len(lay.dims)
        a = axis + r if axis < 0 else axis
        if not 0 <= a < r:
            raise self.fail(node, f"axis {axis} is out of range for rank {r}")
        if a == lay.bax:
            raise self.batch_error(node, lay, f"axis {axis} holds the batch")
        return a

    def pbx_axis(self, lay: Layout, j: int) -> int:
        """The pbxc axis (negative, from the end) of batch-free ONNX axis ``j``."""
        return lay.block(j)[0] - len(lay.shape)

    # ------------------------------------------------------------ moves

    def lay_Transpose(self, node: Any) -> None:
        a = self.check_attrs(node, {"perm": None})
        v, lay = self.lay_in(node, node.input[0])
        r = len(lay.dims)
        perm = [int(p) for p in a.get("perm", list(range(r))[::-1])]
        if sorted(perm) != list(range(r)):
            raise self.fail(node, f"perm {perm} is not a permutation of 0..{r - 1}")
        order = [p for j in perm for p in lay.block(j)]
        new = Layout(tuple(lay.dims[j] for j in perm), perm.index(lay.bax), lay.pre, lay.post)
        self.lay_define(node, self.transpose_expr(v, order), v, new)

    def target_at(self, node: Any, name: str, k: int, full: tuple[int, ...],
                  allowzero: bool) -> list[int]:
        if name in self.batch_consts:
            t = self.batch_consts[name][min(k, 1)]
        else:
            t = self.const(node, name)
        out = [int(v) for v in np.asarray(t).reshape(-1)]
        if allowzero and 0 in out:
            raise self.fail(node, f"allowzero=1 with a 0 in the shape {out}")
        out = [full[i] if d == 0 and i < len(full) else d for i, d in enumerate(out)]
        if sum(1 for d in out if d == -1) > 1 or any(d < -1 or d == 0 for d in out):
            raise self.fail(node, f"shape {out} is not a valid reshape target")
        n = math.prod(full)
        if -1 in out:
            known = math.prod(d for d in out if d != -1)
            if known <= 0 or n % known:
                raise self.fail(node, f"reshape of {list(full)} to {out} does not divide "
                                "evenly")
            out[out.index(-1)] = n // known
        if math.prod(out) != n:
            raise self.fail(node, f"reshape of {list(full)} to {out} changes the number of "
                            "elements")
        return out

    def regroup(self, node: Any, lay: Layout, target: list[int], b: int) -> Layout:
        """Where the batch factor lands in ``target`` (a reshape of ``lay.full(b)``)."""
        after = math.prod(lay.post) * math.prod(lay.dims[lay.bax + 1:])   # the batch's stride
        strides = [math.prod(target[i + 1:]) for i in range(len(target))]
        cands = [i for i, (t, s) in enumerate(zip(target, strides))
                 if s <= after and after * b <= s * t and after % s == 0 and
                 (s * t) % (after * b) == 0 and ((b > 1 and after < s * t) or b == 1)]
        if b == 1 and cands:   # batch 1: prefer an axis of size 1 at the batch's place
            ones = [i for i in cands if target[i] == 1 and strides[i] == after]
            cands = ones[:1] or cands[:1]
        if len(cands) != 1:
            raise self.batch_error(node, lay, f"the reshape to {target} splits the batch "
                                   "axis or mixes it with other elements")
        i = cands[0]
        post = after // strides[i]
        pre = target[i] // (post * b)
        dims = list(target)
        dims[i] = pre * post
        return Layout(tuple(dims), i, _factor(pre), _factor(post))

    def lay_reshape(self, node: Any, lay: Layout, shape_input: str,
                    allowzero: bool) -> Layout:
        """The layout after ``Reshape`` of a value of layout ``lay`` to ``shape_input``."""
        found: set[Layout] = set()
        for k, b in enumerate(self.probes()):
            target = self.target_at(node, shape_input, k, lay.full(b), allowzero)
            found.add(self.regroup(node, lay, target, b))
        if len(found) != 1:
            raise self.batch_error(node, lay, "the reshape target depends on the batch other "
                                   "than through the batch's own axis")
        (new,) = found
        return new

    def lay_Reshape(self, node: Any) -> None:
        a = self.check_attrs(node, {"allowzero": (0, 1)})
        v, lay = self.lay_in(node, node.input[0])
        new = self.lay_reshape(node, lay, node.input[1], bool(a.get("allowzero", 0)))
        self.lay_define(node, self.reshape_expr(v, new.shape), v, new)

    def lay_Unsqueeze(self, node: Any) -> None:
        a = self.check_attrs(node, {"axes": None})
        v, lay = self.lay_in(node, node.input[0])
        axes = self._axes(node, a)  # type: ignore[attr-defined]
        if not axes:
            raise self.fail(node, "Unsqueeze needs axes")
        r = len(lay.dims) + len(axes)
        norm = sorted({ax + r if ax < 0 else ax for ax in axes})
        if len(norm) != len(axes) or any(not 0 <= ax < r for ax in norm):
            raise self.fail(node, f"axes {axes} must be distinct axes of rank {r}")
        dims, bax, it = [], 0, iter(enumerate(lay.dims))
        for i in range(r):
            if i in norm:
                dims.append(1)
                continue
            j, d = next(it)
            if j == lay.bax:
                bax = i
            dims.append(d)
        new = Layout(tuple(dims), bax, lay.pre, lay.post)
        self.lay_define(node, self.reshape_expr(v, new.shape), v, new)

    def lay_Squeeze(self, node: Any) -> None:
        a = self.check_attrs(node, {"axes": None})
        v, lay = self.lay_in(node, node.input[0])
        axes = self._axes(node, a)  # type: ignore[attr-defined]
        if axes is None:
            norm = [i for i, d in enumerate(lay.dims) if d == 1 and i != lay.bax]
        else:
            norm = sorted({self.onnx_axis(node, int(ax), lay) for ax in axes})
        if any(lay.dims[j] != 1 for j in norm):
            raise self.fail(node, f"axes {axes} of {lay.describe()} are not of size 1")
        dims = tuple(d for j, d in enumerate(lay.dims) if j not in norm)
        bax = lay.bax - sum(1 for j in norm if j < lay.bax)
        new = Layout(dims, bax, lay.pre, lay.post)
        self.lay_define(node, self.reshape_expr(v, new.shape), v, new)

    # ------------------------------------------------------------ per-sample ops

    def lay_Gather(self, node: Any) -> None:
        a = self.check_attrs(node, {"axis": None})
        v, lay = self.lay_in(node, node.input[0])
        idx = np.asarray(self.const(node, node.input[1]))
        if idx.ndim != 0:
            raise self.fail(node, f"Gather with indices of shape {list(idx.shape)} is not "
                            "supported (only a scalar index: select)")
        j = self.onnx_axis(node, int(a.get("axis", 0)), lay)
        n = lay.dims[j]
        i = int(idx)
        if not -n <= i < n:
            raise self.fail(node, f"index {i} is out of range for an axis of size {n}")
        dims = tuple(d for q, d in enumerate(lay.dims) if q != j)
        new = Layout(dims, lay.bax - (1 if j < lay.bax else 0), lay.pre, lay.post)
        self.lay_define(node, f"select({v.name}, axis={self.pbx_axis(lay, j)}, "
                        f"index={i % n})", v, new)

    def lay_Slice(self, node: Any) -> None:
        self.check_attrs(node, {})
        v, lay = self.lay_in(node, node.input[0])
        ins = list(node.input) + [""] * (5 - len(node.input))
        starts = [int(s) for s in self.const(node, ins[1]).reshape(-1)]
        ends = [int(e) for e in self.const(node, ins[2]).reshape(-1)]
        axes = ([int(q) for q in self.const(node, ins[3]).reshape(-1)] if ins[3]
                else list(range(len(starts))))
        steps = ([int(q) for q in self.const(node, ins[4]).reshape(-1)] if ins[4]
                 else [1] * len(starts))
        dims = list(lay.dims)
        cur = v
        for s, e, ax, st in zip(starts, ends, axes, steps):
            if st != 1:
                raise self.fail(node, f"Slice step {st} is not supported (step 1)")
            j = self.onnx_axis(node, ax, lay)
            s0, e0, _ = slice(s, e, 1).indices(dims[j])
            if e0 <= s0:
                raise self.fail(node, f"Slice [{s}:{e}] of an axis of size {dims[j]} is empty")
            if s0 == 0 and e0 >= dims[j]:
                continue
            stop = "" if e0 >= dims[j] else f", stop={e0}"
            dims[j] = e0 - s0
            shape = Layout(tuple(dims), lay.bax, lay.pre, lay.post).shape
            cur = self.step(cur, f"slice({{x}}, axis={self.pbx_axis(lay, j)}, start={s0}"
                            f"{stop})", shape, "s")
        self.lay_define(node, None, cur, Layout(tuple(dims), lay.bax, lay.pre, lay.post))

    def lay_Softmax(self, node: Any) -> None:
        self._lay_softmax(node, "softmax")

    def lay_LogSoftmax(self, node: Any) -> None:
        self._lay_softmax(node, "log_softmax")

    def _lay_softmax(self, node: Any, fn: str) -> None:
        a = self.check_attrs(node, {"axis": None})
        if self.opset < 13:  # type: ignore[attr-defined]
            raise self.fail(node, f"{node.op_type} before opset 13 on a value whose batch "
                            "has moved is not supported")
        v, lay = self.lay_in(node, node.input[0])
        j = self.onnx_axis(node, int(a.get("axis", -1)), lay)
        ax = self.pbx_axis(lay, j)
        self.lay_define(node, f"{fn}({v.name}{'' if ax == -1 else f', axis={ax}'})", v, lay)

    def lay_MatMul(self, node: Any) -> None:
        self.check_attrs(node, {})
        if self.is_const(node.input[1]):
            v, lay = self.lay_in(node, node.input[0])
            w = self.weight(node, node.input[1])
            if w.ndim != 2:
                raise self.fail(node, f"MatMul with a constant of rank {w.ndim} is not "
                                "supported (a 2-D weight [in, out])")
            self.lay_linear(node, v, lay, w.T, None, node.input[1])
            return
        if self.is_const(node.input[0]):
            raise self.fail(node, "MatMul of a constant by a value is not supported")
        a, la = self.lay_in(node, node.input[0])
        b, lb = self.lay_in(node, node.input[1])
        ra = len(la.dims)
        if ra < 3 or len(lb.dims) != ra:
            raise self.fail(node, f"MatMul of {la.describe()} and {lb.describe()}: both need "
                            "the same rank >= 3 when the batch has moved")
        if la.bax >= ra - 2 or lb.bax >= ra - 2:
            raise self.batch_error(node, la if la.bax >= ra - 2 else lb,
                                   "MatMul over the batch axis")
        if (la.bax, la.pre, la.post) != (lb.bax, lb.pre, lb.post) or \
                la.dims[la.bax] != lb.dims[lb.bax]:
            raise self.fail(node, f"MatMul of {la.describe()} and {lb.describe()}: the batch "
                            "sits differently in the two operands")
        if la.dims[-1] != lb.dims[-2]:
            raise self.fail(node, f"MatMul shapes {la.describe()} and {lb.describe()} do not "
                            "fit ([..., n, k] x [..., k, m])")
        try:
            lead = tuple(np.broadcast_shapes(la.dims[:-2], lb.dims[:-2]))
        except ValueError:
            raise self.fail(node, f"leading axes of {la.describe()} and {lb.describe()} do "
                            "not broadcast") from None
        new = Layout((*lead, la.dims[-2], lb.dims[-1]), la.bax, la.pre, la.post)
        self.lay_define(node, f"matmul({a.name}, {b.name})", a, new)

    def lay_linear(self, node: Any, v: Any, lay: Layout, w: np.ndarray, b: np.ndarray | None,
                   weight_name: str | None, tensor: str | None = None) -> None:
        """``linear`` on the last ONNX axis, which must not hold the batch (it is then the
        last pbxc axis)."""
        if lay.bax == len(lay.dims) - 1:
            raise self.batch_error(node, lay, "a linear layer over the batch axis")
        if lay.dims[-1] != w.shape[1]:
            raise self.fail(node, f"weight [out, in] = {list(w.shape)} does not fit "
                            f"{lay.describe()}")
        new = Layout((*lay.dims[:-1], w.shape[0]), lay.bax, lay.pre, lay.post)
        self.linear(node, v, w, b, weight_name, tensor)   # defines the output as canonical
        out = self.values[tensor or node.output[0]]
        from pbxc.interop.onnx_import import Value

        self.check_full(node, new, tensor)
        self.values[tensor or node.output[0]] = Value(out.name, new.shape, new.shape,
                                                      None if new.canonical else new)

    def lay_Gemm(self, node: Any) -> None:
        v, lay = self.lay_in(node, node.input[0])
        if len(lay.dims) != 2:
            raise self.fail(node, f"Gemm needs a 2-D input, got {lay.describe()}")
        w, b = self.gemm_weights(node)  # type: ignore[attr-defined]
        self.lay_linear(node, v, lay, w, b, node.input[1])

    def lay_binary(self, node: Any, fn: str) -> None:
        """Add/Sub/Mul/Div with a moved batch: a scalar constant, a constant that is the same
        for every sample, or another value whose batch sits the same way."""
        self.check_attrs(node, {})
        ins = list(node.input)
        consts = [i for i in ins if self.is_const(i) or i in self.batch_consts]
        if consts:
            c_name = consts[0]
            x_name = next(i for i in ins if i != c_name)
            if len(consts) == 2 or (fn in ("sub", "div") and ins[0] == c_name):
                raise self.fail(node, f"{node.op_type} of a constant by a value is not "
                                "supported here")
            v, lay = self.lay_in(node, x_name)
            c = self.weight(node, c_name)
            if c.size == 1:
                from pbxc.interop.onnx_import import _fmt, _shortest

                val = _shortest(c.reshape(())) if c.dtype == np.float32 else float(c.reshape(()))
                if fn == "div" and val == 0:
                    raise self.fail(node, "division by zero")
                self.lay_define(node, f"{fn}({v.name}, value={_fmt(val)})", v, lay)
                return
            per = self.lay_constant(node, c, lay)
            if fn == "div" and np.any(per == 0):
                raise self.fail(node, "division by a constant with zeros")
            p = self.prefix(node, None, fn)
            self.weights[p] = np.ascontiguousarray(per)
            self.lay_define(node, f"{fn}({v.name}, @{p})", v, lay)
            return
        if fn == "div":
            raise self.fail(node, "Div of two computed values is not supported (only by a "
                            "constant)")
        (a, la), (b, lb) = (self.lay_in(node, i) for i in ins)
        if len(la.dims) != len(lb.dims) or (la.bax, la.pre, la.post) != (lb.bax, lb.pre, lb.post):
            raise self.fail(node, f"{node.op_type} of {la.describe()} and {lb.describe()}: the "
                            "batch sits differently in the two operands")
        try:
            dims = tuple(np.broadcast_shapes(la.dims, lb.dims))
        except ValueError:
            raise self.fail(node, f"shapes {la.describe()} and {lb.describe()} do not "
                            "broadcast") from None
        new = Layout(dims, la.bax, la.pre, la.post)
        self.lay_define(node, f"{fn}({a.name}, {b.name})", a, new)

    def lay_constant(self, node: Any, c: np.ndarray, lay: Layout) -> np.ndarray:
        """A constant broadcast against a value of layout ``lay``, as a per-sample constant
        of the pbxc value's rank (size 1 along the batch's factors)."""
        r = len(lay.dims)
        if c.ndim > r:
            raise self.fail(node, f"constant of shape {list(c.shape)} has more axes than the "
                            f"value {lay.describe()}")
        c = c.reshape((1,) * (r - c.ndim) + c.shape)
        if c.shape[lay.bax] != 1:
            raise self.batch_error(node, lay, f"a constant of shape {list(c.shape)} varies "
                                   "along the batch's axis")
        for j in range(r):
            if j != lay.bax and c.shape[j] not in (1, lay.dims[j]):
                raise self.fail(node, f"constant of shape {list(c.shape)} does not broadcast "
                                f"to {lay.describe()}")
        k = len(lay.pre) + len(lay.post)
        shape = (*c.shape[:lay.bax], *([1] * k), *c.shape[lay.bax + 1:])
        return c.reshape(shape)

    def lay_Add(self, node: Any) -> None:
        self.lay_binary(node, "add")

    def lay_Sub(self, node: Any) -> None:
        self.lay_binary(node, "sub")

    def lay_Mul(self, node: Any) -> None:
        self.lay_binary(node, "mul")

    def lay_Div(self, node: Any) -> None:
        self.lay_binary(node, "div")

    def lay_unary(self, node: Any, expr: str, name: str | None = None) -> None:
        v, lay = self.lay_in(node, name or node.input[0])
        self.lay_define(node, expr.format(x=v.name), v, lay)

    def lay_pass(self, node: Any) -> None:
        v, lay = self.lay_in(node, node.input[0])
        self.lay_define(node, None, v, lay)
