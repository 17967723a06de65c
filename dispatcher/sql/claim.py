"""The claim path: leasing due rows, synchronous invocations (written already leased), and
the backlog reads of the runtime."""

from __future__ import annotations

from dispatcher.sql.common import CLAIMED, SNAPSHOT, T_POLICY, Statements

# Where an ordered trigger's row waits while an earlier row of its key is in the outbox:
# beyond the claim's index range on due_at, so a long queue behind a held key costs the
# claim nothing. The emit functions write it; the triggers of migration 0014 end it when the
# key's earlier rows have left (or its block is lifted).
WAITING = "'infinity'::timestamptz"


def key_head(q: str, o: str) -> str:
    """Whether outbox row ``o`` may run now as far as its key's order goes: an unordered row
    always; an ordered one (``order_key`` set) only when no row of its trigger and key with
    a lower version is still in the outbox (running, retrying, parked or not yet due) and
    the key is not blocked by a dead letter. Both are one probe of a primary or partial
    index. An OR keeps the probes per-row filters of the caller's scan: a top-level NOT
    EXISTS would be planned as an anti-join over every due row."""
    return f"""({o}.order_key IS NULL OR (
                    NOT EXISTS (SELECT 1 FROM {q}.outbox e
                                WHERE e.trigger_id = {o}.trigger_id
                                    AND e.order_key = {o}.order_key
                                    AND e.key_seq < {o}.key_seq)
                    AND NOT EXISTS (SELECT 1 FROM {q}.blocked_keys b
                                    WHERE b.trigger_id = {o}.trigger_id
                                        AND b.order_key = {o}.order_key)))"""


class ClaimSql(Statements):
    """What the poller and synchronous calls run to lease rows."""

    def __init__(self, schema: str) -> None:
        super().__init__(schema)
        s = self.quoted
        # Every eligibility predicate sits inside the locking CTE: a filter applied after
        # FOR UPDATE SKIP LOCKED would lock rows it then throws away. MATERIALIZED keeps the
        # planner from inlining the CTE into the UPDATE, which could re-evaluate LIMIT and
        # lock more rows than asked for. A claimed row's due_at becomes its lease expiry, so
        # the same index finds new rows and expired leases; the lease token tells them
        # apart (a non-null token on a due row means the previous claim was orphaned).
        # The cool-down sweep, run with one claim per sweep interval (Poller: SWEEP_EVERY),
        # not with every claim: planning it doubled the claim's planning time, the largest
        # part of a claim of a few rows.
        sweep = f"""
            tick AS (
                -- A breaker whose cool-down is over lets one probe row through (half-open).
                -- Driven from the tiny breakers table: the outbox is only looked at for the
                -- open breakers whose time is up, one index probe each.
                UPDATE {s}.breakers b
                SET state = 'half_open', probe_id = c.probe, updated_at = clock_timestamp()
                FROM (
                    SELECT r.trigger_id,
                        (SELECT p.id FROM {s}.outbox p
                         WHERE p.trigger_id = r.trigger_id AND p.parked_at IS NULL
                             AND {key_head(s, "p")}
                         ORDER BY p.due_at LIMIT 1) AS probe
                    FROM {s}.breakers r
                    WHERE r.state = 'open' AND r.open_until <= clock_timestamp()
                ) AS c
                WHERE b.trigger_id = c.trigger_id AND c.probe IS NOT NULL
                RETURNING b.trigger_id
            ),
            -- The backstop of migration 0014's promotion triggers: a key's first waiting row
            -- whose key has no earlier row left and is not blocked is made due (a rolled-back
            -- settlement, a row another client wrote). $6: at most that many keys a sweep.
            waiting AS MATERIALIZED (
                SELECT DISTINCT ON (w.trigger_id, w.order_key) w.id
                FROM {s}.outbox w
                WHERE w.order_key IS NOT NULL AND w.due_at = {WAITING}
                    AND w.parked_at IS NULL
                ORDER BY w.trigger_id, w.order_key, w.key_seq
                LIMIT $6
            ),
            promoted AS (
                UPDATE {s}.outbox o SET due_at = clock_timestamp()
                FROM waiting
                WHERE o.id = waiting.id AND o.due_at = {WAITING} AND {key_head(s, "o")}
                RETURNING o.id
            ),"""
        claim = f"""
            -- Pauses, breakers, rate-limit holds and the triggers this process holds back
            -- ($5: its local breaker view, ahead of the shared one), folded once per claim
            -- into a few small arrays: the predicates below then stay plain per-row filters
            -- on the index scan, which keeps "index range scan, stop after LIMIT rows" as
            -- the plan (NOT EXISTS would be planned as anti-joins over every due row, then
            -- a sort).
            held AS MATERIALIZED (
                SELECT
                    EXISTS (SELECT 1 FROM {s}.pauses
                            WHERE scope IS NULL AND trigger_id IS NULL) AS everything,
                    ARRAY(SELECT scope FROM {s}.pauses WHERE scope IS NOT NULL) AS scopes,
                    ARRAY(SELECT trigger_id FROM {s}.pauses
                          WHERE trigger_id IS NOT NULL
                          UNION ALL
                          SELECT trigger_id FROM {s}.breakers
                          WHERE state <> 'closed' OR held_until > statement_timestamp()
                          UNION ALL
                          SELECT unnest($5::bigint[]))
                        AS triggers,
                    -- A rate limit holds the probe too.
                    ARRAY(SELECT probe_id FROM {s}.breakers
                          WHERE state = 'half_open' AND probe_id IS NOT NULL
                              AND NOT coalesce(held_until > statement_timestamp(), false))
                        AS probes
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
                    -- Ordered triggers: only the head of each key, never a blocked key's.
                    AND {key_head(s, "o")}
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
            RETURNING {CLAIMED}"""
        # Rows promoted by the sweep were waiting in the statement's snapshot (due_at
        # 'infinity'), so its claim never takes them: each row is changed once at most.
        self.claim = "WITH" + claim
        self.claim_and_sweep = "WITH" + sweep + claim
        # A synchronous call: one reply-to row for one trigger, written already leased by
        # the calling process, which executes it at once. Should that process die, the lease
        # expires and, once the caller's deadline has passed too, any dispatcher answers it
        # as abandoned instead of running it (at most once).
        self.insert_invocation = f"""
            INSERT INTO {s}.outbox AS o (event_id, payload, depth, reply_to, reply_owner,
                reply_deadline, lease_token, due_at, traceparent, {SNAPSHOT})
            SELECT $1, $2::jsonb, $3, $4, $5,
                clock_timestamp() + make_interval(secs => $6), $8,
                clock_timestamp() + make_interval(secs => t.timeout + $9), $10,
                t.id, t.scope, t.name, t.target, t.registered_by, {T_POLICY}
            FROM {s}.triggers t WHERE t.id = $7
            RETURNING {CLAIMED}"""
        # Bounded so that sampling a huge backlog stays cheap; both parts use the due index.
        self.backlog_sample = f"""
            SELECT (SELECT count(*) FROM (
                        SELECT 1 FROM {s}.outbox WHERE due_at <= clock_timestamp()
                        LIMIT $1) AS d) AS due,
                coalesce(extract(epoch FROM clock_timestamp() - (
                    SELECT min(due_at) FROM {s}.outbox WHERE due_at <= clock_timestamp()
                )), 0)::float8 AS oldest_due_seconds,
                (SELECT count(*) FROM {s}.blocked_keys) AS blocked_keys"""
        # For run_until_idle: what is claimable now, and what will become claimable without
        # an operator (parked, paused and blocked-key rows wait for one, so they do not
        # count).
        self.due_count = f"""
            SELECT count(*) FILTER (WHERE due_at <= clock_timestamp() AND NOT EXISTS (
                        SELECT 1 FROM {s}.breakers b
                        WHERE b.trigger_id = o.trigger_id
                            AND ((b.state <> 'closed' AND b.probe_id IS DISTINCT FROM o.id)
                                 OR b.held_until > clock_timestamp()))) AS due,
                count(*) AS total,
                extract(epoch FROM min(due_at) - clock_timestamp())::float8 AS next_due_in
            FROM {s}.outbox o
            WHERE parked_at IS NULL
                AND NOT EXISTS (
                    SELECT 1 FROM {s}.blocked_keys k
                    WHERE k.trigger_id = o.trigger_id AND k.order_key = o.order_key)
                AND NOT EXISTS (
                    SELECT 1 FROM {s}.pauses p
                    WHERE (p.scope IS NULL OR p.scope = o.scope)
                        AND (p.trigger_id IS NULL OR p.trigger_id = o.trigger_id))"""
