"""A forward value the memory plan has freed: it keeps its shape and dtype, not its data.

The backward steps of a pass read some values only for their shapes (a convolution's VJP
needs its input's height and width); ``pbxc.lower.memory`` says which. A released value
stands in for those, so the arrays themselves can be freed as soon as nothing reads them.
Reading its data is a bug in the plan's tables, and fails loudly instead of computing
with garbage: NumPy converts operands with ``__array__``, which raises here.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ReleasedValueError(RuntimeError):
    """A pass read the data of a value its memory plan had released."""


class Released:
    __slots__ = ("dtype", "name", "shape")
    __array_priority__ = 1e6    # binary operators defer to us, and we refuse

    def __init__(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.name, self.shape, self.dtype = name, tuple(shape), np.dtype(dtype)

    @classmethod
    def of(cls, name: str, array: Any) -> Released:
        return array if isinstance(array, Released) else cls(name, array.shape, array.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, start: int, stop: int, spread_to: int | None = None) -> Released:
        """The placeholder of ``value[start:stop]`` (broadcast to ``spread_to`` rows)."""
        count = spread_to if spread_to is not None else len(range(self.shape[0])[start:stop])
        return Released(self.name, (count, *self.shape[1:]), self.dtype)

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise ReleasedValueError(
            f"internal error: the value of '{self.name}' was released by the memory plan "
            "(pbxc.lower.memory.BACKWARD_READS) but a backward step reads its data")

    __array__ = _refuse
    __getitem__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _refuse
    __truediv__ = __rtruediv__ = __neg__ = __abs__ = _refuse
    __lt__ = __le__ = __gt__ = __ge__ = _refuse
    __array_ufunc__ = _refuse
    __array_function__ = _refuse

    def __repr__(self) -> str:
        return f"<released {self.name} {list(self.shape)} {self.dtype}>"
