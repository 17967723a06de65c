"""A faster first statement for ``emit_many``: the same rows, checks and results.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-11

``emit_many``'s first statement matches every mutation, checks the fan-out and backlog caps,
and inserts the rows of the unordered triggers (ordered and latest-state triggers have
statements of their own, unchanged). Its time was the insert and, around it, the work of
carrying each matched row through the statement (docs/benchmarks.md, "B3 bulk emit, round
two"). This revision keeps its semantics and lowers that carrying cost:

- the matched rows (``m``, one per mutation and trigger, materialized) hold only the columns
  the outbox takes and the checks read, not the trigger's whole row and the mutation's key
  twice over; with them the insert's sort and the CTE's tuple store stay in memory at the
  default ``work_mem`` for a thousand mutations at fan-out 10, where 0015's spilled to disk;
- the all-or-nothing gate (0015's ``go`` CTE) is written into the insert's condition, as the
  single ``emit`` does (an uncorrelated sub-select, evaluated once);
- the count of matched rows and the ordered triggers' list are one pass over ``m``, not
  three, and the ids, event ids and trigger ids of the rows inserted one pass over them.

The signature is unchanged, so ``CREATE OR REPLACE`` keeps the owner, every grant and the
comment; downgrade puts 0015's function back (0014's frozen builder, with ``trace``) the
same way.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from alembic import context, op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

# The first statement of 0015's emit_many, from its comment to its INTO list, as 0014's
# frozen builder writes it.
FIRST_START = "    -- The payload is built once per mutation (MATERIALIZED)"
FIRST_END = "        ordered_triggers, ordered_ords;\n"


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


def _first_statement(q: str) -> str:
    """Matching, the fan-out and backlog checks and the unordered triggers' rows, with the
    INTO list of 0015's: the same variables, set to the same values."""
    m = _load("0011_old_values_capture.py")
    u = "u.event_id", "u.scope", "u.namespace", "u.key", "u.op", "u.value", "u.depth"
    event = f"{q}.condition_event(mu.op, mu.key, mu.value, mu.old, t.condition_changed)"
    match = m._match(q, "mu.scope", "mu.namespace", "mu.key", "mu.op", m._prefixes("mu.key"), event)
    shaped = m._shaped(q, "mu.payload", "t.fields")
    policy = ", ".join(f"t.{c.strip()}" for c in m.POLICY.split(","))
    m_policy = policy.replace("t.", "m.")
    # Nothing is inserted when a mutation matches more than max_fanout triggers or a scope
    # would pass its backlog cap: both sub-selects are uncorrelated, evaluated once, before
    # the insert reads its first row.
    allowed = "NOT EXISTS (SELECT FROM over) AND NOT EXISTS (SELECT FROM full_scope)"
    return f"""{FIRST_START}, not once per matching
    -- trigger. Nothing is inserted when any mutation matches more than max_fanout triggers.
    -- A matched row holds only what the insert and the checks read: the narrower it is, the
    -- longer the sort and the CTE's tuple store stay in memory.
    WITH mu AS MATERIALIZED (
        SELECT u.ord, u.event_id, u.scope, u.namespace, u.key, u.op, u.depth, u.value, u.old,
            {m._payload(*u, "u.root", "u.old")} AS payload
        FROM unnest($1, $2, $3, $4, $5, $6, $7, $8, $11)
            WITH ORDINALITY AS u(event_id, scope, namespace, key, op, value, depth, root, old, ord)
    ),
    m AS MATERIALIZED (
        SELECT mu.ord, mu.event_id, {shaped} AS payload, mu.depth, t.trigger_id, t.scope,
            t.trigger_name, t.target, t.registered_by, {policy}, t.n, t.ordered
        FROM mu CROSS JOIN LATERAL (
            SELECT t.id AS trigger_id, t.scope, t.name AS trigger_name, t.target,
                t.registered_by, {policy}, count(*) OVER () AS n, t.fields,
                t.ordering = 'key' AS ordered
            FROM {q}.triggers t
            WHERE {match}
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
    ins AS (
        INSERT INTO {q}.outbox (event_id, payload, depth, {m.SNAPSHOT}, traceparent)
        SELECT m.event_id, m.payload, m.depth, m.trigger_id, m.scope, m.trigger_name,
            m.target, m.registered_by, {m_policy}, $12
        FROM m WHERE NOT m.ordered AND {allowed}
        ORDER BY m.ord, m.trigger_id
        ON CONFLICT (event_id, trigger_id) DO NOTHING
        RETURNING id, event_id, trigger_id
    ),
    tally AS (
        SELECT count(*) AS matched,
            array_agg(m.trigger_id ORDER BY m.ord, m.trigger_id) FILTER (WHERE m.ordered)
                AS ordered_triggers,
            array_agg(m.ord ORDER BY m.ord, m.trigger_id) FILTER (WHERE m.ordered)
                AS ordered_ords
        FROM m
    ),
    done AS (
        SELECT coalesce(array_agg(ins.id ORDER BY ins.id), '{{}}') AS ids,
            coalesce(array_agg(ins.event_id ORDER BY ins.id), '{{}}') AS events,
            coalesce(array_agg(ins.trigger_id ORDER BY ins.id), '{{}}') AS triggers
        FROM ins
    )
    SELECT (SELECT over.ord FROM over), (SELECT over.n FROM over), tally.matched,
        done.ids, done.events, done.triggers,
        (SELECT full_scope.scope FROM full_scope), (SELECT full_scope.max_pending FROM full_scope),
        (SELECT full_scope.pending FROM full_scope), (SELECT full_scope.n FROM full_scope),
        ARRAY(SELECT caps.scope FROM caps WHERE caps.stale),
        CASE WHEN {allowed} THEN coalesce(tally.ordered_triggers, '{{}}') ELSE '{{}}' END,
        CASE WHEN {allowed} THEN coalesce(tally.ordered_ords, '{{}}') ELSE '{{}}' END
    FROM tally, done
    INTO over_ordinal, over_matched, matched, outbox_ids, event_ids, trigger_ids,
        refused_scope, refused_max, refused_pending, refused_adding, stale_scopes,
        ordered_triggers, ordered_ords;
"""


def _emit_many_0015(s: str) -> str:
    return str(_load("0014_key_ordering.py")._emit_many(s, f"{s}_wake", trace=True))


def _emit_many(s: str) -> str:
    """0015's emit_many with this revision's first statement."""
    before = _emit_many_0015(s)
    start = before.index(FIRST_START)
    end = before.index(FIRST_END, start) + len(FIRST_END)
    return before[:start] + _first_statement(f'"{s}"') + before[end:]


def upgrade() -> None:
    op.execute(_emit_many(_schema()))


def downgrade() -> None:
    op.execute(_emit_many_0015(_schema()))
