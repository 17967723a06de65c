"""Register, look up, enable, disable and delete triggers.

>>> registry = TriggerRegistry()
>>> trigger = await registry.register(conn, scope="acme", name="welcome", namespace="users",
...     key_pattern="users/*", target="send_welcome", registered_by="user:7")
>>> paid = await registry.register(conn, scope="acme", name="paid", namespace="orders",
...     key_pattern="orders/*", target="ship", registered_by="user:7",
...     when="changed(status) and new.status == 'paid'", fields=["id", "status"])
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from dispatcher.core.conditions import CompiledCondition, compile_condition
from dispatcher.core.errors import InvalidInput, LimitExceeded, TriggerExists, TriggerNotFound
from dispatcher.core.models import (
    Delivery,
    OnDeadLetter,
    Op,
    Ordering,
    RetryPolicy,
    Trigger,
    check_name,
)
from dispatcher.core.patterns import compile_pattern
from dispatcher.core.validate import is_number
from dispatcher.db import Connection
from dispatcher.names import DEFAULT_SCHEMA, MAX_TIMEOUT
from dispatcher.records import trigger_from_record
from dispatcher.sql import queries

DEFAULT_TIMEOUT = 30.0


def _check_ops(ops: object) -> frozenset[Op]:
    if isinstance(ops, str) or not isinstance(ops, Iterable):
        raise InvalidInput("ops", ops, "must be a collection of 'put' and/or 'delete'")
    result: set[Op] = set()
    for op in ops:
        try:
            result.add(Op(op))
        except ValueError:
            raise InvalidInput("ops", op, f"unknown op; use {[o.value for o in Op]}") from None
    if not result:
        raise InvalidInput("ops", ops, "must name at least one op")
    return frozenset(result)


def _check_timeout(timeout: object) -> float:
    if not is_number(timeout):
        raise InvalidInput("execution_timeout", timeout, "must be a number of seconds")
    value = float(timeout)
    if not 0 < value <= MAX_TIMEOUT:
        raise InvalidInput("execution_timeout", timeout, f"must be in (0, {MAX_TIMEOUT}] seconds")
    return value


@dataclass(frozen=True, slots=True)
class TriggerRegistry:
    """Trigger CRUD for one schema, with a cap on triggers per scope."""

    schema: str = DEFAULT_SCHEMA
    max_triggers_per_scope: int = 1000

    async def register(
        self,
        conn: Connection,
        *,
        scope: str,
        name: str,
        namespace: str,
        key_pattern: str,
        target: str,
        registered_by: str,
        ops: Iterable[Op | str] = (Op.PUT, Op.DELETE),
        retry: RetryPolicy | None = None,
        execution_timeout: float = DEFAULT_TIMEOUT,
        enabled: bool = True,
        is_dead_letter_handler: bool = False,
        when: str | None = None,
        fields: Sequence[str] | None = None,
        ordering: Ordering | str | None = None,
        on_dead_letter: OnDeadLetter | str | None = None,
        delivery: Delivery | str = Delivery.ALL,
    ) -> Trigger:
        """Validate and store a trigger; raises a typed error naming the bad field.

        ``when``: a condition the mutation must meet besides the pattern, over its op, key,
        new and old values and which fields changed (:mod:`dispatcher.core.conditions`), for
        example ``"changed(status) and new.status == 'paid'"``; checked in the emitting
        transaction, so a mutation that does not meet it enqueues nothing for this trigger.
        An invalid condition raises :class:`~dispatcher.core.conditions.ConditionError`,
        pointing at the problem. ``fields``: the top-level fields of the value and the old
        value this trigger's handler receives (the others are left out of its payload).

        A dead-letter handler trigger does not fire on mutations: it runs once for each new
        dead letter of its scope whose event's namespace and key it matches (it takes
        neither ``when`` nor ``fields``).

        ``ordering="key"``: the rows of one key run one at a time, in the commit order of
        the key's mutations (each carries the key's version as ``seq``), across retries,
        processes and crashes. ``on_dead_letter`` (ordered triggers only): ``"block"`` (the
        default) holds a key whose head dead-letters until an operator replays, discards or
        unblocks it; ``"skip"`` lets its later rows run. ``delivery="latest"``: a mutation
        of a key whose newest row has not started yet replaces that row's payload (keeping
        its due time) instead of adding a row; it implies ``ordering="key"``, so a key has
        at most one row running and one pending, and the last delivery carries the final
        state.
        """
        check_name("scope", scope)
        check_name("name", name)
        check_name("namespace", namespace)
        check_name("target", target)
        check_name("registered_by", registered_by)
        pattern = compile_pattern(key_pattern)
        op_set = _check_ops(ops)
        policy = retry if retry is not None else RetryPolicy()
        if not isinstance(policy, RetryPolicy):
            raise InvalidInput("retry", policy, "must be a RetryPolicy")
        seconds = _check_timeout(execution_timeout)
        condition = None if when is None else compile_condition(when)
        selected = None if fields is None else _check_fields(fields)
        if is_dead_letter_handler and (condition is not None or selected is not None):
            raise InvalidInput(
                "when", when, "a dead-letter handler trigger takes neither a condition nor fields"
            )
        order, on_dead, deliver = _check_ordering(ordering, on_dead_letter, delivery)
        if is_dead_letter_handler and order is Ordering.KEY:
            raise InvalidInput("ordering", ordering, "a dead-letter handler trigger runs unordered")
        q = queries(self.schema)
        async with conn.transaction():
            await conn.execute(q.lock_scope, scope)
            row = await conn.fetchrow(
                q.insert_trigger,
                scope,
                name,
                namespace,
                pattern.source,
                pattern.kind.value,
                pattern.prefix,
                pattern.like,
                sorted(o.value for o in op_set),
                target,
                *_policy_columns(policy, seconds),
                bool(enabled),
                bool(is_dead_letter_handler),
                registered_by,
                self.max_triggers_per_scope,
                *_condition_columns(condition),
                selected,
                order.value,
                None if on_dead is None else on_dead.value,
                deliver.value,
            )
            if row is None:
                raise await self._refusal(conn, scope, name)
        return trigger_from_record(row)

    async def _refusal(self, conn: Connection, scope: str, name: str) -> Exception:
        """Why the insert wrote nothing: the name is taken, or the scope is full."""
        q = queries(self.schema)
        if await conn.fetchval(q.trigger_exists, scope, name):
            return TriggerExists(scope, name)
        count = await conn.fetchval(q.count_triggers, scope)
        return LimitExceeded(
            f"triggers in scope {scope!r}",
            int(count) + 1,
            self.max_triggers_per_scope,
            "max_triggers_per_scope",
        )

    async def get(self, conn: Connection, trigger_id: int) -> Trigger:
        row = await conn.fetchrow(queries(self.schema).get_trigger, trigger_id)
        if row is None:
            raise TriggerNotFound(trigger_id)
        return trigger_from_record(row)

    async def get_by_name(self, conn: Connection, scope: str, name: str) -> Trigger:
        row = await conn.fetchrow(queries(self.schema).get_trigger_by_name, scope, name)
        if row is None:
            raise TriggerNotFound(f"{scope}/{name}")
        return trigger_from_record(row)

    async def list(self, conn: Connection, *, scope: str | None = None) -> Sequence[Trigger]:
        rows = await conn.fetch(queries(self.schema).list_triggers, scope)
        return [trigger_from_record(r) for r in rows]

    async def enable(self, conn: Connection, trigger_id: int) -> Trigger:
        return await self._set_enabled(conn, trigger_id, True)

    async def disable(self, conn: Connection, trigger_id: int) -> Trigger:
        """Stop matching new mutations; rows already enqueued still run."""
        return await self._set_enabled(conn, trigger_id, False)

    async def delete(self, conn: Connection, trigger_id: int) -> None:
        """Remove the trigger; rows already enqueued keep their snapshot and still run."""
        if await conn.fetchval(queries(self.schema).delete_trigger, trigger_id) is None:
            raise TriggerNotFound(trigger_id)

    async def _set_enabled(self, conn: Connection, trigger_id: int, enabled: bool) -> Trigger:
        row = await conn.fetchrow(queries(self.schema).set_trigger_enabled, trigger_id, enabled)
        if row is None:
            raise TriggerNotFound(trigger_id)
        return trigger_from_record(row)


def _condition_columns(condition: CompiledCondition | None) -> tuple[object, ...]:
    """The condition columns of ``insert_trigger``: as written, compiled, its variables and
    the field paths its ``changed(...)`` tests."""
    if condition is None:
        return (None, None, None, None)
    return (
        condition.source,
        condition.jsonpath,
        json.dumps(condition.variables, allow_nan=False),
        json.dumps([list(path) for path in condition.changed]),
    )


MAX_FIELDS = 100


def _check_ordering(
    ordering: object, on_dead_letter: object, delivery: object
) -> tuple[Ordering, OnDeadLetter | None, Delivery]:
    """The three order settings, checked together: ``delivery="latest"`` implies key
    ordering, and ``on_dead_letter`` belongs to ordered triggers (default ``"block"``)."""
    deliver = _member("delivery", delivery, Delivery)
    if ordering is None:
        order = Ordering.KEY if deliver is Delivery.LATEST else Ordering.NONE
    else:
        order = _member("ordering", ordering, Ordering)
    if deliver is Delivery.LATEST and order is not Ordering.KEY:
        raise InvalidInput(
            "ordering",
            ordering,
            "delivery='latest' needs ordering='key' (leave ordering out to get it)",
        )
    if order is Ordering.NONE:
        if on_dead_letter is not None:
            raise InvalidInput("on_dead_letter", on_dead_letter, "applies only with ordering='key'")
        return order, None, deliver
    on_dead = (
        OnDeadLetter.BLOCK
        if on_dead_letter is None
        else _member("on_dead_letter", on_dead_letter, OnDeadLetter)
    )
    return order, on_dead, deliver


E = TypeVar("E", Ordering, OnDeadLetter, Delivery)


def _member(name: str, value: object, enum: type[E]) -> E:
    if not isinstance(value, str):
        raise InvalidInput(name, value, f"must be one of {[m.value for m in enum]}")
    try:
        return enum(value)
    except ValueError:
        raise InvalidInput(name, value, f"must be one of {[m.value for m in enum]}") from None


def _check_fields(fields: Sequence[str]) -> list[str]:
    if isinstance(fields, str) or not isinstance(fields, Sequence):
        raise InvalidInput("fields", fields, "must be a list of field names")
    if not 1 <= len(fields) <= MAX_FIELDS:
        raise InvalidInput("fields", fields, f"must name 1 to {MAX_FIELDS} fields")
    for f in fields:
        check_name("fields", f)
    if len(set(fields)) != len(fields):
        raise InvalidInput("fields", fields, "names a field twice")
    return list(fields)


def _policy_columns(policy: RetryPolicy, timeout: float) -> tuple[object, ...]:
    """The policy columns of ``insert_trigger``, in the statement's order."""
    return (
        policy.kind.value,
        policy.base_delay,
        policy.factor,
        policy.max_delay,
        policy.jitter,
        policy.max_attempts,
        policy.max_event_age,
        timeout,
        sorted(policy.park_on),
    )
