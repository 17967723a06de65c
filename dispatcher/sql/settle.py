"""Settlement: every write of a claimed row's outcome, fenced by row id AND lease token."""

from __future__ import annotations

from dispatcher.sql.common import SNAPSHOT, T_POLICY, Statements, trigger_matches


class SettleSql(Statements):
    """The statements :mod:`dispatcher.runtime.settle_writes` applies."""

    def __init__(self, schema: str) -> None:
        super().__init__(schema)
        s = self.quoted
        # A dead letter's handlers: the scope's handler triggers matching its event.
        handles = trigger_matches("t", "dl.payload ->> 'namespace'", "dl.payload ->> 'key'")
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
        # the cause of parking is gone). (An ordered row leaving makes its key's next row
        # due: the trigger outbox_key_left of migration 0014.)
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
        # A target's rate limit holds its whole trigger ($1 trigger ids, $2 seconds each), in
        # every process: the claim leaves its rows alone until held_until, and its waiting
        # rows move there now, so that claims do not scan past them meanwhile. A hold only
        # ever grows. CTEs share one snapshot: `old` is the hold before this statement.
        self.hold_rate_limited = f"""
            WITH f AS (
                SELECT * FROM unnest($1::bigint[], $2::float8[]) AS f(trigger_id, secs)
            ),
            old AS (
                SELECT trigger_id, held_until FROM {s}.breakers
                WHERE trigger_id = ANY($1::bigint[])
            ),
            h AS (
                INSERT INTO {s}.breakers AS b (trigger_id, held_until)
                SELECT trigger_id, clock_timestamp() + make_interval(secs => secs) FROM f
                ON CONFLICT (trigger_id) DO UPDATE SET
                    held_until = greatest(b.held_until, excluded.held_until),
                    updated_at = clock_timestamp()
                RETURNING b.trigger_id, b.held_until
            ),
            moved AS (
                UPDATE {s}.outbox o SET due_at = h.held_until
                FROM h
                WHERE o.trigger_id = h.trigger_id AND o.lease_token IS NULL
                    AND o.parked_at IS NULL AND o.due_at < h.held_until
                RETURNING o.id
            )
            SELECT h.trigger_id, h.held_until,
                old.held_until IS NULL OR old.held_until <= clock_timestamp() AS new_hold,
                (SELECT count(*) FROM moved) AS moved
            FROM h LEFT JOIN old USING (trigger_id)"""
        # Move an open breaker's waiting rows to its reopen time, so claims do not scan past
        # them while it is open: when it opens, and again when rows that were running at
        # that moment come back as failures, or rows a process held back for it come back
        # unrun (they were leased, so the first move left them).
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
                    reason, errors, event_created_at, order_key, key_seq, traceparent)
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
                    created_at, order_key, key_seq, traceparent
                FROM moved
                RETURNING id, outbox_id, scope, trigger_id, trigger_name, payload, depth,
                    reason, attempts, errors, order_key, key_seq, traceparent
            ),
            -- An ordered trigger's head that blocks its key on dead-lettering: the key's
            -- later rows wait (the claim skips blocked keys) until an operator acts.
            blocked AS (
                INSERT INTO {s}.blocked_keys (trigger_id, order_key, scope, trigger_name,
                    dead_letter_id, key_seq)
                SELECT dl.trigger_id, dl.order_key, dl.scope, dl.trigger_name, dl.id,
                    dl.key_seq
                FROM dl JOIN moved ON moved.id = dl.outbox_id
                WHERE moved.blocks_key AND dl.order_key IS NOT NULL
                ON CONFLICT (trigger_id, order_key) DO NOTHING
                RETURNING trigger_id
            ),

            handlers AS (
                -- The handlers run in the dead letter's trace (dispatcher.tracing).
                INSERT INTO {s}.outbox (event_id, payload, depth, dead_letter_id, traceparent,
                    {SNAPSHOT})
                SELECT gen_random_uuid(),
                    jsonb_build_object('dead_letter_id', dl.id, 'trigger', dl.trigger_name,
                        'trigger_id', dl.trigger_id, 'reason', dl.reason,
                        'attempts', dl.attempts, 'errors', dl.errors, 'event', dl.payload),
                    dl.depth, dl.id, dl.traceparent, t.id, t.scope, t.name, t.target,
                    t.registered_by,
                    {T_POLICY}
                FROM dl JOIN {s}.triggers t
                    ON t.scope = dl.scope
                    AND t.is_dead_letter_handler
                    AND t.enabled
                    AND {handles}
                RETURNING id
            )
            SELECT (SELECT coalesce(array_agg(outbox_id), '{{}}') FROM dl) AS moved,
                (SELECT count(*) FROM handlers) AS handlers,
                (SELECT count(*) FROM blocked) AS blocked,
                (SELECT count(*) FROM (
                    SELECT pg_notify('{self.channel}', '') FROM handlers LIMIT 1) AS w)
                    AS notified"""
        # Dead-letter-handler rows: delete the row, then record each handler's outcome on
        # its dead letter (which handler, from the deleted row; success or the error) and
        # set the resolution. Any failure makes it "handler_failed" and a success never
        # lifts that, so the result is the same whichever handler settles first; a failure
        # after a success turns "handled" into "handler_failed". Nothing overwrites an
        # operator's decision (replayed, discarded), though the outcome is still recorded.
        # Outcomes are grouped per dead letter first: an UPDATE ... FROM applies only one
        # joined row per target row, so two handlers settling in one batch would otherwise
        # lose one. Every decision is made in the SET, from the row being updated: a
        # concurrent settle in another process waits for the row lock and then works from
        # the version that one committed (READ COMMITTED re-evaluates the SET on it).
        self.resolve_dead_letter_fenced = f"""
            WITH f AS (
                SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::bigint[], $4::text[],
                    $5::text[]) AS f(id, token, dead_letter_id, resolution, note)
            ),
            d AS (
                DELETE FROM {s}.outbox o USING f
                WHERE o.id = f.id AND o.lease_token = f.token
                RETURNING f.*, o.trigger_id, o.trigger_name
            ),
            g AS (
                SELECT dead_letter_id,
                    bool_or(resolution = 'handler_failed') AS failed,
                    (array_agg(note ORDER BY id DESC)
                        FILTER (WHERE resolution = 'handler_failed'))[1] AS note,
                    jsonb_agg(jsonb_build_object('trigger_id', trigger_id,
                        'trigger', trigger_name, 'outcome', resolution, 'error', note,
                        'at', clock_timestamp()) ORDER BY id) AS outcomes
                FROM d
                GROUP BY dead_letter_id
            ),
            u AS (
                UPDATE {s}.dead_letters dl
                SET handler_outcomes = dl.handler_outcomes || g.outcomes,
                    resolution = CASE
                        WHEN dl.resolution IN ('replayed', 'discarded') THEN dl.resolution
                        WHEN g.failed OR dl.resolution = 'handler_failed'
                            THEN 'handler_failed'
                        ELSE 'handled' END,
                    resolution_note = CASE
                        WHEN g.failed AND dl.resolution IN ('open', 'handled', 'handler_failed')
                            THEN g.note
                        ELSE dl.resolution_note END,
                    resolved_at = CASE
                        WHEN dl.resolution = 'open' OR (dl.resolution = 'handled' AND g.failed)
                            THEN clock_timestamp()
                        ELSE dl.resolved_at END
                FROM g
                WHERE dl.id = g.dead_letter_id
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
