"""The .pbx abstract syntax tree: frozen dataclasses, each with its source position."""

from __future__ import annotations

from dataclasses import dataclass

from pbxc.errors import SourcePos

# ---------------------------------------------------------------- call arguments


@dataclass(frozen=True)
class Ref:
    """A reference to a named value (an input or an earlier statement)."""

    name: str
    pos: SourcePos


@dataclass(frozen=True)
class ParamRef:
    """``@key``: a weight tensor, or a key prefix completed by the op (``@fc1`` -> ``fc1.weight``)."""

    key: str
    pos: SourcePos


@dataclass(frozen=True)
class NumberLit:
    value: float
    is_int: bool
    pos: SourcePos


@dataclass(frozen=True)
class BoolLit:
    value: bool
    pos: SourcePos


@dataclass(frozen=True)
class NoneLit:
    pos: SourcePos


@dataclass(frozen=True)
class SeqLit:
    """``(a, b)`` or ``[a, b]``."""

    items: tuple[Value, ...]
    bracket: str  # "(" or "["
    pos: SourcePos


@dataclass(frozen=True)
class Arg:
    keyword: str | None
    value: Value
    pos: SourcePos


@dataclass(frozen=True)
class Call:
    op: str
    args: tuple[Arg, ...]
    pos: SourcePos  # of the op name


@dataclass(frozen=True)
class StrLit:
    value: str
    pos: SourcePos


Value = Ref | ParamRef | NumberLit | BoolLit | NoneLit | SeqLit | Call | StrLit

# ---------------------------------------------------------------- activation math


@dataclass(frozen=True)
class Num:
    value: float
    text: str
    pos: SourcePos


@dataclass(frozen=True)
class Var:
    name: str
    pos: SourcePos


@dataclass(frozen=True)
class Func:
    name: str
    args: tuple[Expr, ...]
    pos: SourcePos


@dataclass(frozen=True)
class BinOp:
    op: str  # + - * / ^
    left: Expr
    right: Expr
    pos: SourcePos


@dataclass(frozen=True)
class Neg:
    operand: Expr
    pos: SourcePos


@dataclass(frozen=True)
class Compare:
    op: str  # < <= > >=
    left: Expr
    right: Expr
    pos: SourcePos


Expr = Num | Var | Func | BinOp | Neg | Compare

# ---------------------------------------------------------------- statements


@dataclass(frozen=True)
class WeightsDecl:
    paths: tuple[StrLit, ...]
    pos: SourcePos


@dataclass(frozen=True)
class InputDecl:
    name: str
    dtype: str
    shape: tuple[int, ...]
    features: tuple[str, ...] | None
    classes: tuple[str, ...] | None
    pos: SourcePos


@dataclass(frozen=True)
class ActivationDef:
    name: str
    variable: str
    params: tuple[tuple[str, float], ...]
    body: Expr
    pos: SourcePos


@dataclass(frozen=True)
class Assign:
    name: str
    call: Call
    pos: SourcePos


@dataclass(frozen=True)
class OutputDecl:
    name: str
    call: Call | None
    features: tuple[str, ...] | None
    classes: tuple[str, ...] | None
    pos: SourcePos


@dataclass(frozen=True)
class DomainBox:
    """``domain x in [low, high]``: every element of input ``x`` in the interval."""

    input: str
    low: float
    high: float
    pos: SourcePos


@dataclass(frozen=True)
class DomainData:
    """``domain x within k std of "file.npz" [key "K"]``: mean +- k std of a data set."""

    input: str
    k: float
    path: StrLit
    key: StrLit | None
    pos: SourcePos


@dataclass(frozen=True)
class VerifySetting:
    """``name=value`` in a check: a number, a bare name, a string, true or false."""

    name: str
    value: NumberLit | Ref | StrLit | BoolLit
    pos: SourcePos


@dataclass(frozen=True)
class VerifyCheck:
    """A property to verify, ``name`` or ``name(setting=value, ...)``."""

    name: str
    settings: tuple[VerifySetting, ...]
    pos: SourcePos


VerifyStmt = DomainBox | DomainData | VerifyCheck


@dataclass(frozen=True)
class VerifyBlock:
    """``verify { ... }``: the properties ``pbxc verify`` checks, and the input domain."""

    statements: tuple[VerifyStmt, ...]
    pos: SourcePos

    @property
    def domains(self) -> tuple[DomainBox | DomainData, ...]:
        return tuple(s for s in self.statements if not isinstance(s, VerifyCheck))

    @property
    def checks(self) -> tuple[VerifyCheck, ...]:
        return tuple(s for s in self.statements if isinstance(s, VerifyCheck))


@dataclass(frozen=True)
class LrpArg:
    """A rule or composite parameter, positional (``name`` None) or ``name=value``."""

    name: str | None
    value: float
    pos: SourcePos


@dataclass(frozen=True)
class LrpComposite:
    """``composite NAME(args)``: the rules of every layer, by op kind (specs/lrp.md)."""

    name: str                 # as registered: epsilon-gamma-box (written epsilon_gamma_box)
    args: tuple[LrpArg, ...]
    pos: SourcePos


@dataclass(frozen=True)
class LrpAssign:
    """``target = rule(args)``: the rule of the weighted ops of statement ``target``."""

    target: str
    rule: str
    args: tuple[LrpArg, ...]
    pos: SourcePos            # of the target name
    rule_pos: SourcePos


@dataclass(frozen=True)
class LrpBlock:
    """``lrp { ... }``: the LRP rule assignment used when none is given on the CLI or API."""

    statements: tuple[LrpComposite | LrpAssign, ...]
    pos: SourcePos

    @property
    def composites(self) -> tuple[LrpComposite, ...]:
        return tuple(s for s in self.statements if isinstance(s, LrpComposite))

    @property
    def assignments(self) -> tuple[LrpAssign, ...]:
        return tuple(s for s in self.statements if isinstance(s, LrpAssign))


Item = WeightsDecl | InputDecl | ActivationDef | Assign | OutputDecl | VerifyBlock | LrpBlock


@dataclass(frozen=True)
class Program:
    name: str
    items: tuple[Item, ...]
    path: str
    pos: SourcePos

    @property
    def weights(self) -> tuple[WeightsDecl, ...]:
        return tuple(i for i in self.items if isinstance(i, WeightsDecl))

    @property
    def inputs(self) -> tuple[InputDecl, ...]:
        return tuple(i for i in self.items if isinstance(i, InputDecl))

    @property
    def activations(self) -> tuple[ActivationDef, ...]:
        return tuple(i for i in self.items if isinstance(i, ActivationDef))

    @property
    def verify_blocks(self) -> tuple[VerifyBlock, ...]:
        return tuple(i for i in self.items if isinstance(i, VerifyBlock))

    @property
    def lrp_blocks(self) -> tuple[LrpBlock, ...]:
        return tuple(i for i in self.items if isinstance(i, LrpBlock))
