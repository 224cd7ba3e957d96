"""How much memory pbxc may give to what a file asks for (specs/security.md, Inputs).

A file can declare any size: an .npy header that claims 728 TiB, a zip member that claims
4 GiB in 4 MB, a model whose input is ``float64[100000000000]``. Every such size is checked
against these limits before anything is allocated. Both are read from the environment each
time they are needed, so a user with a large model raises them without touching code:

* ``PBXC_MAX_ARRAY_BYTES`` (default 4 GiB): the largest single array read from a weight or
  input file (.npz, .npy, .safetensors).
* ``PBXC_MAX_SAMPLE_BYTES`` (default 2 GiB): the memory one sample's forward pass needs (the
  sum over the graph's values of their per-sample sizes, in float64).
"""

from __future__ import annotations

import os

GIB = 1 << 30
DEFAULTS = {"PBXC_MAX_ARRAY_BYTES": 4 * GIB, "PBXC_MAX_SAMPLE_BYTES": 2 * GIB}
#: deflate cannot compress by more than about 1032:1; a member that claims more is a lie
MAX_DEFLATE_RATIO = 1100


class LimitSettingError(ValueError):
    """An environment variable holds no positive integer."""


def limit(name: str) -> int:
    """The limit ``name`` (one of ``DEFAULTS``) in bytes."""
    text = os.environ.get(name, "").strip()
    if not text:
        return DEFAULTS[name]
    try:
        value = int(float(text))
    except ValueError:
        raise LimitSettingError(f"{name}={text!r} is not a number of bytes") from None
    if value <= 0:
        raise LimitSettingError(f"{name}={text!r} must be a positive number of bytes")
    return value


def max_array_bytes() -> int:
    return limit("PBXC_MAX_ARRAY_BYTES")


def max_sample_bytes() -> int:
    return limit("PBXC_MAX_SAMPLE_BYTES")


def describe_bytes(n: int) -> str:
    """``n`` bytes for a message: 4.0 GiB, 12.5 MiB, 300 B."""
    for unit, size in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
