"""Every SQL statement the library runs, in one place, with the schema name injected once.

Statements take parameters only; no user text is ever spliced into SQL. The schema name is
validated as an identifier before it is quoted in.
"""

from __future__ import annotations

from functools import cache

from dispatcher.schema import DEFAULT_SCHEMA, check_schema_name

_POLICY = (
    "retry_kind, retry_base_delay, retry_factor, retry_max_delay, retry_jitter, "
    "max_attempts, max_event_age, timeout"
)
_SNAPSHOT = f"trigger_id, scope, trigger_name, target, registered_by, {_POLICY}"

# The trigger-match predicate, shared by single and bulk emit. ``mu`` is the mutation (scope,
# namespace, key, op). Prefix and glob patterns are found through the index by probing every
# prefix of the key; the glob's LIKE (its literal characters escaped at registration) then
# filters the few candidates.
_MATCH = """
    t.scope = mu.scope
    AND t.namespace = mu.namespace
    AND t.match_prefix = ANY (ARRAY(
        SELECT left(mu.key, n) FROM generate_series(0, length(mu.key)) AS g(n)))
    AND t.enabled
    AND NOT t.is_dead_letter_handler
    AND mu.op = ANY (t.ops)
    AND CASE t.pattern_kind
        WHEN 'exact' THEN t.match_prefix = mu.key
        WHEN 'prefix' THEN true
        ELSE mu.key LIKE t.match_like ESCAPE '\\'
    END
"""


class Sql:
    """The statements for one schema. Build with :func:`queries`."""

    def __init__(self, schema: str) -> None:
        s = f'"{check_schema_name(schema)}"'
        self.schema = schema
        self.channel = f"{schema}_wake"

        # --- triggers ---
        self.insert_trigger = f"""
            INSERT INTO {s}.triggers (scope, name, namespace, key_pattern, pattern_kind,
                match_prefix, match_like, ops, target, {_POLICY}, enabled,
                is_dead_letter_handler, registered_by)
            SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                $18, $19, $20
            WHERE (SELECT count(*) FROM {s}.triggers WHERE scope = $1) < $21
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

        # --- emit ---
        # One round trip for any number of mutations: match in SQL, enforce the fan-out cap
        # per mutation (nothing is inserted when any mutation exceeds it), insert with the
        # policy snapshot, and send one wake-up hint (Postgres folds identical notifications
        # of a transaction into one).
        self.emit = f"""
            WITH mu AS (
                SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[],
                    $5::text[], $6::text[], $7::int[])
                    WITH ORDINALITY AS u(event_id, scope, namespace, key, op, payload, depth, ord)
            ),
            m AS MATERIALIZED (
                SELECT mu.ord, mu.event_id, mu.payload, mu.depth, t.*
                FROM mu CROSS JOIN LATERAL (
                    SELECT t.id AS trigger_id, t.scope, t.name AS trigger_name, t.target,
                        t.registered_by, t.retry_kind, t.retry_base_delay, t.retry_factor,
                        t.retry_max_delay, t.retry_jitter, t.max_attempts, t.max_event_age,
                        t.timeout
                    FROM {s}.triggers t
                    WHERE {_MATCH}
                    LIMIT $8 + 1
                ) t
            ),
            over AS (
                SELECT ord, count(*) AS n FROM m GROUP BY ord HAVING count(*) > $8
                ORDER BY ord LIMIT 1
            ),
            ins AS (
                INSERT INTO {s}.outbox (event_id, payload, depth, {_SNAPSHOT})
                SELECT event_id, payload::jsonb, depth, {_SNAPSHOT}
                FROM m WHERE NOT EXISTS (SELECT 1 FROM over)
                ORDER BY ord, trigger_id
                ON CONFLICT (event_id, trigger_id) DO NOTHING
                RETURNING id, event_id, trigger_id
            )
            SELECT (SELECT ord FROM over) AS over_ord,
                (SELECT n FROM over) AS over_n,
                (SELECT count(*) FROM m) AS matched,
                (SELECT coalesce(array_agg(id ORDER BY id), '{{}}') FROM ins) AS ids,
                (SELECT coalesce(array_agg(event_id ORDER BY id), '{{}}') FROM ins) AS event_ids,
                (SELECT coalesce(array_agg(trigger_id ORDER BY id), '{{}}') FROM ins)
                    AS trigger_ids,
                (SELECT count(*) FROM (
                    SELECT pg_notify('{self.channel}', '') FROM ins LIMIT 1) AS w) AS notified
            """

        # --- reference KV ---
        self.kv_get = f"""
            SELECT value, version FROM {s}.kv WHERE scope = $1 AND namespace = $2 AND key = $3"""
        self.kv_put = f"""
            INSERT INTO {s}.kv AS kv (scope, namespace, key, value)
            VALUES ($1, $2, $3, $4::jsonb)
            ON CONFLICT (scope, namespace, key) DO UPDATE
                SET value = excluded.value, version = kv.version + 1,
                    updated_at = clock_timestamp()
            RETURNING version"""
        self.kv_delete = f"""
            DELETE FROM {s}.kv WHERE scope = $1 AND namespace = $2 AND key = $3
            RETURNING version"""
        self.kv_list = f"""
            SELECT key, value, version FROM {s}.kv
            WHERE scope = $1 AND namespace = $2 AND starts_with(key, $3)
            ORDER BY key LIMIT $4"""


@cache
def queries(schema: str = DEFAULT_SCHEMA) -> Sql:
    return Sql(schema)
