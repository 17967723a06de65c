"""Flow control: pauses, parked rows, circuit breakers and backlog caps, as operators and the
runtime see them."""

from __future__ import annotations

from dispatcher.sql.common import Statements


def pauses_select(s: str) -> str:
    """Every pause, with its trigger's name (``s``: the quoted schema)."""
    return f"""
            SELECT p.id, p.scope, p.trigger_id, t.name AS trigger_name, p.note, p.paused_at
            FROM {s}.pauses p LEFT JOIN {s}.triggers t ON t.id = p.trigger_id"""


def breakers_select(s: str) -> str:
    """Every breaker that is not plainly closed (open, half-open, counting failures, or
    holding its trigger for a rate limit), with its trigger's scope and name."""
    return f"""
            SELECT b.trigger_id, t.scope, t.name AS trigger_name, b.state, b.failures,
                b.open_until, b.probe_id, b.opened_count, b.updated_at,
                CASE WHEN b.held_until > clock_timestamp() THEN b.held_until END
                    AS held_until
            FROM {s}.breakers b LEFT JOIN {s}.triggers t ON t.id = b.trigger_id
            WHERE b.state <> 'closed' OR b.failures > 0
                OR b.held_until > clock_timestamp()"""


# A backlog cap as operators read it (dispatcher.flow.BacklogCap).
BACKLOG_CAP_COLUMNS = "scope, max_pending, pending, counted_at, recount_interval, updated_at"


def backlog_caps_select(s: str) -> str:
    """Every backlog cap, by scope (``s``: the quoted schema)."""
    return f"SELECT {BACKLOG_CAP_COLUMNS} FROM {s}.backlog_caps"


class FlowSql(Statements):
    """The statements of :mod:`dispatcher.flow`."""

    def __init__(self, schema: str) -> None:
        super().__init__(schema)
        s = self.quoted
        self.pause = f"""
            INSERT INTO {s}.pauses (scope, trigger_id, note) VALUES ($1, $2, $3)
            ON CONFLICT ((coalesce(scope, '')), (coalesce(trigger_id, 0)))
                DO UPDATE SET note = excluded.note
            RETURNING id, scope, trigger_id, note, paused_at"""
        self.resume = f"""
            WITH d AS (
                DELETE FROM {s}.pauses
                WHERE coalesce(scope, '') = coalesce($1, '')
                    AND coalesce(trigger_id, 0) = coalesce($2, 0)
                RETURNING id
            )
            SELECT (SELECT count(*) FROM d) AS resumed,
                (SELECT count(*) FROM (
                    SELECT pg_notify('{self.channel}', '') FROM d LIMIT 1) AS w) AS notified"""
        self.list_pauses = f"{pauses_select(s)} ORDER BY p.paused_at"
        self.list_parked = f"""
            SELECT id, event_id, trigger_id, scope, trigger_name, attempts, parked_at,
                parked_reason, errors -> -1 AS last_error
            FROM {s}.outbox
            WHERE parked_at IS NOT NULL
                AND ($1::bigint IS NULL OR trigger_id = $1)
                AND ($2::text IS NULL OR scope = $2)
            ORDER BY id LIMIT $3"""
        self.count_parked = f"""
            SELECT trigger_id, scope, trigger_name, parked_reason, count(*) AS rows
            FROM {s}.outbox WHERE parked_at IS NOT NULL
            GROUP BY 1, 2, 3, 4 ORDER BY rows DESC"""
        self.unpark = f"""
            WITH u AS (
                UPDATE {s}.outbox o
                SET due_at = clock_timestamp(), parked_at = NULL, parked_reason = NULL
                WHERE o.id IN (
                    SELECT id FROM {s}.outbox
                    WHERE parked_at IS NOT NULL
                        AND ($1::bigint IS NULL OR trigger_id = $1)
                        AND ($2::text IS NULL OR scope = $2)
                    ORDER BY id LIMIT $3
                    FOR UPDATE SKIP LOCKED)
                RETURNING o.id
            )
            SELECT (SELECT count(*) FROM u) AS unparked,
                (SELECT count(*) FROM (
                    SELECT pg_notify('{self.channel}', '') FROM u LIMIT 1) AS w) AS notified"""
        self.list_breakers = f"{breakers_select(s)} ORDER BY b.updated_at DESC"
        # Keys of ordered triggers held by a dead letter ($1 trigger id, $2 scope, $3 limit),
        # oldest first, with how many rows wait behind each.
        self.list_blocked_keys = f"""
            SELECT b.trigger_id, b.order_key, b.scope, b.trigger_name, b.dead_letter_id,
                b.key_seq, b.blocked_at, d.reason, d.resolution,
                (SELECT count(*) FROM {s}.outbox o
                 WHERE o.trigger_id = b.trigger_id AND o.order_key = b.order_key) AS waiting
            FROM {s}.blocked_keys b LEFT JOIN {s}.dead_letters d ON d.id = b.dead_letter_id
            WHERE ($1::bigint IS NULL OR b.trigger_id = $1)
                AND ($2::text IS NULL OR b.scope = $2)
            ORDER BY b.blocked_at, b.trigger_id, b.order_key
            LIMIT $3"""
        self.count_blocked_keys = f"SELECT count(*) FROM {s}.blocked_keys"
        # Skip a blocked key's dead head ($1 trigger id, $2 key; $2 NULL: every key of the
        # trigger): the dead letter stays as it is, the key's later rows run (the trigger
        # blocked_keys_lifted of migration 0014 makes the next one due, with a wake-up).
        self.unblock_keys = f"""
            WITH u AS (
                DELETE FROM {s}.blocked_keys
                WHERE trigger_id = $1 AND ($2::text IS NULL OR order_key = $2)
                RETURNING order_key
            )
            SELECT (SELECT count(*) FROM u) AS unblocked"""
        # What `unpark` would take ($1 trigger id, $2 scope, $3 limit; the same selection as
        # ``unpark``), for a dry run. No FOR UPDATE: a dry run must not hold rows a
        # dispatcher's sibling-success un-park would then skip.
        self.count_unparkable = f"""
            SELECT count(*) FROM (
                SELECT 1 FROM {s}.outbox
                WHERE parked_at IS NOT NULL
                    AND ($1::bigint IS NULL OR trigger_id = $1)
                    AND ($2::text IS NULL OR scope = $2)
                ORDER BY id LIMIT $3) AS x"""

        # Close a breaker by hand ($1: trigger id) and release the rows it held. Opening a
        # breaker moved the trigger's waiting rows to due_at = open_until
        # (SettleSql.hold_behind_breaker); left there they would wait out the cool-down anyway.
        # Rows due later than that (retries backing off) keep their time; claimed and parked
        # rows are not touched. All CTEs see one snapshot: `old` reads (and locks) the
        # breaker as it was before the reset.
        self.reset_breaker = f"""
            WITH old AS (
                SELECT trigger_id, open_until FROM {s}.breakers WHERE trigger_id = $1
                FOR UPDATE
            ),
            reset AS (
                UPDATE {s}.breakers b
                SET state = 'closed', failures = 0, probe_id = NULL, open_until = NULL,
                    updated_at = clock_timestamp()
                FROM old
                WHERE b.trigger_id = old.trigger_id
                RETURNING b.trigger_id
            ),
            released AS (
                UPDATE {s}.outbox o
                SET due_at = clock_timestamp()
                FROM old
                WHERE o.trigger_id = old.trigger_id AND o.due_at = old.open_until
                    AND o.lease_token IS NULL AND o.parked_at IS NULL
                RETURNING o.id
            )
            SELECT (SELECT count(*) FROM reset) AS reset,
                (SELECT count(*) FROM released) AS released,
                (SELECT count(*) FROM (
                    SELECT pg_notify('{self.channel}', '') FROM released LIMIT 1) AS w)
                    AS notified"""

        # --- backlog caps (migration 0010; the emit functions check them) ---
        # Set or change a scope's cap ($1 scope, $2 max_pending, $3 recount_interval), its
        # pending rows counted now. Waits for an emit that is counting the scope (it holds
        # the cap's row until its transaction ends).
        self.set_backlog_cap = f"""
            INSERT INTO {s}.backlog_caps AS c
                (scope, max_pending, recount_interval, pending, counted_at)
            VALUES ($1, $2, $3, (SELECT count(*) FROM {s}.outbox o WHERE o.scope = $1),
                clock_timestamp())
            ON CONFLICT (scope) DO UPDATE
                SET max_pending = excluded.max_pending,
                    recount_interval = excluded.recount_interval,
                    pending = excluded.pending, counted_at = excluded.counted_at,
                    updated_at = clock_timestamp()
            RETURNING {BACKLOG_CAP_COLUMNS}"""
        self.remove_backlog_cap = f"DELETE FROM {s}.backlog_caps WHERE scope = $1 RETURNING scope"
        self.list_backlog_caps = f"{backlog_caps_select(s)} ORDER BY scope"
        # The dispatchers' count of the capped scopes whose count is due, in one scan of the
        # outbox: after they settle rows, the only way a full scope's count goes down without
        # an operator (an emit refused for it counts nothing, its transaction being aborted).
        # A cap an emit is counting is locked by it, and skipped. Nothing is read from the
        # outbox when no count is due: ``counted`` is only read for a row being updated.
        self.recount_backlog_caps = f"""
            WITH due AS MATERIALIZED (
                SELECT b.scope FROM {s}.backlog_caps b
                WHERE b.counted_at IS NULL
                    OR b.counted_at <= clock_timestamp() - b.recount_interval * interval '1 second'
                FOR NO KEY UPDATE SKIP LOCKED
            ),
            counted AS MATERIALIZED (
                SELECT o.scope, count(*) AS n FROM {s}.outbox o
                WHERE o.scope IN (SELECT due.scope FROM due)
                GROUP BY o.scope
            )
            UPDATE {s}.backlog_caps c
            SET pending = coalesce(
                    (SELECT counted.n FROM counted WHERE counted.scope = c.scope), 0),
                counted_at = clock_timestamp()
            FROM due WHERE c.scope = due.scope"""
