"""Trigger registration: insert under the per-scope cap, read, enable, remove."""

from __future__ import annotations

from dispatcher.sql.common import POLICY, Statements


class TriggerSql(Statements):
    """The statements of :mod:`dispatcher.triggers`."""

    def __init__(self, schema: str) -> None:
        super().__init__(schema)
        s = self.quoted
        self.insert_trigger = f"""
            INSERT INTO {s}.triggers (scope, name, namespace, key_pattern, pattern_kind,
                match_prefix, match_like, ops, target, {POLICY}, enabled,
                is_dead_letter_handler, registered_by, condition, condition_path,
                condition_vars, condition_changed, fields, ordering, on_dead_letter, delivery)
            SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                $18, $19, $20, $21, $23, $24::jsonpath, $25::jsonb, $26::jsonb, $27::text[],
                $28, $29, $30
            WHERE (SELECT count(*) FROM {s}.triggers WHERE scope = $1) < $22
            ON CONFLICT (scope, name) DO NOTHING
            RETURNING *"""
        self.count_triggers = f"SELECT count(*) FROM {s}.triggers WHERE scope = $1"
        self.trigger_exists = f"SELECT 1 FROM {s}.triggers WHERE scope = $1 AND name = $2"
        self.get_trigger = f"SELECT * FROM {s}.triggers WHERE id = $1"
        self.get_trigger_by_name = f"SELECT * FROM {s}.triggers WHERE scope = $1 AND name = $2"
        self.list_triggers = f"""
            SELECT * FROM {s}.triggers
            WHERE ($1::text IS NULL OR scope = $1)
            ORDER BY scope, name"""
        self.set_trigger_enabled = f"""
            UPDATE {s}.triggers SET enabled = $2, updated_at = clock_timestamp()
            WHERE id = $1 RETURNING *"""
        self.delete_trigger = f"DELETE FROM {s}.triggers WHERE id = $1 RETURNING id"
        # Serialises registrations within a scope so the per-scope cap holds under concurrency.
        self.lock_scope = "SELECT pg_advisory_xact_lock(hashtextextended($1, 7215))"
