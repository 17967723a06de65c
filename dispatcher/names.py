"""Names the library's schema is built from, without importing SQLAlchemy: the schema
name (validated before it is ever quoted into SQL), the version table, the limits the
tables' CHECK constraints encode."""

from __future__ import annotations

import re

from dispatcher.core.errors import InvalidInput

DEFAULT_SCHEMA = "dispatcher"
VERSION_TABLE = "dispatcher_alembic_version"
# At most 58 characters: the wake-up channel is the name and "_wake", and a channel, like
# any Postgres identifier, holds at most 63 bytes (a longer one fails every emit).
MAX_SCHEMA_NAME_LENGTH = 58
_SCHEMA_NAME = re.compile(rf"[a-z_][a-z0-9_]{{0,{MAX_SCHEMA_NAME_LENGTH - 1}}}")

# The longest handler time limit a trigger may have (seconds).
MAX_TIMEOUT = 3600.0

# The longest interval between two counts of a capped scope's backlog (seconds; a day).
MAX_RECOUNT_INTERVAL = 86_400.0


def check_schema_name(schema: str) -> str:
    if not isinstance(schema, str) or not _SCHEMA_NAME.fullmatch(schema):
        raise InvalidInput(
            "schema",
            schema,
            "must be a lower-case Postgres identifier: a letter or '_', then letters, digits "
            f"or '_', at most {MAX_SCHEMA_NAME_LENGTH} characters",
        )
    return schema
