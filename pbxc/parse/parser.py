"""Text -> AST. lark parses; lark's exceptions are translated to :class:`PbxSyntaxError` here.

The grammar ships inside the package and is compiled once per process.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any

import lark
from lark import Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from pbxc.errors import PbxError, PbxSyntaxError, SourcePos, register_source, source_lines
from pbxc.parse import ast

GRAMMAR_RESOURCE = "grammar/pbx.lark"

#: The deepest nesting of calls, brackets and operators a file may have (specs/language.md,
#: "Limits"): the tree is checked iteratively before any recursive pass walks it.
MAX_NESTING = 100
#: The longest number a file may write, in characters (Python's int() refuses 4300 digits).
MAX_NUMBER_LENGTH = 100


def grammar_text() -> str:
    return resources.files("pbxc").joinpath(GRAMMAR_RESOURCE).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _lark() -> lark.Lark:
    return lark.Lark(grammar_text(), parser="lalr", propagate_positions=True,
                     maybe_placeholders=False)


# Common mistakes, labelled by example (lark's match_examples). Each program is wrong at
# the spot the label describes.
_LABELLED_MISTAKES: dict[str, list[str]] = {
    "a .pbx file starts with 'model NAME'": [
        "input x: float32[3]",
        "weights \"w.npz\"",
        "h = relu(x)",
    ],
    "an input is declared as 'input NAME: float32[d1, d2, ...]'": [
        "model m input x[3]",
        "model m input x float32[3]",
        "model m input x: [3]",
        "model m input x: float32",
        "model m input x: float32(3)",
    ],
    "input dimensions are positive integers, e.g. float32[1, 8, 8]": [
        "model m input x: float32[a]",
        "model m input x: float32[3,]",
    ],
    "a statement is 'NAME = op(...)' or 'NAME = other_name'": [
        "model m h = 3",
        "model m h = @w",
        "model m h = true",
    ],
    "arguments are separated by commas": [
        "model m h = relu(x y)",
        "model m h = linear(x @w)",
    ],
    "an activation is defined as 'activation NAME(z, p = 1.0) = expression'": [
        "model m activation f = z",
        "model m activation f(z) z",
        "model m activation f(z, p) = z",
    ],
}


def _pos_of(path: str, line: int | None, column: int | None) -> SourcePos:
    return SourcePos(path, line or 1, column or 1)


def _describe_terminal(name: str) -> str:
    friendly = {
        "NAME": "a name", "NUMBER": "a number", "INT": "an integer", "STRING": "a string",
        "PARAM": "a weight reference (@key)", "DTYPE": "a dtype (float32 or float64)",
        "COMPARE": "a comparison", "POW": "'^'", "$END": "end of file",
    }
    if name in friendly:
        return friendly[name]
    try:
        pattern = _lark().get_terminal(name).pattern
        return f"'{pattern.value}'"
    except (KeyError, AttributeError):
        return name


def _describe_token(token: Token) -> str:
    if token.type == "$END":
        return "end of file"
    text = str(token)
    if token.type in {"NAME", "NUMBER", "INT", "STRING", "PARAM"}:
        kind = _describe_terminal(token.type).removeprefix("a ").removeprefix("an ")
        return f"{kind} {text}" if token.type == "STRING" else f"{kind} '{text}'"
    return f"'{text}'"


def _expected(expected: set[str] | frozenset[str]) -> str:
    names = sorted({_describe_terminal(e) for e in expected})
    if not names:
        return ""
    if len(names) > 8:
        names = [*names[:8], "..."]
    return "; expected " + ", ".join(names)


def _error_signature(err: UnexpectedInput) -> tuple[object, ...] | None:
    state = getattr(err, "state", None)
    position = getattr(state, "position", None)
    if position is None:
        return None
    accepts = frozenset(getattr(err, "accepts", None) or getattr(err, "expected", ()) or ())
    token = getattr(err, "token", None)
    at_end = isinstance(err, UnexpectedEOF) or getattr(token, "type", None) == "$END"
    return (position, accepts, at_end)


@functools.lru_cache(maxsize=1)
def _labelled_signatures() -> dict[tuple[object, ...], str]:
    # lark's own match_examples also compares parser stack depth, which differs with the
    # number of statements before the mistake; the LALR state alone is what identifies it.
    table: dict[tuple[object, ...], str] = {}
    for label, examples in _LABELLED_MISTAKES.items():
        for example in examples:
            try:
                _lark().parse(example)
            except UnexpectedInput as err:
                signature = _error_signature(err)
                if signature is not None:
                    table.setdefault(signature, label)
    return table


def _syntax_error(err: UnexpectedInput, text: str, path: str) -> PbxSyntaxError:
    signature = _error_signature(err)
    label = _labelled_signatures().get(signature) if signature is not None else None
    if isinstance(err, UnexpectedCharacters):
        at = err.pos_in_stream
        ch = text[at] if at is not None and 0 <= at < len(text) else "?"
        message = f"unexpected character {ch!r}"
        if ch == "'":
            message += "; strings use double quotes"
        pos = _pos_of(path, err.line, err.column)
    elif isinstance(err, UnexpectedEOF):
        lines = source_lines(text) or [""]
        pos = SourcePos(path, len(lines), len(lines[-1]) + 1)
        message = "unexpected end of file" + _expected(set(err.expected))
    elif isinstance(err, UnexpectedToken):
        token = err.token
        if token.type == "$END":
            lines = source_lines(text) or [""]
            pos = SourcePos(path, len(lines), len(lines[-1]) + 1)
        else:
            pos = SourcePos(path, token.line or 1, token.column or 1,
                            token.end_line, token.end_column)
        message = f"unexpected {_describe_token(token)}" + _expected(err.accepts or err.expected)
    else:  # pragma: no cover - lark has no other UnexpectedInput subclasses today
        pos = _pos_of(path, getattr(err, "line", 1), getattr(err, "column", 1))
        message = "syntax error"
    if label:
        message = f"{message} ({label})"
    return PbxSyntaxError(message, pos)


_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}


def _unquote(token: str) -> str:
    """The value of a double-quoted STRING token; only \\n \\t \\" and \\\\ are escapes."""
    body, out, i = token[1:-1], [], 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            out.append(_ESCAPES.get(nxt, "\\" + nxt))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _check_finite(text: str, pos: SourcePos) -> None:
    """Every number a file writes is a finite float64: ``1e999`` would become inf (and NaN
    downstream), and a nonzero ``1e-400`` would silently become 0."""
    value = float(text)
    if value == float("inf"):
        raise PbxSyntaxError(f"number {text} is not finite in float64 (the largest is "
                             "1.8e308)", pos)
    if value == 0.0 and any(ch in "123456789" for ch in text.split("e")[0].split("E")[0]):
        raise PbxSyntaxError(f"number {text} underflows to 0 in float64 (the smallest "
                             "positive is 5e-324)", pos)


class _ToAst(Transformer[Any, Any]):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def _pos(self, meta: Any) -> SourcePos:
        return SourcePos(self.path, getattr(meta, "line", 1), getattr(meta, "column", 1),
                         getattr(meta, "end_line", None), getattr(meta, "end_column", None))

    def _tpos(self, tok: Token) -> SourcePos:
        return SourcePos(self.path, tok.line or 1, tok.column or 1, tok.end_line, tok.end_column)

    # ---- top level
    @v_args(meta=True)
    def start(self, meta: Any, children: list[Any]) -> ast.Program:
        header = children[0]
        return ast.Program(header[0], tuple(children[1:]), self.path, header[1])

    def model_header(self, children: list[Token]) -> tuple[str, SourcePos]:
        return str(children[0]), self._tpos(children[0])

    @v_args(meta=True)
    def weights_decl(self, meta: Any, children: list[Token]) -> ast.WeightsDecl:
        paths = tuple(ast.StrLit(_unquote(str(t)), self._tpos(t)) for t in children)
        return ast.WeightsDecl(paths, self._pos(meta))

    def shape(self, children: list[Token]) -> tuple[int, ...]:
        return tuple(int(t) for t in children)

    def string_list(self, children: list[Token]) -> tuple[str, ...]:
        return tuple(_unquote(str(t)) for t in children)

    def features(self, children: list[Any]) -> tuple[str, tuple[str, ...]]:
        return ("features", children[0])

    def classes(self, children: list[Any]) -> tuple[str, tuple[str, ...]]:
        return ("classes", children[0])

    def input_decl(self, children: list[Any]) -> ast.InputDecl:
        name, dtype, shape, *metas = children
        meta = dict(metas)
        return ast.InputDecl(str(name), str(dtype), shape, meta.get("features"),
                             meta.get("classes"), self._tpos(name))

    def act_param(self, children: list[Any]) -> tuple[str, float]:
        return (str(children[0]), float(children[1].value))

    def activation_decl(self, children: list[Any]) -> ast.ActivationDef:
        name, var, *rest = children
        params, body = tuple(rest[:-1]), rest[-1]
        return ast.ActivationDef(str(name), str(var), params, body, self._tpos(name))

    def assign(self, children: list[Any]) -> ast.Assign:
        name, call = children
        return ast.Assign(str(name), call, self._tpos(name))

    def output_decl(self, children: list[Any]) -> ast.OutputDecl:
        name, *rest = children
        call = rest[0] if rest and isinstance(rest[0], ast.Call) else None
        meta: dict[str, tuple[str, ...]] = dict(r for r in rest if isinstance(r, tuple))
        return ast.OutputDecl(str(name), call, meta.get("features"), meta.get("classes"),
                              self._tpos(name))

    # ---- verify block (specs/verify.md)
    @v_args(meta=True)
    def verify_block(self, meta: Any, children: list[Any]) -> ast.VerifyBlock:
        return ast.VerifyBlock(tuple(children), self._pos(meta))

    def domain_box(self, children: list[Any]) -> ast.DomainBox:
        name, low, high = children
        return ast.DomainBox(str(name), float(low.value), float(high.value), self._tpos(name))

    def domain_data(self, children: list[Any]) -> ast.DomainData:
        name, k, path, *key = children
        key_lit = ast.StrLit(_unquote(str(key[0])), self._tpos(key[0])) if key else None
        return ast.DomainData(str(name), float(k.value),
                              ast.StrLit(_unquote(str(path)), self._tpos(path)), key_lit,
                              self._tpos(name))

    def verify_check(self, children: list[Any]) -> ast.VerifyCheck:
        name, *settings = children
        given = tuple(s for s in settings if s is not None)
        return ast.VerifyCheck(str(name), given, self._tpos(name))

    def verify_setting(self, children: list[Any]) -> ast.VerifySetting:
        name, value = children
        return ast.VerifySetting(str(name), value, self._tpos(name))

    def string_value(self, children: list[Token]) -> ast.StrLit:
        return ast.StrLit(_unquote(str(children[0])), self._tpos(children[0]))

    # ---- lrp block (specs/lrp.md)
    @v_args(meta=True)
    def lrp_block(self, meta: Any, children: list[Any]) -> ast.LrpBlock:
        return ast.LrpBlock(tuple(children), self._pos(meta))

    def lrp_composite(self, children: list[Any]) -> ast.LrpComposite:
        name, args = children[0], (children[1] if len(children) > 1 else None)
        text = _unquote(str(name)) if name.type == "STRING" else str(name).replace("_", "-")
        return ast.LrpComposite(text, args or (), self._tpos(name))

    def lrp_assign(self, children: list[Any]) -> ast.LrpAssign:
        target, rule = children[:2]
        args = children[2] if len(children) > 2 else None
        return ast.LrpAssign(str(target), str(rule), args or (), self._tpos(target),
                             self._tpos(rule))

    def lrp_args(self, children: list[Any]) -> tuple[ast.LrpArg, ...]:
        return tuple(c for c in children if c is not None)

    def lrp_arg(self, children: list[Any]) -> ast.LrpArg:
        name, number = children if len(children) == 2 else (None, children[0])
        value = float(number.value) if isinstance(number, ast.NumberLit) else float(number)
        pos = self._tpos(name) if name is not None else number.pos
        return ast.LrpArg(str(name) if name is not None else None, value, pos)

    # ---- calls
    def alias(self, children: list[Token]) -> ast.Call:
        """``h = g``: the identity op applied to ``g``."""
        tok = children[0]
        pos = self._tpos(tok)
        return ast.Call("identity", (ast.Arg(None, ast.Ref(str(tok), pos), pos),), pos)

    def call(self, children: list[Any]) -> ast.Call:
        name, *args = children
        wrapped = tuple(a if isinstance(a, ast.Arg) else ast.Arg(None, a, a.pos) for a in args)
        return ast.Call(str(name), wrapped, self._tpos(name))

    def keyword_arg(self, children: list[Any]) -> ast.Arg:
        name, value = children
        return ast.Arg(str(name), value, self._tpos(name))

    def ref(self, children: list[Token]) -> ast.Ref:
        return ast.Ref(str(children[0]), self._tpos(children[0]))

    def param(self, children: list[Token]) -> ast.ParamRef:
        tok = children[0]
        key = str(tok)[1:]
        if key.startswith('"'):
            key = _unquote(key)
        return ast.ParamRef(key, self._tpos(tok))

    def _number(self, tok: Token, sign: float) -> ast.NumberLit:
        text = str(tok)
        is_int = text.isdigit()
        _check_finite(text, self._tpos(tok))
        value = sign * (int(text) if is_int else float(text))
        return ast.NumberLit(value, is_int, self._tpos(tok))

    def signed_number(self, children: list[Token]) -> ast.NumberLit:
        return self._number(children[0], 1.0)

    def negative(self, children: list[Token]) -> ast.NumberLit:
        return self._number(children[0], -1.0)

    @v_args(meta=True)
    def true(self, meta: Any, children: list[Any]) -> ast.BoolLit:
        return ast.BoolLit(True, self._pos(meta))

    @v_args(meta=True)
    def false(self, meta: Any, children: list[Any]) -> ast.BoolLit:
        return ast.BoolLit(False, self._pos(meta))

    @v_args(meta=True)
    def none(self, meta: Any, children: list[Any]) -> ast.NoneLit:
        return ast.NoneLit(self._pos(meta))

    @v_args(meta=True)
    def tuple_lit(self, meta: Any, children: list[Any]) -> ast.SeqLit:
        return ast.SeqLit(tuple(children), "(", self._pos(meta))

    @v_args(meta=True)
    def list_lit(self, meta: Any, children: list[Any]) -> ast.SeqLit:
        return ast.SeqLit(tuple(children), "[", self._pos(meta))

    # ---- activation math
    def number(self, children: list[Token]) -> ast.Num:
        tok = children[0]
        _check_finite(str(tok), self._tpos(tok))
        return ast.Num(float(tok), str(tok), self._tpos(tok))

    def variable(self, children: list[Token]) -> ast.Var:
        return ast.Var(str(children[0]), self._tpos(children[0]))

    def function(self, children: list[Any]) -> ast.Func:
        name, *args = children
        return ast.Func(str(name), tuple(args), self._tpos(name))

    @v_args(meta=True)
    def compare(self, meta: Any, children: list[Any]) -> ast.Compare:
        left, op, right = children
        return ast.Compare(str(op), left, right, self._pos(meta))

    def _binary(self, op: str, meta: Any, children: list[Any]) -> ast.BinOp:
        return ast.BinOp(op, children[0], children[-1], self._pos(meta))

    @v_args(meta=True)
    def add(self, meta: Any, children: list[Any]) -> ast.BinOp:
        return self._binary("+", meta, children)

    @v_args(meta=True)
    def sub(self, meta: Any, children: list[Any]) -> ast.BinOp:
        return self._binary("-", meta, children)

    @v_args(meta=True)
    def mul(self, meta: Any, children: list[Any]) -> ast.BinOp:
        return self._binary("*", meta, children)

    @v_args(meta=True)
    def div(self, meta: Any, children: list[Any]) -> ast.BinOp:
        return self._binary("/", meta, children)

    @v_args(meta=True)
    def pow(self, meta: Any, children: list[Any]) -> ast.BinOp:
        return self._binary("^", meta, children)

    @v_args(meta=True)
    def neg(self, meta: Any, children: list[Any]) -> ast.Neg:
        return ast.Neg(children[0], self._pos(meta))


def _check_limits(tree: lark.Tree, path: str) -> None:
    """Nesting depth and number lengths, checked without recursion (the AST pass recurses)."""
    stack: list[tuple[lark.Tree | Token, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Token):
            if node.type in ("NUMBER", "INT") and len(node) > MAX_NUMBER_LENGTH:
                raise PbxSyntaxError(f"number of {len(node)} characters; at most "
                                     f"{MAX_NUMBER_LENGTH} are allowed", _token_pos(path, node))
            continue
        if depth > MAX_NESTING:
            meta = node.meta
            pos = SourcePos(path, getattr(meta, "line", 1), getattr(meta, "column", 1))
            raise PbxSyntaxError(f"expression nested more than {MAX_NESTING} levels deep "
                                 "(calls, brackets and operators count)", pos)
        stack.extend((child, depth + 1) for child in node.children)


def _token_pos(path: str, tok: Token) -> SourcePos:
    return SourcePos(path, tok.line or 1, tok.column or 1, tok.end_line, tok.end_column)


def parse_text(text: str, path: str = "<string>") -> ast.Program:
    """Parse .pbx source text into a :class:`~pbxc.parse.ast.Program`."""
    register_source(path, text)
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as err:
        raise _syntax_error(err, text, path) from None
    _check_limits(tree, path)
    try:
        program: ast.Program = _ToAst(path).transform(tree)
    except lark.exceptions.VisitError as err:
        if isinstance(err.orig_exc, PbxError):
            raise err.orig_exc from None
        raise
    return program


def parse_file(path: str | Path) -> ast.Program:
    """Read and parse a .pbx file; an unreadable file is a :class:`PbxError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PbxError(f"no such file: {p}") from None
    except UnicodeDecodeError as err:
        raise PbxSyntaxError(f"{p}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise PbxError(f"cannot read {p}: {err.strerror}") from None
    return parse_text(text, str(p))
