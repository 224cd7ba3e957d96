"""``pbxc activation NAME``: everything pbxc derives for one activation, as text."""

from __future__ import annotations

import argparse
import difflib
import re

from pbxc.cli import EXIT_OK, UsageError
from pbxc.symbolic.activations import BUILTIN_ACTIVATIONS, ActivationKey
from pbxc.symbolic.calculus import CONVENTIONS, DEFAULT_CONVENTION


def cmd_activation(args: argparse.Namespace) -> int:
    from pbxc.pipeline import check_file
    from pbxc.symbolic.describe import describe_activation

    definitions = {}
    if args.model:
        graph, _ = check_file(args.model)
        definitions = dict(graph.user_activations)
    known = sorted(set(BUILTIN_ACTIVATIONS) | set(definitions))
    name, _, rest = args.name.partition("(")
    name = name.strip()
    if name not in known:
        near = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        where = f" or defined in {args.model}" if args.model else " (give --model FILE for " \
            "activations defined in a .pbx)"
        raise UsageError(f"unknown activation '{args.name}': not built in{where}{hint}")
    defaults = (definitions[name].params if name in definitions
                else BUILTIN_ACTIVATIONS[name].params)
    key = ActivationKey(name, parse_params(args.name, rest, defaults), definitions.get(name))
    print(describe_activation(key, definitions, args.kinks, accuracy=not args.no_accuracy))
    return EXIT_OK


NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def parse_params(text: str, rest: str, defaults: tuple[tuple[str, float], ...]
                 ) -> tuple[tuple[str, float], ...]:
    """``0.1`` / ``alpha=0.1`` arguments (numbers only, as in a .pbx call) over the defaults."""
    values = dict(defaults)
    if not rest:
        return tuple(values.items())
    if not rest.rstrip().endswith(")"):
        raise UsageError(f"'{text}': expected NAME or NAME(value, name=value, ...)")
    args = [a.strip() for a in rest.rstrip()[:-1].split(",") if a.strip()]
    order = [p for p, _ in defaults]
    for i, arg in enumerate(args):
        m = re.fullmatch(rf"(?:([A-Za-z_]\w*)\s*=\s*)?({NUMBER})", arg)
        if m is None:
            raise UsageError(f"'{text}': argument '{arg}' is not a number or name=number")
        pname = m.group(1) or (order[i] if i < len(order) else None)
        if pname not in values:
            expected = ", ".join(order) or "none"
            raise UsageError(f"'{text}': unknown parameter '{pname or arg}'; parameters: "
                             f"{expected}")
        values[pname] = float(m.group(2))
    return tuple(values.items())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("activation", help="f, f', f'', kinks, DFD multiplier branches and "
                       "measured accuracy of one activation")
    p.add_argument("name", help="a built-in (gelu, 'leaky_relu(0.1)', ...) or one defined in "
                   "--model")
    p.add_argument("--model", "-m", help="a .pbx file whose 'activation' definitions to use")
    p.add_argument("--kinks", default=DEFAULT_CONVENTION, choices=CONVENTIONS,
                   help="f' at a kink (default: owner)")
    p.add_argument("--no-accuracy", action="store_true",
                   help="skip the high-precision accuracy measurement (faster)")
    p.set_defaults(func=cmd_activation)
