"""Alembic environment for dispatcher's own migrations.

Run through :func:`dispatcher.migrate.migrate`, which hands over an open connection (already
holding the migration advisory lock) and the target schema in ``config.attributes``.
"""

from __future__ import annotations

from alembic import context

from dispatcher.schema import VERSION_TABLE, build_metadata

config = context.config
connection = config.attributes.get("connection")
schema = config.attributes.get("schema", "dispatcher")
if connection is None:
    raise RuntimeError(
        "dispatcher migrations run through `dispatcher migrate` or dispatcher.migrate(), "
        "not the alembic command line"
    )

context.configure(
    connection=connection,
    target_metadata=build_metadata(schema),
    version_table=VERSION_TABLE,
    version_table_schema=schema,
    include_schemas=False,
)
with context.begin_transaction():
    context.run_migrations()
