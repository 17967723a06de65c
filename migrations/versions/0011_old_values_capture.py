"""Old values and table capture: ``emit`` and ``emit_many`` take the value before the
mutation, and ``capture_row`` turns a host table's row changes into mutations.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06

**Old values.** The emit functions of 0010 are replaced by ones with one more, last, argument
with a default: ``old jsonb DEFAULT NULL`` (``emit``) and ``old jsonb[] DEFAULT NULL``
(``emit_many``), the value the key held before the mutation. Callers that pass ten arguments
are unaffected. The event payload gains the key ``old`` (JSON null when none was given), and
``old`` is checked like ``value`` (size and nesting). A function cannot gain an argument in
place, so the old ones are dropped and the new ones created, and every grant of EXECUTE on
the old ones (docs/least_privilege.sql makes some) is made again on the new ones.

**Table capture.** ``capture_row()`` is a row trigger function (AFTER INSERT OR UPDATE OR
DELETE ... FOR EACH ROW) that ``dispatcher capture add`` attaches to a host table. Its
arguments (``TG_ARGV``) say how to make a mutation of a row:

  0. the format of these arguments, ``'1'``;
  1. the namespace;
  2. ``'scope'`` (a fixed scope) or ``'column'`` (the scope is a column of the row);
  3. the scope, or the name of that column;
  4. the prefix of every key;
  5. and after: the key columns; a key is the prefix then their values joined with ``/``.

An insert is a put of the new row (no old value), a delete a delete with the old row as
``old``, an update a put of the new row with the old row as ``old``; an update that changes
the key or the scope is a delete of the old key (old row as ``old``) and a put of the new one.
A row whose key column or scope column is null is refused (SQLSTATE 22023, naming the table
and the column), and so is a change matching more triggers than ``emit``'s default fan-out cap
(100; SQLSTATE 54000): the writer's statement fails rather than a change going unannounced.
Rows are emitted with ``emit`` (a wake-up hint each), in the writer's transaction, so a
rolled-back change emits nothing. The key and the scope are computed by plain PL/pgSQL
assignments, without a query, so that a captured write costs little more than its ``emit``.
The function runs as its owner (SECURITY DEFINER, a fixed ``search_path``): whoever may write
the table needs no grant on the library's schema.

Later revisions must replace ``capture_row`` with CREATE OR REPLACE, never drop it: the
host tables' triggers refer to it. Downgrading past this revision drops those triggers.
"""

from __future__ import annotations

from alembic import context, op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

# What 0007 and 0010 froze, unchanged: dispatcher.core.models.MAX_NAME_LENGTH and MAX_KEY_LENGTH,
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
    event_id: str,
    scope: str,
    namespace: str,
    key: str,
    op_: str,
    value: str,
    depth: str,
    old: str | None = None,
) -> str:
    old_checks = "\n        " + _value_problem("old", old) if old else ""
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
        {_value_problem("value", value)}{old_checks}
    END"""


def _value_problem(name: str, value: str) -> str:
    return f"""WHEN octet_length({value}::text) > {MAX_VALUE_TEXT_BYTES}
            THEN '{name} is ' || octet_length({value}::text) || ' bytes of JSON text; at most '
                || '{MAX_VALUE_TEXT_BYTES} are allowed'
        WHEN jsonb_path_exists({value},
                'strict $.**{{{MAX_NESTING}}} ? (@.type() == "array" || @.type() == "object")')
            THEN '{name} is nested more than {MAX_NESTING} levels deep; at most {MAX_NESTING} '
                || 'are allowed'"""


def _refuse(function: str, message: str) -> str:
    return f"""RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = '{function}: ' || {message},
            HINT = 'see "Emitting from SQL" in the dispatcher documentation (architecture)';"""


def _payload(
    event_id: str,
    scope: str,
    namespace: str,
    key: str,
    op_: str,
    value: str,
    depth: str,
    root: str,
    old: str | None = None,
) -> str:
    # This revision: the value before the mutation, JSON null when the caller gave none.
    with_old = f",\n        'old', coalesce({old}, 'null'::jsonb)" if old else ""
    return f"""jsonb_build_object('event_id', {event_id}, 'scope', {scope},
        'namespace', {namespace}, 'key', {key}, 'op', {op_},
        'value', coalesce({value}, 'null'::jsonb), 'depth', {depth},
        'root', coalesce({root}, {event_id}){with_old})"""


def _match(
    q: str,
    scope: str,
    namespace: str,
    key: str,
    op_: str,
    prefixes: str,
    condition_event: str | None = None,
) -> str:
    # condition_event (revision 0012 and later): the document a trigger's condition is
    # evaluated on; a trigger without a condition matches as before.
    condition = (
        f"""
        AND CASE WHEN t.condition_path IS NULL THEN true
            ELSE coalesce(jsonb_path_match({condition_event}, t.condition_path,
                t.condition_vars, true), false)
        END"""
        if condition_event
        else ""
    )
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
        END{condition}"""


def _shaped(q: str, payload: str, fields: str) -> str:
    """Revision 0012 and later: the payload a trigger with selected fields receives."""
    return (
        f"CASE WHEN {fields} IS NULL THEN {payload} ELSE {q}.shape_payload({payload}, {fields}) END"
    )


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


def _emit(s: str, channel: str, *, with_old: bool, conditions: bool = False) -> str:
    capped = True  # 0010's backlog check, kept by every later revision
    q = f'"{s}"'
    old = "$11" if with_old else None
    # Revision 0012: conditions and selected fields.
    event = f"{q}.condition_event($5, $4, $6, $11, t.condition_changed)" if conditions else None
    fields_col = ", t.fields AS tfields" if conditions else ""
    payload = f"(SELECT {_payload('$1', '$2', '$3', '$4', '$5', '$6', '$7', '$8', old)})"
    if conditions:
        payload = _shaped(q, payload, "m.tfields")
    problem = _problem("$1", "$2", "$3", "$4", "$5", "$6", "$7", old).replace(
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
    notify boolean DEFAULT true,{" old jsonb DEFAULT NULL," if with_old else ""}
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
            t.registered_by AS tprincipal, {T_POLICY}{fields_col}
        FROM {q}.triggers t
        WHERE (SELECT chk.problem FROM chk) IS NULL
            AND {_match(q, "$2", "$3", "$4", "$5", _prefixes("$4"), event)}
        LIMIT least(greatest($9, 0), {MAX_FANOUT}) + 1
    ),
    ins AS (
        INSERT INTO {q}.outbox (event_id, payload, depth, {SNAPSHOT})
        SELECT $1, {payload},
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


def _emit_many(s: str, channel: str, *, with_old: bool, conditions: bool = False) -> str:
    capped = True  # 0010's backlog check, kept by every later revision
    q = f'"{s}"'
    u = "u.event_id", "u.scope", "u.namespace", "u.key", "u.op", "u.value", "u.depth"
    old_col = " old," if with_old else ""
    # Revision 0012: conditions and selected fields.
    values = " u.value, u.old," if conditions else ""
    event = (
        f"{q}.condition_event(mu.op, mu.key, mu.value, mu.old, t.condition_changed)"
        if conditions
        else None
    )
    fields_col = ", t.fields" if conditions else ""
    many_payload = (
        f"{_shaped(q, 'mu.payload', 't.fields')} AS payload" if conditions else "mu.payload"
    )
    many_match = _match(
        q, "mu.scope", "mu.namespace", "mu.key", "mu.op", _prefixes("mu.key"), event
    )
    bulk_columns = f"event_id, scope, namespace, key, op, value, depth, root,{old_col} ord"
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
    notify boolean DEFAULT true,{" old jsonb[] DEFAULT NULL," if with_old else ""}
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
        OR cardinality($8) <> total{" OR cardinality($11) <> total" if with_old else ""}
    THEN
        {_refuse(f"{s}.emit_many", UNEVEN_OLD if with_old else UNEVEN)}
    END IF;
    SELECT p.ord, p.why INTO bad FROM (
        SELECT u.ord, {_problem(*u, "u.old" if with_old else None)} AS why
        FROM unnest($1, $2, $3, $4, $5, $6, $7{", $11" if with_old else ""})
            WITH ORDINALITY AS u(event_id, scope, namespace, key, op, value, depth,{old_col} ord)
    ) AS p
    WHERE p.why IS NOT NULL
    ORDER BY p.ord LIMIT 1;
    IF FOUND THEN
        {_refuse(f"{s}.emit_many", "'mutation ' || bad.ord || ' of ' || total || ', ' || bad.why")}
    END IF;
    -- The payload is built once per mutation (MATERIALIZED), not once per matching trigger.
    -- Nothing is inserted when any mutation matches more than max_fanout triggers.
    WITH mu AS MATERIALIZED (
        SELECT u.ord, u.event_id, u.scope, u.namespace, u.key, u.op, u.depth,{values}
            {_payload(*u, "u.root", "u.old" if with_old else None)} AS payload
        FROM unnest($1, $2, $3, $4, $5, $6, $7, $8{", $11" if with_old else ""})
            WITH ORDINALITY AS u({bulk_columns})
    ),
    m AS MATERIALIZED (
        SELECT mu.ord, mu.event_id, {many_payload}, mu.depth, t.*
        FROM mu CROSS JOIN LATERAL (
            SELECT t.id AS trigger_id, t.scope, t.name AS trigger_name, t.target,
                t.registered_by, {T_POLICY}, count(*) OVER () AS n{fields_col}
            FROM {q}.triggers t
            WHERE {many_match}
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


UNEVEN_OLD = (
    "'event_id, scope, namespace, key, op, value and depth must be arrays of one length "
    "(root and old too, when given)'"
)

# --- table capture (this revision) ---


def _capture_row(s: str) -> str:
    q = f'"{s}"'
    # emit's default cap (dispatcher.emit.DEFAULT_MAX_FANOUT at this revision).
    fanout = 100

    def locate(row: str, key: str, scope: str) -> str:
        """PL/pgSQL: the key and the scope of ``row`` (jsonb) into ``key`` and ``scope``.
        Plain assignments and a loop, no query: each is a simple expression, evaluated
        without the executor."""
        refuse = """RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('%I.%I: the captured column %I is null in a changed row; '
                    || 'a captured row needs its {what}', TG_TABLE_SCHEMA, TG_TABLE_NAME,
                    {column}),
                HINT = 'give the column a value, or capture the table with another {what} '
                    || 'column (dispatcher capture add)';"""
        return f"""{key} := TG_ARGV[4];
        FOR i IN 5 .. TG_NARGS - 1 LOOP
            part := {row} ->> TG_ARGV[i];
            IF part IS NULL THEN
                {refuse.format(what="key", column="TG_ARGV[i]")}
            END IF;
            {key} := CASE WHEN i = 5 THEN {key} || part ELSE {key} || '/' || part END;
        END LOOP;
        IF TG_ARGV[2] = 'scope' THEN
            {scope} := TG_ARGV[3];
        ELSE
            {scope} := {row} ->> TG_ARGV[3];
            IF {scope} IS NULL THEN
                {refuse.format(what="scope", column="TG_ARGV[3]")}
            END IF;
        END IF;"""

    def emit(scope: str, key: str, op_: str, value: str, old: str) -> str:
        # emit enqueues nothing when more than max_fanout triggers match, and says so only
        # by ``matched``: a change must not go unannounced, so the writer's statement fails.
        return f"""SELECT e.matched INTO matched FROM {q}.emit(gen_random_uuid(), {scope},
            TG_ARGV[1], {key}, '{op_}', {value}, max_fanout => {fanout},
            old => {old}) AS e;
        IF matched > {fanout} THEN
            RAISE EXCEPTION USING ERRCODE = 'program_limit_exceeded',
                MESSAGE = format('{s}.capture_row on %I.%I: the {op_} of key %L matches more '
                    || 'than {fanout} triggers of scope %L and namespace %L, at most '
                    || '{fanout} are allowed; nothing was enqueued',
                    TG_TABLE_SCHEMA, TG_TABLE_NAME, {key}, {scope}, TG_ARGV[1]),
                HINT = 'remove or narrow some of those triggers, or capture the table into '
                    || 'another namespace (dispatcher capture add)';
        END IF;"""

    return f"""
CREATE OR REPLACE FUNCTION {q}.capture_row() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $capture$
DECLARE
    new_row jsonb;
    old_row jsonb;
    new_key text;
    old_key text;
    new_scope text;
    old_scope text;
    part text;
    matched bigint;
BEGIN
    IF TG_NARGS < 6 OR TG_ARGV[0] IS DISTINCT FROM '1' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('{s}.capture_row on %I.%I: arguments of an unknown format; '
                || 'add the capture again (dispatcher capture add)',
                TG_TABLE_SCHEMA, TG_TABLE_NAME);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        new_row := to_jsonb(NEW);
        {locate("new_row", "new_key", "new_scope")}
    END IF;
    IF TG_OP <> 'INSERT' THEN
        old_row := to_jsonb(OLD);
        {locate("old_row", "old_key", "old_scope")}
    END IF;
    IF TG_OP = 'UPDATE' AND (new_key <> old_key OR new_scope <> old_scope) THEN
        -- The row moved: its old key is gone, its new key appears.
        {emit("old_scope", "old_key", "delete", "NULL", "old_row")}
        {emit("new_scope", "new_key", "put", "new_row", "NULL")}
    ELSIF TG_OP = 'DELETE' THEN
        {emit("old_scope", "old_key", "delete", "NULL", "old_row")}
    ELSE
        {emit("new_scope", "new_key", "put", "new_row", "old_row")}
    END IF;
    RETURN NULL;
END
$capture$"""


# --- upgrade and downgrade ---

NEW_SINGLE_ARGS = f"{SINGLE_ARGS}, jsonb"
NEW_BULK_ARGS = f"{BULK_ARGS}, jsonb[]"
OLD_COMMENT = " old: the value before the mutation (payload key old)."


def _replace_functions(*, with_old: bool) -> None:
    """Drop the emit functions of one revision and create the other's, granting EXECUTE
    again to every role that had it."""
    s = _schema()
    q = f'"{s}"'
    channel = f"{s}_wake"
    was = (SINGLE_ARGS, BULK_ARGS) if with_old else (NEW_SINGLE_ARGS, NEW_BULK_ARGS)
    now = (NEW_SINGLE_ARGS, NEW_BULK_ARGS) if with_old else (SINGLE_ARGS, BULK_ARGS)
    for name, before, after in (("emit", was[0], now[0]), ("emit_many", was[1], now[1])):
        # The grantees of EXECUTE on the function being replaced (not its owner).
        op.execute(f"""
DO $keep$
DECLARE
    grantees text[];
    g text;
BEGIN
    SELECT coalesce(array_agg(DISTINCT a.grantee::regrole::text), '{{}}') INTO grantees
    FROM pg_proc p, aclexplode(p.proacl) AS a
    WHERE p.oid = '{q}.{name}({before})'::regprocedure
        AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner;
    DROP FUNCTION {q}.{name}({before});
    {(_emit if name == "emit" else _emit_many)(s, channel, with_old=with_old)};
    REVOKE ALL ON FUNCTION {q}.{name}({after}) FROM PUBLIC;
    FOREACH g IN ARRAY grantees LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION {q}.{name}({after}) TO %s', g);
    END LOOP;
END
$keep$""")
    extra = CAP_COMMENT + (OLD_COMMENT if with_old else "")
    op.execute(f"COMMENT ON FUNCTION {q}.emit({now[0]}) IS '{SINGLE_COMMENT_0007}{extra}'")
    op.execute(f"COMMENT ON FUNCTION {q}.emit_many({now[1]}) IS '{BULK_COMMENT_0007}{extra}'")


def upgrade() -> None:
    s = _schema()
    q = f'"{s}"'
    _replace_functions(with_old=True)
    op.execute(_capture_row(s))
    op.execute(f"REVOKE ALL ON FUNCTION {q}.capture_row() FROM PUBLIC")
    op.execute(
        f"COMMENT ON FUNCTION {q}.capture_row() IS 'Row trigger of a captured table "
        "(dispatcher capture add): emits each inserted, updated or deleted row with its old "
        "and new values.'"
    )


def downgrade() -> None:
    s = _schema()
    q = f'"{s}"'
    # The captures' triggers go with the function they run (theirs only: CASCADE would
    # reach nothing else, but name them to say what is dropped).
    op.execute(f"""
DO $drop$
DECLARE
    t record;
BEGIN
    FOR t IN
        SELECT tg.tgname, n.nspname, c.relname
        FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE tg.tgfoid = '{q}.capture_row()'::regprocedure AND tg.tgparentid = 0
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %I.%I', t.tgname, t.nspname, t.relname);
    END LOOP;
END
$drop$""")
    op.execute(f"DROP FUNCTION {q}.capture_row()")
    _replace_functions(with_old=False)
