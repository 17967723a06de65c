"""Backlog caps: a scope may cap its pending outbox rows; an emit past the cap is refused.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05

``backlog_caps`` holds one row per capped scope: the cap (``max_pending``), the scope's
pending rows as last counted (``pending``, ``counted_at``) and how often to count again
(``recount_interval``, seconds). The emit functions of 0007 are replaced, with the same
signatures and results, by ones that check the cap of each scope of the call before
anything is inserted:

- a primary-key lookup of the scope in ``backlog_caps``; no row, no cap, nothing more (the
  cost an uncapped emit pays);
- with a cap: when the last count plus the rows the call would add for the scope (the
  triggers its mutations match) is over the cap, nothing is inserted and the function
  raises SQLSTATE ``54Q01`` (class 54, program limit exceeded; ``Q01`` is in the
  implementation-defined range), naming the scope, the cap and the backlog in its message
  and, as JSON ``{"scope", "cap", "backlog", "adding"}``, in its DETAIL. The raise aborts
  the caller's transaction, which the caller rolls back; nothing already queued is touched;
- a call that did enqueue for a capped scope whose count is older than its
  ``recount_interval`` counts the scope's rows again (its own included), if it can lock the
  cap's row without waiting (``FOR NO KEY UPDATE SKIP LOCKED``; the lock is kept until its
  transaction ends, so one count per interval). A refused call never counts: its count
  would be rolled back with it, and a full scope would be counted again by every refused
  call. Counts also come from dispatchers (after they settle rows, which is how a full
  scope's count goes down) and from operators setting a cap.

A soft cap: between counts, rows other transactions enqueue for the scope are not counted, so
a scope may pass its cap by what producers commit for it within one ``recount_interval``
plus the duration of the transaction that counted.

A count reads the scope's rows of the outbox, which has no index on ``scope``: a sequential
scan of the outbox.

Under REPEATABLE READ or SERIALIZABLE, locking a cap another transaction counted again after
this one's snapshot raises a serialization failure: it is caught (in a subtransaction,
entered only when a count is due) and the count is left to that other transaction.

Downgrade puts 0007's functions back (their text is built here by the same code with the
check left out, frozen at this revision like 0007's) and drops the table.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql as pg

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# What 0007 froze, unchanged: dispatcher.core.models.MAX_NAME_LENGTH and MAX_KEY_LENGTH,
# dispatcher.emit.MAX_FANOUT and MAX_NESTING, and twice dispatcher.emit.MAX_PAYLOAD_BYTES.
MAX_NAME_LENGTH = 200
MAX_KEY_LENGTH = 1024
MAX_FANOUT = 10_000
MAX_NESTING = 256
MAX_VALUE_TEXT_BYTES = 16 * 1024 * 1024

# dispatcher.core.errors.BACKLOG_FULL_SQLSTATE at this revision.
BACKLOG_FULL = "54Q01"
# The longest recount interval a cap may have (a day; the CHECK also refuses NaN).
MAX_RECOUNT_INTERVAL = 86_400

# dispatcher.sql.POLICY_COLUMNS at this revision.
POLICY = (
    "retry_kind, retry_base_delay, retry_factor, retry_max_delay, retry_jitter, "
    "max_attempts, max_event_age, timeout, park_on"
)
T_POLICY = ", ".join(f"t.{c.strip()}" for c in POLICY.split(","))
SNAPSHOT = f"trigger_id, scope, trigger_name, target, registered_by, {POLICY}"

SINGLE_ARGS = "uuid, text, text, text, text, jsonb, integer, uuid, integer, boolean"
BULK_ARGS = "uuid[], text[], text[], text[], text[], jsonb[], integer[], uuid[], integer, boolean"

SINGLE_COMMENT_0007 = (
    "Enqueue one outbox row per enabled trigger of the scope matching the mutation, in "
    "the caller''s transaction; nothing when more than max_fanout match (see matched)."
)
BULK_COMMENT_0007 = (
    "emit for many mutations (the same arguments as arrays), all or nothing: when one "
    "matches more than max_fanout triggers, over_ordinal names it and nothing is written."
)
CAP_COMMENT = (
    " Refused with SQLSTATE 54Q01 when it would take a scope past its backlog cap (backlog_caps)."
)


def _schema() -> str:
    return str(context.config.attributes.get("schema", "dispatcher"))


# --- 0007's builders, frozen (a migration must not change when the library does) ---


def _name_problem(field: str, expr: str, max_length: int) -> str:
    # [\x01-\x1f\x7f]: control characters (text cannot hold NUL), as check_name refuses them.
    return (
        f"WHEN {expr} IS NULL OR length({expr}) NOT BETWEEN 1 AND {max_length} "
        f"OR {expr} ~ '[\\x01-\\x1f\\x7f]' "
        f"THEN '{field} must be 1 to {max_length} characters, without control characters'"
    )


def _problem(
    event_id: str, scope: str, namespace: str, key: str, op_: str, value: str, depth: str
) -> str:
    return f"""CASE
        WHEN {event_id} IS NULL THEN 'event_id must not be null'
        {_name_problem("scope", scope, MAX_NAME_LENGTH)}
        {_name_problem("namespace", namespace, MAX_NAME_LENGTH)}
        {_name_problem("key", key, MAX_KEY_LENGTH)}
        WHEN {op_} IS NULL OR {op_} NOT IN ('put', 'delete')
            THEN 'op must be ''put'' or ''delete'', not '
                || coalesce(quote_literal(left({op_}, 40)), 'null')
        WHEN {depth} IS NULL OR {depth} < 0
            THEN 'depth must be a non-negative integer, not ' || coalesce({depth}::text, 'null')
        WHEN octet_length({value}::text) > {MAX_VALUE_TEXT_BYTES}
            THEN 'value is ' || octet_length({value}::text) || ' bytes of JSON text; at most '
                || '{MAX_VALUE_TEXT_BYTES} are allowed'
        WHEN jsonb_path_exists({value},
                'strict $.**{{{MAX_NESTING}}} ? (@.type() == "array" || @.type() == "object")')
            THEN 'value is nested more than {MAX_NESTING} levels deep; at most {MAX_NESTING} '
                || 'are allowed'
    END"""


def _refuse(function: str, message: str) -> str:
    return f"""RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = '{function}: ' || {message},
            HINT = 'see "Emitting from SQL" in the dispatcher documentation (architecture)';"""


def _payload(
    event_id: str, scope: str, namespace: str, key: str, op_: str, value: str, depth: str, root: str
) -> str:
    return f"""jsonb_build_object('event_id', {event_id}, 'scope', {scope},
        'namespace', {namespace}, 'key', {key}, 'op', {op_},
        'value', coalesce({value}, 'null'::jsonb), 'depth', {depth},
        'root', coalesce({root}, {event_id}))"""


def _match(q: str, scope: str, namespace: str, key: str, op_: str, prefixes: str) -> str:
    return f"""t.scope = {scope}
        AND t.namespace = {namespace}
        AND t.match_prefix = ANY ({prefixes})
        AND t.enabled
        AND NOT t.is_dead_letter_handler
        AND {op_} = ANY (t.ops)
        AND CASE t.pattern_kind
            WHEN 'exact' THEN t.match_prefix = {key}
            WHEN 'prefix' THEN true
            ELSE {key} LIKE t.match_like ESCAPE '\\'
        END"""


def _prefixes(key: str) -> str:
    return (
        f"ARRAY(SELECT left({key}, n) "
        f"FROM generate_series(0, least(length({key}), {MAX_KEY_LENGTH})) AS g(n))"
    )


def _fanout_problem(max_fanout: str) -> str:
    return (
        f"WHEN {max_fanout} IS NULL OR {max_fanout} NOT BETWEEN 1 AND {MAX_FANOUT} "
        f"THEN 'max_fanout must be 1 to {MAX_FANOUT}, not ' "
        f"|| coalesce({max_fanout}::text, 'null')"
    )


def _fanout_check(function: str) -> str:
    return f"""IF max_fanout IS NULL OR max_fanout NOT BETWEEN 1 AND {MAX_FANOUT} THEN
        {_refuse(function, f"CASE {_fanout_problem('max_fanout')} END")}
    END IF;"""


UNEVEN = (
    "'event_id, scope, namespace, key, op, value and depth must be arrays of one length "
    "(root too, when given)'"
)


# --- the backlog check (this revision) ---

STALE = (
    "({c}.counted_at IS NULL OR {c}.counted_at "
    "<= clock_timestamp() - {c}.recount_interval * interval '1 second')"
)


def _recount(q: str, scopes: str) -> str:
    """PL/pgSQL: count again the pending rows of the capped scopes among ``scopes`` (an
    array) whose count is due, in a call that has just enqueued for them (its rows are
    counted). Only the transaction that locks a cap's row counts it, and keeps the lock
    until it ends; the others skip it (SKIP LOCKED). Never waits."""
    return f"""BEGIN
            WITH due AS MATERIALIZED (
                SELECT b.scope FROM {q}.backlog_caps b
                WHERE b.scope = ANY ({scopes}) AND {STALE.format(c="b")}
                FOR NO KEY UPDATE SKIP LOCKED
            )
            UPDATE {q}.backlog_caps c
            SET pending = (SELECT count(*) FROM {q}.outbox o WHERE o.scope = c.scope),
                counted_at = clock_timestamp()
            FROM due WHERE c.scope = due.scope;
        EXCEPTION WHEN serialization_failure THEN
            -- REPEATABLE READ or SERIALIZABLE: the cap was counted again after this
            -- transaction's snapshot, which is as good.
            NULL;
        END;"""


def _full(function: str, scope: str, cap: str, backlog: str, adding: str) -> str:
    return f"""RAISE EXCEPTION USING ERRCODE = '{BACKLOG_FULL}',
            MESSAGE = '{function}: the backlog of scope ' || quote_literal({scope})
                || ' is full: ' || {backlog} || ' rows pending, its cap is ' || {cap}
                || ', and this call would add ' || {adding} || '; nothing was enqueued',
            DETAIL = jsonb_build_object('scope', {scope}, 'cap', {cap}, 'backlog', {backlog},
                'adding', {adding})::text,
            HINT = 'roll the transaction back and retry once the dispatcher has drained the '
                || 'scope, or raise the cap (dispatcher backlog-caps set)';"""


# --- the functions ---


def _emit(s: str, channel: str, *, capped: bool) -> str:
    q = f'"{s}"'
    problem = _problem("$1", "$2", "$3", "$4", "$5", "$6", "$7").replace(
        "CASE", f"CASE\n        {_fanout_problem('$9')}", 1
    )
    # The cap is read in the one query (``cap``: no row, no cap), which inserts only when the
    # rows the call would add (its matches) fit under it by the last count. A refused call
    # counts nothing: its transaction is aborted, and a count would be lost with it.
    declare = (
        "\n    cap_max bigint;\n    cap_pending bigint;\n    cap_stale boolean;" if capped else ""
    )
    cap_cte = (
        f"""
    cap AS MATERIALIZED (
        SELECT c.max_pending, c.pending, {STALE.format(c="c")} AS stale
        FROM {q}.backlog_caps c WHERE c.scope = $2
    ),"""
        if capped
        else ""
    )
    gate = (
        "\n            AND NOT EXISTS (SELECT FROM cap"
        "\n                WHERE cap.pending + (SELECT count(*) FROM m) > cap.max_pending)"
        if capped
        else ""
    )
    cap_out = (
        ",\n        (SELECT cap.max_pending FROM cap), (SELECT cap.pending FROM cap),"
        "\n        (SELECT cap.stale FROM cap)"
        if capped
        else ""
    )
    cap_into = ", cap_max, cap_pending, cap_stale" if capped else ""
    full = _full(f"{s}.emit", "$2", "cap_max", "cap_pending", "matched")
    after = (
        f"""
    IF cap_max IS NOT NULL AND matched <= $9 THEN
        IF matched > 0 AND cap_pending + matched > cap_max THEN
            {full}
        END IF;
        IF cap_stale AND cardinality(outbox_ids) > 0 THEN
            {_recount(q, "ARRAY[$2]")}
        END IF;
    END IF;"""
        if capped
        else ""
    )
    # One query does it all, the checks included: every PL/pgSQL statement of its own is set
    # up anew in each transaction, and emitting is usually one call per transaction.
    # Nothing is matched or written when a check fails (the gate on ``m``); the error is
    # raised after. Arguments are referred to by position: their names are the outbox's
    # column names (use_column settles the ON CONFLICT target and the like).
    return f"""
CREATE OR REPLACE FUNCTION {q}.emit(
    event_id uuid, scope text, namespace text, key text, op text, value jsonb,
    depth integer DEFAULT 0, root uuid DEFAULT NULL, max_fanout integer DEFAULT 100,
    notify boolean DEFAULT true,
    OUT matched bigint, OUT outbox_ids bigint[], OUT trigger_ids bigint[])
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $emit$
#variable_conflict use_column
DECLARE
    problem text;
    notified bigint;{declare}
BEGIN
    WITH chk AS MATERIALIZED (
        SELECT {problem} AS problem
    ),{cap_cte}
    m AS MATERIALIZED (
        SELECT t.id AS tid, t.name AS tname, t.target AS ttarget,
            t.registered_by AS tprincipal, {T_POLICY}
        FROM {q}.triggers t
        WHERE (SELECT chk.problem FROM chk) IS NULL
            AND {_match(q, "$2", "$3", "$4", "$5", _prefixes("$4"))}
        LIMIT least(greatest($9, 0), {MAX_FANOUT}) + 1
    ),
    ins AS (
        INSERT INTO {q}.outbox (event_id, payload, depth, {SNAPSHOT})
        SELECT $1, (SELECT {_payload("$1", "$2", "$3", "$4", "$5", "$6", "$7", "$8")}),
            $7, m.tid, $2, m.tname, m.ttarget, m.tprincipal, {POLICY}
        FROM m WHERE (SELECT count(*) FROM m) <= $9{gate}
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
            SELECT pg_notify('{channel}', '') FROM ins WHERE $10 LIMIT 1) AS w){cap_out}
    INTO problem, matched, outbox_ids, trigger_ids, notified{cap_into};
    IF problem IS NOT NULL THEN
        {_refuse(f"{s}.emit", "problem")}
    END IF;{after}
END
$emit$"""


def _emit_many(s: str, channel: str, *, capped: bool) -> str:
    q = f'"{s}"'
    u = "u.event_id", "u.scope", "u.namespace", "u.key", "u.op", "u.value", "u.depth"
    declare = (
        """
    refused_scope text;
    refused_max bigint;
    refused_pending bigint;
    refused_adding bigint;
    stale_scopes text[];"""
        if capped
        else ""
    )
    # The caps of the call's scopes, and the first capped scope (in scope order) whose
    # matches do not fit under it by the last count: then nothing is inserted.
    cap_ctes = (
        f"""
    caps AS MATERIALIZED (
        SELECT c.scope, c.max_pending, c.pending, {STALE.format(c="c")} AS stale
        FROM {q}.backlog_caps c
        WHERE c.scope IN (SELECT DISTINCT mu.scope FROM mu)
    ),
    full_scope AS (
        SELECT caps.scope, caps.max_pending, caps.pending, k.n
        FROM caps CROSS JOIN LATERAL (SELECT count(*) AS n FROM m WHERE m.scope = caps.scope) k
        WHERE k.n > 0 AND caps.pending + k.n > caps.max_pending
        ORDER BY caps.scope LIMIT 1
    ),"""
        if capped
        else ""
    )
    gate = " AND NOT EXISTS (SELECT FROM full_scope)" if capped else ""
    cap_out = (
        """,
        (SELECT full_scope.scope FROM full_scope), (SELECT full_scope.max_pending FROM full_scope),
        (SELECT full_scope.pending FROM full_scope), (SELECT full_scope.n FROM full_scope),
        ARRAY(SELECT caps.scope FROM caps WHERE caps.stale)"""
        if capped
        else ""
    )
    cap_into = (
        ",\n        refused_scope, refused_max, refused_pending, refused_adding, stale_scopes"
        if capped
        else ""
    )
    full = _full(
        f"{s}.emit_many", "refused_scope", "refused_max", "refused_pending", "refused_adding"
    )
    after = (
        f"""
    IF over_ordinal IS NULL AND refused_scope IS NOT NULL THEN
        {full}
    END IF;
    IF cardinality(stale_scopes) > 0 AND cardinality(outbox_ids) > 0 THEN
        {_recount(q, "stale_scopes")}
    END IF;"""
        if capped
        else ""
    )
    return f"""
CREATE OR REPLACE FUNCTION {q}.emit_many(
    event_id uuid[], scope text[], namespace text[], key text[], op text[], value jsonb[],
    depth integer[], root uuid[] DEFAULT NULL, max_fanout integer DEFAULT 100,
    notify boolean DEFAULT true,
    OUT over_ordinal bigint, OUT over_matched bigint, OUT matched bigint,
    OUT outbox_ids bigint[], OUT event_ids uuid[], OUT trigger_ids bigint[])
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $emit_many$
#variable_conflict use_column
DECLARE
    total integer := cardinality($1);
    bad record;{declare}
BEGIN
    {_fanout_check(f"{s}.emit_many")}
    IF total IS NULL
        OR cardinality($2) IS DISTINCT FROM total OR cardinality($3) IS DISTINCT FROM total
        OR cardinality($4) IS DISTINCT FROM total OR cardinality($5) IS DISTINCT FROM total
        OR cardinality($6) IS DISTINCT FROM total OR cardinality($7) IS DISTINCT FROM total
        OR cardinality($8) <> total
    THEN
        {_refuse(f"{s}.emit_many", UNEVEN)}
    END IF;
    SELECT p.ord, p.why INTO bad FROM (
        SELECT u.ord, {_problem(*u)} AS why
        FROM unnest($1, $2, $3, $4, $5, $6, $7)
            WITH ORDINALITY AS u(event_id, scope, namespace, key, op, value, depth, ord)
    ) AS p
    WHERE p.why IS NOT NULL
    ORDER BY p.ord LIMIT 1;
    IF FOUND THEN
        {_refuse(f"{s}.emit_many", "'mutation ' || bad.ord || ' of ' || total || ', ' || bad.why")}
    END IF;
    -- The payload is built once per mutation (MATERIALIZED), not once per matching trigger.
    -- Nothing is inserted when any mutation matches more than max_fanout triggers.
    WITH mu AS MATERIALIZED (
        SELECT u.ord, u.event_id, u.scope, u.namespace, u.key, u.op, u.depth,
            {_payload(*u, "u.root")} AS payload
        FROM unnest($1, $2, $3, $4, $5, $6, $7, $8)
            WITH ORDINALITY AS u(event_id, scope, namespace, key, op, value, depth, root, ord)
    ),
    m AS MATERIALIZED (
        SELECT mu.ord, mu.event_id, mu.payload, mu.depth, t.*
        FROM mu CROSS JOIN LATERAL (
            SELECT t.id AS trigger_id, t.scope, t.name AS trigger_name, t.target,
                t.registered_by, {T_POLICY}, count(*) OVER () AS n
            FROM {q}.triggers t
            WHERE {_match(q, "mu.scope", "mu.namespace", "mu.key", "mu.op", _prefixes("mu.key"))}
            LIMIT $9 + 1
        ) t
    ),
    over AS (
        SELECT m.ord, m.n FROM m WHERE m.n > $9 ORDER BY m.ord LIMIT 1
    ),{cap_ctes}
    ins AS (
        INSERT INTO {q}.outbox (event_id, payload, depth, {SNAPSHOT})
        SELECT m.event_id, m.payload, m.depth, m.trigger_id, m.scope, m.trigger_name,
            m.target, m.registered_by, {POLICY}
        FROM m WHERE NOT EXISTS (SELECT 1 FROM over){gate}
        ON CONFLICT (event_id, trigger_id) DO NOTHING
        RETURNING id, event_id, trigger_id
    )
    SELECT (SELECT over.ord FROM over), (SELECT over.n FROM over), (SELECT count(*) FROM m),
        (SELECT coalesce(array_agg(ins.id ORDER BY ins.id), '{{}}') FROM ins),
        (SELECT coalesce(array_agg(ins.event_id ORDER BY ins.id), '{{}}') FROM ins),
        (SELECT coalesce(array_agg(ins.trigger_id ORDER BY ins.id), '{{}}') FROM ins){cap_out}
    INTO over_ordinal, over_matched, matched, outbox_ids, event_ids, trigger_ids{cap_into};{after}
    IF $10 AND cardinality(outbox_ids) > 0 THEN
        PERFORM pg_notify('{channel}', '');
    END IF;
END
$emit_many$"""


def _functions(*, capped: bool) -> None:
    s = _schema()
    q = f'"{s}"'
    # The wake-up channel the dispatcher listens on (dispatcher.sql.Sql.channel).
    channel = f"{s}_wake"
    # CREATE OR REPLACE keeps the functions' owner, privileges (no EXECUTE for PUBLIC) and
    # the grants docs/least_privilege.sql made.
    op.execute(_emit(s, channel, capped=capped))
    op.execute(_emit_many(s, channel, capped=capped))
    extra = CAP_COMMENT if capped else ""
    op.execute(f"COMMENT ON FUNCTION {q}.emit({SINGLE_ARGS}) IS '{SINGLE_COMMENT_0007}{extra}'")
    op.execute(f"COMMENT ON FUNCTION {q}.emit_many({BULK_ARGS}) IS '{BULK_COMMENT_0007}{extra}'")


def upgrade() -> None:
    s = _schema()
    op.create_table(
        "backlog_caps",
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("max_pending", sa.BigInteger, nullable=False),
        sa.Column("pending", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("counted_at", pg.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("recount_interval", sa.Float, nullable=False, server_default=sa.text("1.0")),
        sa.Column(
            "updated_at",
            pg.TIMESTAMP(timezone=True),
            nullable=False,
            server_default=sa.text("clock_timestamp()"),
        ),
        sa.PrimaryKeyConstraint("scope", name="backlog_caps_pkey"),
        sa.CheckConstraint("max_pending > 0", name="backlog_caps_max_pending_check"),
        sa.CheckConstraint(
            f"recount_interval > 0 AND recount_interval <= {MAX_RECOUNT_INTERVAL}",
            name="backlog_caps_recount_interval_check",
        ),
        schema=s,
    )
    _functions(capped=True)


def downgrade() -> None:
    _functions(capped=False)
    op.drop_table("backlog_caps", schema=_schema())
