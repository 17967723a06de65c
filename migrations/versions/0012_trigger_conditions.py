"""Conditional triggers and selected fields.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07

A trigger may carry a condition over the event (``dispatcher.core.conditions``: the op, the
key, the new and old values, which fields changed) and a list of the fields it receives.

``triggers`` gains:

- ``condition``: the condition as written, normalised (for display); ``condition_path``:
  it compiled to a SQL/JSON path predicate (``jsonpath``), whose every literal is a variable
  of ``condition_vars`` (user text never enters SQL, and only quoted field names enter the
  path); ``condition_changed``: the field paths its ``changed(...)`` tests, a JSON array of
  arrays of names. All four set or all four null.
- ``fields``: the top-level fields of ``value`` and ``old`` a trigger receives (null: all).

The emit functions are replaced (same signatures, so their grants stay) by 0011's, built
with the condition and the fields: a trigger with a condition matches a mutation only when
``jsonb_path_match(condition_event(...), condition_path, condition_vars, silent => true)``
is true, in the caller's transaction, so a mutation that does not match writes no row; a
trigger with fields receives a payload whose ``value`` and ``old`` (when objects) keep only
those fields. ``condition_event`` builds the document the predicate reads:
``{"op", "key", "new", "old", "changed": [bool, ...]}``, each ``changed`` entry being
``(new #> path) IS DISTINCT FROM (old #> path)``; ``shape_payload`` selects the fields.
Both are called only for triggers that have a condition or fields.

0011's function builders are loaded from its file (they are frozen with it); downgrade puts
0011's functions back and drops the columns.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql as pg

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

# dispatcher.core.conditions limits at this revision, for the CHECKs.
MAX_CONDITION_LENGTH = 4096
MAX_FIELDS = 100


def _schema() -> str:
    return str(context.config.attributes.get("schema", "dispatcher"))


def _revision_0011() -> ModuleType:
    path = Path(__file__).with_name("0011_old_values_capture.py")
    spec = importlib.util.spec_from_file_location("dispatcher_migration_0011", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load the migration {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _helpers(q: str) -> list[str]:
    def shape(part: str) -> str:
        return f"""CASE WHEN jsonb_typeof(payload -> '{part}') = 'object' THEN
                (SELECT coalesce(jsonb_object_agg(e.key, e.value), '{{}}'::jsonb)
                 FROM jsonb_each(payload -> '{part}') AS e WHERE e.key = ANY (fields))
            ELSE payload -> '{part}' END"""

    def at(value: str) -> str:
        return f"(coalesce({value}, 'null'::jsonb) #> ARRAY(SELECT jsonb_array_elements_text(c.p)))"

    return [
        f"""
CREATE OR REPLACE FUNCTION {q}.condition_event(
    op text, key text, new_value jsonb, old_value jsonb, changed jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $event$
    SELECT jsonb_build_object('op', op, 'key', key,
        'new', coalesce(new_value, 'null'::jsonb), 'old', coalesce(old_value, 'null'::jsonb),
        'changed', coalesce((
            SELECT jsonb_agg({at("new_value")} IS DISTINCT FROM {at("old_value")} ORDER BY c.i)
            FROM jsonb_array_elements(changed) WITH ORDINALITY AS c(p, i)), '[]'::jsonb))
$event$""",
        f"""
CREATE OR REPLACE FUNCTION {q}.shape_payload(payload jsonb, fields text[]) RETURNS jsonb
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $shape$
    SELECT payload || jsonb_build_object('value', {shape("value")}, 'old', {shape("old")})
$shape$""",
    ]


def _functions(*, conditions: bool) -> None:
    m = _revision_0011()
    s = _schema()
    channel = f"{s}_wake"
    # Same signatures: CREATE OR REPLACE keeps owner, grants and comments.
    op.execute(m._emit(s, channel, with_old=True, conditions=conditions))
    op.execute(m._emit_many(s, channel, with_old=True, conditions=conditions))


def upgrade() -> None:
    s = _schema()
    q = f'"{s}"'
    op.add_column("triggers", sa.Column("condition", sa.Text, nullable=True), schema=s)
    op.add_column("triggers", sa.Column("condition_path", pg.JSONPATH, nullable=True), schema=s)
    op.add_column("triggers", sa.Column("condition_vars", pg.JSONB, nullable=True), schema=s)
    op.add_column("triggers", sa.Column("condition_changed", pg.JSONB, nullable=True), schema=s)
    op.add_column("triggers", sa.Column("fields", pg.ARRAY(sa.Text), nullable=True), schema=s)
    op.create_check_constraint(
        "triggers_condition_check",
        "triggers",
        "(condition IS NULL) = (condition_path IS NULL) "
        "AND (condition IS NULL) = (condition_vars IS NULL) "
        "AND (condition IS NULL) = (condition_changed IS NULL) "
        f"AND (condition IS NULL OR length(condition) <= {MAX_CONDITION_LENGTH})",
        schema=s,
    )
    op.create_check_constraint(
        "triggers_fields_check",
        "triggers",
        f"fields IS NULL OR cardinality(fields) BETWEEN 1 AND {MAX_FIELDS}",
        schema=s,
    )
    for statement in _helpers(q):
        op.execute(statement)
    for fn in (
        "condition_event(text, text, jsonb, jsonb, jsonb)",
        "shape_payload(jsonb, text[])",
    ):
        op.execute(f"REVOKE ALL ON FUNCTION {q}.{fn} FROM PUBLIC")
    _functions(conditions=True)


def downgrade() -> None:
    s = _schema()
    q = f'"{s}"'
    _functions(conditions=False)
    op.execute(f"DROP FUNCTION {q}.condition_event(text, text, jsonb, jsonb, jsonb)")
    op.execute(f"DROP FUNCTION {q}.shape_payload(jsonb, text[])")
    op.drop_constraint("triggers_fields_check", "triggers", schema=s)
    op.drop_constraint("triggers_condition_check", "triggers", schema=s)
    for column in ("fields", "condition_changed", "condition_vars", "condition_path", "condition"):
        op.drop_column("triggers", column, schema=s)
