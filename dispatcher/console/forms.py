"""The dead-letter filter as a page's query string and a form's hidden fields, both ways.

What the operator types is read by the library's own parsers (the CLI's meanings: a trigger
is an id or ``SCOPE/NAME``, ages are durations such as ``7d``); what it refuses becomes a
400 page naming the field.

>>> form = FilterForm.read({"scope": "acme", "reason": "timeout", "since": "1d"})
>>> form.to_filter(None)
DeadLetterFilter(scope='acme', ..., reason=<DeadLetterReason.TIMEOUT: 'timeout'>, ...)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from urllib.parse import urlencode

from dispatcher.admin import DeadLetterFilter, parse_duration
from dispatcher.core.errors import InvalidInput
from dispatcher.flow import parse_trigger_ref

# "resolution" absent from the query: the dead letters that need action.
DEFAULT_RESOLUTION = "open"
ANY = "any"
FIELDS = ("scope", "trigger", "reason", "resolution", "since", "older_than", "text")


@dataclass(frozen=True, slots=True)
class FilterForm:
    """The filter fields as typed (empty string: not set)."""

    scope: str = ""
    trigger: str = ""
    reason: str = ""
    resolution: str = DEFAULT_RESOLUTION
    since: str = ""
    older_than: str = ""
    text: str = ""

    @classmethod
    def read(cls, params: Mapping[str, object]) -> FilterForm:
        values = {}
        for name in FIELDS:
            raw = params.get(name)
            values[name] = raw.strip() if isinstance(raw, str) else ""
        if "resolution" not in params:
            values["resolution"] = DEFAULT_RESOLUTION
        return cls(**values)

    def fields(self) -> dict[str, str]:
        """Every field, set or not, for hidden inputs (an empty resolution means any)."""
        values = asdict(self)
        if not values["resolution"]:
            values["resolution"] = ANY
        return values

    def query(self, **extra: str) -> str:
        """The query string that selects this filter again (and ``extra``)."""
        return urlencode({**self.fields(), **extra})

    def to_filter(self, scopes: tuple[str, ...] | None) -> DeadLetterFilter:
        """The library's filter, within the operator's ``scopes`` (None: all)."""
        if self.scope and scopes is not None and self.scope not in scopes:
            raise InvalidInput("scope", self.scope, "is not a scope this console may show")
        f = DeadLetterFilter(
            scope=self.scope or None,
            reason=self.reason or None,  # type: ignore[arg-type]  # checked by the filter
            resolution=(
                None if self.resolution in ("", ANY) else self.resolution  # type: ignore[arg-type]
            ),
            since=parse_duration(self.since) if self.since else None,
            older_than=parse_duration(self.older_than) if self.older_than else None,
            text=self.text or None,
            scopes=scopes,
        )
        if self.trigger:
            f = f.for_trigger(parse_trigger_ref(self.trigger))
        return f

    def describe(self) -> str:
        """The filter in words, for previews and the audit log."""
        parts = [f"{k}={v}" for k, v in self.fields().items() if v]
        return ", ".join(parts) or "every dead letter"

    def audit(self) -> dict[str, str]:
        """The fields set, as the audit log keeps them."""
        return {k: v for k, v in self.fields().items() if v}
