"""Who a trigger's script runs as: the principal who registered it, resolved at execution."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from dispatcher.core.models import JsonValue


@dataclass(frozen=True, slots=True)
class Principal:
    """An identity a handler acts as. ``attributes`` carry whatever the host resolves."""

    id: str
    attributes: Mapping[str, JsonValue] = field(default_factory=dict)


class PrincipalResolver(Protocol):
    """Resolve a principal id at execution time; ``None`` means unknown or revoked, which
    fails the execution as permission denied (a permanent failure)."""

    async def resolve(self, principal_id: str) -> Principal | None: ...


class RegisteredByResolver:
    """The default: the principal is exactly the trigger's ``registered_by``."""

    async def resolve(self, principal_id: str) -> Principal | None:
        return Principal(principal_id)


class PrincipalDirectory:
    """An in-memory directory of known principals that can be revoked.

    >>> directory = PrincipalDirectory(["user:1", "user:2"])
    >>> directory.revoke("user:2")
    """

    def __init__(self, known: Iterable[str] = ()) -> None:
        self._known: dict[str, Principal] = {p: Principal(p) for p in known}

    def add(self, principal: Principal | str) -> None:
        p = Principal(principal) if isinstance(principal, str) else principal
        self._known[p.id] = p

    def revoke(self, principal_id: str) -> None:
        self._known.pop(principal_id, None)

    async def resolve(self, principal_id: str) -> Principal | None:
        return self._known.get(principal_id)
