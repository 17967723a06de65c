"""The reference KV store, and the per-root budgets of handler writes."""

from __future__ import annotations

from dispatcher.sql.common import Statements


class KvSql(Statements):
    """The statements of :mod:`dispatcher.kv` and :mod:`dispatcher.runtime.kv_session`."""

    def __init__(self, schema: str) -> None:
        super().__init__(schema)
        s = self.quoted
        self.root_budget_add = f"""
            INSERT INTO {s}.root_budgets AS b (root_id, rows) VALUES ($1, $2)
            ON CONFLICT (root_id) DO UPDATE SET rows = b.rows + excluded.rows
            RETURNING rows"""
        self.root_budget_expire = f"""
            DELETE FROM {s}.root_budgets
            WHERE created_at < clock_timestamp() - make_interval(secs => $1)"""
        self.kv_get = f"""
            SELECT value, version FROM {s}.kv WHERE scope = $1 AND namespace = $2 AND key = $3"""
        # The value replaced comes back as ``old``. The row is read and locked before the
        # write: the insert's source joins ``prev``, so ``prev`` is read first (read after,
        # it would no longer see the row this statement changed). A key two transactions
        # create at once reports no old value to the one that waited.
        self.kv_put = f"""
            WITH prev AS MATERIALIZED (
                SELECT value FROM {s}.kv
                WHERE scope = $1 AND namespace = $2 AND key = $3
                FOR UPDATE
            ),
            up AS (
                INSERT INTO {s}.kv AS kv (scope, namespace, key, value)
                SELECT $1, $2, $3, $4::jsonb FROM (VALUES (1)) AS one(n) LEFT JOIN prev ON true
                ON CONFLICT (scope, namespace, key) DO UPDATE
                    SET value = excluded.value, version = kv.version + 1,
                        updated_at = clock_timestamp()
                RETURNING version
            )
            SELECT (SELECT version FROM up), (SELECT prev.value::text FROM prev) AS old"""
        self.kv_delete = f"""
            DELETE FROM {s}.kv WHERE scope = $1 AND namespace = $2 AND key = $3
            RETURNING version, value::text AS old"""
        self.kv_list = f"""
            SELECT key, value, version FROM {s}.kv
            WHERE scope = $1 AND namespace = $2 AND starts_with(key, $3)
            ORDER BY key LIMIT $4"""
