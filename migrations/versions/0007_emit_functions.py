"""Fan-out as SQL functions: ``emit`` (one mutation) and ``emit_many`` (arrays).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04

Producers enqueue through these functions and nothing else: they match triggers, enforce the
all-or-nothing fan-out cap, snapshot the policy, build the event payload from their own
arguments and send the wake-up hint, so that no caller can write an outbox row's target or
principal itself. They run as their owner (the role that migrates; SECURITY DEFINER) with a
fixed ``search_path``, and every object they touch is qualified with the schema. EXECUTE is
taken away from PUBLIC: grant it to the roles that emit (docs/least_privilege.sql does).

A caller passes the mutation's value, not the payload; the payload every matching trigger
receives is ``{event_id, scope, namespace, key, op, value, depth, root}``, exactly what
``dispatcher.emit.encode_event`` writes. What a hostile caller could pass is refused with
SQLSTATE 22023 (invalid_parameter_value) and a message naming the argument.

PL/pgSQL rather than LANGUAGE sql: Postgres (before 18) plans a SQL function's body anew on
every call, while PL/pgSQL keeps its plans for the session (on Postgres 15 a single emit cost
about twice the server time as a SQL function).
"""

from __future__ import annotations

from alembic import context, op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# The library's limits at this revision (frozen here: a migration must not change when the
# library does): dispatcher.core.models.MAX_NAME_LENGTH and MAX_KEY_LENGTH,
# dispatcher.emit.MAX_FANOUT and MAX_NESTING, and twice dispatcher.emit.MAX_PAYLOAD_BYTES
# (Postgres writes jsonb with a space after every ',' and ':').
MAX_NAME_LENGTH = 200
MAX_KEY_LENGTH = 1024
MAX_FANOUT = 10_000
MAX_NESTING = 256
MAX_VALUE_TEXT_BYTES = 16 * 1024 * 1024

# dispatcher.sql.POLICY_COLUMNS at this revision.
POLICY = (
    "retry_kind, retry_base_delay, retry_factor, retry_max_delay, retry_jitter, "
    "max_attempts, max_event_age, timeout, park_on"
)
T_POLICY = ", ".join(f"t.{c.strip()}" for c in POLICY.split(","))
SNAPSHOT = f"trigger_id, scope, trigger_name, target, registered_by, {POLICY}"

SINGLE_ARGS = "uuid, text, text, text, text, jsonb, integer, uuid, integer, boolean"
BULK_ARGS = "uuid[], text[], text[], text[], text[], jsonb[], integer[], uuid[], integer, boolean"


def _schema() -> str:
    return str(context.config.attributes.get("schema", "dispatcher"))


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
    """What is wrong with one mutation, as text, or NULL: the same rules as ``Mutation`` and
    ``encode_event``. The size bound is on the JSON text a dispatcher reads back; the
    nesting probe stops at the bound's level, so it costs little on any value."""
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
    # What encode_event writes; a SQL NULL value is JSON null (a delete's value).
    return f"""jsonb_build_object('event_id', {event_id}, 'scope', {scope},
        'namespace', {namespace}, 'key', {key}, 'op', {op_},
        'value', coalesce({value}, 'null'::jsonb), 'depth', {depth},
        'root', coalesce({root}, {event_id}))"""


def _match(q: str, scope: str, namespace: str, key: str, op_: str, prefixes: str) -> str:
    """The trigger-match predicate (``t`` is the trigger). Prefix and glob patterns are found
    through the index by probing every prefix of the key; the glob's LIKE (its literal
    characters escaped at registration) then filters the few candidates."""
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
    # Bounded whatever the key: a longer one is refused, but this may be planned first.
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


def _emit(s: str, channel: str) -> str:
    q = f'"{s}"'
    problem = _problem("$1", "$2", "$3", "$4", "$5", "$6", "$7").replace(
        "CASE", f"CASE\n        {_fanout_problem('$9')}", 1
    )
    # One query does it all, the checks included: every PL/pgSQL statement of its own is set
    # up anew in each transaction, and emitting is usually one call per transaction. Nothing
    # is matched or written when a check fails (the gate on ``m``); the error is raised after.
    # Arguments are referred to by position: their names are the outbox's column names
    # (use_column settles the ON CONFLICT target and the like).
    return f"""
CREATE FUNCTION {q}.emit(
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
    notified bigint;
BEGIN
    WITH chk AS MATERIALIZED (
        SELECT {problem} AS problem
    ),
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
        FROM m WHERE (SELECT count(*) FROM m) <= $9
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
            SELECT pg_notify('{channel}', '') FROM ins WHERE $10 LIMIT 1) AS w)
    INTO problem, matched, outbox_ids, trigger_ids, notified;
    IF problem IS NOT NULL THEN
        {_refuse(f"{s}.emit", "problem")}
    END IF;
END
$emit$"""


def _emit_many(s: str, channel: str) -> str:
    q = f'"{s}"'
    u = "u.event_id", "u.scope", "u.namespace", "u.key", "u.op", "u.value", "u.depth"
    return f"""
CREATE FUNCTION {q}.emit_many(
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
    bad record;
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
    ),
    ins AS (
        INSERT INTO {q}.outbox (event_id, payload, depth, {SNAPSHOT})
        SELECT m.event_id, m.payload, m.depth, m.trigger_id, m.scope, m.trigger_name,
            m.target, m.registered_by, {POLICY}
        FROM m WHERE NOT EXISTS (SELECT 1 FROM over)
        ON CONFLICT (event_id, trigger_id) DO NOTHING
        RETURNING id, event_id, trigger_id
    )
    SELECT (SELECT over.ord FROM over), (SELECT over.n FROM over), (SELECT count(*) FROM m),
        (SELECT coalesce(array_agg(ins.id ORDER BY ins.id), '{{}}') FROM ins),
        (SELECT coalesce(array_agg(ins.event_id ORDER BY ins.id), '{{}}') FROM ins),
        (SELECT coalesce(array_agg(ins.trigger_id ORDER BY ins.id), '{{}}') FROM ins)
    INTO over_ordinal, over_matched, matched, outbox_ids, event_ids, trigger_ids;
    IF $10 AND cardinality(outbox_ids) > 0 THEN
        PERFORM pg_notify('{channel}', '');
    END IF;
END
$emit_many$"""


def upgrade() -> None:
    s = _schema()
    q = f'"{s}"'
    # The wake-up channel the dispatcher listens on (dispatcher.sql.Sql.channel).
    channel = f"{s}_wake"
    op.execute(_emit(s, channel))
    op.execute(_emit_many(s, channel))
    for name, args in (("emit", SINGLE_ARGS), ("emit_many", BULK_ARGS)):
        op.execute(f"REVOKE ALL ON FUNCTION {q}.{name}({args}) FROM PUBLIC")
    op.execute(
        f"COMMENT ON FUNCTION {q}.emit({SINGLE_ARGS}) IS "
        "'Enqueue one outbox row per enabled trigger of the scope matching the mutation, in "
        "the caller''s transaction; nothing when more than max_fanout match (see matched).'"
    )
    op.execute(
        f"COMMENT ON FUNCTION {q}.emit_many({BULK_ARGS}) IS "
        "'emit for many mutations (the same arguments as arrays), all or nothing: when one "
        "matches more than max_fanout triggers, over_ordinal names it and nothing is written.'"
    )


def downgrade() -> None:
    s = _schema()
    q = f'"{s}"'
    op.execute(f"DROP FUNCTION IF EXISTS {q}.emit_many({BULK_ARGS})")
    op.execute(f"DROP FUNCTION IF EXISTS {q}.emit({SINGLE_ARGS})")
