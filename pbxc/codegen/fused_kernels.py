"""Fused elementwise kernels for LRP and DFD, compiled with numba (the optional ``fast`` extra).

NumPy runs one pass over memory per operation: LRP's epsilon step (stabilise z, divide, the
stabiliser's share R - s z and its per-sample sum, the bias share sum s zb) is about eight
passes and four temporaries per layer, the ledger's per-sample sum and absolute sum of each
relevance array three more, DFD's secant multiplier with its trust tests about ten. Here each
is one loop over memory, compiled by numba.

Semantics: the plain NumPy kernels (``pbxc.codegen.numpy_kernels``,
``pbxc.runtime.model.ActivationTable``, ``pbxc.runtime.lrp``) stay the reference. Every
elementwise output here is bit for bit the reference's: the same IEEE operations in the same
order on the same dtype (constants are passed as scalars of the arrays' dtype, so float32 stays
float32; no ``fastmath``, so no contraction into fused multiply-adds and no reassociation).
Per-sample sums are accumulated in float64, in index order, one sample after another, and
returned in the relevance dtype: deterministic, and at least as accurate as NumPy's pairwise
sums in the array's dtype (in float32, much more), but not bit for bit those sums.

On by default when numba is installed, for arrays of ``AUTO_MIN_ELEMENTS`` (4M) elements or
more: numba's start (below) would stall the first call of a small one, which gains a few
milliseconds at most. ``PBXC_FUSED=1`` takes every array of ``MIN_ELEMENTS`` (65536) or more
(for long-running processes that make many calls: ResNet-50's batch-1 LRP runs 10-20% faster
warm), ``PBXC_FUSED=0`` none (the plain NumPy path). Smaller arrays always take the plain
path (in cache, NumPy's vectorised passes are faster than one scalar loop); the choice
depends on the shapes and the setting alone. numba is imported,
and each loop compiled, on first use only, for the array types a run meets (``cache=True``:
later processes load them from numba's cache, ``NUMBA_CACHE_DIR`` or ``__pycache__``; where no
cache directory is writable they are compiled in memory). Measured on the 2-core development
machine: numba's start costs about 0.25-0.3 s once per process with a warm cache (its import
and first dispatch), compiling about 0.3 s per loop and signature (ResNet-50's LRP: 1.2 s,
once), and about 100 MiB of resident memory (LLVM). A numba that fails to import warns once
and leaves the plain path. The standalone modules of ``pbxc compile`` never use these loops:
they run on NumPy alone.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import warnings
from typing import Any

import numpy as np

FUSED_ENV = "PBXC_FUSED"


# ------------------------------------------------------------------ the loops (numba source)
# Plain Python, compiled by ``FusedKernels._build``. 2-d arrays (sample, element); scalars
# arrive in the arrays' dtype, so that float32 arithmetic stays float32.

def _epsilon_step(r, z, eps, bias, inner, s):  # pragma: no cover - compiled by numba
    """s = R / (z + eps sign(z)) (sign(0) = +1) into ``s``; per sample, in float64, the
    stabiliser's share sum(R - s z) and the bias share sum_c b_c sum_{k in c} s_k (``bias``
    (1 or B, C), each b_c over ``inner`` consecutive elements; (B, 0) for no bias)."""
    batch, n = r.shape
    stab = np.zeros(batch, np.float64)
    share = np.zeros(batch, np.float64)
    channels = bias.shape[1]
    for i in range(batch):
        acc = 0.0
        if channels == 0:
            for k in range(n):
                zk = z[i, k]
                q = r[i, k] / (zk + eps if zk >= 0 else zk - eps)
                s[i, k] = q
                acc += np.float64(r[i, k] - q * zk)
        elif inner == 1:   # a bias value per element
            row = i if bias.shape[0] > 1 else 0
            accb = 0.0
            for k in range(n):
                zk = z[i, k]
                q = r[i, k] / (zk + eps if zk >= 0 else zk - eps)
                s[i, k] = q
                acc += np.float64(r[i, k] - q * zk)
                accb += np.float64(q) * np.float64(bias[row, k])
            share[i] = accb
        else:   # a bias value per channel of ``inner`` elements
            row = i if bias.shape[0] > 1 else 0
            accb = 0.0
            for c in range(channels):
                part = 0.0
                for k in range(c * inner, (c + 1) * inner):
                    zk = z[i, k]
                    q = r[i, k] / (zk + eps if zk >= 0 else zk - eps)
                    s[i, k] = q
                    acc += np.float64(r[i, k] - q * zk)
                    part += np.float64(q)
                accb += part * np.float64(bias[row, c])
            share[i] = accb
        stab[i] = acc
    return stab, share


def _product_sums(x, c, out):  # pragma: no cover - compiled by numba
    """out = x * c; per sample, in float64, the sum and the absolute sum of out."""
    batch, n = x.shape
    total = np.zeros(batch, np.float64)
    size = np.zeros(batch, np.float64)
    for i in range(batch):
        acc = 0.0
        mag = 0.0
        for k in range(n):
            v = x[i, k] * c[i, k]
            out[i, k] = v
            acc += np.float64(v)
            mag += abs(np.float64(v))
        total[i] = acc
        size[i] = mag
    return total, size


def _sums(a):  # pragma: no cover - compiled by numba
    """Per sample, in float64, the sum and the absolute sum."""
    batch, n = a.shape
    total = np.zeros(batch, np.float64)
    size = np.zeros(batch, np.float64)
    for i in range(batch):
        acc = 0.0
        mag = 0.0
        for k in range(n):
            v = np.float64(a[i, k])
            acc += v
            mag += abs(v)
        total[i] = acc
        size[i] = mag
    return total, size


def _secant(z0, z, f0, f1, quarter, floor, big, out, rest):  # pragma: no cover - numba
    """DFD's secant (f1 - f0) / (z - z0) into ``out``, and into ``rest`` where it may not be
    trusted (ActivationTable.multiplier's tests); returns how many."""
    batch, n = z.shape
    count = 0
    for i in range(batch):
        for k in range(n):
            d = z[i, k] - z0[i, k]
            df = f1[i, k] - f0[i, k]
            q = df / d
            out[i, k] = q
            adf = abs(df)
            bad = (adf < (abs(f1[i, k]) + abs(f0[i, k])) * quarter or adf <= floor
                   or abs(d) <= floor or not abs(q) <= big)
            rest[i, k] = bad
            count += bad
    return count


def _relu_secant(z0, z, f0, f1, big, out, rest):  # pragma: no cover - compiled by numba
    """relu's exact secant |(f1 - f0) / (z - z0)| into ``out``; ``rest`` where it is not
    finite (z == z0, or an infinite z); returns how many."""
    batch, n = z.shape
    count = 0
    for i in range(batch):
        for k in range(n):
            q = abs((f1[i, k] - f0[i, k]) / (z[i, k] - z0[i, k]))
            out[i, k] = q
            bad = not q <= big
            rest[i, k] = bad
            count += bad
    return count


def _gather(rest, count, z0, z):  # pragma: no cover - compiled by numba
    """The flat indices where ``rest`` holds, and z0 and z there (row-major order, as
    ``z0[rest]``), ``count`` of them."""
    batch, n = rest.shape
    index = np.empty(count, np.int64)
    g0 = np.empty(count, z.dtype)
    g1 = np.empty(count, z.dtype)
    j = 0
    for i in range(batch):
        for k in range(n):
            if rest[i, k]:
                index[j] = i * n + k
                g0[j] = z0[i, k]
                g1[j] = z[i, k]
                j += 1
    return index, g0, g1


def _relu(z, zero, out):  # pragma: no cover - compiled by numba
    """out = z where z > 0, else +0.0 (-inf too); returns whether z holds a NaN (where the
    reference, max(z, 0) + 0.0, hands over to the generated routine)."""
    n = z.shape[0]
    odd = False
    for k in range(n):
        v = z[k]
        out[k] = v if v > zero else zero
        if v != v:
            odd = True
    return odd


_LOOPS: dict[str, Any] = {"epsilon_step": _epsilon_step, "product_sums": _product_sums, "sums": _sums,
          "secant": _secant, "relu_secant": _relu_secant, "gather": _gather, "relu": _relu}


#: arrays smaller than this take the plain path: they fit in cache, where NumPy's vectorised
#: passes beat one scalar loop (measured: the 784-512-512-512-10 MLP at batch 32, 16384
#: elements a layer, ran 4% slower fused; at batch 256, 131072, 7% faster). A property of the
#: shapes alone, so a given call always takes the same path.
MIN_ELEMENTS = 1 << 16


def _rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1)


#: the default (``PBXC_FUSED`` unset or ``auto``): only arrays of at least this many elements
#: (16 MiB of float32) take the loops, so that numba starts only for calls that repay its
#: start (about 0.3 s once per process): ResNet-50 at 224x224 reaches it from batch 6 (its
#: first stage's 256 x 56 x 56 maps), where an LRP call takes seconds, while batch-1 calls
#: and small models never start numba and their first call is not stalled.
AUTO_MIN_ELEMENTS = 1 << 22


def _plain(*arrays: np.ndarray, least: int | None = None) -> bool:
    """All C-contiguous float arrays of one shape and dtype (what the loops take as is), of
    at least ``least`` elements (None: ``MIN_ELEMENTS``)."""
    first = arrays[0]
    least = MIN_ELEMENTS if least is None else least
    return isinstance(first, np.ndarray) and first.size >= least and \
        first.dtype.kind == "f" and all(
            isinstance(a, np.ndarray) and a.dtype == first.dtype and a.shape == first.shape
            and a.flags.c_contiguous and a.ndim >= 1 for a in arrays)


class FusedKernels:
    """The fused kernels; numba is imported and the loops compiled on first use."""

    def __init__(self, min_elements: int | None = None) -> None:
        #: the smallest array the loops take (None: ``MIN_ELEMENTS``, read at each call)
        self.min_elements = min_elements
        self._lock = threading.Lock()
        self._loops: dict[str, Any] | None = None
        self._failed = False
        # per-sample (sum, abs sum) of arrays this step produced, by id (the array kept
        # alongside, so that a reused id is never mistaken): read once by the LRP ledger
        self._noted: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def ready(self) -> bool:
        """Whether the loops are available (numba imports); the first call imports it."""
        if self._loops is None and not self._failed:
            with self._lock:
                if self._loops is None and not self._failed:
                    self._loops = self._build()
                    self._failed = self._loops is None
        return self._loops is not None

    @staticmethod
    def _build() -> dict[str, Any] | None:
        try:
            import numba
        except Exception as exc:   # a broken install (e.g. llvmlite) leaves the NumPy path
            warnings.warn(f"numba does not import ({exc}); the fused kernels are off",
                          RuntimeWarning, stacklevel=3)
            return None
        loops: dict[str, Any] = {}
        jit: Any = numba.njit
        for name, fn in _LOOPS.items():
            try:
                loops[name] = jit(cache=True, error_model="numpy", nogil=True)(fn)
            except RuntimeError:   # no writable cache directory: compile in memory
                loops[name] = jit(error_model="numpy", nogil=True)(fn)
        return loops

    def _loop(self, name: str) -> Any:
        assert self._loops is not None
        return self._loops[name]

    # ------------------------------------------------------------------------------- LRP
    def epsilon_step(self, relevance: np.ndarray, z: np.ndarray, epsilon: float,
                     bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(s, sum(R - s z), sum(s zb)) per sample for the sign-placed stabiliser, s bit for
        bit ``lrp_divide(R, lrp_stabilise(z, eps, "sign"), eps, "sign")``; ``bias``: zb,
        anything that broadcasts onto z (None: no bias). None where the arrays do not suit
        (the caller takes the plain path)."""
        if not (_plain(relevance, z, least=self.min_elements) and relevance.ndim >= 2 and self.ready()):
            return None
        eps = z.dtype.type(epsilon)
        if bias is None:
            table, inner = np.zeros((1, 0), dtype=z.dtype), 1
        else:
            table, inner = _bias_table(np.asarray(bias, dtype=z.dtype), z.shape)
        s = np.empty_like(relevance)
        stab, share = self._loop("epsilon_step")(_rows(relevance), _rows(z), eps, table,
                                                 inner, _rows(s))
        return s, stab.astype(z.dtype), share.astype(z.dtype)

    def product_sums(self, x: np.ndarray, c: np.ndarray) -> np.ndarray | None:
        """x * c (bit for bit), its per-sample sum and absolute sum noted for :meth:`sums`;
        None where the arrays do not suit."""
        if not (_plain(x, c, least=self.min_elements) and self.ready()):
            return None
        out = np.empty_like(x)
        total, size = self._loop("product_sums")(_rows(x), _rows(c), _rows(out))
        self._noted[id(out)] = (out, total.astype(x.dtype), size.astype(x.dtype))
        return out

    def sums(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-sample sum and absolute sum (float64 accumulation, ``a``'s dtype); None where
        ``a`` does not suit."""
        hit = self._noted.pop(id(a), None)
        if hit is not None and hit[0] is a:
            return hit[1], hit[2]
        if not (_plain(a, least=self.min_elements) and self.ready()):
            return None
        total, size = self._loop("sums")(_rows(a))
        return total.astype(a.dtype), size.astype(a.dtype)

    def forget(self) -> None:
        """Drop the noted sums (the end of an LRP pass)."""
        self._noted.clear()

    # ------------------------------------------------------------------------------- DFD
    def secant(self, z0: np.ndarray, z: np.ndarray, f0: np.ndarray, f1: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, int] | None:
        """DFD's secant (f1 - f0) / (z - z0), where it may not be trusted and how many: the
        tests of ``ActivationTable.multiplier``, |df| < (|f1| + |f0|) / 4, |df| or |dz| <=
        tiny / eps, non-finite. None where the arrays do not suit."""
        args = _secant_args(z0, z, f0, f1, least=self.min_elements)
        if args is None or not self.ready():
            return None
        info = np.finfo(z.dtype)
        kind = z.dtype.type
        out, rest = np.empty(z.shape, z.dtype), np.empty(z.shape, np.bool_)
        count = self._loop("secant")(*args, kind(0.25), kind(info.tiny / info.eps),
                                     kind(info.max), _rows(out), _rows(rest))
        return out, rest, int(count)

    def relu_secant(self, z0: np.ndarray, z: np.ndarray, f0: np.ndarray, f1: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, int] | None:
        """relu's secant |(f1 - f0) / (z - z0)|, where it is not finite and how many."""
        args = _secant_args(z0, z, f0, f1, least=self.min_elements)
        if args is None or not self.ready():
            return None
        out, rest = np.empty(z.shape, z.dtype), np.empty(z.shape, np.bool_)
        count = self._loop("relu_secant")(*args, z.dtype.type(np.finfo(z.dtype).max),
                                          _rows(out), _rows(rest))
        return out, rest, int(count)

    def redo(self, out: np.ndarray, rest: np.ndarray, count: int, z0: np.ndarray,
             z: np.ndarray, fn: Any) -> None:
        """``out[rest] = fn(z0[rest], z[rest])`` for an elementwise ``fn`` (bit for bit: the
        same entries in the same order), gathering in one pass instead of three."""
        if not count:
            return
        args = _secant_args(z0, z, least=self.min_elements)
        if args is None:
            out[rest] = fn(z0[rest], z[rest])
            return
        index, g0, g1 = self._loop("gather")(_rows(rest) if rest.ndim > 1 else
                                             rest.reshape(1, -1), count, *args)
        out.reshape(-1)[index] = fn(g0, g1)

    def relu(self, z: np.ndarray) -> np.ndarray | None:
        """relu(z), bit for bit the plain ``_relu``; None where that would be None (a NaN in
        z) or z does not suit."""
        if not (_plain(z, least=self.min_elements) and self.ready()):
            return None
        out = np.empty_like(z)
        if self._loop("relu")(z.reshape(-1), z.dtype.type(0), out.reshape(-1)):
            return None
        return out


def _bias_table(b: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """zb (broadcasting onto ``shape``) as a (1 or B, C) table, each entry over ``inner``
    consecutive elements of a sample: a per-channel bias stays C numbers."""
    batch, sample = shape[0], shape[1:]
    if b.ndim == len(shape) and b.shape[0] == batch and batch > 1:   # per sample: as is
        full = np.array(np.broadcast_to(b, shape), order="C")
        return full.reshape(batch, -1), 1
    if b.ndim == len(shape):
        b = b[0]
    b = b.reshape((1,) * (len(sample) - b.ndim) + b.shape)
    lead = 0
    while lead < len(sample) and b.shape[lead] == sample[lead]:
        lead += 1
    rest: tuple[int, ...] = tuple(b.shape[lead:])
    if all(size == 1 for size in rest):   # (C1, .., Ck, 1, .., 1): channels, then inner
        inner = int(np.prod(sample[lead:], dtype=np.int64))
        return np.array(b, order="C").reshape(1, -1), inner   # writable copies: one
    return np.array(np.broadcast_to(b, sample), order="C").reshape(1, -1), 1   # signature


def _secant_args(*arrays: np.ndarray, least: int | None = None) -> list[np.ndarray] | None:
    """The four secant operands as (B, n) views (a shared baseline row keeps its zero
    stride), or None unless they are float arrays of one shape and dtype."""
    z = arrays[1]
    if not all(isinstance(a, np.ndarray) and a.shape == z.shape and a.dtype == z.dtype
               for a in arrays) or z.dtype.kind != "f" or z.ndim < 1 \
            or z.size < (MIN_ELEMENTS if least is None else least):
        return None
    if z.ndim == 1:
        return [a.reshape(1, -1) for a in arrays]
    return [_rows(a) for a in arrays]


_SHARED: dict[str, FusedKernels] = {}
_SHARED_LOCK = threading.Lock()


def fused_mode() -> str:
    """``PBXC_FUSED``: "0" (off), "1" (every array of ``MIN_ELEMENTS`` or more) or "auto"
    (the default: arrays of ``AUTO_MIN_ELEMENTS`` or more). Another value warns and means
    "auto"."""
    text = os.environ.get(FUSED_ENV, "").strip().lower()
    if text in ("0", "1"):
        return text
    if text not in ("", "auto"):
        warnings.warn(f"{FUSED_ENV}={text!r} is not 0, 1 or auto; using auto", stacklevel=3)
    return "auto"


def available() -> FusedKernels | None:
    """The process's fused kernels for the ``PBXC_FUSED`` mode when numba is installed, else
    None (one instance per mode: numba's compiled loops serve every model)."""
    mode = fused_mode()
    if mode == "0":
        return None
    if mode not in _SHARED:
        with _SHARED_LOCK:
            if mode not in _SHARED:
                if importlib.util.find_spec("numba") is None:
                    return None
                _SHARED[mode] = FusedKernels(None if mode == "1" else AUTO_MIN_ELEMENTS)
    return _SHARED[mode]
