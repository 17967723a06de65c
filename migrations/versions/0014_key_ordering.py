"""Per-key ordered delivery and latest-state coalescing.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-09

A trigger may deliver the events of each key one at a time, in the order their mutations
committed (``ordering = 'key'``), and may deliver only the latest state of a key
(``delivery = 'latest'``, which needs ordering).

**The order.** ``key_versions`` holds one row per (scope, namespace, key) that an ordered
trigger has matched: its last version. An emit that matches an ordered trigger upserts that
row (version + 1) and stamps the version on its ordered outbox rows (``key_seq``, and the
payload key ``seq``). The upsert keeps the row locked until the emitting transaction ends, so
a second transaction emitting the same key waits for the first to commit or roll back and
then reads its committed version (``ON CONFLICT DO UPDATE`` always reads the latest committed
row): versions of one key follow the commit order of its mutations, whatever order their
outbox ids were allocated in. ``emit_many`` locks its keys in sorted order. A transaction
that emits several keys in different orders than another can deadlock with it; Postgres
aborts one of them.

**The claim** takes an ordered row only when no row of the same trigger and key with a lower
``key_seq`` is still in the outbox (running, retrying, parked or not yet due) and the key is
not in ``blocked_keys``; the index ``outbox_key_order_idx`` answers both in one probe.

**Dead letters.** The outbox row carries ``blocks_key`` (a snapshot of the trigger's
``on_dead_letter``: ``'block'``, the default, or ``'skip'``). When an ordered row with it
dead-letters, its (trigger, key) goes into ``blocked_keys`` in the same statement, and the
key's later rows wait until an operator replays or discards the dead letter, or unblocks the
key (skips it). Dead letters keep ``order_key`` and ``key_seq``, and a replay keeps them: the
replayed row runs before the key's later rows.

**Waiting rows.** An ordered row written while an earlier row of its trigger and key is in
the outbox waits at ``due_at = 'infinity'``, beyond the claim's index range, so a long queue
behind a running, retrying or blocked head costs the claim nothing. It becomes due when the
rows before it have left: ``outbox_key_left`` (after each ordered row is deleted: done,
dead-lettered without a block, cut by the depth limit) and ``blocked_keys_lifted`` (a block
lifted by a replay, discard, purge or unblock) make the key's first row due if it waits and
the key is not blocked; ``outbox_promote_waiting``, deferred to the commit of the
transaction that wrote a waiting row, does the same for it when nothing is left before it
by then. The two meet on a row lock (see ``promote_waiting``), so a row is not left waiting
by an emit and a settlement that overlap. (Each dispatcher also sweeps every few seconds for
a first waiting row of an unblocked key with nothing before it.)

**Coalescing.** For a ``delivery = 'latest'`` trigger, a mutation of a key whose newest row is
still pending (never attempted, not leased, not parked) replaces that row's event id, payload,
depth and version in place, keeping its due time, instead of adding a row. This step runs as
a statement of its own after the key's version is locked, so it reads the outbox as of after
the previous emitter of the key committed. With ordering, a key has at most one row running
and one pending per trigger.

The emit functions are replaced (same signatures, so grants stay) by this revision's, built
from 0011's frozen pieces; downgrade puts 0012's back.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql as pg

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def _schema() -> str:
    return str(context.config.attributes.get("schema", "dispatcher"))


def _load(name: str) -> ModuleType:
    path = Path(__file__).with_name(name)
    spec = importlib.util.spec_from_file_location(f"dispatcher_migration_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load the migration {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pieces() -> ModuleType:
    return _load("0011_old_values_capture.py")


# The columns an ordered row adds to the outbox insert (due_at: a row behind its key's head
# waits at 'infinity', out of the claim's index range, until the head leaves).
ORDER_COLUMNS = "order_key, key_seq, blocks_key, due_at"
WAITING = "'infinity'::timestamptz"
# The longest scope, namespace and key an ordered trigger takes together, in UTF-8 bytes: the
# key goes into btree indexes (key_versions, the outbox's order index, blocked_keys), whose
# entries Postgres caps at 2,704 bytes. A key of 1,024 characters may take 4,096.
MAX_ORDERED_KEY_BYTES = 2600
KEY_BYTES = "(octet_length($2) + octet_length($3) + octet_length($4))"
BAD_ORDINAL = "'mutation ' || bad.ord || ' of ' || total || ', ' || "
TOO_LONG = (
    f"'an ordered trigger''s key, with its scope and namespace, must be at most "
    f"{MAX_ORDERED_KEY_BYTES} bytes (UTF-8); this one is ' || "
)


def _due(q: str, tid: str, key: str, behind: str = "false") -> str:
    """An ordered row's due time: now when it is its key's head, else 'infinity' (waiting)
    when a row of its trigger and key is in the outbox already, or ``behind`` (an earlier
    row of the same call) holds. The check reads the statement's snapshot: a row it misses
    (committed meanwhile) only makes this one due early, and the claim's head test still
    holds it back."""
    return f"""CASE WHEN {behind} OR EXISTS (
                SELECT 1 FROM {q}.outbox e WHERE e.trigger_id = {tid} AND e.order_key = {key})
            THEN {WAITING} ELSE clock_timestamp() END"""


def _trigger_columns() -> str:
    m = _pieces()
    return (
        f"t.id AS tid, t.name AS tname, t.target AS ttarget, t.registered_by AS tprincipal, "
        f"{m.T_POLICY}, t.fields AS tfields, t.ordering = 'key' AS tordered, "
        f"t.delivery = 'latest' AS tlatest, t.on_dead_letter = 'block' AS tblocks"
    )


def _with_seq(payload: str, seq: str) -> str:
    return f"{payload} || jsonb_build_object('seq', {seq})"


def _coalesce(q: str, rows: str, key: str, *, trace: bool = False) -> str:
    """The CTEs of the coalescing step: ``rows`` lists each latest-delivery trigger to enqueue
    (``tid``, the trigger's snapshot columns, ``event_id``, ``payload``, ``depth``, ``seq``,
    and with ``trace`` (revision 0015) ``traceparent``) for the key ``key`` (a column of
    ``rows``). Each replaces the trigger's newest row of the key when that row is still
    pending, else inserts one."""
    m = _pieces()
    set_trace = ", traceparent = r.traceparent" if trace else ""
    trace_col = ", traceparent" if trace else ""
    trace_val = ", r.traceparent" if trace else ""
    pending = "o.lease_token IS NULL AND o.attempts = 0 AND o.parked_at IS NULL"
    return f"""
    newest AS (
        SELECT r.tid, r.{key} AS order_key, x.id
        FROM {rows} r CROSS JOIN LATERAL (
            SELECT o.id, o.lease_token, o.attempts, o.parked_at FROM {q}.outbox o
            WHERE o.trigger_id = r.tid AND o.order_key = r.{key}
            ORDER BY o.key_seq DESC LIMIT 1) x
        WHERE x.lease_token IS NULL AND x.attempts = 0 AND x.parked_at IS NULL
    ),
    -- Re-checked on the row as committed: a claim that leased it meanwhile wins, and the
    -- mutation gets a row of its own below.
    upd AS (
        UPDATE {q}.outbox o
        SET event_id = r.event_id, payload = r.payload, depth = r.depth, key_seq = r.seq{set_trace}
        FROM newest JOIN {rows} r ON r.tid = newest.tid AND r.{key} = newest.order_key
        WHERE o.id = newest.id AND {pending}
        RETURNING o.id, o.event_id, o.trigger_id, o.order_key
    ),
    added AS (
        INSERT INTO {q}.outbox (event_id, payload, depth, {m.SNAPSHOT}, {ORDER_COLUMNS}{trace_col})
        SELECT r.event_id, r.payload, r.depth, r.tid, r.scope, r.tname, r.ttarget,
            r.tprincipal, {m.T_POLICY.replace("t.", "r.")}, r.{key}, r.seq, r.tblocks,
            {_due(q, "r.tid", f"r.{key}")}{trace_val}
        FROM {rows} r
        WHERE (r.tid, r.{key}) NOT IN (SELECT upd.trigger_id, upd.order_key FROM upd)
        ON CONFLICT (event_id, trigger_id) DO NOTHING
        RETURNING id, event_id, trigger_id
    ),
    done AS (
        SELECT upd.id, upd.event_id, upd.trigger_id FROM upd
        UNION ALL
        SELECT added.id, added.event_id, added.trigger_id FROM added
    )"""


def _emit(s: str, channel: str, *, trace: bool = False) -> str:
    """The single-mutation function; with ``trace`` (revision 0015), one more last argument,
    ``traceparent``, stored on every row the call enqueues."""
    m = _pieces()
    trace_arg = " traceparent text DEFAULT NULL," if trace else ""
    trace_col = ", traceparent" if trace else ""
    trace_val = ", $12" if trace else ""
    trace_r = ", $12 AS traceparent" if trace else ""
    q = f'"{s}"'
    event = f"{q}.condition_event($5, $4, $6, $11, t.condition_changed)"
    payload = m._shaped(
        q,
        f"(SELECT {m._payload('$1', '$2', '$3', '$4', '$5', '$6', '$7', '$8', '$11')})",
        "m.tfields",
    )
    problem = m._problem("$1", "$2", "$3", "$4", "$5", "$6", "$7", "$11").replace(
        "CASE", f"CASE\n        {m._fanout_problem('$9')}", 1
    )
    full = m._full(f"{s}.emit", "$2", "cap_max", "cap_pending", "matched")
    latest_payload = m._shaped(
        q,
        f"(SELECT {m._payload('$1', '$2', '$3', '$4', '$5', '$6', '$7', '$8', '$11')})",
        "t.fields",
    )
    ordered_payload = latest_payload.replace("t.fields", "t.tfields")
    return f"""
CREATE OR REPLACE FUNCTION {q}.emit(
    event_id uuid, scope text, namespace text, key text, op text, value jsonb,
    depth integer DEFAULT 0, root uuid DEFAULT NULL, max_fanout integer DEFAULT 100,
    notify boolean DEFAULT true, old jsonb DEFAULT NULL,{trace_arg}
    OUT matched bigint, OUT outbox_ids bigint[], OUT trigger_ids bigint[])
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $emit$
#variable_conflict use_column
DECLARE
    problem text;
    notified bigint;
    cap_max bigint;
    cap_pending bigint;
    cap_stale boolean;
    ordered bigint[];
    latest bigint[];
    seq bigint;
    more_ids bigint[] := '{{}}';
    more_triggers bigint[] := '{{}}';
    latest_ids bigint[];
    latest_triggers bigint[];
    added bigint := 0;
BEGIN
    -- Matching, the checks and the unordered rows: one statement, as before ordering
    -- existed (an unordered trigger pays nothing for it).
    WITH chk AS MATERIALIZED (
        SELECT {problem} AS problem
    ),
    cap AS MATERIALIZED (
        SELECT c.max_pending, c.pending, {m.STALE.format(c="c")} AS stale
        FROM {q}.backlog_caps c WHERE c.scope = $2
    ),
    m AS MATERIALIZED (
        SELECT {_trigger_columns()}
        FROM {q}.triggers t
        WHERE (SELECT chk.problem FROM chk) IS NULL
            AND {m._match(q, "$2", "$3", "$4", "$5", m._prefixes("$4"), event)}
        LIMIT least(greatest($9, 0), {m.MAX_FANOUT}) + 1
    ),
    ins AS (
        INSERT INTO {q}.outbox (event_id, payload, depth, {m.SNAPSHOT}{trace_col})
        SELECT $1, {payload},
            $7, m.tid, $2, m.tname, m.ttarget, m.tprincipal, {m.POLICY}{trace_val}
        FROM m WHERE (SELECT count(*) FROM m) <= $9
            AND NOT EXISTS (SELECT FROM cap
                WHERE cap.pending + (SELECT count(*) FROM m) > cap.max_pending)
            AND NOT m.tordered
        ORDER BY m.tid
        ON CONFLICT (event_id, trigger_id) DO NOTHING
        RETURNING id, trigger_id
    )
    SELECT (SELECT chk.problem FROM chk),
        (SELECT count(*) FROM m),
        ARRAY(SELECT ins.id FROM ins ORDER BY ins.id),
        ARRAY(SELECT ins.trigger_id FROM ins ORDER BY ins.id),
        -- A hint only when something was enqueued; Postgres folds a transaction's
        -- identical notifications into one.
        (SELECT count(*) FROM (
            SELECT pg_notify('{channel}', '') FROM ins WHERE $10 LIMIT 1) AS w),
        (SELECT cap.max_pending FROM cap), (SELECT cap.pending FROM cap),
        (SELECT cap.stale FROM cap),
        ARRAY(SELECT m.tid FROM m WHERE m.tordered)
    INTO problem, matched, outbox_ids, trigger_ids, notified, cap_max, cap_pending, cap_stale,
        ordered;
    IF problem IS NOT NULL THEN
        {m._refuse(f"{s}.emit", "problem")}
    END IF;
    IF cap_max IS NOT NULL AND matched <= $9 AND matched > 0
        AND cap_pending + matched > cap_max THEN
        {full}
    END IF;
    -- (A call over the fan-out cap writes nothing; one over a backlog cap raised above.)
    IF cardinality(ordered) > 0 AND matched <= $9
        AND octet_length($2) + octet_length($3) + octet_length($4) > {MAX_ORDERED_KEY_BYTES}
    THEN
        {m._refuse(f"{s}.emit", TOO_LONG + KEY_BYTES)}
    END IF;
    IF cardinality(ordered) > 0 AND matched <= $9 THEN
        -- Ordered triggers matched: the key's next version, locked until this transaction
        -- ends (see the module notes), and their rows.
        WITH kv AS (
            INSERT INTO {q}.key_versions AS k (scope, namespace, key, version)
            VALUES ($2, $3, $4, 1)
            ON CONFLICT (scope, namespace, key) DO UPDATE
                SET version = k.version + 1, updated_at = clock_timestamp()
            RETURNING k.version
        ),
        t AS MATERIALIZED (
            SELECT {_trigger_columns()} FROM {q}.triggers t WHERE t.id = ANY (ordered)
        ),
        ins AS (
            INSERT INTO {q}.outbox (event_id, payload, depth, {m.SNAPSHOT}, {ORDER_COLUMNS}
                {trace_col})
            SELECT $1, {_with_seq(ordered_payload, "kv.version")},
                $7, t.tid, $2, t.tname, t.ttarget, t.tprincipal, {m.POLICY},
                $4, kv.version, t.tblocks, {_due(q, "t.tid", "$4")}{trace_val}
            FROM t, kv WHERE NOT t.tlatest
            ORDER BY t.tid
            ON CONFLICT (event_id, trigger_id) DO NOTHING
            RETURNING id, trigger_id
        )
        SELECT ARRAY(SELECT ins.id FROM ins), ARRAY(SELECT ins.trigger_id FROM ins),
            (SELECT kv.version FROM kv),
            ARRAY(SELECT t.tid FROM t WHERE t.tlatest ORDER BY t.tid)
        INTO more_ids, more_triggers, seq, latest;
        added := cardinality(more_ids);
    END IF;
    IF cardinality(latest) > 0 THEN
        -- Latest-state triggers, in a statement of its own: it reads the outbox after the
        -- key's version was locked above, so it sees the previous emitter's rows.
        WITH r AS MATERIALIZED (
            SELECT {_trigger_columns()}, t.scope, $1 AS event_id, $4 AS order_key,
                {_with_seq(latest_payload, "seq")} AS payload, $7 AS depth, seq AS seq{trace_r}
            FROM {q}.triggers t
            WHERE t.id = ANY (latest)
                AND NOT EXISTS (SELECT FROM {q}.outbox x
                                WHERE x.event_id = $1 AND x.trigger_id = t.id)
        ),{_coalesce(q, "r", "order_key", trace=trace)}
        SELECT ARRAY(SELECT done.id FROM done), ARRAY(SELECT done.trigger_id FROM done),
            added + (SELECT count(*) FROM added)
        INTO latest_ids, latest_triggers, added;
        more_ids := more_ids || latest_ids;
        more_triggers := more_triggers || latest_triggers;
    END IF;
    IF cardinality(more_ids) > 0 THEN
        SELECT coalesce(array_agg(u.i ORDER BY u.i), '{{}}'),
            coalesce(array_agg(u.t ORDER BY u.i), '{{}}')
        INTO outbox_ids, trigger_ids
        FROM unnest(outbox_ids || more_ids, trigger_ids || more_triggers) AS u(i, t);
        -- A hint for rows added, not for a pending row replaced in place.
        IF $10 AND notified = 0 AND added > 0 THEN
            PERFORM pg_notify('{channel}', '');
        END IF;
    END IF;
    IF cap_stale AND cardinality(outbox_ids) > 0 THEN
        {m._recount(q, "ARRAY[$2]")}
    END IF;
END
$emit$"""


BAD_MUTATION = "'mutation ' || bad.ord || ' of ' || total || ', ' || bad.why"


def _emit_many(s: str, channel: str, *, trace: bool = False) -> str:
    """The bulk function; with ``trace`` (revision 0015), one more last argument,
    ``traceparent`` (one for the call), stored on every row the call enqueues."""
    m = _pieces()
    trace_arg = " traceparent text DEFAULT NULL," if trace else ""
    trace_col = ", traceparent" if trace else ""
    trace_val = ", $12" if trace else ""
    trace_r = ", $12 AS traceparent" if trace else ""
    q = f'"{s}"'
    u = "u.event_id", "u.scope", "u.namespace", "u.key", "u.op", "u.value", "u.depth"
    event = f"{q}.condition_event(mu.op, mu.key, mu.value, mu.old, t.condition_changed)"
    many_match = m._match(
        q, "mu.scope", "mu.namespace", "mu.key", "mu.op", m._prefixes("mu.key"), event
    )
    bulk_columns = "event_id, scope, namespace, key, op, value, depth, root, old, ord"
    full = m._full(
        f"{s}.emit_many", "refused_scope", "refused_max", "refused_pending", "refused_adding"
    )
    shaped = m._shaped(q, "mu.payload", "t.fields")
    ordered_shaped = m._shaped(q, "mu.payload", "t.tfields")
    return f"""
CREATE OR REPLACE FUNCTION {q}.emit_many(
    event_id uuid[], scope text[], namespace text[], key text[], op text[], value jsonb[],
    depth integer[], root uuid[] DEFAULT NULL, max_fanout integer DEFAULT 100,
    notify boolean DEFAULT true, old jsonb[] DEFAULT NULL,{trace_arg}
    OUT over_ordinal bigint, OUT over_matched bigint, OUT matched bigint,
    OUT outbox_ids bigint[], OUT event_ids uuid[], OUT trigger_ids bigint[])
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $emit_many$
#variable_conflict use_column
DECLARE
    total integer := cardinality($1);
    bad record;
    refused_scope text;
    refused_max bigint;
    refused_pending bigint;
    refused_adding bigint;
    stale_scopes text[];
    ordered_triggers bigint[];
    ordered_ords bigint[];
    latest_triggers bigint[];
    latest_ords bigint[];
    latest_seqs bigint[];
    more_ids bigint[];
    more_events uuid[];
    more_triggers bigint[];
    notified bigint;
BEGIN
    {m._fanout_check(f"{s}.emit_many")}
    IF total IS NULL
        OR cardinality($2) IS DISTINCT FROM total OR cardinality($3) IS DISTINCT FROM total
        OR cardinality($4) IS DISTINCT FROM total OR cardinality($5) IS DISTINCT FROM total
        OR cardinality($6) IS DISTINCT FROM total OR cardinality($7) IS DISTINCT FROM total
        OR cardinality($8) <> total OR cardinality($11) <> total
    THEN
        {m._refuse(f"{s}.emit_many", m.UNEVEN_OLD)}
    END IF;
    SELECT p.ord, p.why INTO bad FROM (
        SELECT u.ord, {m._problem(*u, "u.old")} AS why
        FROM unnest($1, $2, $3, $4, $5, $6, $7, $11)
            WITH ORDINALITY AS u(event_id, scope, namespace, key, op, value, depth, old, ord)
    ) AS p
    WHERE p.why IS NOT NULL
    ORDER BY p.ord LIMIT 1;
    IF FOUND THEN
        {m._refuse(f"{s}.emit_many", BAD_MUTATION)}
    END IF;
    -- The payload is built once per mutation (MATERIALIZED), not once per matching trigger.
    -- Nothing is inserted when any mutation matches more than max_fanout triggers.
    WITH mu AS MATERIALIZED (
        SELECT u.ord, u.event_id, u.scope, u.namespace, u.key, u.op, u.depth, u.value, u.old,
            {m._payload(*u, "u.root", "u.old")} AS payload
        FROM unnest($1, $2, $3, $4, $5, $6, $7, $8, $11)
            WITH ORDINALITY AS u({bulk_columns})
    ),
    m AS MATERIALIZED (
        SELECT mu.ord, mu.event_id, {shaped} AS payload, mu.depth, mu.namespace AS mnamespace,
            mu.key AS mkey, t.*
        FROM mu CROSS JOIN LATERAL (
            SELECT t.id AS trigger_id, t.scope, t.name AS trigger_name, t.target,
                t.registered_by, {m.T_POLICY}, count(*) OVER () AS n, t.fields,
                t.ordering = 'key' AS ordered, t.delivery = 'latest' AS latest,
                t.on_dead_letter = 'block' AS blocks
            FROM {q}.triggers t
            WHERE {many_match}
            LIMIT $9 + 1
        ) t
    ),
    over AS (
        SELECT m.ord, m.n FROM m WHERE m.n > $9 ORDER BY m.ord LIMIT 1
    ),
    caps AS MATERIALIZED (
        SELECT c.scope, c.max_pending, c.pending, {m.STALE.format(c="c")} AS stale
        FROM {q}.backlog_caps c
        WHERE c.scope IN (SELECT DISTINCT mu.scope FROM mu)
    ),
    full_scope AS (
        SELECT caps.scope, caps.max_pending, caps.pending, k.n
        FROM caps CROSS JOIN LATERAL (SELECT count(*) AS n FROM m WHERE m.scope = caps.scope) k
        WHERE k.n > 0 AND caps.pending + k.n > caps.max_pending
        ORDER BY caps.scope LIMIT 1
    ),
    go AS MATERIALIZED (
        SELECT NOT EXISTS (SELECT FROM over) AND NOT EXISTS (SELECT FROM full_scope) AS ok
    ),
    ins AS (
        INSERT INTO {q}.outbox (event_id, payload, depth, {m.SNAPSHOT}{trace_col})
        SELECT m.event_id, m.payload, m.depth, m.trigger_id, m.scope, m.trigger_name,
            m.target, m.registered_by, {m.POLICY}{trace_val}
        FROM m WHERE (SELECT go.ok FROM go) AND NOT m.ordered
        ORDER BY m.ord, m.trigger_id
        ON CONFLICT (event_id, trigger_id) DO NOTHING
        RETURNING id, event_id, trigger_id
    )
    SELECT (SELECT over.ord FROM over), (SELECT over.n FROM over), (SELECT count(*) FROM m),
        (SELECT coalesce(array_agg(ins.id ORDER BY ins.id), '{{}}') FROM ins),
        (SELECT coalesce(array_agg(ins.event_id ORDER BY ins.id), '{{}}') FROM ins),
        (SELECT coalesce(array_agg(ins.trigger_id ORDER BY ins.id), '{{}}') FROM ins),
        (SELECT full_scope.scope FROM full_scope), (SELECT full_scope.max_pending FROM full_scope),
        (SELECT full_scope.pending FROM full_scope), (SELECT full_scope.n FROM full_scope),
        ARRAY(SELECT caps.scope FROM caps WHERE caps.stale),
        ARRAY(SELECT m.trigger_id FROM m WHERE m.ordered AND (SELECT go.ok FROM go)
              ORDER BY m.ord, m.trigger_id),
        ARRAY(SELECT m.ord FROM m WHERE m.ordered AND (SELECT go.ok FROM go)
              ORDER BY m.ord, m.trigger_id)
    INTO over_ordinal, over_matched, matched, outbox_ids, event_ids, trigger_ids,
        refused_scope, refused_max, refused_pending, refused_adding, stale_scopes,
        ordered_triggers, ordered_ords;
    IF over_ordinal IS NULL AND refused_scope IS NOT NULL THEN
        {full}
    END IF;
    IF cardinality(ordered_triggers) > 0 THEN
        SELECT u.ord, octet_length(u.s) + octet_length(u.n) + octet_length(u.k) AS size
        INTO bad
        FROM unnest($2, $3, $4) WITH ORDINALITY AS u(s, n, k, ord)
        WHERE u.ord = ANY (ordered_ords)
            AND octet_length(u.s) + octet_length(u.n) + octet_length(u.k)
                > {MAX_ORDERED_KEY_BYTES}
        ORDER BY u.ord LIMIT 1;
        IF FOUND THEN
            {m._refuse(f"{s}.emit_many", BAD_ORDINAL + TOO_LONG + "bad.size")}
        END IF;
    END IF;
    IF cardinality(ordered_triggers) > 0 THEN
        -- Ordered triggers matched: their keys' next versions, each key's row locked once,
        -- in key order (so two calls lock their common keys in the same order), a key
        -- mutated n times in the call taking n versions in call order; then their rows.
        WITH w AS (
            SELECT * FROM unnest(ordered_triggers, ordered_ords) AS w(tid, ord)
        ),
        mu AS MATERIALIZED (
            SELECT u.ord, u.event_id, u.scope, u.namespace, u.key, u.depth,
                {m._payload(*u, "u.root", "u.old")} AS payload
            FROM unnest($1, $2, $3, $4, $5, $6, $7, $8, $11)
                WITH ORDINALITY AS u({bulk_columns})
            WHERE u.ord IN (SELECT w.ord FROM w)
        ),
        kv AS (
            INSERT INTO {q}.key_versions AS k (scope, namespace, key, version)
            SELECT mu.scope, mu.namespace, mu.key, count(*) FROM mu
            GROUP BY mu.scope, mu.namespace, mu.key
            ORDER BY mu.scope, mu.namespace, mu.key
            ON CONFLICT (scope, namespace, key) DO UPDATE
                SET version = k.version + excluded.version, updated_at = clock_timestamp()
            RETURNING k.scope, k.namespace, k.key, k.version
        ),
        seqs AS MATERIALIZED (
            SELECT mu.ord, kv.version
                    - count(*) OVER (PARTITION BY mu.scope, mu.namespace, mu.key)
                    + row_number() OVER (PARTITION BY mu.scope, mu.namespace, mu.key
                                         ORDER BY mu.ord) AS seq,
                -- A later mutation of a key in this call waits behind the call's first one
                -- (a row this leaves waiting with nothing before it for its trigger is made
                -- due at commit by outbox_promote_waiting).
                row_number() OVER (PARTITION BY mu.scope, mu.namespace, mu.key
                                   ORDER BY mu.ord) > 1 AS behind
            FROM mu
            JOIN kv ON kv.scope = mu.scope AND kv.namespace = mu.namespace AND kv.key = mu.key
        ),
        t AS MATERIALIZED (
            SELECT w.ord, {_trigger_columns()}, t.scope AS tscope
            FROM w JOIN {q}.triggers t ON t.id = w.tid
        ),
        ins AS (
            INSERT INTO {q}.outbox (event_id, payload, depth, {m.SNAPSHOT}, {ORDER_COLUMNS}
                {trace_col})
            SELECT mu.event_id, {_with_seq(ordered_shaped, "s.seq")}, mu.depth, t.tid,
                t.tscope, t.tname, t.ttarget, t.tprincipal, {m.POLICY}, mu.key, s.seq,
                t.tblocks, {_due(q, "t.tid", "mu.key", "s.behind")}{trace_val}
            FROM t JOIN mu ON mu.ord = t.ord JOIN seqs s ON s.ord = t.ord
            WHERE NOT t.tlatest
            ORDER BY t.ord, t.tid
            ON CONFLICT (event_id, trigger_id) DO NOTHING
            RETURNING id, event_id, trigger_id
        ),
        -- Latest-state triggers: of a key mutated several times in the call, the last one.
        latest AS (
            SELECT DISTINCT ON (t.tid, mu.scope, mu.namespace, mu.key) t.tid, t.ord, s.seq
            FROM t JOIN mu ON mu.ord = t.ord JOIN seqs s ON s.ord = t.ord
            WHERE t.tlatest
            ORDER BY t.tid, mu.scope, mu.namespace, mu.key, t.ord DESC
        )
        SELECT ARRAY(SELECT ins.id FROM ins), ARRAY(SELECT ins.event_id FROM ins),
            ARRAY(SELECT ins.trigger_id FROM ins),
            ARRAY(SELECT latest.tid FROM latest ORDER BY latest.ord, latest.tid),
            ARRAY(SELECT latest.ord FROM latest ORDER BY latest.ord, latest.tid),
            ARRAY(SELECT latest.seq FROM latest ORDER BY latest.ord, latest.tid)
        INTO more_ids, more_events, more_triggers, latest_triggers, latest_ords, latest_seqs;
        outbox_ids := outbox_ids || more_ids;
        event_ids := event_ids || more_events;
        trigger_ids := trigger_ids || more_triggers;
    END IF;
    IF cardinality(latest_triggers) > 0 THEN
        -- Latest-state triggers, in a statement of its own: it reads the outbox after the
        -- keys' versions were locked above, so it sees the previous emitters' rows.
        WITH w AS (
            SELECT * FROM unnest(latest_triggers, latest_ords, latest_seqs) AS w(tid, ord, seq)
        ),
        mu AS MATERIALIZED (
            SELECT u.ord, u.event_id, u.scope, u.key, u.depth,
                {m._payload(*u, "u.root", "u.old")} AS payload
            FROM unnest($1, $2, $3, $4, $5, $6, $7, $8, $11)
                WITH ORDINALITY AS u({bulk_columns})
            WHERE u.ord IN (SELECT w.ord FROM w)
        ),
        r AS MATERIALIZED (
            SELECT {_trigger_columns()}, t.scope, mu.event_id, mu.key AS order_key,
                {_with_seq(shaped, "w.seq")} AS payload, mu.depth, w.seq{trace_r}
            FROM w JOIN mu ON mu.ord = w.ord JOIN {q}.triggers t ON t.id = w.tid
            WHERE NOT EXISTS (SELECT FROM {q}.outbox x
                              WHERE x.event_id = mu.event_id AND x.trigger_id = t.id)
        ),{_coalesce(q, "r", "order_key", trace=trace)}
        SELECT ARRAY(SELECT done.id FROM done), ARRAY(SELECT done.event_id FROM done),
            ARRAY(SELECT done.trigger_id FROM done),
            (SELECT count(*) FROM added)
        INTO more_ids, more_events, more_triggers, notified;
        outbox_ids := outbox_ids || more_ids;
        event_ids := event_ids || more_events;
        trigger_ids := trigger_ids || more_triggers;
    END IF;
    IF cardinality(ordered_triggers) > 0 THEN
        -- Every row of the call, by id, as the unordered ones alone come.
        SELECT coalesce(array_agg(u.i ORDER BY u.i), '{{}}'),
            coalesce(array_agg(u.e ORDER BY u.i), '{{}}'),
            coalesce(array_agg(u.t ORDER BY u.i), '{{}}')
        INTO outbox_ids, event_ids, trigger_ids
        FROM unnest(outbox_ids, event_ids, trigger_ids) AS u(i, e, t);
    END IF;
    IF cardinality(stale_scopes) > 0 AND cardinality(outbox_ids) > 0 THEN
        {m._recount(q, "stale_scopes")}
    END IF;
    IF $10 AND cardinality(outbox_ids) > 0 THEN
        PERFORM pg_notify('{channel}', '');
    END IF;
END
$emit_many$"""


def _promotion(q: str, channel: str) -> list[str]:
    """The functions of the two promotion triggers (see the module notes). Their statements
    read fresh snapshots (each statement of a volatile PL/pgSQL function does, in READ
    COMMITTED): they see what committed up to the moment they run."""
    first_waiting = f"""
        UPDATE {q}.outbox o SET due_at = clock_timestamp()
        WHERE o.id = (SELECT n.id FROM {q}.outbox n
                      WHERE n.trigger_id = OLD.trigger_id AND n.order_key = OLD.order_key
                      ORDER BY n.key_seq LIMIT 1)
            AND o.due_at = {WAITING} AND o.parked_at IS NULL
            AND NOT EXISTS (SELECT 1 FROM {q}.blocked_keys b
                            WHERE b.trigger_id = OLD.trigger_id
                                AND b.order_key = OLD.order_key)
        RETURNING o.id INTO promoted;"""
    return [
        f"""
CREATE OR REPLACE FUNCTION {q}.key_left() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $left$
DECLARE
    promoted bigint;
BEGIN
    -- An ordered row left the outbox (done, dead-lettered, skipped), or a key's block was
    -- lifted: the key's first row, if it waits, is due now. A trigger delivering every
    -- state wakes the dispatchers for it; a latest-state one waits for the next poll.
    {first_waiting}
    IF promoted IS NOT NULL AND EXISTS (
            SELECT 1 FROM {q}.triggers t WHERE t.id = OLD.trigger_id AND t.delivery = 'all')
    THEN
        PERFORM pg_notify('{channel}', '');
    END IF;
    RETURN NULL;
END
$left$""",
        f"""
CREATE OR REPLACE FUNCTION {q}.promote_waiting() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $promote$
BEGIN
    -- At the commit of a row written to wait: if no earlier row of its key is left, it is
    -- due now. An earlier row a concurrent settlement is deleting is locked by it and
    -- skipped (taken as gone); an earlier row this finds stays locked (KEY SHARE) until the
    -- commit, so a settlement deleting it afterwards sees this row committed and promotes
    -- it. Never waits.
    PERFORM 1 FROM {q}.outbox e
    WHERE e.trigger_id = NEW.trigger_id AND e.order_key = NEW.order_key
        AND e.key_seq < NEW.key_seq
    FOR KEY SHARE SKIP LOCKED;
    IF NOT FOUND THEN
        UPDATE {q}.outbox o SET due_at = clock_timestamp()
        WHERE o.id = NEW.id AND o.due_at = {WAITING} AND o.parked_at IS NULL
            AND NOT EXISTS (SELECT 1 FROM {q}.blocked_keys b
                            WHERE b.trigger_id = NEW.trigger_id
                                AND b.order_key = NEW.order_key);
    END IF;
    RETURN NULL;
END
$promote$""",
        f"""CREATE TRIGGER outbox_key_left AFTER DELETE ON {q}.outbox
        FOR EACH ROW WHEN (OLD.order_key IS NOT NULL)
        EXECUTE FUNCTION {q}.key_left()""",
        f"""CREATE TRIGGER blocked_keys_lifted AFTER DELETE ON {q}.blocked_keys
        FOR EACH ROW EXECUTE FUNCTION {q}.key_left()""",
        f"""CREATE CONSTRAINT TRIGGER outbox_promote_waiting AFTER INSERT ON {q}.outbox
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
        WHEN (NEW.order_key IS NOT NULL AND NEW.due_at = {WAITING})
        EXECUTE FUNCTION {q}.promote_waiting()""",
        f"REVOKE ALL ON FUNCTION {q}.key_left() FROM PUBLIC",
        f"REVOKE ALL ON FUNCTION {q}.promote_waiting() FROM PUBLIC",
    ]


def _functions(*, ordering: bool) -> None:
    s = _schema()
    channel = f"{s}_wake"
    if ordering:
        op.execute(_emit(s, channel))
        op.execute(_emit_many(s, channel))
    else:
        m = _pieces()
        # Same signatures: CREATE OR REPLACE keeps owner, grants and comments.
        op.execute(m._emit(s, channel, with_old=True, conditions=True))
        op.execute(m._emit_many(s, channel, with_old=True, conditions=True))


def upgrade() -> None:
    s = _schema()
    op.add_column(
        "triggers",
        sa.Column("ordering", sa.Text, nullable=False, server_default=sa.text("'none'")),
        schema=s,
    )
    op.add_column("triggers", sa.Column("on_dead_letter", sa.Text, nullable=True), schema=s)
    op.add_column(
        "triggers",
        sa.Column("delivery", sa.Text, nullable=False, server_default=sa.text("'all'")),
        schema=s,
    )
    op.create_check_constraint(
        "triggers_ordering_check",
        "triggers",
        "ordering IN ('none', 'key') AND delivery IN ('all', 'latest') "
        "AND (ordering = 'key') = (on_dead_letter IS NOT NULL) "
        "AND (on_dead_letter IS NULL OR on_dead_letter IN ('block', 'skip')) "
        "AND (delivery = 'all' OR ordering = 'key')",
        schema=s,
    )
    # No CHECK on the outbox's new columns: every inserted row would pay for it.
    op.add_column("outbox", sa.Column("order_key", sa.Text, nullable=True), schema=s)
    op.add_column("outbox", sa.Column("key_seq", sa.BigInteger, nullable=True), schema=s)
    op.add_column("outbox", sa.Column("blocks_key", sa.Boolean, nullable=True), schema=s)
    op.create_index(
        "outbox_key_order_idx",
        "outbox",
        ["trigger_id", "order_key", "key_seq"],
        schema=s,
        postgresql_where=sa.text("order_key IS NOT NULL"),
    )
    op.add_column("dead_letters", sa.Column("order_key", sa.Text, nullable=True), schema=s)
    op.add_column("dead_letters", sa.Column("key_seq", sa.BigInteger, nullable=True), schema=s)
    op.create_table(
        "key_versions",
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("namespace", sa.Text, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column(
            "updated_at",
            pg.TIMESTAMP(timezone=True),
            nullable=False,
            server_default=sa.text("clock_timestamp()"),
        ),
        sa.PrimaryKeyConstraint("scope", "namespace", "key", name="key_versions_pkey"),
        schema=s,
    )
    op.create_table(
        "blocked_keys",
        sa.Column("trigger_id", sa.BigInteger, nullable=False),
        sa.Column("order_key", sa.Text, nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("trigger_name", sa.Text, nullable=False),
        sa.Column("dead_letter_id", sa.BigInteger, nullable=False),
        sa.Column("key_seq", sa.BigInteger, nullable=True),
        sa.Column(
            "blocked_at",
            pg.TIMESTAMP(timezone=True),
            nullable=False,
            server_default=sa.text("clock_timestamp()"),
        ),
        sa.PrimaryKeyConstraint("trigger_id", "order_key", name="blocked_keys_pkey"),
        schema=s,
    )
    op.create_index("blocked_keys_dead_letter_idx", "blocked_keys", ["dead_letter_id"], schema=s)
    op.create_index("blocked_keys_scope_idx", "blocked_keys", ["scope", "blocked_at"], schema=s)
    for statement in _promotion(f'"{s}"', f"{s}_wake"):
        op.execute(statement)
    _functions(ordering=True)


def downgrade() -> None:
    s = _schema()
    _functions(ordering=False)
    q = f'"{s}"'
    op.execute(f"DROP TRIGGER outbox_promote_waiting ON {q}.outbox")
    op.execute(f"DROP TRIGGER outbox_key_left ON {q}.outbox")
    op.execute(f"DROP TABLE {q}.blocked_keys")  # its trigger with it
    op.execute(f"DROP FUNCTION {q}.promote_waiting()")
    op.execute(f"DROP FUNCTION {q}.key_left()")
    op.drop_table("key_versions", schema=s)
    op.drop_column("dead_letters", "key_seq", schema=s)
    op.drop_column("dead_letters", "order_key", schema=s)
    op.drop_index("outbox_key_order_idx", "outbox", schema=s)
    for column in ("blocks_key", "key_seq", "order_key"):
        op.drop_column("outbox", column, schema=s)
    op.drop_constraint("triggers_ordering_check", "triggers", schema=s)
    for column in ("delivery", "on_dead_letter", "ordering"):
        op.drop_column("triggers", column, schema=s)
