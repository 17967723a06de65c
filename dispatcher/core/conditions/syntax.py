"""The condition language's text: its limits and its error, the syntax tree, the tokens.

The tokenizer turns text into :class:`_Token` values; the parser
(:mod:`~dispatcher.core.conditions.parser`) turns those into the tree the other modules walk.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, TypeAlias

from dispatcher.core.errors import InvalidInput

MAX_CONDITION_LENGTH = 4096
MAX_NESTING = 32
MAX_ATOMS = 100


class ConditionError(InvalidInput):
    """A condition that does not parse or breaks a rule; nothing was registered.

    ``position`` is the 0-based offset in the text of the problem (``len(text)`` for "it
    ended too soon"), ``problem`` the short reason; the message quotes the text with a caret
    under that offset, whose column it gives counting from 1.
    """

    def __init__(self, text: str, position: int, problem: str, *, field: str = "when") -> None:
        self.position = position
        self.problem = problem
        shown, caret = _excerpt(text, position)
        super().__init__(
            field, text, f"{problem} at column {position + 1}\n    {shown}\n    {' ' * caret}^"
        )


def _excerpt(text: str, position: int, window: int = 60) -> tuple[str, int]:
    start = max(0, position - window)
    end = min(len(text), position + window)
    prefix = "..." if start else ""
    suffix = "..." if end < len(text) else ""
    # One line, one cell per character, nothing a terminal or a log would mangle.
    visible = "".join(
        " " if c in _SPACE else "?" if unicodedata.category(c) in ("Cc", "Cs") else c
        for c in text[start:end]
    )
    return prefix + visible + suffix, len(prefix) + position - start


# The syntax tree.

Scalar: TypeAlias = "str | int | float | bool | None"
_CmpOp: TypeAlias = Literal["==", "!=", "<", "<=", ">", ">="]
_ORDERINGS = ("<", "<=", ">", ">=")


@dataclass(frozen=True, slots=True)
class _Attr:
    name: Literal["op", "key"]


@dataclass(frozen=True, slots=True)
class _Field:
    side: Literal["new", "old"]
    path: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Const:
    value: Scalar


_Operand: TypeAlias = "_Attr | _Field | _Const"


@dataclass(frozen=True, slots=True)
class _Compare:
    left: _Operand
    op: _CmpOp
    right: _Operand


@dataclass(frozen=True, slots=True)
class _Member:
    operand: _Operand
    values: tuple[_Const, ...]
    negated: bool


@dataclass(frozen=True, slots=True)
class _Exists:
    field: _Field


@dataclass(frozen=True, slots=True)
class _Changed:
    path: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Not:
    item: _Node


@dataclass(frozen=True, slots=True)
class _And:
    items: tuple[_Node, ...]


@dataclass(frozen=True, slots=True)
class _Or:
    items: tuple[_Node, ...]


_Node: TypeAlias = "_Compare | _Member | _Exists | _Changed | _Not | _And | _Or"


def _flatten(items: list[_Node], kind: type[_And] | type[_Or]) -> tuple[_Node, ...]:
    # (a and b) and c is a and b and c: one node, so that the normalised text, which drops
    # the parentheses, parses back to the same tree.
    out: list[_Node] = []
    for item in items:
        if isinstance(item, kind):
            out.extend(item.items)
        else:
            out.append(item)
    return tuple(out)


# Tokens.

_TokenKind: TypeAlias = Literal["name", "qname", "string", "number", "punct", "end"]


@dataclass(frozen=True, slots=True)
class _Token:
    kind: _TokenKind
    text: str  # as written
    value: str  # decoded: a name, a string's content, a punctuation mark
    start: int


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_RUN = re.compile(r"[-+.0-9A-Za-z_]+")
_SPACE = " \t\n\r"
_PUNCT = "()[],."
_OPERATORS = ("==", "!=", "<=", ">=", "<", ">")
_MISTAKES = {
    "<>": "'<>' is not an operator: write '!=' for 'differs from'",
    "&&": "'&&' is not an operator: write 'and'",
    "||": "'||' is not an operator: write 'or'",
    "=": "'=' is not an operator: write '==' to compare",
    "!": "'!' is not an operator: write 'not' to negate, or '!=' for 'differs from'",
    "&": "'&' is not an operator: write 'and'",
    "|": "'|' is not an operator: write 'or'",
}


def _tokenize(text: str, field: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    n = len(text)
    while i < n:
        char = text[i]
        if char in _SPACE:
            i += 1
        elif char in _PUNCT:
            tokens.append(_Token("punct", char, char, i))
            i += 1
        elif char in "'\"":
            token = _quoted(text, i, field)
            tokens.append(token)
            i += len(token.text)
        elif char == "-" or (char.isascii() and char.isdigit()):
            after_dot = (
                len(tokens) > 1 and _is_punct(tokens[-1], ".") and tokens[-2].kind != "punct"
            )
            token = _number(text, i, field, after_dot=after_dot)
            tokens.append(token)
            i += len(token.text)
        elif match := _IDENT.match(text, i):
            word = match.group()
            tokens.append(_Token("name", word, word, i))
            i = match.end()
        else:
            operator = next((op for op in _OPERATORS if text.startswith(op, i)), None)
            if operator is not None and not text.startswith("<>", i):
                tokens.append(_Token("punct", operator, operator, i))
                i += len(operator)
                continue
            mistake = next((m for m in _MISTAKES if text.startswith(m, i)), None)
            if mistake is not None:
                raise ConditionError(text, i, _MISTAKES[mistake], field=field)
            raise ConditionError(text, i, _unexpected_character(char), field=field)
    tokens.append(_Token("end", "", "", n))
    return tokens


def _unexpected_character(char: str) -> str:
    name = unicodedata.name(char, "")
    described = f"{char!r} (U+{ord(char):04X}{' ' + name if name else ''})"
    if char.isalnum():
        return (
            f"unexpected character {described}: a name with characters other than "
            'A-Z, a-z, 0-9 and _ is double-quoted, as in new."café"'
        )
    return f"unexpected character {described}"


def _quoted(text: str, start: int, field: str) -> _Token:
    quote = text[start]
    out: list[str] = []
    i = start + 1
    while i < len(text):
        char = text[i]
        if char == quote:
            raw = text[start : i + 1]
            kind: _TokenKind = "string" if quote == "'" else "qname"
            return _Token(kind, raw, "".join(out), start)
        if char == "\\":
            following = text[i + 1 : i + 2]
            if following not in (quote, "\\"):
                what = "a string" if quote == "'" else "a quoted name"
                escape = "\\" + following
                raise ConditionError(
                    text,
                    i,
                    f"unknown escape '{escape}' in {what}: the only escapes are \\{quote} and \\\\",
                    field=field,
                )
            out.append(following)
            i += 2
            continue
        if char in _SPACE and char != " ":
            raise ConditionError(
                text,
                i,
                f"control character U+{ord(char):04X} is not allowed inside quotes",
                field=field,
            )
        out.append(char)
        i += 1
    what = "string" if quote == "'" else "quoted name"
    raise ConditionError(
        text, start, f"unterminated {what}: no closing {quote} after this one", field=field
    )


def _number(text: str, start: int, field: str, *, after_dot: bool) -> _Token:
    match = _NUMBER.match(text, start)
    run = _NUMBER_RUN.match(text, start)
    written = run.group() if run else text[start]
    if after_dot:
        raise ConditionError(
            text,
            start,
            f'a name that is not an identifier is double-quoted: "{written}"',
            field=field,
        )
    if match is None:
        if text[start] == "-":
            raise ConditionError(
                text,
                start,
                "'-' must start a number, as in -1 (there is no arithmetic)",
                field=field,
            )
        raise ConditionError(text, start, f"invalid number {written!r}", field=field)
    end = match.end()
    if end < len(text) and (text[end] in "._" or (text[end].isascii() and text[end].isalnum())):
        raise ConditionError(
            text,
            start,
            f"invalid number {written!r}: numbers are written as in JSON (no leading zeros, "
            "digits on both sides of '.', as in 0.5, 10, 1e-3)",
            field=field,
        )
    number = match.group()
    return _Token("number", number, number, start)


def _number_value(token: _Token, text: str, field: str) -> int | float:
    written = token.value
    if not any(c in written for c in ".eE"):
        return int(written)
    value = float(written)
    if not math.isfinite(value):
        raise ConditionError(
            text,
            token.start,
            f"the number {written} is out of range (beyond \u00b11.7976931348623157e308)",
            field=field,
        )
    if Decimal(written) != Decimal(repr(value)):
        raise ConditionError(
            text,
            token.start,
            f"the number {written} has no exact double value and would be read as "
            f"{value!r}: write {value!r}, or an integer",
            field=field,
        )
    return value


def _is_punct(token: _Token, *marks: str) -> bool:
    return token.kind == "punct" and token.value in marks


_CMP_OPS: dict[str, _CmpOp] = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


def _show(token: _Token) -> str:
    if token.kind == "end":
        return "the end"
    text = token.text if len(token.text) <= 30 else token.text[:27] + "..."
    return repr(text)
