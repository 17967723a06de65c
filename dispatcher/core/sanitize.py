"""Make untrusted text and values storable: Postgres text and jsonb, UTF-8, bounded in size.

Handlers return whatever they like and raise whatever they like; what reaches a table must
hold no NUL (Postgres text rejects it), no lone surrogate (not encodable as UTF-8), no NaN
(not JSON), and must not grow without bound.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from dispatcher.core.errors import InvalidInput
from dispatcher.core.models import JsonValue
from dispatcher.core.validate import is_int

DEFAULT_TEXT_LIMIT = 8192
DEFAULT_DEPTH_LIMIT = 64
DEFAULT_ITEM_LIMIT = 100_000
# Our walk (two frames per level) and json.dumps both recurse; stay well inside the
# interpreter's default recursion limit of 1000, leaving room for the caller's own stack.
MAX_DEPTH_LIMIT = 128

TOO_DEEP = "…[nested too deeply]"
CIRCULAR = "…[circular reference]"
OMITTED_KEY = "…[omitted]"
# What sanitize_text puts where it cut text out (see _omitted). Redaction looks for it: a
# secret cut there is only half in the text, where a literal match cannot find it.
CUT_MARKER = re.compile(r"…\[\d+ characters omitted\]…")

_SURROGATE = re.compile("[\ud800-\udfff]")
# Beyond a signed 64-bit integer most JSON readers (JavaScript, Go, jsonb consumers casting to
# bigint) silently lose precision; a decimal string keeps every digit.
_INT_MIN = -(2**63)
_INT_MAX = 2**63 - 1


def sanitize_text(text: str, limit: int = DEFAULT_TEXT_LIMIT) -> str:
    """Text safe for a Postgres ``text`` column and UTF-8, at most ``limit`` characters.

    NUL characters are removed; a surrogate pair spelled as two code points becomes the
    character it encodes and every unpaired surrogate becomes U+FFFD. Longer text keeps its
    head and tail around a marker saying how many characters were left out.

    >>> sanitize_text("a\\x00b" + "x" * 100, limit=40)
    'abxxxxx…[88 characters omitted]…xxxxxxx'
    """
    _check_limit("limit", limit)
    # Cheap tests first: this runs on every error message, some of them megabytes long.
    # isascii() reads a flag of the string object; a failed encode scans in C, several
    # times faster than the regular expression, which then runs only on text that has a
    # surrogate.
    cleaned = text.replace("\x00", "") if "\x00" in text else text
    if not cleaned.isascii() and _has_surrogate(cleaned):
        # A UTF-16 round trip joins valid high/low pairs and replaces only the unpaired halves.
        cleaned = cleaned.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return _bound(cleaned, limit)


def sanitize_json(
    value: object,
    *,
    text_limit: int = DEFAULT_TEXT_LIMIT,
    depth_limit: int = DEFAULT_DEPTH_LIMIT,
    item_limit: int = DEFAULT_ITEM_LIMIT,
) -> JsonValue:
    """Turn any Python value into one ``json.dumps(..., allow_nan=False)`` and jsonb accept.

    Strings (dict keys included, coerced to ``str``) go through :func:`sanitize_text`;
    NaN and infinities become ``None``; integers outside the signed 64-bit range become
    decimal strings; tuples become lists; any other object becomes its sanitised ``repr()``.
    Containers nested more than ``depth_limit`` levels deep become ``TOO_DEEP``, a container
    inside itself becomes ``CIRCULAR``, and after ``item_limit`` values the rest of each
    container is replaced by a count of what was omitted. Never raises for any ``value``.

    >>> sanitize_json({"n": float("nan"), 1: (2**70, b"\\x00")})
    {'n': None, '1': ['1180591620717411303424', "b'\\\\x00'"]}
    """
    # Most handlers return nothing or a scalar: answer those without building a walk
    # (this runs once per execution).
    if value is None or type(value) is bool:
        return value
    if type(value) is int and _INT_MIN <= value <= _INT_MAX:
        return value
    _check_limit("text_limit", text_limit)
    _check_limit("depth_limit", depth_limit, maximum=MAX_DEPTH_LIMIT)
    _check_limit("item_limit", item_limit)
    walk = _Walk(text_limit=text_limit, depth_limit=depth_limit, item_limit=item_limit)
    return walk.convert(value, 0)


def describe_exception(exc: BaseException, limit: int = DEFAULT_TEXT_LIMIT) -> str:
    """``"TypeName: message"`` for an exception, sanitised and at most ``limit`` characters.

    The type name stands alone when the message is empty.

    >>> describe_exception(ValueError("bad input"))
    'ValueError: bad input'
    """
    name = type(exc).__name__
    try:
        message = str(exc)
    except Exception as failure:
        # A broken __str__ must not hide the original error behind a new one.
        message = f"<str() of the exception raised {type(failure).__name__}>"
    return sanitize_text(f"{name}: {message}" if message else name, limit)


class _Walk:
    """One traversal: the limits and the state shared by every level of it."""

    def __init__(self, *, text_limit: int, depth_limit: int, item_limit: int) -> None:
        self.text_limit = text_limit
        self.depth_limit = depth_limit
        self.remaining = item_limit
        # ids of the containers on the path from the root; only these can form a cycle.
        self.open: set[int] = set()

    def convert(self, value: object, depth: int) -> JsonValue:
        self.remaining -= 1
        try:
            return self._convert(value, depth)
        except Exception:
            # Hostile __repr__, __len__ or __iter__, a mapping that changes while we read it:
            # the value is lost but the rest of the result survives.
            return self.text(f"<unrepresentable {type(value).__name__}>")

    def text(self, text: str) -> str:
        return sanitize_text(text, self.text_limit)

    def _convert(self, value: object, depth: int) -> JsonValue:
        if value is None or isinstance(value, bool):
            return value
        # The base-class methods below read the plain value of a subclass (an IntEnum, a
        # StrEnum) without running any method the subclass overrides.
        if isinstance(value, int):
            number = int.__int__(value)
            return number if _INT_MIN <= number <= _INT_MAX else self.text(_int_text(number))
        if isinstance(value, float):
            real = float.__float__(value)
            return real if math.isfinite(real) else None
        if isinstance(value, str):
            return self.text(str.__str__(value))
        if not isinstance(value, list | tuple | Mapping):
            return self.text(repr(value))
        if depth >= self.depth_limit:
            return TOO_DEEP
        marker = id(value)
        if marker in self.open:
            return CIRCULAR
        self.open.add(marker)
        # Containers are walked here rather than in helpers: two stack frames per level
        # (this and convert) keep MAX_DEPTH_LIMIT well inside the recursion limit.
        try:
            if isinstance(value, Mapping):
                entries: dict[str, JsonValue] = {}
                for index, (key, item) in enumerate(value.items()):
                    if self.remaining <= 0:
                        entries[OMITTED_KEY] = _omitted_items(len(value) - index, "entries")
                        break
                    entries[self._key(key)] = self.convert(item, depth + 1)
                return entries
            items: list[JsonValue] = []
            for index, item in enumerate(value):
                if self.remaining <= 0:
                    items.append(_omitted_items(len(value) - index, "items"))
                    break
                items.append(self.convert(item, depth + 1))
            return items
        finally:
            self.open.discard(marker)

    def _key(self, key: object) -> str:
        if isinstance(key, str):
            return self.text(str.__str__(key))
        if is_int(key):
            return self.text(_int_text(int.__int__(key)))
        return self.text(repr(key))


def _int_text(number: int) -> str:
    try:
        return str(number)
    except ValueError:
        # Python refuses to print integers of more than sys.get_int_max_str_digits() digits.
        return f"…[integer of {number.bit_length()} bits]"


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.search(text) is not None
    return False


def _bound(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    # Size the marker for the largest count it could show, so the result never overshoots.
    keep = limit - len(_omitted(len(text)))
    if keep < 2:
        # No room for a head, a marker and a tail: a plain cut is the best that fits.
        return text[:limit]
    tail = keep // 2
    head = keep - tail
    return text[:head] + _omitted(len(text) - keep) + text[len(text) - tail :]


def _omitted_items(count: int, what: str) -> str:
    # A container whose iterator outruns its len() has no honest count to show.
    return f"…[{count} more {what} omitted]" if count > 0 else f"…[more {what} omitted]"


def _omitted(count: int) -> str:
    return f"…[{count} characters omitted]…"


def _check_limit(name: str, value: int, *, maximum: int | None = None) -> None:
    if not is_int(value) or value < 0:
        raise InvalidInput(name, value, "must be a non-negative integer")
    if maximum is not None and value > maximum:
        raise InvalidInput(name, value, f"must be at most {maximum}")
