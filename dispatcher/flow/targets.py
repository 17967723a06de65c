"""How an operator names what flow control acts on: a trigger (by id or ``SCOPE/NAME``), a
scope, or everything; and the errors raised when that target has nothing to undo."""

from __future__ import annotations

import re
from typing import TypeAlias

from dispatcher.core.errors import DispatcherError, InvalidInput
from dispatcher.core.models import check_name
from dispatcher.core.validate import is_int

# A trigger as an operator names it: its id, or (scope, name).
TriggerRef: TypeAlias = int | tuple[str, str]

_BIGINT_MAX = 2**63 - 1
_DIGITS = re.compile(r"[0-9]+")


class NotPaused(DispatcherError, LookupError):
    """:meth:`FlowControl.resume_target` found no pause on its target."""


class NoBreaker(DispatcherError, LookupError):
    """:meth:`FlowControl.reset_breaker_of` found no breaker for the trigger."""


def parse_trigger_ref(text: str) -> TriggerRef:
    """A trigger id (``7``) or ``SCOPE/NAME`` (split at the first ``/``).

    >>> parse_trigger_ref("acme/welcome")
    ('acme', 'welcome')
    """
    stripped = text.strip()
    if _DIGITS.fullmatch(stripped):
        # Length first: int() of thousands of digits raises, and no id has over 19.
        if len(stripped.lstrip("0")) <= 19 and 1 <= int(stripped) <= _BIGINT_MAX:
            return int(stripped)
    else:
        scope, _, name = stripped.partition("/")
        if scope and name:
            return scope, name
    raise InvalidInput(
        "trigger", text, "expected a trigger id (e.g. 7) or SCOPE/NAME (e.g. acme/welcome)"
    )


def _target_text(scope: str | None, trigger_id: int | None, trigger_name: str | None) -> str:
    if trigger_id is not None:
        return f"trigger {trigger_id}" + (f" ({trigger_name})" if trigger_name else "")
    if scope is not None:
        return f"scope {scope}"
    return "everything"


def _check_target(scope: str | None, trigger_id: int | None, *, everything: bool) -> None:
    if scope is not None:
        check_name("scope", scope)
    if trigger_id is not None and (not is_int(trigger_id)):
        raise InvalidInput("trigger_id", trigger_id, "must be an integer trigger id")
    if scope is not None and trigger_id is not None:
        raise InvalidInput("scope", scope, "give a scope or a trigger, not both")
    if scope is None and trigger_id is None and not everything:
        raise InvalidInput("target", None, "give a scope or a trigger (or everything=True)")
