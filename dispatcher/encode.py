"""Validate and encode a mutation's event payload, before it is sent to the emit functions.

The payload every matching trigger receives is ``{"event_id", "scope", "namespace", "key",
"op", "value", "depth", "root", "old"}`` as compact JSON text (:func:`encode_event`). A value is
refused before it is sent when it is not JSON-serialisable, holds a lone surrogate or a NUL
(which Postgres' jsonb cannot store), nests deeper than :data:`MAX_NESTING`, or makes the
payload longer than the caller's limit; a value whose text must be too long is refused by a
cheap walk before it is serialised at all (:func:`_text_size_floor`). :mod:`dispatcher.emit`
sends only what passed.
"""

from __future__ import annotations

import json
import re
import uuid
from itertools import chain
from typing import Any, cast

from dispatcher.core.errors import InvalidInput, LimitExceeded
from dispatcher.core.models import Mutation

# How deep a value may nest lists and dicts (a scalar is 0 levels, ``[]`` is 1). Deep enough
# for any document (the chaos suite runs values 200 deep), and shallow enough that code
# walking a value recursively, at two or three Python frames per level (the dispatcher's
# redaction, json.dumps and json.loads, a handler's own code), stays far inside the
# interpreter's default recursion limit of 1000. Past about 950 levels every dispatcher would
# fail to decode the row it claimed.
MAX_NESTING = 256

# An escaped NUL in JSON text, not preceded by an escaping backslash: Postgres' jsonb cannot
# store U+0000.
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def encode_event(mutation: Mutation, *, max_bytes: int) -> str:
    """The event payload every matching trigger receives, as JSON text, within ``max_bytes``:
    ``{"event_id", "scope", "namespace", "key", "op", "value", "depth", "root", "old"}``
    (``old`` is null when the mutation has none)."""
    head, tail = _frame(mutation)
    value, old = encode_values(mutation, max_bytes)
    return f"{head}{value}{tail}{'null' if old is None else old}}}"


def encode_values(mutation: Mutation, max_bytes: int) -> tuple[str, str | None]:
    """The JSON text of the mutation's value and of its old value (None: it has none), once
    the payload they make (:func:`encode_event`) is known to fit in ``max_bytes``.

    A value is refused by its size before it is serialised when a cheap walk shows that its
    text must be too long, and refused when it nests deeper than :data:`MAX_NESTING`.
    """
    old = mutation.old
    # The text around the value and the old value ("null" when there is none).
    frame = _frame_bytes(mutation)
    if old is None:
        frame += len("null")
    floor = frame + _text_size_floor("value", mutation.value, max_bytes - frame)
    if old is not None and floor <= max_bytes:
        floor += _text_size_floor("old", old, max_bytes - floor)
    if floor > max_bytes:
        raise LimitExceeded(
            f"event payload for key {mutation.key!r} (at least)",
            floor,
            max_bytes,
            "max_payload_bytes",
        )
    value_text, value_size = _encode("value", mutation.value)
    size = frame + value_size
    old_text = None
    if old is not None:
        old_text, old_size = _encode("old", old)
        size += old_size
    if size > max_bytes:
        raise LimitExceeded(
            f"event payload for key {mutation.key!r}", size, max_bytes, "max_payload_bytes"
        )
    return value_text, old_text


# The payload's text around the value and the old value, less the parts that vary (the
# closing brace included): what _frame writes for empty strings and numbers.
_FRAME_FIXED = len('{"event_id":"","scope":,"namespace":,"key":,"op":"","value":')
_FRAME_FIXED += len(',"depth":,"root":"","old":') + len("}")
# What JSON text writes escaped, without ensure_ascii: a string holding none of it is its
# characters between two quotes.
_ESCAPED = re.compile(r'["\\\x00-\x1f]')


def _frame_bytes(mutation: Mutation) -> int:
    """The length in UTF-8 bytes of :func:`_frame`'s two texts and the closing brace, without
    writing them (the bulk path measures every mutation's frame)."""
    size = _FRAME_FIXED + len(mutation.op.value) + len(str(int(mutation.depth)))
    size += _uuid_chars(mutation.event_id) + _uuid_chars(mutation.root)
    try:
        for text in (mutation.scope, mutation.namespace, mutation.key):
            if _ESCAPED.search(text) is None:
                size += len(text.encode("utf-8")) + 2
            else:
                size += len(_dumps(text).encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput(
            "mutation",
            f"{mutation.scope}/{mutation.namespace}/{mutation.key}",
            "its scope, namespace or key contains a lone surrogate, which is not valid Unicode",
        ) from None
    return size


def _uuid_chars(value: uuid.UUID) -> int:
    return 36 if type(value) is uuid.UUID else len(str(value))


def _frame(mutation: Mutation) -> tuple[str, str]:
    """The payload's text before the value, and between the value and the old value."""
    head = (
        f'{{"event_id":"{mutation.event_id}","scope":{_dumps(mutation.scope)},'
        f'"namespace":{_dumps(mutation.namespace)},"key":{_dumps(mutation.key)},'
        f'"op":"{mutation.op.value}","value":'
    )
    return head, f',"depth":{int(mutation.depth)},"root":"{mutation.root}","old":'


def _encode(field: str, value: object) -> tuple[str, int]:
    """``value``'s JSON text and its length in UTF-8 bytes; what Postgres' jsonb cannot
    hold is refused, naming ``field``."""
    try:
        text = _dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(field, value, f"is not JSON-serialisable: {exc}") from None
    except RecursionError:  # within MAX_NESTING, but called with the stack nearly full
        raise InvalidInput(field, "<deeply nested>", "is nested too deeply to encode") from None
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput(
            field, value, "contains a lone surrogate, which is not valid Unicode"
        ) from None
    # The other fields cannot hold a NUL: names and keys refuse control characters.
    if _JSON_NUL.search(text):
        raise InvalidInput(field, value, "contains a NUL character, which Postgres cannot store")
    return text, size


# json.dumps with these options builds an encoder per call; one serves every call (it keeps
# no state between them).
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _dumps(value: object) -> str:
    return _ENCODER.encode(value)


# Exact types measured without a per-item Python call; a level holding anything else (a
# subclass, an object JSON cannot hold) is sorted with isinstance instead.
_NUMBERS = frozenset({int, float, bool, type(None)})
_KNOWN = _NUMBERS | {str, list, tuple, dict}


def _text_size_floor(field: str, value: object, budget: int) -> int:
    """A lower bound of the length of ``value``'s compact JSON text in UTF-8 bytes, counted
    only until it passes ``budget``; raises :class:`InvalidInput` for nesting deeper than
    :data:`MAX_NESTING`.

    The value is measured one level of nesting at a time, each level in a few passes that
    mostly run in C. A string counts its length and quotes (every character is at least one
    byte), a list its brackets and commas, a dict its braces, commas, colons and keys,
    anything else one byte (what JSON cannot hold is left for ``json.dumps`` to refuse).
    The count stops at the first level that passes ``budget``, and a level's items are taken
    out of their containers only once those containers' commas fit in it: a 100 MB string
    or a list of ten million numbers is refused at the first look, and the work is bounded
    by ``budget`` whatever the value.
    """
    size = 0
    level: list[object] = [value]
    seen: set[int] = set()  # the containers met so far, to tell a cycle from deep nesting
    depth = 0  # how many containers hold each item of ``level``
    while True:
        kinds = set(map(type, level))
        size += len(level)  # at least one byte each
        if kinds <= _NUMBERS:
            return size
        strings, lists, tuples, dicts = _sort(level, kinds)
        size += len(strings) + sum(map(len, strings))  # a string's quotes and characters
        if size > budget or not (lists or tuples or dicts):
            return size
        if depth == MAX_NESTING:
            raise _too_deep(field, seen)
        seen.update(map(id, lists), map(id, tuples), map(id, dicts))
        # With the byte counted above, a container of n items writes n + 1 bytes or more
        # of brackets and commas, and a dict n colons too; then the keys (a number, true or
        # null as a key is written as a string of at least one character).
        pairs = sum(map(len, dicts))
        size += sum(map(len, lists)) + sum(map(len, tuples)) + 2 * pairs
        if size > budget:
            return size
        if dicts:
            keys = list(chain.from_iterable(map(dict.keys, dicts)))
            key_kinds = set(map(type, keys))
            string_keys = cast(list[str], keys if key_kinds == {str} else _sort(keys, key_kinds)[0])
            size += 3 * pairs + sum(map(len, string_keys)) - len(string_keys)
            if size > budget:
                return size
        # A subclass's items as json.dumps sees them: its storage, not its own __iter__.
        level = [
            *chain.from_iterable(map(list.__iter__, lists)),
            *chain.from_iterable(map(tuple.__iter__, tuples)),
            *chain.from_iterable(map(dict.values, dicts)),
        ]
        depth += 1


def _sort(
    level: list[object], kinds: set[type]
) -> tuple[list[str], list[list[object]], list[tuple[object, ...]], list[dict[object, object]]]:
    """The strings, lists, tuples and dicts of ``level``, subclasses included."""
    if not kinds <= _KNOWN:
        return (
            [x for x in level if isinstance(x, str)],
            [x for x in level if isinstance(x, list)],
            [x for x in level if isinstance(x, tuple)],
            [x for x in level if isinstance(x, dict)],
        )
    if len(kinds) == 1:  # all of one kind: no pass at all
        only: list[Any] = level
        kind = next(iter(kinds))
        return (
            only if kind is str else [],
            only if kind is list else [],
            only if kind is tuple else [],
            only if kind is dict else [],
        )
    # Exact types: one pass for each kind present.
    return (
        [x for x in level if type(x) is str] if str in kinds else [],
        [x for x in level if type(x) is list] if list in kinds else [],
        [x for x in level if type(x) is tuple] if tuple in kinds else [],
        [x for x in level if type(x) is dict] if dict in kinds else [],
    )


def _too_deep(field: str, seen: set[int]) -> InvalidInput:
    # Fewer containers than levels: one of them holds itself.
    if len(seen) < MAX_NESTING:
        return InvalidInput(field, "<circular>", "is not JSON-serialisable: it contains itself")
    return InvalidInput(
        field,
        "<deeply nested>",
        f"is nested more than {MAX_NESTING} levels deep; at most {MAX_NESTING} are allowed",
    )
