"""Where synchronous calls wait for their reply.

A call registers a pending request here, writes a reply-to outbox row and waits. The
dispatcher delivers the reply after the row's fenced delete; a receiver that already gave up
(timed out or was cancelled) makes the delivery fail, and the dispatcher records an
``abandoned_executions`` row instead.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Protocol

import anyio

from dispatcher.core.models import JsonValue
from dispatcher.core.outcomes import Failure, Reply, Success


@dataclass(frozen=True, slots=True)
class InvokeResult:
    """A synchronous call's answer: an HTTP-style status and the result or the failure."""

    status: int
    result: JsonValue = None
    error: Failure | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def from_reply(cls, reply: Reply) -> InvokeResult:
        match reply.result:
            case Success(result=value):
                return cls(reply.status, value, None)
            case Failure() as failure:
                return cls(reply.status, None, failure)


class InboxResolver(Protocol):
    """Delivers replies to waiting callers of this process."""

    @property
    def inbox_id(self) -> str: ...

    def is_waiting(self, reply_to: str) -> bool: ...

    def deliver(self, reply_to: str, reply: Reply) -> bool:
        """Hand the reply over; False when nobody waits for it any more."""
        ...


@dataclass(slots=True)
class _Pending:
    done: anyio.Event = field(default_factory=anyio.Event)
    reply: Reply | None = None


class InProcessInbox:
    """Replies for calls made in this process, keyed by a request id."""

    def __init__(self) -> None:
        self._id = uuid.uuid4().hex
        self._pending: dict[str, _Pending] = {}

    @property
    def inbox_id(self) -> str:
        return self._id

    def open(self) -> str:
        request_id = uuid.uuid4().hex
        self._pending[request_id] = _Pending()
        return request_id

    def close(self, request_id: str) -> None:
        """Stop waiting: a reply arriving later is refused (and recorded as abandoned)."""
        self._pending.pop(request_id, None)

    async def wait(self, request_id: str) -> Reply:
        pending = self._pending[request_id]
        await pending.done.wait()
        assert pending.reply is not None
        return pending.reply

    def is_waiting(self, reply_to: str) -> bool:
        return reply_to in self._pending

    def deliver(self, reply_to: str, reply: Reply) -> bool:
        pending = self._pending.pop(reply_to, None)
        if pending is None:
            return False
        pending.reply = reply
        pending.done.set()
        return True
