"""ONNX import of the ops transformers export to (issue 12).

A mixin of :class:`pbxc.interop.onnx_import.Converter`: each ``op_<Name>`` maps one ONNX node
to the per-sample ops of the issue-12 contract (``transpose``, ``matmul``, ``slice``,
``select``, ``mean``/``sum``, ``layernorm``; a Concat's constant operand as ``@p``). ONNX axes include the batch axis
(axis 0); pbxc's exclude it, so every axis is converted and an op that moves or reduces the
batch axis is an error naming the node.
"""

from __future__ import annotations

from typing import Any

import numpy as np

INT64_MAX = 2 ** 63 - 1


class TransformerOps:
    """Handlers for Transpose, MatMul of two values, Gather (scalar index), Slice, Split,
    ReduceMean/ReduceSum over per-sample axes and LayerNormalization."""

    # ---- helpers provided by Converter (declared for readers and mypy)
    fail: Any
    value: Any
    define: Any
    alias: Any
    const: Any
    check_attrs: Any
    axis: Any
    shape_of: Any
    weight: Any
    prefix: Any
    weights: dict[str, np.ndarray]
    opset: int
    consts: dict[str, np.ndarray]
    dtype: str
    lay_Transpose: Any

    def op_Transpose(self, node: Any) -> None:
        a = self.check_attrs(node, {"perm": None})
        x = self.value(node, node.input[0])
        full = len(x.shape) + 1
        perm = [int(p) for p in a.get("perm", list(range(full))[::-1])]
        if sorted(perm) != list(range(full)):
            raise self.fail(node, f"perm {perm} is not a permutation of 0..{full - 1}")
        if perm[0] != 0:   # the batch moves: tracked (pbxc/interop/onnx_layout.py)
            self.lay_Transpose(node)
            return
        per_sample = [p - 1 for p in perm[1:]]
        if per_sample == list(range(full - 1)):
            self.alias(node.output[0], x)
            return
        shape = tuple(x.shape[p] for p in per_sample)
        self.define(node, f"transpose({x.name}, perm=({', '.join(map(str, per_sample))}"
                    f"{',' if len(per_sample) == 1 else ''}))", self.shape_of(node, shape))

    def matmul_values(self, node: Any) -> None:
        """``MatMul`` of two computed values (attention's Q K^T and A V): ``matmul(a, b)``."""
        a = self.value(node, node.input[0])
        b = self.value(node, node.input[1])
        if len(a.shape) < 2 or len(b.shape) < 2:
            raise self.fail(node, f"MatMul of values of per-sample shapes {list(a.shape)} and "
                            f"{list(b.shape)}: both need rank >= 2 per sample")
        if a.shape[-1] != b.shape[-2]:
            raise self.fail(node, f"MatMul shapes {list(a.shape)} and {list(b.shape)} do not "
                            "fit ([..., n, k] x [..., k, m])")
        try:
            lead = tuple(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
        except ValueError:
            raise self.fail(node, f"leading axes of {list(a.shape)} and {list(b.shape)} do "
                            "not broadcast") from None
        self.define(node, f"matmul({a.name}, {b.name})",
                    self.shape_of(node, (*lead, a.shape[-2], b.shape[-1])))

    def op_Gather(self, node: Any) -> None:
        a = self.check_attrs(node, {"axis": None})
        x = self.value(node, node.input[0])
        idx = np.asarray(self.const(node, node.input[1]))
        if idx.ndim != 0:
            raise self.fail(node, f"Gather with indices of shape {list(idx.shape)} is not "
                            "supported (only a scalar index: select)")
        ax = self.axis(node, int(a.get("axis", 0)), len(x.shape))
        n = x.shape[ax]
        i = int(idx)
        if not -n <= i < n:
            raise self.fail(node, f"index {i} is out of range for an axis of size {n}")
        shape = tuple(d for k, d in enumerate(x.shape) if k != ax % len(x.shape))
        self.define(node, f"select({x.name}, axis={ax}, index={i % n})", self.shape_of(node, shape))

    def _slice_expr(self, name: str, ax: int, start: int, stop: int | None) -> str:
        stop_text = "" if stop is None else f", stop={stop}"
        return f"slice({name}, axis={ax}, start={start}{stop_text})"

    def op_Slice(self, node: Any) -> None:
        self.check_attrs(node, {})
        x = self.value(node, node.input[0])
        ins = list(node.input) + [""] * (5 - len(node.input))
        starts = [int(v) for v in self.const(node, ins[1]).reshape(-1)]
        ends = [int(v) for v in self.const(node, ins[2]).reshape(-1)]
        axes = ([int(v) for v in self.const(node, ins[3]).reshape(-1)] if ins[3]
                else list(range(len(starts))))
        steps = [int(v) for v in self.const(node, ins[4]).reshape(-1)] if ins[4] else [1] * len(starts)
        cur, shape = x, list(x.shape)
        cuts: list[tuple[int, int, int | None, tuple[int, ...]]] = []
        for s, e, ax_onnx, st in zip(starts, ends, axes, steps):
            if st != 1:
                raise self.fail(node, f"Slice step {st} is not supported (step 1)")
            ax = self.axis(node, ax_onnx, len(x.shape))
            n = shape[ax]
            s0, e0, _ = slice(s, e, st).indices(n)
            if e0 <= s0:
                raise self.fail(node, f"Slice [{s}:{e}] of an axis of size {n} is empty")
            if s0 == 0 and e0 >= n:
                continue
            shape[ax] = e0 - s0
            cuts.append((ax, s0, None if e0 >= n else e0, tuple(shape)))
        if not cuts:
            self.alias(node.output[0], x)
            return
        for k, (cut_axis, cut_start, cut_stop, shp) in enumerate(cuts):
            last = k == len(cuts) - 1
            tensor = node.output[0] if last else f"{node.output[0]}__slice{k}"
            self.define(node, self._slice_expr(cur.name, cut_axis, cut_start, cut_stop),
                        self.shape_of(node, shp) if last else shp, tensor=tensor)
            cur = self.values[tensor]

    values: dict[str, Any]

    def op_Split(self, node: Any) -> None:
        a = self.check_attrs(node, {"axis": None, "num_outputs": None})
        x = self.value(node, node.input[0])
        ax = self.axis(node, int(a.get("axis", 0)), len(x.shape))
        n = x.shape[ax]
        outs = list(node.output)
        if len(node.input) > 1 and node.input[1]:
            sizes = [int(v) for v in self.const(node, node.input[1]).reshape(-1)]
        else:
            k = len(outs)
            step = -(-n // k)
            sizes = [min(step, n - i * step) for i in range(k)]
        if sum(sizes) != n or len(sizes) != len(outs):
            raise self.fail(node, f"split sizes {sizes} do not cover an axis of size {n}")
        start = 0
        for o, size in zip(outs, sizes):
            shape = list(x.shape)
            shape[ax] = size
            stop = start + size
            if o:
                self.define(node, self._slice_expr(x.name, ax, start, None if stop >= n else stop),
                            tuple(shape), tensor=o)
            start = stop

    def reduce_axes(self, node: Any, kind: str) -> None:
        """``mean``/``sum`` over per-sample axes; reducing the batch axis is an error."""
        a = self.check_attrs(node, {"axes": None, "keepdims": (0, 1),
                                    "noop_with_empty_axes": (0,)})
        x = self.value(node, node.input[0])
        axes = a.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self.const(node, node.input[1]).reshape(-1).tolist()
        rank = len(x.shape)
        per = sorted({self.axis(node, int(v), rank) % rank for v in axes}) if axes else None
        if per is None:
            raise self.fail(node, f"{node.op_type} over every axis reduces the batch axis")
        keep = bool(a.get("keepdims", 1))
        shape = tuple((1 if k in per else d) for k, d in enumerate(x.shape) if keep or k not in per)
        setting = f", axes=({', '.join(map(str, per))}{',' if len(per) == 1 else ''})"
        self.define(node, f"{kind}({x.name}{setting}{', keepdims=true' if keep else ''})",
                    self.shape_of(node, shape))

    def op_ReduceSum(self, node: Any) -> None:
        self.reduce_axes(node, "sum")

    def op_LayerNormalization(self, node: Any) -> None:
        a = self.check_attrs(node, {"axis": None, "epsilon": None, "stash_type": (1,)})
        x = self.value(node, node.input[0])
        rank = len(x.shape)
        ax = self.axis(node, int(a.get("axis", -1)), rank)
        last = -ax
        trailing = x.shape[rank - last:]
        w = np.asarray(self.weight(node, node.input[1]))
        p = self.prefix(node, node.input[1], "layernorm")
        self.weights[f"{p}.weight"] = np.ascontiguousarray(np.broadcast_to(w, trailing))
        if len(node.input) > 2 and node.input[2]:
            b = np.asarray(self.weight(node, node.input[2]))
            self.weights[f"{p}.bias"] = np.ascontiguousarray(np.broadcast_to(b, trailing))
        eps = float(a.get("epsilon", 1e-5))
        # ONNX stores float attributes as float32: write the shortest text of that float32
        eps_text = repr(float(str(np.float32(eps))))
        if len([o for o in node.output if o]) > 1:
            raise self.fail(node, "the Mean/InvStdDev outputs of LayerNormalization are not "
                            "supported")
        self.define(node, f"layernorm({x.name}, @{p}, eps={eps_text}"
                    f"{'' if last == 1 else f', last={last}'})", self.shape_of(node, x.shape))

    batch_consts: dict[str, tuple[np.ndarray, np.ndarray]]
    emit: Any
    fresh: Any

    def constant_operand(self, node: Any, name: str) -> Any:
        """A constant beside values (the class token of a Concat, often an ``Expand`` over the
        batch): the same for every sample, stored as a weight of the per-sample shape; the
        returned value's name is ``@p``, which concat takes as an operand
        (``concat(@p, x, axis=k)``)."""
        from pbxc.interop.onnx_import import Value

        if name in self.batch_consts:
            first, second = self.batch_consts[name]
            if first.ndim < 1 or second.ndim != first.ndim or \
                    not np.array_equal(first[0], second[0]) or \
                    not all(np.array_equal(first[0], r) for r in first) or \
                    not all(np.array_equal(second[0], r) for r in second):
                raise self.fail(node, f"input '{name}' varies with the batch")
            c = first[0]
        else:
            c = self.consts[name]
            # a fixed batch (the dynamo exporter's example batch): every row must be equal
            if c.ndim < 1 or not all(np.array_equal(c[0], r) for r in c):
                raise self.fail(node, f"constant '{name}' of shape {list(c.shape)} differs "
                                "along the batch axis")
            c = c[0]
        self.consts.setdefault(f"{name}__per_sample", c)
        w = np.asarray(self.weight(node, f"{name}__per_sample"))
        p = self.constant_key(node, name)
        self.weights[p] = np.ascontiguousarray(w)
        return Value(f"@{p}", tuple(w.shape), tuple(w.shape))

    graph: Any
    used_prefixes: set[str]

    def constant_key(self, node: Any, name: str) -> str:
        """The weight key of a constant operand: the initializer it is expanded from (the
        class token's parameter name, ``cls``), when that is a free key; else one from the
        node's name."""
        from pbxc.interop.onnx_import import PARAM_RE

        initializers = {t.name for t in self.graph.initializer}
        source = name
        while source not in initializers:
            n = self.producer.get(source)
            if n is None or n.op_type not in ("Expand", "Identity") or not n.input:
                break
            source = n.input[0]
        if source in initializers and PARAM_RE.match(source) and \
                source not in self.used_prefixes and source not in self.weights:
            self.used_prefixes.add(source)
            return str(source)
        return str(self.prefix(node, None, "constant"))

    # ---- canonicalisation: LayerNorm decomposed by an exporter (or written by hand)
    producer: dict[str, Any]
    only_consumer: Any
    producer_of: Any
    is_const: Any
    consumers: dict[str, list[Any]]

    def _reduce_axes_of(self, node: Any) -> list[int] | None:
        for a in node.attribute:
            if a.name == "axes":
                return list(a.ints)
        if len(node.input) > 1 and node.input[1] and self.is_const(node.input[1]):
            return [int(v) for v in self.consts[node.input[1]].reshape(-1)]
        return None

    def match_layernorm(self, div: Any) -> tuple[Any, dict[str, Any], list[Any]] | None:
        """``(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) [* w] [+ b]`` over trailing
        axes (keepdims), the form `torch.onnx.export` writes below opset 17 and users write
        by hand: returns (final node, data, matched nodes) for one ``layernorm``."""
        sqrt = self.producer_of(div.input[1], "Sqrt")
        d = div.input[0]
        sub = self.producer_of(d, "Sub")
        if sqrt is None or sub is None or self.only_consumer(div.input[1]) is None:
            return None
        add_eps = self.producer_of(sqrt.input[0], "Add")
        if add_eps is None or self.only_consumer(sqrt.input[0]) is None:
            return None
        eps_in = [i for i in add_eps.input if self.is_const(i)]
        var_in = [i for i in add_eps.input if not self.is_const(i)]
        if len(eps_in) != 1 or len(var_in) != 1 or self.consts[eps_in[0]].size != 1:
            return None
        var = self.producer_of(var_in[0], "ReduceMean")
        if var is None or self.only_consumer(var_in[0]) is None:
            return None
        sq = self.producer.get(var.input[0])
        if sq is None or self.only_consumer(var.input[0]) is None:
            return None
        if sq.op_type == "Pow":
            if sq.input[0] != d or not self.is_const(sq.input[1]) or \
                    float(self.consts[sq.input[1]].reshape(-1)[0]) != 2.0:
                return None
        elif not (sq.op_type == "Mul" and list(sq.input) == [d, d]):
            return None
        mean = self.producer_of(sub.input[1], "ReduceMean")
        x = sub.input[0]
        if mean is None or mean.input[0] != x or len(self.consumers.get(d, [])) != 2:
            return None
        axes_mean, axes_var = self._reduce_axes_of(mean), self._reduce_axes_of(var)
        if not axes_mean or axes_mean != axes_var:
            return None
        if any(a.name == "keepdims" and a.i == 0 for n in (mean, var) for a in n.attribute):
            return None
        inner = [mean, sub, sq, var, add_eps, sqrt, div]
        final, weight, bias = div, None, None
        mul = self.only_consumer(div.output[0])
        if mul is not None and mul.op_type == "Mul" and \
                sum(self.is_const(i) for i in mul.input) == 1:
            weight = next(i for i in mul.input if self.is_const(i))
            final = mul
            inner.append(mul)
            add = self.only_consumer(mul.output[0])
            if add is not None and add.op_type == "Add" and \
                    sum(self.is_const(i) for i in add.input) == 1:
                bias = next(i for i in add.input if self.is_const(i))
                final = add
                inner.append(add)
        data = {"x": x, "axes": axes_mean, "eps": eps_in[0], "weight": weight, "bias": bias,
                "first": mean}
        return final, data, inner

    def pattern_layernorm(self, node: Any, data: dict[str, Any]) -> None:
        x = self.value(node, data["x"])
        rank = len(x.shape)
        axes = sorted(self.axis(data["first"], int(a), rank) % rank for a in data["axes"])
        if axes != list(range(rank - len(axes), rank)):
            raise self.fail(data["first"], f"a LayerNorm pattern over axes {data['axes']} (not "
                            "the trailing axes) is not supported")
        trailing = x.shape[rank - len(axes):]
        eps_arr = self.consts[data["eps"]]
        eps = float(str(eps_arr.reshape(())) if eps_arr.dtype == np.float32
                    else eps_arr.reshape(()))
        p = self.prefix(node, data["weight"], "layernorm")
        w = (np.asarray(self.weight(node, data["weight"])) if data["weight"]
             else np.ones(trailing, dtype=self.dtype))
        self.weights[f"{p}.weight"] = np.ascontiguousarray(np.broadcast_to(w, trailing))
        if data["bias"]:
            b = np.asarray(self.weight(node, data["bias"]))
            self.weights[f"{p}.bias"] = np.ascontiguousarray(np.broadcast_to(b, trailing))
        last = len(axes)
        self.define(node, f"layernorm({x.name}, @{p}, eps={eps!r}"
                    f"{'' if last == 1 else f', last={last}'})", self.shape_of(node, x.shape))
