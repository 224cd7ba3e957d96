"""Every elementwise activation as one sympy expression f(z).

Built-ins are defined here; user-defined activations are built from their parsed expression
tree through a whitelist of constructors. No text is ever sympified, evaluated or executed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import sympy
from sympy import Abs, Piecewise, Rational, erfc, exp, sqrt, tanh
from sympy.logic.boolalg import ITE

from pbxc.errors import PbxValidationError, SourcePos
from pbxc.ops import BUILTIN_ACTIVATIONS, MATH_CONSTANTS, MATH_FUNCTIONS
from pbxc.parse import ast
from pbxc.symbolic.functions import NormalCdf, Sigmoid, Softplus

#: The variable of every activation expression.
Z = sympy.Symbol("z", real=True)

# SELU constants (Klambauer et al. 2017), to the digits PyTorch uses.
SELU_ALPHA = sympy.Float("1.6732632423543772848170429916717", 40)
SELU_SCALE = sympy.Float("1.0507009873554804934193349852946", 40)


def number(value: float | int | str) -> sympy.Expr:
    """An exact sympy number for a literal: ``0.1`` becomes 1/10, the decimal the user wrote."""
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()
                                  and abs(value) < 2**53):
        return sympy.Integer(int(value))
    return Rational(str(value))


def _elu(z: sympy.Expr, alpha: sympy.Expr) -> sympy.Expr:
    return Piecewise((z, z > 0), (alpha * (exp(z) - 1), True))


_BUILTINS: dict[str, Callable[..., sympy.Expr]] = {
    "identity": lambda z: z,
    "relu": lambda z: Piecewise((z, z > 0), (0, True)),
    "leaky_relu": lambda z, alpha: Piecewise((z, z > 0), (alpha * z, True)),
    "elu": _elu,
    "selu": lambda z: SELU_SCALE * _elu(z, SELU_ALPHA),
    "gelu": lambda z: z * NormalCdf(z),
    "silu": lambda z: z * Sigmoid(z),
    "mish": lambda z: z * tanh(Softplus(z)),
    "softplus": lambda z, beta: Softplus(beta * z) / beta,
    "sigmoid": lambda z: Sigmoid(z),
    "tanh": lambda z: tanh(z),
    # boundaries belong to the constant pieces, so the derivative there is 0 (as in PyTorch)
    "hardtanh": lambda z, lo, hi: Piecewise((lo, z <= lo), (hi, z >= hi), (z, True)),
    "hardsigmoid": lambda z: Piecewise((0, z <= -3), (1, z >= 3), (z / 6 + Rational(1, 2), True)),
    # torch's ReLU6 is hardtanh(0, 6): the bounds belong to the constant pieces
    "relu6": lambda z: Piecewise((0, z <= 0), (6, z >= 6), (z, True)),
    # torch.clamp with number bounds (ONNX Clip): gradient 0 at the bounds, as hardtanh
    "clip": lambda z, lo, hi: Piecewise((lo, z <= lo), (hi, z >= hi), (z, True)),
    # torch's hardswish backward: 0 for z <= -3, 1 for z >= 3, z/3 + 1/2 between
    "hardswish": lambda z: Piecewise((0, z <= -3), (z, z >= 3), (z * (z + 3) / 6, True)),
    # Hendrycks & Gimpel 2016, section 2: z/2 (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))), torch's
    # approximate="tanh"; written z sigmoid(2u) (1 + tanh u = 2 sigmoid 2u): no cancellation
    "gelu_tanh": lambda z: z * Sigmoid(2 * sqrt(2 / sympy.pi) * (z + Rational(44715, 10**6) * z**3)),
    "abs": lambda z: Abs(z),
    "exp": lambda z: exp(z),
    "log_sigmoid": lambda z: -Softplus(-z),
}

_MATH: dict[str, Callable[..., sympy.Expr]] = {
    "exp": exp, "log": sympy.log, "log1p": lambda x: sympy.log(1 + x),
    "expm1": lambda x: exp(x) - 1, "sqrt": sqrt, "erf": sympy.erf, "erfc": erfc,
    "sin": sympy.sin, "cos": sympy.cos, "tanh": tanh, "sinh": sympy.sinh, "cosh": sympy.cosh,
    "atan": sympy.atan, "abs": Abs, "sign": sympy.sign,
    "heaviside": lambda x: Piecewise((1, x > 0), (0, True)),
    "max": lambda a, b: Piecewise((a, a >= b), (b, True)),
    "min": lambda a, b: Piecewise((a, a <= b), (b, True)),
}
assert set(_MATH) == set(MATH_FUNCTIONS) - {"where"}
assert set(_BUILTINS) == set(BUILTIN_ACTIVATIONS)

_COMPARE: dict[str, Callable[[sympy.Expr, sympy.Expr], sympy.Basic]] = {
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
}


def builtin_expression(name: str, params: Mapping[str, float] | None = None,
                       z: sympy.Expr = Z) -> sympy.Expr:
    """f(z) of a built-in activation, with parameters (by name) filled from defaults."""
    spec = BUILTIN_ACTIVATIONS[name]
    values = dict(spec.params)
    values.update(params or {})
    return _BUILTINS[name](z, *(number(values[p]) for p, _ in spec.params))


def _power(base: sympy.Expr, exponent: sympy.Expr, pos: SourcePos) -> sympy.Expr:
    """base ** exponent, refusing exponents that would make sympy expand or evaluate forever
    (``z^1000000``, ``2^(10^9)``); a power of two numbers is evaluated in floating point."""
    from pbxc.symbolic.budget import current_limits

    if exponent.is_number and exponent.is_real:
        limit = current_limits().max_exponent
        if base.is_number and base.is_real:
            try:
                value = float(base) ** float(exponent)
            except (OverflowError, ZeroDivisionError):
                value = float("inf")
            if isinstance(value, complex) or value != value or abs(value) == float("inf"):
                raise PbxValidationError(f"the power ({base}) ^ ({exponent}) is not a finite real "
                                         "number", pos)
            return sympy.Float(value) if abs(float(exponent)) > limit else base ** exponent
        if abs(float(exponent)) > limit:
            raise PbxValidationError(f"exponent {exponent} is too large: at most {limit} in "
                                     "magnitude (PBXC_DERIVE_MAX_EXPONENT, specs/activations.md)",
                                     pos)
    return base ** exponent


@dataclass(frozen=True)
class ActivationKey:
    """What identifies an activation expression: its name, parameter values and definition."""

    name: str
    params: tuple[tuple[str, float], ...]
    definition: ast.ActivationDef | None = None  # None for built-ins

    @property
    def label(self) -> str:
        args = ", ".join(f"{k}={v:g}" for k, v in self.params)
        return f"{self.name}({args})" if args else self.name

    @property
    def pos(self) -> SourcePos | None:
        return self.definition.pos if self.definition is not None else None


class _UserExpr:
    def __init__(self, definitions: Mapping[str, ast.ActivationDef]) -> None:
        self.definitions = definitions

    def build(self, definition: ast.ActivationDef, argument: sympy.Expr,
              params: Mapping[str, sympy.Expr]) -> sympy.Expr:
        env = {definition.variable: argument, **params}
        return self.expr(definition, definition.body, env)

    def expr(self, owner: ast.ActivationDef, node: ast.Expr, env: Mapping[str, sympy.Expr]
             ) -> sympy.Expr:
        if isinstance(node, ast.Num):
            return number(node.text if not node.text.isdigit() else int(node.text))
        if isinstance(node, ast.Var):
            if node.name in env:
                return env[node.name]
            if node.name in MATH_CONSTANTS:
                return sympy.pi if node.name == "pi" else sympy.E
            raise PbxValidationError(f"unknown name '{node.name}' in activation "
                                     f"'{owner.name}'", node.pos)
        if isinstance(node, ast.Neg):
            return -self.expr(owner, node.operand, env)
        if isinstance(node, ast.BinOp):
            left, right = self.expr(owner, node.left, env), self.expr(owner, node.right, env)
            if node.op == "+":
                return left + right
            if node.op == "-":
                return left - right
            if node.op == "*":
                return left * right
            if node.op == "/":
                return left / right
            return _power(left, right, node.pos)
        if isinstance(node, ast.Compare):
            raise PbxValidationError("a comparison may appear only as the first argument of "
                                     "where()", node.pos)
        return self.call(owner, node, env)

    def call(self, owner: ast.ActivationDef, node: ast.Func, env: Mapping[str, sympy.Expr]
             ) -> sympy.Expr:
        name = node.name
        if name == "where" and len(node.args) == 3:
            cond = node.args[0]
            if not isinstance(cond, ast.Compare):
                raise PbxValidationError("the first argument of where() must be a comparison "
                                         "such as z > 0", node.pos)
            relation = _COMPARE[cond.op](self.expr(owner, cond.left, env),
                                         self.expr(owner, cond.right, env))
            return Piecewise((self.expr(owner, node.args[1], env), relation),
                             (self.expr(owner, node.args[2], env), True))
        args = [self.expr(owner, a, env) for a in node.args]
        if name in _MATH and len(args) == MATH_FUNCTIONS[name]:
            return _MATH[name](*args)
        if name in BUILTIN_ACTIVATIONS:
            spec = BUILTIN_ACTIVATIONS[name]
            if 1 <= len(args) <= 1 + len(spec.params):
                values = [*args[1:], *(number(v) for _, v in spec.params[len(args) - 1:])]
                return _BUILTINS[name](args[0], *values)
        if name in self.definitions:
            callee = self.definitions[name]
            if 1 <= len(args) <= 1 + len(callee.params):
                bound = {p: (args[1 + i] if 1 + i < len(args) else number(default))
                         for i, (p, default) in enumerate(callee.params)}
                return self.build(callee, args[0], bound)
        raise PbxValidationError(f"cannot call '{name}' with {len(args)} argument(s) in "
                                 f"activation '{owner.name}'", node.pos)


@functools.lru_cache(maxsize=512)
def _cached_expression(key: ActivationKey,
                       definitions: tuple[ast.ActivationDef, ...]) -> sympy.Expr:
    params = dict(key.params)
    if key.definition is None:
        return builtin_expression(key.name, params)
    values = {p: number(params.get(p, default)) for p, default in key.definition.params}
    built = _UserExpr({d.name: d for d in definitions}).build(key.definition, Z, values)
    # a comparison of piecewise values (max(min(z, 1), max(z, -1))) folds into if-then-else
    # conditions, which no evaluator or printer has; as and/or they mean the same
    return built.replace(lambda e: isinstance(e, ITE), lambda e: e.to_nnf())


def activation_expression(key: ActivationKey,
                          definitions: Mapping[str, ast.ActivationDef] | None = None
                          ) -> sympy.Expr:
    """f(z) for ``key``; user activations may call each other through ``definitions``."""
    defs = tuple(sorted((definitions or {}).values(), key=lambda d: d.name))
    return _cached_expression(key, defs)


def activation_key(name: str, params: tuple[tuple[str, float], ...],
                   definitions: Mapping[str, ast.ActivationDef]) -> ActivationKey:
    return ActivationKey(name, params, definitions.get(name))
