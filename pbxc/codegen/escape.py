"""The only ways outside text enters generated code: one escaper per target language.

Generated Python and CUDA C are built from trusted pieces (printers, kernel templates). Every
string that comes from outside (file names and paths, source lines quoted in comments, model,
node, feature and class names, manifest fields) reaches them through these functions:

* :func:`py_literal` - a Python literal (``repr`` of builtin str/int/float/bool/None and
  containers of them; non-finite floats as ``float('inf')``). Anything else is refused.
* :func:`py_text` - text inside a ``#`` comment or a ``\"\"\"`` docstring: one line, every
  backslash escaped and every quote that could close the docstring, and no character Python
  or an editor treats as a line break (non-printable ones as ``\\x..``/``\\u..`` escapes).
* :func:`c_text` - text inside a ``//`` or ``/* */`` comment of C/CUDA: printable ASCII
  only; everything else, and ``\\``, the ``?`` of ``??`` (trigraphs) and the ``/`` of ``*/``,
  as 3-digit octal escapes, so no line splice, comment end or raw newline/NUL can appear.
  (The generated C holds no string literal; outside text reaches it only in comments.)
* :func:`identifier` - an ASCII Python identifier for a graph value name, injective (two
  names never share one identifier; see :func:`pbxc.codegen.numpy_module.var`).

Long texts are cut (before escaping, so no escape is cut in half) to ``limit`` characters.
"""

from __future__ import annotations

import math
import re
from typing import Any

#: the longest outside text quoted in a generated comment or docstring
TEXT_LIMIT = 160

_PRINTABLE_ASCII = re.compile(r"[ -~]")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def py_literal(value: Any) -> str:
    """``value`` as Python source that evaluates to an equal value and does nothing else.

    Only builtin str, int, float, bool, None and lists, tuples and dicts of them; their
    subclasses (``numpy.str_``, ``IntEnum``, ...) are converted to the builtin first, because a
    subclass's ``repr`` is its own code."""
    if value is None or isinstance(value, bool):
        return repr(bool(value)) if value is not None else "None"
    if isinstance(value, str):
        return repr(str(value))
    if isinstance(value, int):
        return repr(int(value))
    if isinstance(value, float):
        v = float(value)
        return repr(v) if math.isfinite(v) else f"float({str(v)!r})"
    if isinstance(value, (list, tuple)):
        items = [py_literal(v) for v in value]
        if isinstance(value, tuple):
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        return "[" + ", ".join(items) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{py_literal(k)}: {py_literal(v)}"
                               for k, v in value.items()) + "}"
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalars
        return py_literal(value.item())
    raise TypeError(f"py_literal: {type(value).__name__} has no safe Python literal")


def py_text(text: str, limit: int = TEXT_LIMIT) -> str:
    """``text`` safe inside a ``#`` comment or a ``\"\"\"`` docstring of generated Python."""
    cut = _cut(str(text), limit)
    out = []
    for k, ch in enumerate(cut):
        # a quote is escaped where it could close a docstring: before another, or last
        if ch == "\\" or (ch == '"' and cut[k + 1:k + 2] in ('"', "")):
            out.append("\\" + ch)
        elif ch.isprintable() and ch not in "\x85\u2028\u2029":
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1] if ord(ch) > 0x7f or ch in "\t\n\r" else f"\\x{ord(ch):02x}")
    return "".join(out)


def c_text(text: str, limit: int = TEXT_LIMIT) -> str:
    """``text`` safe inside a C/CUDA comment (``//`` or ``/* */``)."""
    cut = _cut(str(text), limit)
    out = []
    for k, ch in enumerate(cut):
        special = (ch == "\\" or (ch == "?" and cut[k + 1:k + 2] == "?")
                   or (ch == "/" and k > 0 and cut[k - 1] == "*"))
        if _PRINTABLE_ASCII.fullmatch(ch) and not special:
            out.append(ch)
        else:
            out.extend(f"\\{b:03o}" for b in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)


#: a path segment spelt as itself: alphanumeric words joined by single underscores
_PLAIN_SEGMENT = re.compile(r"[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*")


def identifier(name: str) -> str:
    """An ASCII identifier for ``name``, injective. A plain name (``/``-separated segments of
    alphanumeric words joined by single underscores, the first not starting with a digit:
    ``h1``, ``fc_1``, ``h1/linear``) is spelt behind ``_`` with ``/`` as ``__``
    (``_h1__linear``); since its segments hold no ``__`` and neither start nor end with
    ``_``, the spelling splits back one way. Any other name (``h__linear``, ``a b``, ``_x``)
    is spelt behind ``0``, with ``/`` as ``__``, ``_`` as ``_u`` and every other
    non-alphanumeric character as ``_x<hex code>_`` (``h__linear`` -> ``0h_u_ulinear``):
    tokens that read back one way, and no plain spelling starts with ``0``. So two names
    never share an identifier. Callers put a letter prefix in front."""
    name = str(name)
    segments = name.split("/")
    if (all(_PLAIN_SEGMENT.fullmatch(seg) for seg in segments) and name.isascii()
            and not name[0].isdigit()):
        return "_" + "__".join(segments)
    out = ["0"]
    for ch in name:
        if ch.isascii() and ch.isalnum():
            out.append(ch)
        elif ch == "/":
            out.append("__")
        elif ch == "_":
            out.append("_u")
        else:
            out.append(f"_x{ord(ch):x}_")
    return "".join(out)
