"""Every SQL statement the library runs, in one place, with the schema name injected once.

Statements take parameters only; no user text is ever spliced into SQL. The schema name is
validated as an identifier before it is quoted in.
"""

from __future__ import annotations

from functools import cache

from dispatcher.names import DEFAULT_SCHEMA, check_schema_name

# The trigger columns snapshotted into every outbox row (editing a trigger never changes
# rows in flight).
POLICY_COLUMNS = (
    "retry_kind",
    "retry_base_delay",
    "retry_factor",
    "retry_max_delay",
    "retry_jitter",
    "max_attempts",
    "max_event_age",
    "timeout",
    "park_on",
)
_POLICY = ", ".join(POLICY_COLUMNS)
_T_POLICY = ", ".join(f"t.{c}" for c in POLICY_COLUMNS)
_SNAPSHOT = f"trigger_id, scope, trigger_name, target, registered_by, {_POLICY}"

# What a claim returns (the row as routing and execution see it); ``o`` is the outbox row.
_CLAIMED = f"""o.id, o.lease_token, o.event_id, o.trigger_id, o.scope, o.trigger_name,
                o.target, o.registered_by, o.payload, o.attempts, o.orphans, o.depth,
                o.reply_to, o.reply_owner, o.dead_letter_id, {_POLICY},
                extract(epoch FROM clock_timestamp() - o.created_at)::float8 AS age"""


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
                $18, $19, $20, $21
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

        # --- emit ---
        # Fan-out is defined once, by the emit functions in the schema (migration 0007):
        # matching, the all-or-nothing fan-out cap, the policy snapshot, the payload and the
        # wake-up hint, sent when $10 says so. The emitter debounces hints across
        # transactions (Postgres folds a transaction's identical notifications into one),
        # because a notifying commit holds a database-wide lock until its WAL flush, which
        # serialises concurrent producers. Bulk: one round trip for any number of mutations.
        self.emit = f"""
            SELECT over_ordinal, over_matched, matched, outbox_ids, event_ids, trigger_ids
            FROM {s}.emit_many($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                $6::jsonb[], $7::int[], $8::uuid[], $9::int, $10::bool)"""

        # --- runtime: claim ---
        # Every eligibility predicate sits inside the locking CTE: a filter applied after
        # FOR UPDATE SKIP LOCKED would lock rows it then throws away. MATERIALIZED keeps the
        # planner from inlining the CTE into the UPDATE, which could re-evaluate LIMIT and
        # lock more rows than asked for. A claimed row's due_at becomes its lease expiry, so
        # the same index finds new rows and expired leases; the lease token tells them
        # apart (a non-null token on a due row means the previous claim was orphaned).
        self.claim = f"""
            WITH tick AS (
                -- A breaker whose cool-down is over lets one probe row through (half-open).
                -- Driven from the tiny breakers table: the outbox is only looked at for the
                -- open breakers whose time is up, one index probe each.
                UPDATE {s}.breakers b
                SET state = 'half_open', probe_id = c.probe, updated_at = clock_timestamp()
                FROM (
                    SELECT r.trigger_id,
                        (SELECT p.id FROM {s}.outbox p
                         WHERE p.trigger_id = r.trigger_id AND p.parked_at IS NULL
                         ORDER BY p.due_at LIMIT 1) AS probe
                    FROM {s}.breakers r
                    WHERE r.state = 'open' AND r.open_until <= clock_timestamp()
                ) AS c
                WHERE b.trigger_id = c.trigger_id AND c.probe IS NOT NULL
                RETURNING b.trigger_id
            ),
            -- Pauses and breakers, folded once per claim into a few small arrays: the
            -- predicates below then stay plain per-row filters on the index scan, which
            -- keeps "index range scan, stop after LIMIT rows" as the plan (NOT EXISTS would
            -- be planned as anti-joins over every due row, then a sort).
            held AS MATERIALIZED (
                SELECT
                    EXISTS (SELECT 1 FROM {s}.pauses
                            WHERE scope IS NULL AND trigger_id IS NULL) AS everything,
                    ARRAY(SELECT scope FROM {s}.pauses WHERE scope IS NOT NULL) AS scopes,
                    ARRAY(SELECT trigger_id FROM {s}.pauses
                          WHERE trigger_id IS NOT NULL
                          UNION ALL
                          SELECT trigger_id FROM {s}.breakers WHERE state <> 'closed')
                        AS triggers,
                    ARRAY(SELECT probe_id FROM {s}.breakers
                          WHERE state = 'half_open' AND probe_id IS NOT NULL) AS probes
            ),
            due AS MATERIALIZED (
                -- statement_timestamp() is the database clock and, unlike clock_timestamp(),
                -- stable, so it can bound the index range scan.
                SELECT id FROM {s}.outbox o
                WHERE due_at <= statement_timestamp()
                    AND (reply_owner IS NULL OR reply_owner = $3
                         OR reply_deadline < statement_timestamp())
                    AND NOT (SELECT everything FROM held)
                    -- "|| ''" and "+ 0" hide the columns' statistics from the planner: with
                    -- one dominant scope or trigger, "<> ALL (…)" would be estimated to
                    -- match almost nothing, and it would seq-scan and sort every due row.
                    AND (o.scope || '') <> ALL ((SELECT scopes FROM held)::text[])
                    AND ((o.trigger_id + 0) <> ALL ((SELECT triggers FROM held)::bigint[])
                         OR o.id = ANY ((SELECT probes FROM held)::bigint[]))
                ORDER BY due_at
                LIMIT $1
                FOR UPDATE SKIP LOCKED
            )
            UPDATE {s}.outbox o
            SET lease_token = $2,
                orphans = o.orphans + (o.lease_token IS NOT NULL)::int,
                due_at = clock_timestamp() + make_interval(secs => o.timeout + $4)
            FROM due
            WHERE o.id = due.id
            RETURNING {_CLAIMED}"""

        # --- runtime: settle (every write fenced by id AND lease token) ---
        self.delete_fenced = f"""
            DELETE FROM {s}.outbox o
            USING unnest($1::bigint[], $2::uuid[]) AS f(id, token)
            WHERE o.id = f.id AND o.lease_token = f.token
            RETURNING o.id"""
        # Rows stopped by the depth limit: out of the outbox, into depth_cutoffs (never a
        # dead letter, but an operator can count and find them), in one statement.
        self.skip_depth_fenced = f"""
            WITH d AS (
                DELETE FROM {s}.outbox o
                USING unnest($1::bigint[], $2::uuid[], $3::int[]) AS f(id, token, max_depth)
                WHERE o.id = f.id AND o.lease_token = f.token
                RETURNING o.*, f.max_depth
            )
            INSERT INTO {s}.depth_cutoffs (outbox_id, event_id, trigger_id, scope,
                trigger_name, target, namespace, key, root, depth, max_depth)
            SELECT id, event_id, trigger_id, scope, trigger_name, target,
                payload ->> 'namespace', payload ->> 'key', payload ->> 'root', depth,
                max_depth
            FROM d
            RETURNING outbox_id AS id"""
        self.depth_cutoffs_expire = f"""
            DELETE FROM {s}.depth_cutoffs
            WHERE cut_at < clock_timestamp() - make_interval(secs => $1)"""
        # Outcomes someone is told about (a sync reply, a dead letter, a dead letter's
        # resolution) are written with a synchronous commit, whatever the session's
        # setting: the commit returns once its WAL is flushed, and with it every earlier
        # commit's (the handler's KV writes behind a reply included: WAL is one sequence).
        self.durable_commit = "SET LOCAL synchronous_commit = on"

        # Async successes: delete, close the trigger's breaker if it was counting failures or
        # open, and un-park a bounded batch of the trigger's parked rows (a success shows
        # the cause of parking is gone).
        self.complete_fenced = f"""
            WITH d AS (
                DELETE FROM {s}.outbox o
                USING unnest($1::bigint[], $2::uuid[]) AS f(id, token)
                WHERE o.id = f.id AND o.lease_token = f.token
                RETURNING o.id, o.trigger_id
            ),
            t AS (SELECT DISTINCT trigger_id FROM d),
            unparked AS (
                UPDATE {s}.outbox o
                SET due_at = clock_timestamp(), parked_at = NULL, parked_reason = NULL
                WHERE o.id IN (
                    SELECT p.id FROM t CROSS JOIN LATERAL (
                        SELECT id FROM {s}.outbox q
                        WHERE q.trigger_id = t.trigger_id AND q.parked_at IS NOT NULL
                        ORDER BY id LIMIT $3) AS p)
                RETURNING o.id
            ),
            closed AS (
                UPDATE {s}.breakers b
                SET state = 'closed', failures = 0, probe_id = NULL, open_until = NULL,
                    updated_at = clock_timestamp()
                WHERE b.trigger_id IN (SELECT trigger_id FROM t)
                    AND (b.failures > 0 OR b.state <> 'closed')
                RETURNING b.trigger_id
            ),
            was AS (
                SELECT trigger_id, state, open_until FROM {s}.breakers
                WHERE trigger_id IN (SELECT trigger_id FROM closed) AND state <> 'closed'
            ),
            -- Rows the breaker had moved to its reopen time run now that it is closed.
            freed AS (
                UPDATE {s}.outbox o SET due_at = clock_timestamp()
                FROM was
                WHERE o.trigger_id = was.trigger_id AND o.due_at = was.open_until
                    AND o.lease_token IS NULL AND o.parked_at IS NULL
                RETURNING o.id
            )
            SELECT (SELECT coalesce(array_agg(id), '{{}}') FROM d) AS deleted,
                (SELECT count(*) FROM unparked) AS unparked,
                (SELECT count(*) FROM freed) AS freed,
                (SELECT coalesce(array_agg(trigger_id), '{{}}') FROM was) AS breakers_closed,
                (SELECT count(*) FROM (
                    SELECT pg_notify('{self.channel}', '') FROM unparked LIMIT 1) AS w)
                    AS notified"""
        # Counted failures per trigger: open the breaker at the threshold (or at once from
        # half-open: the probe failed). One upsert per trigger; returns the triggers whose
        # breaker opened with this statement.
        self.breaker_failures = f"""
            WITH f AS (
                SELECT * FROM unnest($1::bigint[], $2::int[]) AS f(trigger_id, n)
            )
            INSERT INTO {s}.breakers AS b (trigger_id, failures, state, open_until,
                opened_at, opened_count)
            -- failures carries n even when opening: ON CONFLICT sees it as
            -- excluded.failures, the count to add.
            SELECT trigger_id, n,
                CASE WHEN n >= $3 THEN 'open' ELSE 'closed' END,
                CASE WHEN n >= $3 THEN clock_timestamp() + make_interval(secs => $4) END,
                CASE WHEN n >= $3 THEN now() END,
                (n >= $3)::int
            FROM f
            ON CONFLICT (trigger_id) DO UPDATE SET
                failures = CASE
                    WHEN b.state = 'half_open'
                        OR (b.state = 'closed' AND b.failures + excluded.failures >= $3)
                    THEN 0 ELSE b.failures + excluded.failures END,
                state = CASE
                    WHEN b.state = 'half_open'
                        OR (b.state = 'closed' AND b.failures + excluded.failures >= $3)
                    THEN 'open' ELSE b.state END,
                open_until = CASE
                    WHEN b.state = 'half_open'
                        OR (b.state = 'closed' AND b.failures + excluded.failures >= $3)
                    THEN clock_timestamp() + make_interval(secs => $4)
                    ELSE b.open_until END,
                opened_at = CASE
                    WHEN b.state = 'half_open'
                        OR (b.state = 'closed' AND b.failures + excluded.failures >= $3)
                    THEN now() ELSE b.opened_at END,
                probe_id = CASE
                    WHEN b.state = 'half_open'
                        OR (b.state = 'closed' AND b.failures + excluded.failures >= $3)
                    THEN NULL ELSE b.probe_id END,
                opened_count = b.opened_count + (
                    b.state = 'half_open'
                    OR (b.state = 'closed' AND b.failures + excluded.failures >= $3))::int,
                updated_at = clock_timestamp()
            -- b.* above is the latest committed row (ON CONFLICT waits for a concurrent
            -- writer and re-reads), so only the transaction that made the transition sees
            -- its own now() in opened_at: a breaker opened by two processes at once is
            -- counted once.
            RETURNING b.trigger_id, b.open_until, b.state = 'open' AND b.opened_at = now()
                AS just_opened, b.state = 'open' AS is_open"""
        # Move an open breaker's waiting rows to its reopen time, so claims do not scan past
        # them while it is open: when it opens, and again when rows that were running at
        # that moment come back as failures (they were leased, so the first move left them).
        self.hold_behind_breaker = f"""
            UPDATE {s}.outbox o SET due_at = b.open_until
            FROM {s}.breakers b
            WHERE b.trigger_id = ANY($1::bigint[]) AND b.state = 'open'
                AND o.trigger_id = b.trigger_id AND o.lease_token IS NULL
                AND o.parked_at IS NULL AND o.due_at < b.open_until"""
        # Rows kept in the outbox, lease cleared, in one statement whatever the mix: retries,
        # no-attempt reschedules and lease releases come due after f.delay with f.attempts;
        # parks (f.park: the failure kind) leave the claim index's way (due_at = infinity)
        # with their attempts (f.attempts is null) until un-parked. The error history is
        # bounded: past $7 entries the oldest is dropped.
        self.reschedule_fenced = f"""
            UPDATE {s}.outbox o
            SET due_at = CASE WHEN f.park IS NULL
                    THEN clock_timestamp() + make_interval(secs => f.delay)
                    ELSE 'infinity' END,
                attempts = coalesce(f.attempts, o.attempts),
                lease_token = NULL,
                parked_at = CASE WHEN f.park IS NULL THEN o.parked_at
                    ELSE clock_timestamp() END,
                parked_reason = coalesce(f.park, o.parked_reason),
                errors = CASE
                    WHEN f.error IS NULL THEN o.errors
                    WHEN jsonb_array_length(o.errors) >= $7
                        THEN (o.errors - 0) || jsonb_build_array(
                            f.error::jsonb || jsonb_build_object('at', clock_timestamp()))
                    ELSE o.errors || jsonb_build_array(
                        f.error::jsonb || jsonb_build_object('at', clock_timestamp()))
                END
            FROM unnest($1::bigint[], $2::uuid[], $3::float8[], $4::int[], $5::text[],
                $6::text[]) AS f(id, token, delay, attempts, park, error)
            WHERE o.id = f.id AND o.lease_token = f.token
            RETURNING o.id"""
        # Outbox row -> dead letter, and the scope's matching dead-letter handlers enqueued,
        # in one statement (so one transaction): a crash can never leave a row both in the
        # outbox and in dead_letters, nor a dead letter whose handlers were not enqueued.
        self.dead_letter_fenced = f"""
            WITH f AS (
                SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::int[],
                    $5::text[], $6::text[]) AS f(id, token, reason, attempts, error, payload)
            ),
            moved AS (
                DELETE FROM {s}.outbox o USING f
                WHERE o.id = f.id AND o.lease_token = f.token
                RETURNING o.*, f.reason AS dl_reason, f.attempts AS dl_attempts,
                    f.error AS dl_error, f.payload AS dl_payload
            ),
            dl AS (
                INSERT INTO {s}.dead_letters (outbox_id, event_id, trigger_id, scope,
                    trigger_name, target, registered_by, payload, policy, depth, attempts,
                    reason, errors, event_created_at)
                -- dl_payload: the payload with secrets redacted, when redaction is on.
                SELECT id, event_id, trigger_id, scope, trigger_name, target, registered_by,
                    coalesce(dl_payload::jsonb, payload),
                    jsonb_build_object('kind', retry_kind, 'base_delay', retry_base_delay,
                        'factor', retry_factor, 'max_delay', retry_max_delay,
                        'jitter', retry_jitter, 'max_attempts', max_attempts,
                        'max_event_age', max_event_age, 'timeout', timeout,
                        'park_on', to_jsonb(park_on)),
                    depth, dl_attempts, dl_reason,
                    CASE WHEN dl_error IS NULL THEN errors
                        ELSE errors || jsonb_build_array(dl_error::jsonb
                            || jsonb_build_object('at', clock_timestamp()))
                    END,
                    created_at
                FROM moved
                RETURNING id, outbox_id, scope, trigger_id, trigger_name, payload, depth,
                    reason, attempts, errors
            ),
            handlers AS (
                INSERT INTO {s}.outbox (event_id, payload, depth, dead_letter_id, {_SNAPSHOT})
                SELECT gen_random_uuid(),
                    jsonb_build_object('dead_letter_id', dl.id, 'trigger', dl.trigger_name,
                        'trigger_id', dl.trigger_id, 'reason', dl.reason,
                        'attempts', dl.attempts, 'errors', dl.errors, 'event', dl.payload),
                    dl.depth, dl.id, t.id, t.scope, t.name, t.target, t.registered_by,
                    {_T_POLICY}
                FROM dl JOIN {s}.triggers t
                    ON t.scope = dl.scope
                    AND t.is_dead_letter_handler
                    AND t.enabled
                    AND t.namespace = dl.payload ->> 'namespace'
                    AND CASE t.pattern_kind
                        WHEN 'exact' THEN t.match_prefix = dl.payload ->> 'key'
                        WHEN 'prefix' THEN starts_with(dl.payload ->> 'key', t.match_prefix)
                        ELSE (dl.payload ->> 'key') LIKE t.match_like ESCAPE '\\'
                    END
                RETURNING id
            )
            SELECT (SELECT coalesce(array_agg(outbox_id), '{{}}') FROM dl) AS moved,
                (SELECT count(*) FROM handlers) AS handlers,
                (SELECT count(*) FROM (
                    SELECT pg_notify('{self.channel}', '') FROM handlers LIMIT 1) AS w)
                    AS notified"""
        # Dead-letter-handler rows: delete the row, then mark the dead letter. "handled"
        # may overwrite an earlier "handler_failed" from another handler; nothing overwrites
        # an operator's decision (replayed, discarded).
        self.resolve_dead_letter_fenced = f"""
            WITH f AS (
                SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::bigint[], $4::text[],
                    $5::text[]) AS f(id, token, dead_letter_id, resolution, note)
            ),
            d AS (
                DELETE FROM {s}.outbox o USING f
                WHERE o.id = f.id AND o.lease_token = f.token
                RETURNING f.*
            ),
            u AS (
                UPDATE {s}.dead_letters dl
                SET resolution = d.resolution, resolution_note = d.note,
                    resolved_at = clock_timestamp()
                FROM d
                WHERE dl.id = d.dead_letter_id
                    AND (dl.resolution = 'open'
                         OR (dl.resolution = 'handler_failed' AND d.resolution = 'handled'))
                RETURNING dl.id
            )
            SELECT (SELECT coalesce(array_agg(id), '{{}}') FROM d) AS deleted,
                (SELECT count(*) FROM u) AS updated"""
        self.insert_abandoned = f"""
            INSERT INTO {s}.abandoned_executions (reply_to, event_id, trigger_id, scope,
                target, status, outcome, result, error)
            SELECT reply_to, event_id, trigger_id, scope, target, status, outcome,
                result::jsonb, error
            FROM unnest($1::text[], $2::uuid[], $3::bigint[], $4::text[], $5::text[],
                $6::int[], $7::text[], $8::text[], $9::text[])
                AS f(reply_to, event_id, trigger_id, scope, target, status, outcome, result,
                    error)"""
        # A synchronous call: one reply-to row for one trigger, written already leased by
        # the calling process, which executes it at once. Should that process die, the lease
        # expires and, once the caller's deadline has passed too, any dispatcher answers it
        # as abandoned instead of running it (at most once).
        self.insert_invocation = f"""
            INSERT INTO {s}.outbox AS o (event_id, payload, depth, reply_to, reply_owner,
                reply_deadline, lease_token, due_at, {_SNAPSHOT})
            SELECT $1, $2::jsonb, $3, $4, $5,
                clock_timestamp() + make_interval(secs => $6), $8,
                clock_timestamp() + make_interval(secs => t.timeout + $9),
                t.id, t.scope, t.name, t.target, t.registered_by, {_T_POLICY}
            FROM {s}.triggers t WHERE t.id = $7
            RETURNING {_CLAIMED}"""
        # Bounded so that sampling a huge backlog stays cheap; both parts use the due index.
        self.backlog_sample = f"""
            SELECT (SELECT count(*) FROM (
                        SELECT 1 FROM {s}.outbox WHERE due_at <= clock_timestamp()
                        LIMIT $1) AS d) AS due,
                coalesce(extract(epoch FROM clock_timestamp() - (
                    SELECT min(due_at) FROM {s}.outbox WHERE due_at <= clock_timestamp()
                )), 0)::float8 AS oldest_due_seconds"""
        # For run_until_idle: what is claimable now, and what will become claimable without
        # an operator (parked and paused rows wait for one, so they do not count).
        self.due_count = f"""
            SELECT count(*) FILTER (WHERE due_at <= clock_timestamp() AND NOT EXISTS (
                        SELECT 1 FROM {s}.breakers b
                        WHERE b.trigger_id = o.trigger_id AND b.state <> 'closed'
                            AND b.probe_id IS DISTINCT FROM o.id)) AS due,
                count(*) AS total,
                extract(epoch FROM min(due_at) - clock_timestamp())::float8 AS next_due_in
            FROM {s}.outbox o
            WHERE parked_at IS NULL
                AND NOT EXISTS (
                    SELECT 1 FROM {s}.pauses p
                    WHERE (p.scope IS NULL OR p.scope = o.scope)
                        AND (p.trigger_id IS NULL OR p.trigger_id = o.trigger_id))"""

        # --- flow control (operator actions) ---
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
        self.list_pauses = f"""
            SELECT p.id, p.scope, p.trigger_id, t.name AS trigger_name, p.note, p.paused_at
            FROM {s}.pauses p LEFT JOIN {s}.triggers t ON t.id = p.trigger_id
            ORDER BY p.paused_at"""
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
        self.list_breakers = f"""
            SELECT b.trigger_id, t.scope, t.name AS trigger_name, b.state, b.failures,
                b.open_until, b.probe_id, b.opened_count, b.updated_at
            FROM {s}.breakers b LEFT JOIN {s}.triggers t ON t.id = b.trigger_id
            WHERE b.state <> 'closed' OR b.failures > 0
            ORDER BY b.updated_at DESC"""
        # The single-mutation form of emit (see ``emit`` above).
        self.emit_one = f"""
            SELECT matched, outbox_ids, trigger_ids
            FROM {s}.emit($1::uuid, $2::text, $3::text, $4::text, $5::text, $6::jsonb,
                $7::int, $8::uuid, $9::int, $10::bool)"""

        # --- per-root budgets (handler writes only) ---
        self.root_budget_add = f"""
            INSERT INTO {s}.root_budgets AS b (root_id, rows) VALUES ($1, $2)
            ON CONFLICT (root_id) DO UPDATE SET rows = b.rows + excluded.rows
            RETURNING rows"""
        self.root_budget_expire = f"""
            DELETE FROM {s}.root_budgets
            WHERE created_at < clock_timestamp() - make_interval(secs => $1)"""

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
