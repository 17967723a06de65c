"""The normalised text of a tree: keywords in lower case, single spaces, numbers in their
shortest form, parentheses only where the grammar needs them; it parses back to the same
tree."""

from __future__ import annotations

from enum import Enum
from typing import assert_never

from dispatcher.core.conditions.syntax import (
    _IDENT,
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


class _Level(Enum):
    OR = 0
    AND = 1
    NOT = 2


def _render(node: _Node, level: _Level) -> str:
    # Parentheses only where the grammar needs them: never more than the text had, so the
    # normalised text never nests deeper than what was accepted.
    match node:
        case _Or(items):
            text = " or ".join(_render(item, _Level.AND) for item in items)
            return text if level is _Level.OR else f"({text})"
        case _And(items):
            text = " and ".join(_render(item, _Level.NOT) for item in items)
            return text if level is not _Level.NOT else f"({text})"
        case _Not(item):
            return f"not {_render(item, _Level.NOT)}"
        case _Compare(left, op, right):
            return f"{_render_operand(left)} {op} {_render_operand(right)}"
        case _Member(operand, values, negated):
            listed = ", ".join(_render_const(v) for v in values)
            return f"{_render_operand(operand)} {'not in' if negated else 'in'} [{listed}]"
        case _Exists(field):
            return f"exists({_render_operand(field)})"
        case _Changed(path):
            return f"changed({_render_path(path, first_is_keyword_free=True)})"
        case _:
            assert_never(node)


def _render_operand(operand: _Operand) -> str:
    match operand:
        case _Attr(name):
            return name
        case _Field(side, path):
            return f"{side}.{_render_path(path, first_is_keyword_free=False)}"
        case _Const():
            return _render_const(operand)
        case _:
            assert_never(operand)


def _render_path(path: tuple[str, ...], *, first_is_keyword_free: bool) -> str:
    return ".".join(
        _render_segment(segment, first=first_is_keyword_free and i == 0)
        for i, segment in enumerate(path)
    )


def _render_segment(name: str, *, first: bool) -> str:
    if _IDENT.fullmatch(name) and not (first and name.lower() in ("new", "old")):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _render_const(const: _Const) -> str:
    value = const.value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _quote_string(value)
    return repr(value)


def _quote_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
