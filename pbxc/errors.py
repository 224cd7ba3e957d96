"""Source positions and the error hierarchy. A leaf module: it imports nothing from pbxc.

Every error pbxc raises on bad input is a :class:`PbxError` carrying one or more
:class:`Diagnostic` records.  A diagnostic with a :class:`SourcePos` renders as::

    model.pbx:12:9: error: unknown op 'lineer'; did you mean 'linear'?
       12 | h1 = lineer(x, @fc1)
          |      ^
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# Source text of every file pbxc has read, so a diagnostic can quote its line
# long after the parser is gone.
_SOURCES: dict[str, str] = {}


def register_source(filename: str, text: str) -> None:
    """Remember ``text`` as the contents of ``filename`` for rendering diagnostics."""
    _SOURCES[filename] = text


def source_lines(text: str) -> list[str]:
    """The lines of ``text`` as the grammar counts them: broken at "\\n" only.

    ``str.splitlines`` also breaks at form feed, vertical tab, U+001C-U+001E, U+0085, U+2028
    and U+2029, which the grammar treats as ordinary characters (inside comments and strings),
    so every later line would be quoted wrongly. A trailing "\\r" (CRLF files) is dropped.
    """
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()  # the newline that ends the last line starts no line of its own
    return lines


def source_line(filename: str, line: int) -> str | None:
    text = _SOURCES.get(filename)
    if text is None:
        return None
    lines = source_lines(text)
    if 1 <= line <= len(lines):
        return lines[line - 1]
    return None


@dataclass(frozen=True)
class SourcePos:
    """A 1-based position in a source file."""

    file: str
    line: int
    column: int
    end_line: int | None = None
    end_column: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Diagnostic:
    message: str
    pos: SourcePos | None = None
    severity: str = "error"
    notes: tuple[str, ...] = ()

    def render(self) -> str:
        head = f"{self.pos}: " if self.pos is not None else ""
        out = [f"{head}{self.severity}: {self.message}"]
        if self.pos is not None:
            text = source_line(self.pos.file, self.pos.line)
            if text is not None:
                gutter = f"{self.pos.line:>5} | "
                out.append(gutter + text.rstrip("\n"))
                width = 1
                if self.pos.end_line == self.pos.line and self.pos.end_column is not None:
                    width = max(1, self.pos.end_column - self.pos.column)
                caret_pad = "".join("\t" if ch == "\t" else " " for ch in text[: self.pos.column - 1])
                out.append(" " * (len(gutter) - 2) + "| " + caret_pad + "^" + "~" * (width - 1))
        out.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(out)


class PbxError(Exception):
    """Base of every error pbxc reports about user input."""

    def __init__(self, diagnostics: Diagnostic | Sequence[Diagnostic] | str,
                 pos: SourcePos | None = None) -> None:
        if isinstance(diagnostics, str):
            diagnostics = [Diagnostic(diagnostics, pos)]
        elif isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics: list[Diagnostic] = list(diagnostics)
        super().__init__(self.render())

    @property
    def pos(self) -> SourcePos | None:
        return self.diagnostics[0].pos if self.diagnostics else None

    @property
    def message(self) -> str:
        return self.diagnostics[0].message if self.diagnostics else ""

    def render(self) -> str:
        return "\n".join(d.render() for d in self.diagnostics)


class PbxSyntaxError(PbxError):
    """The text is not a well-formed .pbx program."""


class PbxValidationError(PbxError):
    """The program parses but means nothing valid: names, arguments, shapes, cycles."""


class WeightError(PbxError):
    """A weight file or tensor is missing, unsafe, mis-shaped or non-finite."""


class InputError(PbxError):
    """An input array given at run time does not fit the model."""


class OutputError(PbxError):
    """An output cannot be written safely: it would replace what pbxc did not write, or the
    file system refuses it (read-only, too long, no space)."""


class UnsupportedOp(PbxError):
    """A pass, printer or backend has no rule for an op or construct."""


class VerificationError(PbxError):
    """An attribution property does not hold."""


@dataclass
class DiagnosticBag:
    """Collects several diagnostics so a file's semantic errors are reported together."""

    diagnostics: list[Diagnostic] = field(default_factory=list)

    def error(self, message: str, pos: SourcePos | None = None, notes: Iterable[str] = ()) -> None:
        self.diagnostics.append(Diagnostic(message, pos, "error", tuple(notes)))

    def __bool__(self) -> bool:
        return bool(self.diagnostics)

    def raise_if_any(self, cls: type[PbxError] = PbxValidationError) -> None:
        if self.diagnostics:
            raise cls(self.diagnostics)


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """A ``; did you mean 'x'?`` suffix, or an empty string when nothing is close."""
    close = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)
    if not close:
        return ""
    if len(close) == 1:
        return f"; did you mean '{close[0]}'?"
    return "; did you mean one of " + ", ".join(f"'{c}'" for c in close) + "?"


def nearest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.3)
