"""Text into the syntax tree: the checks on the whole text, then a recursive descent that
refuses, with its position and a hint, whatever the grammar or the rules do not allow."""

from __future__ import annotations

import unicodedata
from functools import lru_cache
from typing import Literal

from dispatcher.core.conditions.reference import _kind
from dispatcher.core.conditions.render import (
    _quote_string,
    _render_const,
    _render_operand,
    _render_segment,
)
from dispatcher.core.conditions.syntax import (
    _CMP_OPS,
    _OPERATORS,
    _ORDERINGS,
    _SPACE,
    MAX_ATOMS,
    MAX_CONDITION_LENGTH,
    MAX_NESTING,
    ConditionError,
    _And,
    _Attr,
    _Changed,
    _Compare,
    _Const,
    _Exists,
    _Field,
    _flatten,
    _is_punct,
    _Member,
    _Node,
    _Not,
    _number_value,
    _Operand,
    _Or,
    _show,
    _Token,
    _tokenize,
)


def _parse(text: str, field: str) -> _Node:
    if len(text) > MAX_CONDITION_LENGTH:
        raise ConditionError(
            text,
            MAX_CONDITION_LENGTH,
            f"the condition is {len(text)} characters long; the limit is {MAX_CONDITION_LENGTH}",
            field=field,
        )
    for i, char in enumerate(text):
        if "\ud800" <= char <= "\udfff":
            raise ConditionError(
                text, i, f"lone surrogate U+{ord(char):04X} is not valid text", field=field
            )
        if char not in _SPACE and unicodedata.category(char) == "Cc":
            raise ConditionError(
                text, i, f"control character U+{ord(char):04X} is not allowed", field=field
            )
    if not text.strip(_SPACE):
        raise ConditionError(
            text,
            0,
            "the condition is empty; write one such as new.status == 'paid'",
            field=field,
        )
    return _cached_parse(text, field)


@lru_cache(maxsize=512)
def _cached_parse(text: str, field: str) -> _Node:
    return _Parser(text, field).condition()


class _Parser:
    def __init__(self, text: str, field: str) -> None:
        self.text = text
        self.field = field
        self.tokens = _tokenize(text, field)
        self.index = 0
        self.depth = 0
        self.atoms = 0

    def condition(self) -> _Node:
        node = self.or_()
        token = self.peek()
        if token.kind != "end":
            if _is_punct(token, ")"):
                raise self.error(token, "this ')' closes no '('")
            raise self.error(
                token, f"expected 'and', 'or' or the end of the condition, found {_show(token)}"
            )
        return node

    def or_(self) -> _Node:
        items = [self.and_()]
        while self.keyword("or"):
            items.append(self.and_())
        return items[0] if len(items) == 1 else _Or(_flatten(items, _Or))

    def and_(self) -> _Node:
        items = [self.not_()]
        while self.keyword("and"):
            items.append(self.not_())
        return items[0] if len(items) == 1 else _And(_flatten(items, _And))

    def not_(self) -> _Node:
        token = self.peek()
        if self.is_keyword(token, "not"):
            self.enter(token)
            self.index += 1
            item = self.not_()
            self.depth -= 1
            return _Not(item)
        return self.atom()

    def atom(self) -> _Node:
        token = self.peek()
        if _is_punct(token, "("):
            self.enter(token)
            self.index += 1
            node = self.or_()
            closing = self.peek()
            if not _is_punct(closing, ")"):
                raise self.error(
                    closing,
                    f"expected ')' to close the '(' at column {token.start + 1}, "
                    f"found {_show(closing)}",
                )
            self.index += 1
            self.depth -= 1
            return node
        if (
            token.kind == "end"
            or self.is_keyword(token, "and", "or", "in")
            or _is_punct(token, ")", "]", ",")
        ):
            raise self.error(token, f"expected a condition{self.after()}, found {_show(token)}")
        self.atoms += 1
        if self.atoms > MAX_ATOMS:
            raise self.error(
                token,
                f"more than {MAX_ATOMS} comparisons, membership tests, exists() and "
                "changed(): split the trigger, or use 'in' for lists of values",
            )
        following = self.tokens[self.index + 1]
        if self.is_keyword(token, "changed") and _is_punct(following, "("):
            self.index += 2
            return _Changed(self.changed_path())
        if self.is_keyword(token, "exists") and _is_punct(following, "("):
            self.index += 2
            field = self.field_operand()
            self.close_call("exists")
            return _Exists(field)
        left = self.operand()
        operator = self.peek()
        if _is_punct(operator, *_OPERATORS):
            self.index += 1
            right_token = self.peek()
            right = self.operand()
            return self.compare((token, left), operator, (right_token, right))
        if self.keyword("in"):
            return self.member(token, left, negated=False)
        if self.is_keyword(operator, "not"):
            self.index += 1
            if not self.keyword("in"):
                raise self.error(
                    self.peek(), f"expected 'in' after 'not', found {_show(self.peek())}"
                )
            return self.member(token, left, negated=True)
        hint = ""
        if isinstance(left, _Field):
            shown = _render_operand(left)
            hint = f" (a field alone is not a condition: write {shown} == true, or exists({shown}))"
        raise self.error(
            operator,
            f"expected ==, !=, <, <=, >, >=, in or not in after "
            f"{_render_operand(left)}, found {_show(operator)}{hint}",
        )

    def compare(
        self, left: tuple[_Token, _Operand], operator: _Token, right: tuple[_Token, _Operand]
    ) -> _Node:
        op = _CMP_OPS[operator.value]
        if isinstance(left[1], _Const) and isinstance(right[1], _Const):
            raise self.error(
                left[0], "this compares two literals: one side must be op, key or a field"
            )
        for (token, side), (other_token, other) in ((left, right), (right, left)):
            if isinstance(side, _Const) and side.value is None and op in _ORDERINGS:
                raise self.error(
                    token,
                    f"null can only be compared with == or != (or tested with exists()), "
                    f"not with {op}",
                )
            if isinstance(side, _Attr) and side.name == "op" and op in _ORDERINGS:
                raise self.error(operator, "op can only be compared with ==, != or in")
            if isinstance(side, _Attr) and isinstance(other, _Const):
                self.check_attr_literal(side, other, other_token)
        return _Compare(left[1], op, right[1])

    def check_attr_literal(self, attr: _Attr, const: _Const, token: _Token) -> None:
        if attr.name == "op" and not (
            isinstance(const.value, str) and const.value in ("put", "delete")
        ):
            raise self.error(token, f"op is 'put' or 'delete', never {_render_const(const)}")
        if attr.name == "key" and not isinstance(const.value, str):
            raise self.error(
                token, f"key is a string, never {_render_const(const)}: write it quoted"
            )

    def member(self, start: _Token, operand: _Operand, *, negated: bool) -> _Node:
        if isinstance(operand, _Const):
            raise self.error(
                start, "this tests a literal against literals: test op, key or a field"
            )
        opening = self.peek()
        if not _is_punct(opening, "["):
            raise self.error(
                opening, f"expected '[' and a list of literals after 'in', found {_show(opening)}"
            )
        self.index += 1
        values: list[_Const] = []
        kind: str | None = None
        while True:
            token = self.peek()
            if _is_punct(token, "]"):
                raise self.error(
                    token,
                    "the list is empty" if not values else "expected a literal after ','",
                )
            const = self.literal()
            if const is None:
                raise self.error(
                    token,
                    "a list holds literals only (strings, numbers, true, false, null), "
                    f"found {_show(token)}",
                )
            if isinstance(operand, _Attr):
                self.check_attr_literal(operand, const, token)
            this_kind = _kind(const.value)
            if kind is None or kind == "null":
                kind = this_kind
            elif this_kind not in ("null", kind):
                raise self.error(
                    token,
                    f"the list mixes {kind}s and {this_kind}s: a value has one type, so "
                    "keep one (and null)",
                )
            values.append(const)
            separator = self.peek()
            self.index += 1
            if _is_punct(separator, "]"):
                return _Member(operand, tuple(values), negated)
            if not _is_punct(separator, ","):
                raise self.error(
                    separator, f"expected ',' or ']' in the list, found {_show(separator)}"
                )

    def operand(self) -> _Operand:
        token = self.peek()
        const = self.literal()
        if const is not None:
            return const
        if self.is_keyword(token, "op", "key"):
            self.index += 1
            return _Attr("op" if token.value.lower() == "op" else "key")
        if self.is_keyword(token, "new", "old"):
            return self.field_operand()
        if token.kind == "qname":
            raise self.error(
                token,
                f"double quotes are for field names, as in new.{token.text}; write a string "
                f"in single quotes: {_quote_string(token.value)}",
            )
        if self.is_keyword(token, "changed", "exists"):
            example = "changed(status)" if token.value.lower() == "changed" else "exists(new.a)"
            raise self.error(
                token, f"expected '(' after {token.value!r}: it is a test, as in {example}"
            )
        if token.kind == "name" and not self.is_keyword(token, "and", "or", "not", "in"):
            if _is_punct(self.tokens[self.index + 1], "("):
                raise self.error(
                    token,
                    f"unknown function {token.value!r}: the functions are changed(path) and "
                    "exists(field)",
                )
            raise self.error(
                token,
                f"unknown name {token.value!r}: a field is new.<name> or old.<name>, as in "
                f"new.{_render_segment(token.value, first=False)}",
            )
        if _is_punct(token, ".") and self.tokens[self.index + 1].kind == "number":
            raise self.error(token, "a number starts with a digit, as in 0.5")
        raise self.error(token, f"expected a value{self.after()}, found {_show(token)}")

    def literal(self) -> _Const | None:
        token = self.peek()
        if token.kind == "string":
            self.index += 1
            return _Const(token.value)
        if token.kind == "number":
            self.index += 1
            return _Const(_number_value(token, self.text, self.field))
        for word, value in (("true", True), ("false", False), ("null", None)):
            if self.is_keyword(token, word):
                self.index += 1
                return _Const(value)
        return None

    def field_operand(self) -> _Field:
        token = self.peek()
        if not self.is_keyword(token, "new", "old"):
            raise self.error(
                token, f"expected a field (new.<name> or old.<name>), found {_show(token)}"
            )
        self.index += 1
        dot = self.peek()
        side: Literal["new", "old"] = "new" if token.value.lower() == "new" else "old"
        if not _is_punct(dot, "."):
            raise self.error(
                dot,
                f"expected '.' and a field name after {side!r} (as in {side}.status), "
                f"found {_show(dot)}",
            )
        self.index += 1
        return _Field(side, self.path())

    def changed_path(self) -> tuple[str, ...]:
        first = self.peek()
        if first.kind == "name" and first.value.lower() in ("new", "old"):
            raise self.error(
                first,
                "changed() takes the path without new. or old., as in changed(status); "
                f'a field named {first.value} is quoted: changed("{first.value}")',
            )
        path = self.path()
        self.close_call("changed")
        return path

    def path(self) -> tuple[str, ...]:
        segments = [self.segment()]
        while _is_punct(self.peek(), "."):
            self.index += 1
            segments.append(self.segment())
        return tuple(segments)

    def segment(self) -> str:
        token = self.peek()
        if token.kind in ("name", "qname"):
            self.index += 1
            return token.value
        hint = ""
        if token.kind in ("number", "string"):
            hint = f'; a name that is not an identifier is double-quoted: "{token.value}"'
        raise self.error(token, f"expected a field name{self.after()}, found {_show(token)}{hint}")

    def close_call(self, function: str) -> None:
        token = self.peek()
        if not _is_punct(token, ")"):
            raise self.error(token, f"expected ')' to close {function}(, found {_show(token)}")
        self.index += 1

    def enter(self, token: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.error(
                token,
                f"nesting deeper than {MAX_NESTING} levels (each '(' and each 'not' is one)",
            )

    def peek(self) -> _Token:
        return self.tokens[self.index]

    def after(self) -> str:
        return f" after {self.tokens[self.index - 1].text!r}" if self.index else ""

    def keyword(self, word: str) -> bool:
        if self.is_keyword(self.peek(), word):
            self.index += 1
            return True
        return False

    @staticmethod
    def is_keyword(token: _Token, *words: str) -> bool:
        return token.kind == "name" and token.value.lower() in words

    def error(self, token: _Token, problem: str) -> ConditionError:
        return ConditionError(self.text, token.start, problem, field=self.field)
