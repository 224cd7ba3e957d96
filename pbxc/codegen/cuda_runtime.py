"""The runtime of a generated CUDA module: devices, checked launches, the LRP engine.

``pbxc compile --target cuda`` copies this file's source verbatim into the generated module
(as ``numpy_kernels`` is copied into the NumPy one), so it imports only numpy; cupy is
imported when a :class:`CupyDevice` is made. A device has ``xp`` (the array namespace) and
``launch(name, grid, block, args)``. :class:`CupyDevice` launches the kernels compiled from
the CUDA source by ``cupy.RawModule``; the serial CPU shim (``pbxc.codegen.cuda_shim``) runs
the same source compiled as C++, with numpy as ``xp``, so one module text runs on both.

Matrix products go to ``xp.matmul`` (cuBLAS on a GPU); everything elementwise around them is
a generated kernel. Every launch checks its arguments against the kernel's signature first.
"""

import numpy as np

#: threads per block; grids are capped, the kernels' grid-stride loops cover the rest
BLOCK = 256
MAX_GRID = 65535

#: LRP modifiers by name -> the code of ``pbx_lrp_modify`` in the kernels' helpers
MODIFIER_CODES = {"same": 0, "pos": 1, "neg": 2, "ones": 3, "square": 4, "gamma": 5, "const": 6}
PLACEMENT_CODES = {"sign": 0, "slides": 1}


class KernelArgumentError(ValueError):
    """An argument does not match what the kernel or pass expects (dtype, shape, device)."""


def launch_geometry(total):
    """(grid, block) for a grid-stride loop over ``total`` elements."""
    return max(1, min(MAX_GRID, -(-int(total) // BLOCK))), BLOCK


class CupyDevice:
    """Kernels compiled from the CUDA source by NVRTC through ``cupy.RawModule``."""

    name = "cupy"

    def __init__(self, source, options=()):
        import cupy

        self.xp = cupy
        self._module = cupy.RawModule(code=source, options=("--std=c++14", *options))
        self._functions = {}

    def launch(self, name, grid, block, args):
        fn = self._functions.get(name)
        if fn is None:
            fn = self._functions[name] = self._module.get_function(name)
        fn((grid,), (block,), tuple(args))


class Context:
    """One pass's device, precision and kernel table: checked launches and array helpers."""

    def __init__(self, device, kernels, dtype):
        self.device = device
        self.xp = device.xp
        self.kernels = kernels
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise KernelArgumentError(f"dtype must be float32 or float64, got {self.dtype}")
        self.suffix = "_f32" if self.dtype == np.float32 else "_f64"

    # ---- arrays
    def new(self, shape, dtype=None):
        return self.xp.empty(tuple(int(s) for s in shape), dtype=dtype or self.dtype)

    def zeros(self, shape):
        return self.xp.zeros(tuple(int(s) for s in shape), dtype=self.dtype)

    def asarray(self, a, dtype=None):
        return self.xp.ascontiguousarray(self.xp.asarray(a, dtype=dtype or self.dtype))

    def matmul(self, a, b):
        return self.xp.matmul(a, b)

    def conv_matmul(self, w2, cols, groups):
        """(O, C/g*kh*kw) weights times (B, C*kh*kw, P) columns, per group -> (B, O, P)."""
        if groups == 1:
            return self.xp.matmul(w2, cols)
        opg, rows = w2.shape[0] // groups, w2.shape[1]
        parts = [self.xp.matmul(w2[g * opg:(g + 1) * opg], cols[:, g * rows:(g + 1) * rows])
                 for g in range(groups)]
        return self.xp.ascontiguousarray(self.xp.concatenate(parts, axis=1))

    def conv_matmul_t(self, w2, g, groups):
        """The transpose: (B, O, P) cotangents -> (B, C*kh*kw, P) column cotangents."""
        if groups == 1:
            return self.xp.matmul(w2.T, g)
        opg = w2.shape[0] // groups
        parts = [self.xp.matmul(w2[k * opg:(k + 1) * opg].T, g[:, k * opg:(k + 1) * opg])
                 for k in range(groups)]
        return self.xp.ascontiguousarray(self.xp.concatenate(parts, axis=1))

    # ---- launches
    def call(self, name, ins, outs, scalars=(), total=None):
        """Launch ``name`` in this precision on (inputs, outputs, scalars), after checking each
        argument's type, dtype, layout and size against the kernel's signature."""
        full = name + self.suffix
        signature = self.kernels.get(name)
        if signature is None:
            raise KernelArgumentError(f"no kernel {name!r} in this module")
        args = [*ins, *outs, *scalars]
        if len(args) != len(signature) - 1:
            raise KernelArgumentError(f"kernel {full} takes {len(signature) - 1} arguments, "
                                      f"got {len(args)}")
        if total is None:
            total = outs[0].size
        typed = []
        for k, ((kind, arg, extent), a) in enumerate(zip(signature, args)):
            where = f"kernel {full}, argument {k} ({arg})"
            if kind.endswith("*"):
                want = self.dtype if "T" in kind else np.dtype(np.int32)
                if not isinstance(a, self.xp.ndarray):
                    raise KernelArgumentError(f"{where}: expected a {self.xp.__name__} array, "
                                              f"got {type(a).__name__}")
                if a.dtype != want:
                    raise KernelArgumentError(f"{where}: expected {want.name}, got {a.dtype}")
                if not a.flags.c_contiguous:
                    raise KernelArgumentError(f"{where}: expected a C-contiguous array")
                expect = total if extent == "total" else extent
                if expect != "" and a.size != expect:
                    raise KernelArgumentError(f"{where}: expected {expect} elements, got "
                                              f"{a.size} (shape {list(a.shape)})")
                typed.append(a)
            elif kind == "T":
                typed.append(self.dtype.type(a))
            elif kind == "int":
                typed.append(np.int32(a))
            else:
                typed.append(np.int64(a))
        if total == 0:
            return
        typed.append(np.int64(total))
        grid, block = launch_geometry(total)
        self.device.launch(full, grid, block, typed)

    def run(self, name, ins, shape, scalars=()):
        """Launch a one-output kernel into a new array of ``shape``; return it."""
        out = self.new(shape)
        self.call(name, ins, [out], scalars)
        return out

    def add(self, a, b):
        return self.run("pbx_add", [a, b], a.shape)

    def scale(self, a, w):
        return self.run("pbx_scale", [a], a.shape, [w])

    def modify(self, mod, a):
        """An LRP modifier (name, parameter) applied to an array; 'same' returns ``a``."""
        name, param = mod
        if name == "same":
            return a
        if name not in MODIFIER_CODES:
            raise KernelArgumentError(f"unknown LRP modifier {name!r}")
        if name == "const" and np.ndim(param) != 0:
            raise KernelArgumentError("the CUDA LRP engine takes scalar z^B bounds, got an "
                                      f"array of shape {list(np.shape(param))}")
        return self.run("pbx_modify", [a], a.shape,
                        [MODIFIER_CODES[name], 0.0 if param is None else float(param)])


def unit_modify(mod, dtype):
    """A modifier applied to the unit weight of avg pooling and add (numpy_kernels.lrp_modify
    on ``ones(())``): a host scalar."""
    name, param = mod
    one = np.ones((), dtype=dtype)
    table = {"same": one, "pos": one, "ones": one, "square": one * one,
             "neg": np.zeros((), dtype=dtype)}
    if name in table:
        return table[name]
    if name == "gamma":
        return one + dtype.type(param) * one
    if name == "const":
        return np.asarray(param, dtype=dtype)
    raise KernelArgumentError(f"unknown LRP modifier {name!r}")


class LrpOp:
    """What the LRP engine needs of one op: its weight (None: the unit weight of pooling and
    add) and bias, how the bias broadcasts (element i takes b[(i // inner) % count]), and the
    forward and transposed maps of modified inputs with a modified weight."""

    def __init__(self, key, w, b, inner, count, forward, transpose):
        self.key, self.w, self.b = key, w, b
        self.inner, self.count = inner, count
        self.forward, self.transpose = forward, transpose


_MODIFIED: dict = {}   # modified weights by (device, dtype, op, modifier)


def _weight(C, op, mod):
    if op.w is None:
        return unit_modify(mod, C.dtype)
    key = (id(C.device), C.dtype.name, op.key, mod)
    if key not in _MODIFIED:
        _MODIFIED[key] = C.modify(mod, op.w)
    return _MODIFIED[key]


#: a rule group that modifies nothing (LRP-0, epsilon): its z is the op's forward output
UNMODIFIED = ((1.0, ("same", None), ("same", None), ("same", None)),)


def lrp_rule_step(C, op, relevance, xs, groups, epsilon, placement, z_out=None):
    """Relevance at the op's output -> (relevance per input, absorbed by bias, by stabiliser).

    The generic rule of numpy_kernels.lrp_rule_step (Montavon et al. 2019, the slides' eq.
    R_j = sum_k a_j rho(w_jk) / stab(sum_j a_j rho(w_jk) + rho(b_k)) R_k) in four steps: z by
    the forward map with modified parameters, s = R / stab(z), c = rho(W)^T s, R = a c.
    ``z_out``, the op's forward output, is z for a group that modifies nothing (LRP-0,
    epsilon), as in the NumPy engine: one transposed product per layer instead of two.
    """
    r_in = [C.zeros(x.shape) for x in xs]
    batch = relevance.shape[0]
    bias_abs = C.zeros((batch,))
    stab_abs = C.zeros((batch,))
    for coef, terms in groups:
        zb = C.zeros(relevance.shape)
        passes = []
        if z_out is not None and tuple(terms) == UNMODIFIED:
            z = z_out
            if op.b is not None:
                C.call("pbx_lrp_bias", [op.b], [C.zeros(relevance.shape), zb],
                       [op.inner, op.count, 0, 0.0, 1.0])
            passes.append((1.0, xs, _weight(C, op, ("same", None))))
            terms = ()
        else:
            z = C.zeros(relevance.shape)
        for sign, in_mod, w_mod, b_mod in terms:
            ins = [C.modify(in_mod, x) for x in xs]
            wt = _weight(C, op, w_mod)
            zt = op.forward(C, ins, wt)
            if b_mod is not None and op.b is not None:
                name, param = b_mod
                C.call("pbx_lrp_bias", [op.b], [zt, zb],
                       [op.inner, op.count, MODIFIER_CODES[name],
                        0.0 if param is None else float(param), sign])
            C.call("pbx_axpy", [zt], [z], [sign])
            passes.append((sign, ins, wt))
        s = C.new(relevance.shape)
        C.call("pbx_lrp_divide", [relevance, z], [s], [epsilon, PLACEMENT_CODES[placement]])
        for sign, ins, wt in passes:
            for i, c in enumerate(op.transpose(C, s, wt)):
                C.call("pbx_lrp_accumulate", [ins[i], c], [r_in[i]], [coef * sign])
        # the ledger: per-sample sums of s zb and R - s z (xp's reductions, as NumPy sums)
        absorbed, kept = C.new(relevance.shape), C.new(relevance.shape)
        C.call("pbx_lrp_ledger_terms", [relevance, s, z, zb], [absorbed, kept])
        bias_abs = bias_abs + coef * absorbed.reshape(batch, -1).sum(axis=1)
        stab_abs = stab_abs + coef * kept.reshape(batch, -1).sum(axis=1)
    return r_in, bias_abs, stab_abs
