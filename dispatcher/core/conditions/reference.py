"""The reference semantics: the decision the compiled jsonpath makes, computed in Python
(:func:`~dispatcher.core.conditions.evaluate`), with JSON values compared as Postgres does."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from enum import Enum
from typing import TYPE_CHECKING, Final, TypeAlias, assert_never

from dispatcher.core.conditions.syntax import (
    _And,
    _Attr,
    _Changed,
    _CmpOp,
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
from dispatcher.core.errors import InvalidInput
from dispatcher.core.models import JsonValue

if TYPE_CHECKING:
    from dispatcher.core.conditions import CompiledCondition


class _Missing(Enum):
    MISSING = 0


_MISSING: Final = _Missing.MISSING
_Value: TypeAlias = "JsonValue | _Missing"


class _Evaluator:
    def __init__(self, condition: CompiledCondition, event: Mapping[str, JsonValue]) -> None:
        self.condition = condition
        self.event = event

    def node(self, node: _Node) -> bool:
        match node:
            case _Or(items):
                return any(self.node(item) for item in items)
            case _And(items):
                return all(self.node(item) for item in items)
            case _Not(item):
                return not self.node(item)
            case _Compare(left, op, right):
                return _compare(self.operand(left), op, self.operand(right))
            case _Member(operand, values, negated):
                subject = self.operand(operand)
                if negated:
                    return all(_compare(subject, "!=", v.value) for v in values)
                return any(_compare(subject, "==", v.value) for v in values)
            case _Exists(field):
                return self.operand(field) is not _MISSING
            case _Changed(path):
                return self.changed(path)
            case _:
                assert_never(node)

    def operand(self, operand: _Operand) -> _Value:
        match operand:
            case _Attr(name):
                return self.event.get(name, _MISSING)
            case _Field(side, path):
                value: _Value = self.event.get(side, _MISSING)
                for segment in path:
                    if not isinstance(value, Mapping) or segment not in value:
                        return _MISSING
                    value = value[segment]
                return value
            case _Const(value):
                return value
            case _:
                assert_never(operand)

    def changed(self, path: tuple[str, ...]) -> bool:
        flags = self.event.get("changed")
        if flags is not None:
            # The document's flags, as the database reads them: a missing or non-boolean
            # flag is false.
            if path not in self.condition.changed or not isinstance(flags, Sequence):
                return False
            index = self.condition.changed.index(path)
            return index < len(flags) and flags[index] is True
        new = _pg_extract(self.event.get("new", _MISSING), path)
        old = _pg_extract(self.event.get("old", _MISSING), path)
        if new is _MISSING or old is _MISSING:
            return new is not old
        return not _json_equal(new, old)


def _kind(value: _Value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float | Decimal):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, Sequence):
        return "array"
    raise InvalidInput("event", value, "is not a JSON value")


def _decimal(value: object) -> int | Decimal:
    # The decimal JSON carries: a float by its shortest form (what json.dumps writes and
    # Postgres reads as numeric), so 1e23 == 100000000000000000000000 as in the database.
    if isinstance(value, int):
        return value
    number = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value))
    if not number.is_finite():
        raise InvalidInput("event", value, "is not a JSON number (NaN and infinities are not)")
    return number


def _order(left: JsonValue, right: JsonValue, kind: str) -> int:
    if kind == "null":
        return 0
    if kind == "string":
        # Code point order: what Postgres's jsonpath does (byte order of UTF-8).
        assert isinstance(left, str)
        assert isinstance(right, str)
        return (left > right) - (left < right)
    if kind == "boolean":
        return int(bool(left)) - int(bool(right))
    a, b = _decimal(left), _decimal(right)
    return (a > b) - (a < b)


def _compare(left: _Value, op: _CmpOp, right: _Value) -> bool:
    if left is _MISSING or right is _MISSING:
        return False
    left_kind, right_kind = _kind(left), _kind(right)
    if left_kind != right_kind:
        # jsonpath: a null against any other value is unequal; other mixes are unknown.
        return op == "!=" and "null" in (left_kind, right_kind)
    if left_kind in ("object", "array"):
        return False
    order = _order(left, right, left_kind)
    if op == "==":
        return order == 0
    if op == "!=":
        return order != 0
    if op == "<":
        return order < 0
    if op == "<=":
        return order <= 0
    if op == ">":
        return order > 0
    if op == ">=":
        return order >= 0
    assert_never(op)


def _pg_extract(value: _Value, path: tuple[str, ...]) -> _Value:
    """``value #> path``: SQL NULL (missing) for an absent member or a step into a scalar,
    and, unlike jsonpath, an array indexed by a segment that reads as an integer."""
    for segment in path:
        if isinstance(value, Mapping):
            if segment not in value:
                return _MISSING
            value = value[segment]
        elif isinstance(value, Sequence) and not isinstance(value, str):
            index = _strtoint(segment)
            if index is None:
                return _MISSING
            if index < 0:
                # -1 is the last element; INT_MIN is refused outright.
                if index == -(2**31) or -index > len(value):
                    return _MISSING
                index += len(value)
            if index >= len(value):
                return _MISSING
            value = value[index]
        else:
            return _MISSING
    return value


_STRTOL = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)")


def _strtoint(text: str) -> int | None:
    # C's strtol in base 10, as Postgres's strtoint uses it: leading white space, a sign,
    # ASCII digits, nothing after; out of int range is no index at all.
    match = _STRTOL.fullmatch(text)
    if match is None:
        return None
    number = int(match.group(1))
    return number if -(2**31) <= number < 2**31 else None


def _json_equal(left: JsonValue, right: JsonValue) -> bool:
    # jsonb equality: types must agree (true is not 1), numbers by value, members by name.
    kind = _kind(left)
    if kind != _kind(right):
        return False
    if isinstance(left, Mapping):
        assert isinstance(right, Mapping)
        return left.keys() == right.keys() and all(_json_equal(left[k], right[k]) for k in left)
    if kind == "array":
        assert isinstance(left, Sequence)
        assert isinstance(right, Sequence)
        return len(left) == len(right) and all(
            _json_equal(a, b) for a, b in zip(left, right, strict=True)
        )
    return _order(left, right, kind) == 0
