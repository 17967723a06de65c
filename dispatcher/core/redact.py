"""Keep secrets out of what the dispatcher stores for operators.

Dead letters, abandoned executions and error histories outlive the event and are read by
people who should not see credentials. A key is sensitive when its name contains one of the
redactor's name *fragments*, both compared in lower case with ``-`` and ``_`` left out: the
fragment ``password`` covers ``db_password`` and ``DB-Password``, ``api_key`` covers
``X-Api-Key``, ``apikey`` and ``apiKey``. The redactor masks

- the value of every sensitive key in JSON, at any depth, inside lists too;
- ``key=value``, ``"key": "value"`` and ``Key: value`` pairs with a sensitive key in free text
  such as exception messages (an exception's type name, ``InvalidTokenError: …``, is not
  read as a key);
- the password of every URL in text, whatever its scheme, keeping the user and the host
  readable: ``postgresql://app:[REDACTED]@db/app``;
- every literal occurrence in text of a value that sat under a sensitive key (in the event's
  payload, or elsewhere in the JSON document being redacted), and the part of one that a cut
  left next to a truncation marker (``…[N characters omitted]…``), if at least
  ``MIN_PARTIAL_LENGTH`` characters of it are on that side.

Fragments prefer safety to precision: ``token`` also masks ``tokens_used`` and ``secret``
masks ``secretary``. Redact text before cutting it to size: a secret cut in half without a
marker is only caught by the pair patterns above.

>>> r = Redactor(frozenset({"password"}))
>>> r.redact_json({"user": "ann", "auth": {"DB-Password": "hunter2"}})
{'user': 'ann', 'auth': {'DB-Password': '[REDACTED]'}}
>>> r.redact_text("login failed: db_password=hunter2 via postgresql://app:pw@db/app")
'login failed: db_password=[REDACTED] via postgresql://app:[REDACTED]@db/app'
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from dispatcher.core.errors import InvalidInput
from dispatcher.core.models import JsonValue
from dispatcher.core.sanitize import CUT_MARKER
from dispatcher.core.validate import is_number

REDACTED = "[REDACTED]"
# Name fragments: a key containing any of them (lower case, '-' and '_' left out) is
# sensitive. Left out on purpose: "auth" (author, authority), "session" (session counts and
# timeouts; the session ids that are credentials are in), "pwd" (the working directory).
DEFAULT_REDACT_KEYS = frozenset(
    {
        "api_key",  # also api-key, apikey, apiKey, X-Api-Key
        "authorization",  # also Proxy-Authorization
        "cookie",  # also Set-Cookie
        "credential",
        "jwt",
        "passphrase",
        "passwd",
        "password",
        "private_key",
        "secret",  # also client_secret, aws_secret_access_key (and secretary)
        "sessid",  # PHPSESSID
        "session_id",
        "session_key",
        "token",  # also access_token, refresh_token, csrf_token (and tokens_used)
    }
)
MIN_FRAGMENT_LENGTH = 3
# Literal values shorter than this are not scrubbed from text: "1" or "no" would blank out
# half of every message.
MIN_SECRET_LENGTH = 4
# The shortest part of a secret masked next to a truncation marker: shorter ends of text
# match the start or end of some secret by chance.
MIN_PARTIAL_LENGTH = 4

# A key in free text: a whole word (letters, digits, '_', '-'), then an optional closing
# quote and ':' or '='. It starts only where a word starts and the word is read
# possessively, so a long word is read once, not once per character.
_PAIR_KEY = re.compile(r"(?<![\w-])([\w-]++)[\"']?\s*+[:=]\s*+")
# A key in text ending so is an exception's type name ("InvalidTokenError: token expired").
_TYPE_NAME_ENDINGS = ("error", "exception", "warning")
# The value after a key: a quoted string, or a bare word, maybe after an auth scheme ("Bearer
# abc") or after an opening quote whose closing one was cut off. Brackets are read apart.
_PAIR_VALUE = re.compile(
    r"\"[^\"]*\"|'[^']*'"
    r"|[\"']?(?i:(?:bearer|basic|digest|token)\s+)?[^\s,;&}\]\)\"'…]+"
)
_BRACKET = re.compile(r"[\[\]{}]")
# scheme://user:password@ — the user may be empty (redis://:pw@host) and, carelessly
# unescaped, the password may hold '@': the last '@' before the path ends it.
_URL_PASSWORD = re.compile(r"(?<![\w+.-])([A-Za-z][\w+.-]*+://[^\s:/?#]*+:)[^\s/?#]*@")


# Values with nothing inside to walk.
_SCALARS = frozenset({str, int, float, bool, type(None)})

# Key names whose verdict is kept (then forgotten all at once: a bound, not a policy).
_MAX_VERDICTS = 4096


def _norm(key: str) -> str:
    return key.lower().replace("-", "").replace("_", "")


@dataclass(frozen=True)
class Redactor:
    """Masks values of keys containing any of ``keys`` (name fragments); ``()``: off.

    >>> Redactor(frozenset({"secret"})).redact_json({"client_secret": "x", "id": 7})
    {'client_secret': '[REDACTED]', 'id': 7}
    """

    keys: frozenset[str] = DEFAULT_REDACT_KEYS
    _fragments: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _sensitive: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    # Key names seen, and whether each is sensitive: payloads of one application repeat
    # the same few keys, and every failure's message is redacted against its payload.
    _verdicts: dict[str, bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        keys = frozenset(self.keys)
        for key in keys:
            # One or two letters would mask nearly every key (and a string given instead of
            # a tuple of them arrives here as its letters).
            if not isinstance(key, str) or len(_norm(key)) < MIN_FRAGMENT_LENGTH:
                raise InvalidInput(
                    "redact_keys",
                    key,
                    f"each name fragment needs at least {MIN_FRAGMENT_LENGTH} characters "
                    "besides '-' and '_'; () turns redaction off",
                )
        fragments = tuple(sorted({_norm(k) for k in keys}))
        object.__setattr__(self, "keys", frozenset(fragments))
        object.__setattr__(self, "_fragments", fragments)
        # For keys, one search is several times faster than a test per fragment; for long
        # text it is the other way round (see _mask_pairs).
        pattern = "|".join(map(re.escape, fragments))
        object.__setattr__(self, "_sensitive", re.compile(pattern) if fragments else None)
        object.__setattr__(self, "_verdicts", {})

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def is_sensitive(self, key: str) -> bool:
        """Whether ``key`` contains one of the fragments.

        >>> Redactor(frozenset({"api_key"})).is_sensitive("X-Api-Key")
        True
        """
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = self._sensitive is not None and self._sensitive.search(_norm(key)) is not None
            if len(self._verdicts) >= _MAX_VERDICTS:
                self._verdicts.clear()
            self._verdicts[key] = verdict
        return verdict

    def redact_json(self, value: JsonValue) -> JsonValue:
        """A copy of ``value`` with every sensitive key's value replaced, and its strings
        redacted as text (the values found under sensitive keys are scrubbed from them)."""
        if not self.keys:
            return value
        return self._walk(value, 0, _longest_first(self.secrets_in(value)))

    def _walk(self, value: JsonValue, depth: int, secrets: tuple[str, ...]) -> JsonValue:
        if depth > 200:
            return REDACTED  # deeper than any real payload: do not risk leaking it
        if type(value) is dict or isinstance(value, Mapping):
            return {
                k: (REDACTED if self.is_sensitive(str(k)) else self._walk(v, depth + 1, secrets))
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self._walk(v, depth + 1, secrets) for v in value]
        if isinstance(value, str):
            return self._text(value, secrets)
        return value

    def secrets_in(self, value: JsonValue) -> frozenset[str]:
        """The string values found under sensitive keys anywhere in ``value``."""
        found: set[str] = set()
        if self.keys:
            self._collect(value, found, 0)
        return frozenset(s for s in found if len(s) >= MIN_SECRET_LENGTH)

    def _collect(self, value: JsonValue, found: set[str], depth: int) -> None:
        if depth > 200 or type(value) in _SCALARS:
            return  # (scalars first: most of a payload, and an ABC check each is slow)
        if type(value) is dict or isinstance(value, Mapping):
            for k, v in value.items():
                if self.is_sensitive(k if type(k) is str else str(k)):
                    _strings(v, found, depth + 1)
                else:
                    self._collect(v, found, depth + 1)
        elif isinstance(value, list | tuple):
            for v in value:
                self._collect(v, found, depth + 1)

    def redact_text(self, text: str, secrets: Iterable[str] = ()) -> str:
        """``text`` with the given literal secrets (whole, or cut at a truncation marker),
        URL passwords and sensitive ``key=value`` pairs masked.

        >>> Redactor().redact_text('retry with {"X-Api-Key": "k1"} at https://u:pw@h/x')
        'retry with {"X-Api-Key": "[REDACTED]"} at https://u:[REDACTED]@h/x'
        """
        if not self.keys:
            return text
        return self._text(text, _longest_first(secrets))

    def _text(self, text: str, secrets: tuple[str, ...]) -> str:
        text = _scrub_literals(text, secrets)
        if "://" in text:
            text = _URL_PASSWORD.sub(_masked_url, text)
        return self._mask_pairs(text)

    def _mask_pairs(self, text: str) -> str:
        # Most text holds no fragment at all: substring tests find that out in C.
        normalised = _norm(text)
        if not any(f in normalised for f in self._fragments):
            return text
        # A loop rather than one sub(): a pair whose key is not sensitive must not swallow
        # its value, which may hold a sensitive pair of its own (note="password=x"), and a
        # value in brackets ends where they balance, which a regular expression cannot tell.
        parts: list[str] = []
        closers: dict[int, int] | None = None
        done = pos = 0
        while (key := _PAIR_KEY.search(text, pos)) is not None:
            pos = key.end()
            if not self._is_text_key(key.group(1)):
                continue
            if text.startswith(("[", "{"), pos):
                # A list or an object ("token: ['a', 'b']") ends where its brackets
                # balance; one that never closes (cut off) ends with its line.
                if closers is None:
                    closers = _closers(text)
                end = closers.get(pos) or _line_end(text, pos)
            else:
                value = _PAIR_VALUE.match(text, pos)
                end = pos if value is None else value.end()
            if end > pos:
                parts += (text[done:pos], _masked(text[pos:end]))
                done = pos = end
        if not parts:
            return text
        parts.append(text[done:])
        return "".join(parts)

    def _is_text_key(self, word: str) -> bool:
        # An exception's type name ("InvalidTokenError: token expired") is not a key.
        return self.is_sensitive(word) and not _norm(word).endswith(_TYPE_NAME_ENDINGS)


def _longest_first(secrets: Iterable[str]) -> tuple[str, ...]:
    # Longest first: a secret that contains another is replaced whole.
    return tuple(sorted({s for s in secrets if s}, key=len, reverse=True))


def _scrub_literals(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    if not secrets or "characters omitted]" not in text:
        return text
    return _scrub_cut_secrets(text, secrets)


def _scrub_cut_secrets(text: str, secrets: tuple[str, ...]) -> str:
    """Mask what a cut left of a secret on either side of each truncation marker: the
    start of one at the end of the text before it, the end of one at the start of the
    text after it."""
    marks = [m.span() for m in CUT_MARKER.finditer(text)]
    spans: list[tuple[int, int]] = []
    for i, (start, end) in enumerate(marks):
        before = marks[i - 1][1] if i else 0
        after = marks[i + 1][0] if i + 1 < len(marks) else len(text)
        head = text[before:start]
        if n := max((_partial(head, s) for s in secrets), default=0):
            spans.append((start - n, start))
        tail = text[end:after]
        if n := max((_partial(s, tail) for s in secrets), default=0):
            spans.append((end, end + n))
    if not spans:
        return text
    parts: list[str] = []
    done = 0
    for start, end in spans:  # in text order; a head span may overlap the previous tail span
        if end <= done:
            continue
        parts += (text[done : max(start, done)], REDACTED)
        done = end
    parts.append(text[done:])
    return "".join(parts)


def _partial(left: str, right: str) -> int:
    """How much of the end of ``left`` is the start of ``right``, if at least
    MIN_PARTIAL_LENGTH; else 0."""
    # Cheap test first: such an overlap contains the last MIN_PARTIAL_LENGTH characters of
    # left, so they occur in right (head side) or the first ones of right occur in left.
    if len(left) < MIN_PARTIAL_LENGTH or len(right) < MIN_PARTIAL_LENGTH:
        return 0
    if left[-MIN_PARTIAL_LENGTH:] not in right or right[:MIN_PARTIAL_LENGTH] not in left:
        return 0
    n = _overlap(left, right)
    return n if n >= MIN_PARTIAL_LENGTH else 0


def _overlap(left: str, right: str) -> int:
    """The length of the longest suffix of ``left`` that is a prefix of ``right``.

    Knuth-Morris-Pratt, linear in the lengths: a secret can be long, and trying every
    length would be quadratic.

    >>> _overlap("user=hunt", "hunter2")
    4
    """
    n = min(len(left), len(right))
    pattern = right[:n]
    fallback = [0] * n
    k = 0
    for i in range(1, n):
        while k and pattern[i] != pattern[k]:
            k = fallback[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        fallback[i] = k
    k = 0
    for ch in left[len(left) - n :]:
        if k == n:
            k = fallback[k - 1]
        while k and ch != pattern[k]:
            k = fallback[k - 1]
        if ch == pattern[k]:
            k += 1
    return k


def _closers(text: str) -> dict[int, int]:
    """For each opening bracket in ``text`` that is closed, where its closing one ends.

    One pass for the whole text: scanning ahead from each sensitive key instead would be
    quadratic in text full of brackets that never close.
    """
    closers: dict[int, int] = {}
    opened: list[int] = []
    for m in _BRACKET.finditer(text):
        if m.group() in "[{":
            opened.append(m.start())
        elif opened:
            closers[opened.pop()] = m.end()
    return closers


def _line_end(text: str, pos: int) -> int:
    end = text.find("\n", pos)
    return len(text) if end < 0 else end


def _masked_url(m: re.Match[str]) -> str:
    return f"{m.group(1)}{REDACTED}@"


def _masked(value: str) -> str:
    quote = value[0]
    if quote in "\"'":
        closed = len(value) > 1 and value.endswith(quote)
        return f"{quote}{REDACTED}{quote if closed else ''}"
    return REDACTED


def _strings(value: JsonValue, found: set[str], depth: int) -> None:
    if depth > 200:
        return
    if isinstance(value, str):
        found.add(value)
    elif is_number(value):
        found.add(str(value))
    elif isinstance(value, Mapping):
        for v in value.values():
            _strings(v, found, depth + 1)
    elif isinstance(value, Sequence):
        for v in value:
            _strings(v, found, depth + 1)
