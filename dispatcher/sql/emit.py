"""Fan-out: the producers' calls into the emit functions (migrations 0007, 0010, 0011,
0012, 0014, 0015, 0016)."""

from __future__ import annotations

from dispatcher.sql.common import Statements


class EmitSql(Statements):
    """The statements of :mod:`dispatcher.emit`."""

    def __init__(self, schema: str) -> None:
        super().__init__(schema)
        s = self.quoted
        # Fan-out is defined once, by the emit functions in the schema (migration 0011):
        # matching, the all-or-nothing fan-out cap, the policy snapshot, the payload and the
        # wake-up hint, sent when $10 says so. The emitter debounces hints across
        # transactions (Postgres folds a transaction's identical notifications into one),
        # because a notifying commit holds a database-wide lock until its WAL flush, which
        # serialises concurrent producers. Bulk: one round trip for any number of mutations.
        self.emit = f"""
            SELECT over_ordinal, over_matched, matched, outbox_ids, event_ids, trigger_ids
            FROM {s}.emit_many($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                $6::jsonb[], $7::int[], $8::uuid[], $9::int, $10::bool, $11::jsonb[],
                $12::text)"""
        # The single-mutation form of ``emit``.
        self.emit_one = f"""
            SELECT matched, outbox_ids, trigger_ids
            FROM {s}.emit($1::uuid, $2::text, $3::text, $4::text, $5::text, $6::jsonb,
                $7::int, $8::uuid, $9::int, $10::bool, $11::jsonb, $12::text)"""
