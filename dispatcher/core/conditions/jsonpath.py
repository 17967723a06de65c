"""A tree into what the database evaluates: the jsonpath, its variables and the changed
flags (the package docstring's "Compilation" says how)."""

from __future__ import annotations

from typing import assert_never

from dispatcher.core.conditions.syntax import (
    _And,
    _Attr,
    _Changed,
    _Compare,
    _Const,
    _Exists,
    _Field,
    _Member,
    _Node,
    _Not,
    _Operand,
    _Or,
)
from dispatcher.core.models import JsonValue


class _Compiler:
    def __init__(self) -> None:
        self.variables: dict[str, JsonValue] = {}
        self.changed: list[tuple[str, ...]] = []

    def node(self, node: _Node) -> str:
        match node:
            case _Or(items):
                return "(" + " || ".join(self.node(item) for item in items) + ")"
            case _And(items):
                return "(" + " && ".join(self.node(item) for item in items) + ")"
            case _Not(item):
                return f"!({self.node(item)})"
            case _Compare(left, op, right):
                return _two_valued(f"{self.operand(left)} {op} {self.operand(right)}")
            case _Member(operand, values, negated):
                # The list is one array variable and the subject is written once, so the
                # path grows with the text, not with the text squared. x in L: some element
                # equals x. x not in L: no element fails to differ from x (differing being
                # unknown for a missing x, or one of another type, fails).
                listed = self.variable([v.value for v in values])
                subject = self.operand(operand)
                if negated:
                    differs = f"@ != {subject}"
                    failing = f"({differs}) is unknown || !({differs})"
                    return f"!{_two_valued(f'exists({listed}[*] ? ({failing}))')}"
                return _two_valued(f"exists({listed}[*] ? (@ == {subject}))")
            case _Exists(field):
                return _two_valued(f"exists({self.operand(field)})")
            case _Changed(path):
                if path not in self.changed:
                    self.changed.append(path)
                return _two_valued(f'$."changed"[{self.changed.index(path)}] == true')
            case _:
                assert_never(node)

    def operand(self, operand: _Operand) -> str:
        match operand:
            case _Attr(name):
                return f"$.{_jsonpath_string(name)}"
            case _Field(side, path):
                return "$." + ".".join(_jsonpath_string(s) for s in (side, *path))
            case _Const(value):
                return self.variable(value)
            case _:
                assert_never(operand)

    def variable(self, value: JsonValue) -> str:
        name = f"v{len(self.variables) + 1}"
        self.variables[name] = value
        return f"${name}"


def _two_valued(predicate: str) -> str:
    # jsonpath's predicates are three-valued: a comparison of different types or of
    # non-scalars, or over a member strict mode cannot find, is unknown, and
    # jsonb_path_match would return NULL (and an enclosing ! would keep it unknown). Unknown
    # becomes false here, atom by atom, so not, and and or work on plain booleans (the
    # `exists` of an `in` is two-valued already, and wrapped all the same: one rule for
    # every atom). `is unknown` takes only a parenthesised predicate, hence (( )).
    return f"(!(({predicate}) is unknown) && ({predicate}))"


def _jsonpath_string(name: str) -> str:
    # A jsonpath string literal: backslash and double quote escaped, and, though the parser
    # never lets one through, every control character as \uXXXX, so no name ends the literal.
    out = ['"']
    for char in name:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)
