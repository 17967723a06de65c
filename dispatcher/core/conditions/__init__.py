r"""Trigger conditions: a small language over the event, validated and compiled at registration.

A condition decides, per mutation, whether a trigger fires. It sees the operation, the key,
the new and the old value, and which fields changed:

* ``changed(status) and new.status == 'paid'`` (status changed to paid);
* ``op == 'delete' and old.plan in ['pro', 'team']``;
* ``exists(new.email) and not changed(email)``;
* ``new.total >= 100 or (new.priority == true and key != 'users/system')``;
* ``new."shipping address".city != null`` (a name that is not an identifier, double-quoted).

Grammar (keywords are case-insensitive and normalised to lower case; field names are not)::

    condition := or
    or        := and ("or" and)*
    and       := not ("and" not)*
    not       := "not" not | atom
    atom      := "(" condition ")"
               | "changed" "(" path ")"
               | "exists" "(" field ")"
               | operand cmp operand
               | operand ["not"] "in" "[" literal ("," literal)* "]"
    cmp       := "==" | "!=" | "<" | "<=" | ">" | ">="
    operand   := "op" | "key" | field | literal
    field     := ("new" | "old") "." path
    path      := segment ("." segment)*
    segment   := identifier | quoted-name
    literal   := string | number | "true" | "false" | "null"

* An identifier is ``[A-Za-z_][A-Za-z0-9_]*``; any other name is double-quoted, like an SQL
  identifier, with ``\"`` and ``\\`` as its only escapes: ``new."a b"``, ``new."say \"hi\""``.
  After a dot every identifier is a name, keywords included (``new.key``, ``new.in``).
* A string is single-quoted, like an SQL string, with ``\'`` and ``\\`` as its only escapes:
  ``'paid'``, ``'it\'s'``. Double quotes never make a string (``new.status == "paid"`` is
  refused with a hint).
* A number has JSON syntax (``-1``, ``0.5``, ``1e300``). An integer is exact at any size; a
  number with a fraction or an exponent must have an exact double value (``0.1`` does: it is
  read as the double whose shortest form is ``0.1``; ``0.30000000000000001`` does not, and
  is refused rather than silently read as ``0.3``).
* ``changed(path)`` takes the path without ``new.``/``old.``: ``changed(status)``,
  ``changed(address.city)``. A field named ``new`` or ``old`` is quoted: ``changed("new")``.
* Spaces, tabs and line breaks separate tokens; no other control character is accepted
  anywhere, and none inside quotes.
* Limits: 4,096 characters, 32 levels of nesting (each ``(`` and each ``not`` is a level),
  100 atoms (a comparison, a membership test, ``exists`` or ``changed``).

Semantics: every atom is true or false, never unknown, so ``not`` is plain negation.

* ``op`` is ``'put'`` or ``'delete'``; ``key`` is the key. ``new.a.b`` is the member ``b`` of
  the member ``a`` of the new value (JSON ``null`` on a delete), ``old.…`` likewise. A path is
  *missing* when a member is absent or a step meets anything but an object (arrays are never
  entered).
* A comparison is true only when both sides are present and the relation holds between
  scalars of one JSON type: strings (by code point), numbers (exactly, as decimals: ``10 ==
  10.0``, ``-0 == 0``), booleans (``false < true``). A missing side, an object or array, or
  two different types make it false: ``new.n == 1`` is false for ``"1"``, ``true`` or ``[1]``,
  and so is ``new.n != 1``.
* ``null`` asks "is it JSON null?": ``x == null`` is true iff ``x`` is null; ``x != null`` is
  true iff ``x`` is present and not null (objects and arrays included); ``x != 'a'`` is true
  when ``x`` is null. Between two fields, ``null <= null`` and ``null >= null`` are true,
  every other ordering with a null is false; a literal ``null`` is refused with ``<`` and
  friends.
* ``x in [a, b]`` means ``x == a or x == b``; ``x not in [a, b]`` means ``x != a and x != b``
  (so both are false when ``x`` is missing). A list holds literals of one type, and ``null``.
* ``exists(field)`` is true iff the path is present; a JSON ``null`` is present.
* ``changed(path)`` is true iff the value at the path differs between new and old, presence
  included (absent on one side and present, even as null, on the other is a change), by
  JSON equality (``1 == 1.0``, member order ignored). It is computed in SQL as
  ``(new #> path) IS DISTINCT FROM (old #> path)``; note that ``#>``, unlike the field access
  above, indexes arrays with integer-like segments (``changed("0")``), and :func:`evaluate`
  does the same.
* Refused at registration because they are always false or meaningless: a comparison of two
  literals, ``op`` against anything but ``'put'``/``'delete'`` or with an ordering, ``key``
  against a non-string.

Compilation: the database evaluates ``jsonb_path_match(event, jsonpath, variables, silent =>
true)`` over the event document ``{"op", "key", "new", "old", "changed": [bool, ...]}``, the
``changed`` flags being computed for :attr:`CompiledCondition.changed` in order. Every
literal goes into ``variables`` (``$v1``, ``$v2``, …) and never into the jsonpath text; field
names are written into it as jsonpath string literals, escaped. A list is one array variable,
tested with a filter: ``x in [...]`` is ``exists($v1[*] ? (@ == x))``. The path runs in ``strict``
mode (no implicit unwrapping of arrays, a missing member is an error), and each atom ``P``
compiles to ``(!((P) is unknown) && (P))``: jsonpath makes a comparison of mismatched types,
of non-scalars or over a missing member *unknown*, and this turns unknown into false.

The package: the limits, :class:`ConditionError`, the tokens and the syntax tree
(:mod:`~dispatcher.core.conditions.syntax`), the parser
(:mod:`~dispatcher.core.conditions.parser`), the normalised text
(:mod:`~dispatcher.core.conditions.render`), the compiler
(:mod:`~dispatcher.core.conditions.jsonpath`) and the Python evaluator
(:mod:`~dispatcher.core.conditions.reference`).

>>> c = compile_condition("changed(status) and NEW.status == 'paid'")
>>> c.source, c.changed, c.variables
("changed(status) and new.status == 'paid'", (('status',),), {'v1': 'paid'})
>>> evaluate(c, {"op": "put", "key": "o/1", "new": {"status": "paid"}, "old": {}})
True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from dispatcher.core.conditions.jsonpath import _Compiler
from dispatcher.core.conditions.parser import _parse
from dispatcher.core.conditions.reference import _Evaluator
from dispatcher.core.conditions.render import _Level, _render
from dispatcher.core.conditions.syntax import (
    MAX_ATOMS,
    MAX_CONDITION_LENGTH,
    MAX_NESTING,
    ConditionError,
)
from dispatcher.core.errors import InvalidInput
from dispatcher.core.models import JsonValue

__all__ = [
    "MAX_ATOMS",
    "MAX_CONDITION_LENGTH",
    "MAX_NESTING",
    "CompiledCondition",
    "ConditionError",
    "compile_condition",
    "evaluate",
]


@dataclass(frozen=True, slots=True)
class CompiledCondition:
    """A validated condition: its normalised text and what the database evaluates.

    ``source`` compiles to this same value again; ``jsonpath`` and ``variables`` are the
    second and third arguments of ``jsonb_path_match``; ``changed`` lists the paths (without
    ``new``/``old``) whose flags the event document's ``changed`` array holds, in order.
    """

    source: str
    jsonpath: str
    variables: dict[str, JsonValue]
    changed: tuple[tuple[str, ...], ...]


def compile_condition(text: str, *, field: str = "when") -> CompiledCondition:
    """Parse, check and translate ``text``; raises :class:`ConditionError` pointing at the
    problem (``field`` names the argument in its message).

    >>> compile_condition("new.qty > 10").jsonpath
    'strict (!(($."new"."qty" > $v1) is unknown) && ($."new"."qty" > $v1))'
    """
    value: object = text
    if not isinstance(value, str):
        raise InvalidInput(field, value, "must be a string, such as \"new.status == 'paid'\"")
    node = _parse(value, field)
    source = _render(node, _Level.OR)
    if len(source) > MAX_CONDITION_LENGTH:
        raise ConditionError(
            value,
            len(value),
            f"normalised (spaces around operators, numbers in their shortest form) the "
            f"condition is {len(source)} characters long; the limit is {MAX_CONDITION_LENGTH}",
            field=field,
        )
    compiler = _Compiler()
    body = compiler.node(node)
    return CompiledCondition(
        source=source,
        jsonpath=f"strict {body}",
        variables=compiler.variables,
        changed=tuple(compiler.changed),
    )


def evaluate(condition: CompiledCondition, event: Mapping[str, JsonValue]) -> bool:
    """The decision the database makes for ``condition`` on ``event``, in Python.

    ``event`` has the document's shape (``op``, ``key``, ``new``, ``old``); its ``changed``
    flags are used when present, else computed from ``new`` and ``old`` as the SQL does.
    Numbers compare as the decimals JSON would carry (a float by its shortest form).

    >>> evaluate(compile_condition("new.n == 10"), {"op": "put", "key": "k", "new": {"n": 10.0}})
    True
    """
    return _Evaluator(condition, event).node(_parse(condition.source, "when"))
