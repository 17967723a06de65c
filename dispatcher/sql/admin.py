"""Every statement of the operator surface: dead letters, abandoned executions, status.

Like :mod:`dispatcher.sql`, the schema name is validated and injected once, and every value
an operator types travels as a parameter, never as SQL text.

Dead-letter filters share one parameter layout, ``$1`` to ``$12`` (see :data:`FILTER_PARAMS`),
written as "``$n IS NULL OR column = $n``" pairs. asyncpg prepares each statement once per
connection; Postgres plans the first executions with the actual values, folding the ``IS
NULL`` tests away, so a given filter still uses the ``(scope, resolution, dead_lettered_at)``
index.
"""

from __future__ import annotations

from functools import cache

from dispatcher.names import DEFAULT_SCHEMA
from dispatcher.sql.common import Statements
from dispatcher.sql.flow import breakers_select, pauses_select

# Positional parameters of _FILTER, in order; admin.py builds its arguments from this list.
FILTER_PARAMS = (
    "scope",
    "trigger_name",
    "trigger_id",
    "reason",
    "resolution",
    "since_at",
    "since_ago",
    "older_at",
    "older_ago",
    "ids",
    "text",
    "scopes",
)

# "ago" bounds compare with the database clock. The uncorrelated sub-select is an init plan,
# computed once per statement: clock_timestamp() inline would be re-evaluated for every row
# and keep the planner from using an index on dead_lettered_at.
_FILTER = """
    ($1::text IS NULL OR d.scope = $1)
    AND ($2::text IS NULL OR d.trigger_name = $2)
    AND ($3::bigint IS NULL OR d.trigger_id = $3)
    AND ($4::text IS NULL OR d.reason = $4)
    AND ($5::text IS NULL OR d.resolution = $5)
    AND ($6::timestamptz IS NULL OR d.dead_lettered_at >= $6)
    AND ($7::interval IS NULL OR d.dead_lettered_at >= (SELECT clock_timestamp() - $7))
    AND ($8::timestamptz IS NULL OR d.dead_lettered_at < $8)
    AND ($9::interval IS NULL OR d.dead_lettered_at < (SELECT clock_timestamp() - $9))
    AND ($10::bigint[] IS NULL OR d.id = ANY ($10))
    AND ($11::text IS NULL OR d.errors::text ILIKE $11 OR d.payload::text ILIKE $11)
    AND ($12::text[] IS NULL OR d.scope = ANY ($12))
"""

# Resolutions an operator may still act on. "handler_failed" is not final: an operator may
# replay or discard it (another handler's later success does not lift it; see
# SettleSql.resolve_dead_letter_fenced).
ACTIONABLE = ("open", "handler_failed")
# Final resolutions: only these are ever purged.
FINAL = ("handled", "replayed", "discarded")

_ACTIONABLE_SQL = "('open', 'handler_failed')"
_FINAL_SQL = "('handled', 'replayed', 'discarded')"

# The latest error's message: entries are objects {attempt, kind, message, at}; a bare string
# entry (hand-written rows) is shown as it is.
_LAST_ERROR = "coalesce(d.errors -> -1 ->> 'message', d.errors ->> -1)"


class AdminSql(Statements):
    """The operator statements for one schema. Build with :func:`admin_queries`."""

    def __init__(self, schema: str) -> None:
        super().__init__(schema)
        s = self.quoted

        # --- dead letters: read ---
        # $13: row limit.
        self.list_dead_letters = f"""
            SELECT d.id, d.scope, d.trigger_id, d.trigger_name, d.reason, d.resolution,
                d.attempts, d.dead_lettered_at, d.resolved_at, d.replayed_as,
                {_LAST_ERROR} AS last_error
            FROM {s}.dead_letters d
            WHERE {_FILTER}
            ORDER BY d.id DESC
            LIMIT $13"""
        # jsonb columns come back as text whatever codecs the caller's connection has set,
        # so decoding is always ours. The replay's fate is read from where it can be: still
        # in the outbox, or dead-lettered again (both looked up through an index).
        self.get_dead_letter = f"""
            SELECT d.id, d.outbox_id, d.event_id, d.trigger_id, d.scope, d.trigger_name,
                d.target, d.registered_by, d.payload::text AS payload,
                d.policy::text AS policy, d.depth, d.attempts, d.reason,
                d.errors::text AS errors, d.resolution, d.resolution_note,
                d.handler_outcomes::text AS handler_outcomes, d.replayed_as,
                d.event_created_at, d.dead_lettered_at, d.resolved_at,
                EXISTS (
                    SELECT 1 FROM {s}.outbox o
                    WHERE o.event_id = d.replayed_as AND o.trigger_id = d.trigger_id
                ) AS replay_pending,
                (SELECT again.id FROM {s}.dead_letters again
                    WHERE again.trigger_id = d.trigger_id AND again.event_id = d.replayed_as
                    ORDER BY again.id LIMIT 1) AS replay_dead_letter_id
            FROM {s}.dead_letters d
            WHERE d.id = $1"""

        # Whether a trigger a filter names is known: registered, or named by a dead letter (a
        # deleted trigger's letters keep its id, scope and name). $1 id, $2 name, $3 scope;
        # NULL for any. Asked only when a filter naming a trigger selects nothing.
        self.trigger_known = f"""
            SELECT EXISTS (
                SELECT 1 FROM {s}.triggers t
                WHERE ($1::bigint IS NULL OR t.id = $1) AND ($2::text IS NULL OR t.name = $2)
                    AND ($3::text IS NULL OR t.scope = $3)
            ) OR EXISTS (
                SELECT 1 FROM {s}.dead_letters d
                WHERE ($1::bigint IS NULL OR d.trigger_id = $1)
                    AND ($2::text IS NULL OR d.trigger_name = $2)
                    AND ($3::text IS NULL OR d.scope = $3)
            )"""

        # --- dead letters: replay and discard ---
        # Lock what the action will change, oldest first ($13: limit, NULL for all). SKIP
        # LOCKED: a dead letter another replay or discard holds is left to it, so two
        # operators running the same command act on each letter once between them. Only the
        # dead letter is locked; the trigger is read for its current policy.
        self.lock_actionable = f"""
            SELECT d.id, d.trigger_id, d.scope, d.trigger_name, d.policy::text AS policy,
                t.id IS NOT NULL AS trigger_exists, t.retry_kind, t.retry_base_delay,
                t.retry_factor, t.retry_max_delay, t.retry_jitter, t.max_attempts,
                t.max_event_age, t.timeout, t.park_on
            FROM {s}.dead_letters d
            LEFT JOIN {s}.triggers t ON t.id = d.trigger_id
            WHERE {_FILTER}
                AND d.resolution IN {_ACTIONABLE_SQL}
            ORDER BY d.id
            LIMIT $13
            FOR UPDATE OF d SKIP LOCKED"""
        # For ids named explicitly: whether each exists, matches the rest of the filter, and
        # where its lifecycle is, so that a replay can say why it left one alone.
        self.explain_ids = f"""
            SELECT x.id, d.id IS NOT NULL AS found, d.resolution, d.replayed_as,
                coalesce({_FILTER}, false) AS matches
            FROM unnest($10::bigint[]) AS x(id)
            LEFT JOIN {s}.dead_letters d ON d.id = x.id
            ORDER BY x.id"""
        # The replay itself, one statement: mark each locked dead letter (compare-and-set on
        # its resolution), enqueue exactly the ones marked with a fresh attempt budget
        # (attempts, orphans, errors, due_at and created_at take their defaults: due now,
        # and max_event_age counts from now), and send one wake-up hint if anything was
        # enqueued. The snapshot columns (target, principal, payload, depth) are the dead
        # letter's; only the policy columns come from the plan.
        self.replay = f"""
            WITH p AS (
                SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::float8[],
                    $5::float8[], $6::float8[], $7::float8[], $8::int[], $9::float8[],
                    $10::float8[], $11::text[])
                    AS p(dead_letter_id, event_id, retry_kind, retry_base_delay,
                        retry_factor, retry_max_delay, retry_jitter, max_attempts,
                        max_event_age, timeout, park_on)
            ),
            marked AS (
                UPDATE {s}.dead_letters d
                SET resolution = 'replayed', replayed_as = p.event_id,
                    resolved_at = clock_timestamp()
                FROM p
                WHERE d.id = p.dead_letter_id AND d.resolution IN {_ACTIONABLE_SQL}
                RETURNING d.id, p.event_id, d.trigger_id, d.scope, d.trigger_name, d.target,
                    d.registered_by, d.payload, d.depth, p.retry_kind, p.retry_base_delay,
                    p.retry_factor, p.retry_max_delay, p.retry_jitter, p.max_attempts,
                    p.max_event_age, p.timeout,
                    ARRAY(SELECT jsonb_array_elements_text(p.park_on::jsonb)) AS park_on,
                    d.order_key, d.key_seq, d.traceparent
            ),
            -- A replayed head of an ordered trigger keeps its key and version, so it runs
            -- before the key's later rows; the block it caused is lifted.
            unblocked AS (
                DELETE FROM {s}.blocked_keys b USING marked
                WHERE b.dead_letter_id = marked.id
                RETURNING b.trigger_id
            ),
            ins AS (
                INSERT INTO {s}.outbox (event_id, trigger_id, scope, trigger_name, target,
                    registered_by, payload, depth, retry_kind, retry_base_delay,
                    retry_factor, retry_max_delay, retry_jitter, max_attempts, max_event_age,
                    timeout, park_on, order_key, key_seq, blocks_key, traceparent)
                SELECT event_id, trigger_id, scope, trigger_name, target, registered_by,
                    payload, depth, retry_kind, retry_base_delay, retry_factor,
                    retry_max_delay, retry_jitter, max_attempts, max_event_age, timeout,
                    park_on, order_key, key_seq,
                    CASE WHEN order_key IS NOT NULL THEN coalesce((
                        SELECT t.on_dead_letter = 'block' FROM {s}.triggers t
                        WHERE t.id = marked.trigger_id), true) END,
                    traceparent
                FROM marked
                ORDER BY id
                RETURNING event_id
            )
            SELECT (SELECT count(*) FROM marked) AS marked,
                (SELECT count(*) FROM ins) AS enqueued,
                (SELECT count(*) FROM unblocked) AS unblocked,
                (SELECT count(*) FROM (
                    SELECT pg_notify('{self.channel}', '') FROM ins LIMIT 1) AS w) AS notified"""
        # Discarding a blocking head lets its key's later rows run.
        self.discard = f"""
            WITH d AS (
                UPDATE {s}.dead_letters
                SET resolution = 'discarded', resolved_at = clock_timestamp()
                WHERE id = ANY ($1::bigint[]) AND resolution IN {_ACTIONABLE_SQL}
                RETURNING id
            ),
            unblocked AS (
                DELETE FROM {s}.blocked_keys b USING d WHERE b.dead_letter_id = d.id
            )
            SELECT id FROM d"""

        # --- dead letters: purge ---
        # Only final resolutions go; an open or handler_failed letter is never deleted. A
        # final row always has resolved_at, the coalesce only guards hand-edited rows.
        _purgeable = f"""
            d.resolution IN {_FINAL_SQL}
            AND coalesce(d.resolved_at, d.dead_lettered_at)
                < (SELECT clock_timestamp() - $1::interval)"""
        self.count_purgeable = f"SELECT count(*) FROM {s}.dead_letters d WHERE {_purgeable}"
        self.purge = f"""
            WITH gone AS (DELETE FROM {s}.dead_letters d WHERE {_purgeable} RETURNING d.id),
            -- A purged letter can no longer be replayed: a key it still blocked (a handled
            -- one) is unblocked with it.
            unblocked AS (
                DELETE FROM {s}.blocked_keys b USING gone WHERE b.dead_letter_id = gone.id
            )
            SELECT count(*) FROM gone"""

        # --- dead letters: the console's pages ---
        # One keyset page, newest first: $13/$14 the (dead_lettered_at, id) of the last row
        # of the previous page (NULL for the first), $15 the row limit. The row comparison is
        # an index condition on dead_letters_listing_idx and dead_letters_resolution_listing_idx
        # (migration 0013); with a scope or a trigger, dead_letters_scope_idx and
        # dead_letters_trigger_idx give the order and an incremental sort breaks ties by id.
        self.dead_letter_page = f"""
            SELECT d.id, d.scope, d.trigger_id, d.trigger_name, d.reason, d.resolution,
                d.attempts, d.dead_lettered_at, d.resolved_at, d.replayed_as,
                {_LAST_ERROR} AS last_error
            FROM {s}.dead_letters d
            WHERE {_FILTER}
                AND ($13::timestamptz IS NULL OR (d.dead_lettered_at, d.id) < ($13, $14::bigint))
            ORDER BY d.dead_lettered_at DESC, d.id DESC
            LIMIT $15"""
        # A page of a text search: the filter's other fields and the cursor select rows in
        # list order (an index scan, as above), at most $16 of them (the scan budget); the
        # text ($17, an ILIKE pattern) is tested on those, lazily: the scan stops at $15
        # matches. OFFSET 0 keeps the planner from merging the two levels, and so from
        # reading every row to sort the matches (jsonb to text costs ~10 us a row). Call
        # with $11 NULL.
        self.dead_letter_search_page = f"""
            SELECT d.id, d.scope, d.trigger_id, d.trigger_name, d.reason, d.resolution,
                d.attempts, d.dead_lettered_at, d.resolved_at, d.replayed_as,
                {_LAST_ERROR} AS last_error
            FROM (
                SELECT d.* FROM {s}.dead_letters d
                WHERE {_FILTER}
                    AND ($13::timestamptz IS NULL
                        OR (d.dead_lettered_at, d.id) < ($13, $14::bigint))
                ORDER BY d.dead_lettered_at DESC, d.id DESC
                LIMIT $16 OFFSET 0
            ) d
            WHERE d.errors::text ILIKE $17 OR d.payload::text ILIKE $17
            ORDER BY d.dead_lettered_at DESC, d.id DESC
            LIMIT $15"""
        # Where a search's scan budget ($15 rows) ends: the last row it may read, NULL
        # when the rows run out first. Reads the index only up to there. Call with $11 NULL.
        self.search_boundary = f"""
            SELECT d.dead_lettered_at, d.id FROM {s}.dead_letters d
            WHERE {_FILTER}
                AND ($13::timestamptz IS NULL OR (d.dead_lettered_at, d.id) < ($13, $14::bigint))
            ORDER BY d.dead_lettered_at DESC, d.id DESC
            OFFSET $15 - 1 LIMIT 1"""
        # What a bulk action would act on, by trigger: the dry-run preview an operator
        # confirms. Counts only (no lock): the action itself locks and re-checks each row.
        self.summarize_actionable = f"""
            SELECT d.scope, d.trigger_id, d.trigger_name, count(*) AS letters,
                count(*) FILTER (WHERE t.id IS NULL) AS trigger_gone,
                min(d.dead_lettered_at) AS oldest, max(d.dead_lettered_at) AS newest
            FROM {s}.dead_letters d
            LEFT JOIN {s}.triggers t ON t.id = d.trigger_id
            WHERE {_FILTER}
                AND d.resolution IN {_ACTIONABLE_SQL}
            GROUP BY d.scope, d.trigger_id, d.trigger_name
            ORDER BY letters DESC, d.trigger_id"""

        # --- the console's overview ---
        # Outbox rows by state for each trigger (the states of self.status), the busiest
        # first; $1 the scopes (NULL: all), $2 how many triggers.
        self.backlog_by_trigger = f"""
            WITH c AS MATERIALIZED (SELECT clock_timestamp() AS now)
            SELECT o.trigger_id, o.scope, o.trigger_name, count(*) AS total,
                count(*) FILTER (WHERE o.parked_at IS NULL
                    AND o.due_at <= (SELECT now FROM c)) AS due_now,
                count(*) FILTER (WHERE o.parked_at IS NULL
                    AND o.due_at > (SELECT now FROM c) AND o.lease_token IS NULL) AS scheduled,
                count(*) FILTER (WHERE o.parked_at IS NULL
                    AND o.due_at > (SELECT now FROM c) AND o.lease_token IS NOT NULL) AS leased,
                count(*) FILTER (WHERE o.parked_at IS NOT NULL) AS parked,
                extract(epoch FROM (SELECT now FROM c)
                    - min(o.due_at) FILTER (WHERE o.parked_at IS NULL
                        AND o.due_at <= (SELECT now FROM c)))::float8 AS oldest_due_seconds
            FROM {s}.outbox o
            WHERE $1::text[] IS NULL OR o.scope = ANY ($1)
            GROUP BY o.trigger_id, o.scope, o.trigger_name
            ORDER BY total DESC, o.trigger_id
            LIMIT $2"""
        # Dead letters opened in each of the last $2 hours of UTC (this one included),
        # oldest first; hours with none are left out. A range scan of dead_letters_listing_idx.
        self.dead_letters_per_hour = f"""
            SELECT date_trunc('hour', d.dead_lettered_at, 'UTC') AS hour, count(*) AS letters
            FROM {s}.dead_letters d
            WHERE d.dead_lettered_at >= (SELECT date_trunc('hour', clock_timestamp(), 'UTC')
                    - make_interval(hours => $2 - 1))
                AND ($1::text[] IS NULL OR d.scope = ANY ($1))
            GROUP BY 1
            ORDER BY 1"""
        # The counts the console refreshes live, for the scopes $1 (NULL: all).
        self.console_counts = f"""
            WITH c AS MATERIALIZED (SELECT clock_timestamp() AS now)
            SELECT c.now,
                (SELECT count(*) FROM {s}.outbox o WHERE o.parked_at IS NULL
                    AND o.due_at <= c.now AND ($1::text[] IS NULL OR o.scope = ANY ($1)))
                    AS due_now,
                (SELECT count(*) FROM {s}.outbox o WHERE o.parked_at IS NOT NULL
                    AND ($1::text[] IS NULL OR o.scope = ANY ($1))) AS parked,
                (SELECT count(*) FROM {s}.dead_letters d WHERE d.resolution = 'open'
                    AND ($1::text[] IS NULL OR d.scope = ANY ($1))) AS open,
                (SELECT count(*) FROM {s}.dead_letters d WHERE d.resolution = 'handler_failed'
                    AND ($1::text[] IS NULL OR d.scope = ANY ($1))) AS handler_failed,
                (SELECT count(*) FROM {s}.abandoned_executions a
                    WHERE $1::text[] IS NULL OR a.scope = ANY ($1)) AS abandoned
            FROM c"""

        # --- the audit log (migration 0013) ---
        self.audit = f"""
            INSERT INTO {s}.audit_log (actor, action, scope, target, filter, count, detail)
            VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7::jsonb)
            RETURNING id, at"""
        # Newest first, before id $1 (NULL: from the newest); $2 scopes (NULL: every row;
        # else rows of those scopes only), $3 limit.
        self.list_audit = f"""
            SELECT a.id, a.at, a.actor, a.action, a.scope, a.target, a.filter::text AS filter,
                a.count, a.detail::text AS detail
            FROM {s}.audit_log a
            WHERE ($1::bigint IS NULL OR a.id < $1)
                AND ($2::text[] IS NULL OR a.scope = ANY ($2))
            ORDER BY a.id DESC
            LIMIT $3"""

        # --- abandoned executions ---
        self.list_abandoned = f"""
            SELECT a.id, a.reply_to, a.event_id, a.trigger_id, a.scope, a.target, a.status,
                a.outcome, a.result::text AS result, a.error, a.created_at
            FROM {s}.abandoned_executions a
            WHERE ($1::text IS NULL OR a.scope = $1)
                AND ($2::timestamptz IS NULL OR a.created_at >= $2)
                AND ($3::interval IS NULL OR a.created_at >= (SELECT clock_timestamp() - $3))
            ORDER BY a.id DESC
            LIMIT $4"""

        # --- status ---
        # One statement, so every number, pause and breaker comes from the same snapshot and
        # the same instant of the database clock. A claimed row's due_at is its lease
        # expiry: a future due_at with a lease token is a live claim, a past one is
        # claimable again (counted due). A parked row sits at due_at = 'infinity' until
        # un-parked; it is counted as parked only, so the four states partition the outbox.
        # Pauses and breakers are selected as FlowSql.list_pauses and list_breakers select
        # them; arrays of anonymous rows come back as tuples.
        # $1: how many triggers to list by backlog.
        self.status = f"""
            WITH c AS MATERIALIZED (SELECT clock_timestamp() AS now),
            ob AS (
                SELECT
                    count(*) FILTER (WHERE o.parked_at IS NULL
                        AND o.due_at <= (SELECT now FROM c)) AS due_now,
                    count(*) FILTER (WHERE o.parked_at IS NULL
                        AND o.due_at > (SELECT now FROM c) AND o.lease_token IS NULL)
                        AS scheduled,
                    count(*) FILTER (WHERE o.parked_at IS NULL
                        AND o.due_at > (SELECT now FROM c) AND o.lease_token IS NOT NULL)
                        AS leased,
                    count(*) FILTER (WHERE o.parked_at IS NOT NULL) AS parked,
                    extract(epoch FROM (SELECT now FROM c)
                        - min(o.due_at) FILTER (WHERE o.parked_at IS NULL
                            AND o.due_at <= (SELECT now FROM c))
                    )::float8 AS oldest_due_seconds
                FROM {s}.outbox o
            ),
            top AS (
                SELECT o.trigger_id, o.scope, o.trigger_name, count(*) AS total,
                    count(*) FILTER (WHERE o.parked_at IS NULL
                        AND o.due_at <= (SELECT now FROM c)) AS due_now,
                    count(*) FILTER (WHERE o.parked_at IS NOT NULL) AS parked
                FROM {s}.outbox o
                GROUP BY o.trigger_id, o.scope, o.trigger_name
                ORDER BY total DESC, o.trigger_id
                LIMIT $1
            ),
            pz AS ({pauses_select(s)}),
            bk AS ({breakers_select(s)}),
            by_resolution AS (
                SELECT resolution, count(*) AS n FROM {s}.dead_letters GROUP BY resolution
            ),
            by_reason AS (
                SELECT reason, count(*) AS n FROM {s}.dead_letters
                WHERE resolution IN {_ACTIONABLE_SQL}
                GROUP BY reason
            )
            SELECT c.now, ob.due_now, ob.scheduled, ob.leased, ob.parked,
                ob.oldest_due_seconds,
                (SELECT coalesce(array_agg(resolution ORDER BY resolution), '{{}}')
                    FROM by_resolution) AS resolutions,
                (SELECT coalesce(array_agg(n ORDER BY resolution), '{{}}')
                    FROM by_resolution) AS resolution_counts,
                (SELECT coalesce(array_agg(reason ORDER BY reason), '{{}}')
                    FROM by_reason) AS reasons,
                (SELECT coalesce(array_agg(n ORDER BY reason), '{{}}')
                    FROM by_reason) AS reason_counts,
                (SELECT coalesce(array_agg(trigger_id ORDER BY total DESC, trigger_id), '{{}}')
                    FROM top) AS top_trigger_ids,
                (SELECT coalesce(array_agg(scope ORDER BY total DESC, trigger_id), '{{}}')
                    FROM top) AS top_scopes,
                (SELECT coalesce(array_agg(trigger_name ORDER BY total DESC, trigger_id),
                    '{{}}') FROM top) AS top_names,
                (SELECT coalesce(array_agg(total ORDER BY total DESC, trigger_id), '{{}}')
                    FROM top) AS top_totals,
                (SELECT coalesce(array_agg(due_now ORDER BY total DESC, trigger_id), '{{}}')
                    FROM top) AS top_due,
                (SELECT coalesce(array_agg(parked ORDER BY total DESC, trigger_id), '{{}}')
                    FROM top) AS top_parked,
                (SELECT count(*) FROM {s}.abandoned_executions) AS abandoned,
                (SELECT count(*) FROM {s}.blocked_keys) AS blocked_keys,
                (SELECT coalesce(array_agg(
                    ROW(id, scope, trigger_id, trigger_name, note, paused_at)
                    ORDER BY paused_at, id), '{{}}') FROM pz) AS pauses,
                (SELECT coalesce(array_agg(
                    ROW(trigger_id, scope, trigger_name, state, failures, open_until, probe_id,
                        opened_count, updated_at, held_until)
                    ORDER BY updated_at DESC, trigger_id), '{{}}') FROM bk) AS breakers
            FROM c, ob"""


@cache
def admin_queries(schema: str = DEFAULT_SCHEMA) -> AdminSql:
    """The cached :class:`AdminSql` for ``schema``.

    >>> admin_queries("dispatcher").channel
    'dispatcher_wake'
    """
    return AdminSql(schema)
