"""Keep secrets out of what the dispatcher stores for operators.

Dead letters, abandoned executions and error histories outlive the event and are read by
people who should not see credentials. The redactor replaces the values of sensitive keys in
JSON (at any depth, inside lists too), ``key=value`` / ``"key": "value"`` / ``Key: value``
pairs in free text such as exception messages, and any literal occurrence in text of a
value that sat under a sensitive key in the event's payload.

>>> r = Redactor(frozenset({"password"}))
>>> r.redact_json({"user": "ann", "auth": {"Password": "hunter2"}})
{'user': 'ann', 'auth': {'Password': '[REDACTED]'}}
>>> r.redact_text("login failed: password=hunter2")
'login failed: password=[REDACTED]'
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from dispatcher.core.models import JsonValue

REDACTED = "[REDACTED]"
DEFAULT_REDACT_KEYS = frozenset(
    {
        "password",
        "passwd",
        "secret",
        "authorization",
        "api_key",
        "apikey",
        "access_token",
        "refresh_token",
        "private_key",
        "cookie",
    }
)
# Literal values shorter than this are not scrubbed from text: "1" or "no" would blank out
# half of every message.
MIN_SECRET_LENGTH = 4


def _norm(key: str) -> str:
    return key.lower().replace("-", "_")


@dataclass(frozen=True)
class Redactor:
    keys: frozenset[str] = DEFAULT_REDACT_KEYS
    _pattern: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        keys = frozenset(_norm(k) for k in self.keys)
        object.__setattr__(self, "keys", keys)
        if not keys:
            object.__setattr__(self, "_pattern", None)
            return
        names = "|".join(
            re.escape(k).replace("_", "[_-]") for k in sorted(keys, key=len, reverse=True)
        )
        # key, optional closing quote, separator, optional opening quote, then the value:
        # a quoted string, or a scheme word plus token ("Bearer abc"), or a bare token.
        pattern = (
            rf"(?i)(\b(?:{names})\b[\"']?\s*[:=]\s*)"
            r"(\"[^\"]*\"|'[^']*'|(?:(?:bearer|basic|token)\s+)?[^\s,;&}\]\)\"']+)"
        )
        object.__setattr__(self, "_pattern", re.compile(pattern))

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def is_sensitive(self, key: str) -> bool:
        return _norm(key) in self.keys

    def redact_json(self, value: JsonValue) -> JsonValue:
        """A copy of ``value`` with every sensitive key's value replaced."""
        if not self.keys:
            return value
        return self._walk(value, 0)

    def _walk(self, value: JsonValue, depth: int) -> JsonValue:
        if depth > 200:
            return REDACTED  # deeper than any real payload: do not risk leaking it
        if isinstance(value, Mapping):
            return {
                k: (REDACTED if self.is_sensitive(str(k)) else self._walk(v, depth + 1))
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self._walk(v, depth + 1) for v in value]
        if isinstance(value, str):
            return self.redact_text(value)
        return value

    def secrets_in(self, value: JsonValue) -> frozenset[str]:
        """The string values found under sensitive keys anywhere in ``value``."""
        found: set[str] = set()
        if self.keys:
            self._collect(value, found, 0)
        return frozenset(s for s in found if len(s) >= MIN_SECRET_LENGTH)

    def _collect(self, value: JsonValue, found: set[str], depth: int) -> None:
        if depth > 200:
            return
        if isinstance(value, Mapping):
            for k, v in value.items():
                if self.is_sensitive(str(k)):
                    _strings(v, found, depth + 1)
                else:
                    self._collect(v, found, depth + 1)
        elif isinstance(value, list | tuple):
            for v in value:
                self._collect(v, found, depth + 1)

    def redact_text(self, text: str, secrets: Iterable[str] = ()) -> str:
        """``text`` with sensitive ``key=value`` pairs and the given literal secrets masked."""
        if not self.keys:
            return text
        for secret in sorted(secrets, key=len, reverse=True):
            if secret:
                text = text.replace(secret, REDACTED)
        assert self._pattern is not None
        return self._pattern.sub(_mask, text)


def _mask(m: re.Match[str]) -> str:
    value = m.group(2)
    quote = value[0] if value[:1] in ("'", '"') else ""
    return f"{m.group(1)}{quote}{REDACTED}{quote}"


def _strings(value: JsonValue, found: set[str], depth: int) -> None:
    if depth > 200:
        return
    if isinstance(value, str):
        found.add(value)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        found.add(str(value))
    elif isinstance(value, Mapping):
        for v in value.values():
            _strings(v, found, depth + 1)
    elif isinstance(value, Sequence):
        for v in value:
            _strings(v, found, depth + 1)
