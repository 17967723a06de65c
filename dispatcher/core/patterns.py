"""Key patterns: validated and translated once, at registration.

The language has three forms:

* an exact key: ``users/42``;
* a prefix: a single trailing ``*``, as in ``users/*``;
* a glob: ``*`` (any run of characters, ``/`` included) and ``?`` (one character) anywhere.

Every other character, ``%``, ``_`` and ``\\`` included, matches itself. The translation
yields the literal prefix before the first wildcard (matched in SQL with an index, by probing
the prefixes of the mutated key) and, for globs, a ``LIKE`` pattern with every literal
character escaped, passed to Postgres as a parameter and never spliced into SQL text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from dispatcher.core.errors import InvalidInput
from dispatcher.core.models import MAX_KEY_LENGTH, check_name

LIKE_ESCAPE = "\\"


class PatternKind(StrEnum):
    EXACT = "exact"
    PREFIX = "prefix"
    GLOB = "glob"


@dataclass(frozen=True, slots=True)
class CompiledPattern:
    source: str
    kind: PatternKind
    prefix: str
    like: str | None

    def matches(self, key: str) -> bool:
        """The same decision the SQL makes, for callers that match in Python."""
        if self.kind is PatternKind.EXACT:
            return key == self.prefix
        if not key.startswith(self.prefix):
            return False
        if self.kind is PatternKind.PREFIX:
            return True
        return _glob_regex(self.source).fullmatch(key) is not None


def compile_pattern(pattern: object) -> CompiledPattern:
    """Validate ``pattern`` and translate it; raises :class:`InvalidInput` naming the field."""
    source = check_name("key_pattern", pattern, max_length=MAX_KEY_LENGTH)
    first = _first_wildcard(source)
    if first is None:
        return CompiledPattern(source, PatternKind.EXACT, source, None)
    prefix = source[:first]
    if first == len(source) - 1 and source[first] == "*":
        return CompiledPattern(source, PatternKind.PREFIX, prefix, None)
    if "**" in source:
        raise InvalidInput(
            "key_pattern", source, "'**' is redundant: a single '*' already matches any run"
        )
    return CompiledPattern(source, PatternKind.GLOB, prefix, _to_like(source))


def key_prefixes(key: str) -> list[str]:
    """Every prefix of ``key``, shortest first: the index probes that find prefix patterns."""
    return [key[:i] for i in range(len(key) + 1)]


def _first_wildcard(text: str) -> int | None:
    for index, char in enumerate(text):
        if char in "*?":
            return index
    return None


def _to_like(source: str) -> str:
    out: list[str] = []
    for char in source:
        if char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        elif char in ("%", "_", LIKE_ESCAPE):
            out.append(LIKE_ESCAPE + char)
        else:
            out.append(char)
    return "".join(out)


def _glob_regex(source: str) -> re.Pattern[str]:
    parts = []
    for char in source:
        if char == "*":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts), re.DOTALL)
