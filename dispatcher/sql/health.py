"""The statement behind the progress verdict of ``dispatcher status``
(:func:`dispatcher.core.health.table_readiness`)."""

from __future__ import annotations

from functools import cache

from dispatcher.names import DEFAULT_SCHEMA
from dispatcher.sql.claim import key_head
from dispatcher.sql.common import Statements


class HealthSql(Statements):
    def __init__(self, schema: str) -> None:
        super().__init__(schema)
        s = self.quoted
        # What a claim could take now: due, not parked, not paused, not held by a breaker,
        # its key's head if its trigger is ordered
        # (the predicate of ClaimSql.due_count; keep the two in step: a row a claim may
        # not take must not count here, or a verdict says "stalled" while it waits as it
        # should). Counted up to $1 rows, so that a huge backlog stays cheap to read; the
        # oldest is one index probe on due_at.
        claimable = f"""
                FROM {s}.outbox o
                WHERE o.parked_at IS NULL AND o.due_at <= clock_timestamp()
                    AND NOT EXISTS (
                        SELECT 1 FROM {s}.breakers b
                        WHERE b.trigger_id = o.trigger_id
                            AND ((b.state <> 'closed' AND b.probe_id IS DISTINCT FROM o.id)
                                 OR b.held_until > clock_timestamp()))
                    AND NOT EXISTS (
                        SELECT 1 FROM {s}.pauses p
                        WHERE (p.scope IS NULL OR p.scope = o.scope)
                            AND (p.trigger_id IS NULL OR p.trigger_id = o.trigger_id))
                    -- An ordered trigger's row behind its key's head, or of a blocked key.
                    AND {key_head(s, "o")}"""
        self.progress = f"""
            SELECT
                (SELECT count(*) FROM (SELECT 1 {claimable} LIMIT $1) AS d) AS claimable,
                extract(epoch FROM clock_timestamp() - (
                    SELECT o.due_at {claimable} ORDER BY o.due_at LIMIT 1
                ))::float8 AS oldest_claimable_seconds"""


@cache
def health_queries(schema: str = DEFAULT_SCHEMA) -> HealthSql:
    return HealthSql(schema)
