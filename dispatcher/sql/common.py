"""What the statement owners share: the schema injected once, the policy snapshot's columns,
the claimed row's shape, and the trigger-match predicate.

No user text is ever spliced into SQL; the schema name is validated as an identifier before
it is quoted in.
"""

from __future__ import annotations

from dispatcher.names import check_schema_name

# The trigger columns snapshotted into every outbox row (editing a trigger never changes
# rows in flight).
POLICY_COLUMNS = (
    "retry_kind",
    "retry_base_delay",
    "retry_factor",
    "retry_max_delay",
    "retry_jitter",
    "max_attempts",
    "max_event_age",
    "timeout",
    "park_on",
)
POLICY = ", ".join(POLICY_COLUMNS)
T_POLICY = ", ".join(f"t.{c}" for c in POLICY_COLUMNS)
SNAPSHOT = f"trigger_id, scope, trigger_name, target, registered_by, {POLICY}"

# What a claim returns (the row as routing and execution see it); ``o`` is the outbox row.
# :func:`dispatcher.records.claimed_row` reads them by position: see its CLAIMED_COLUMNS.
CLAIMED = f"""o.id, o.lease_token, o.event_id, o.trigger_id, o.scope, o.trigger_name,
                o.target, o.registered_by, o.payload, o.attempts, o.orphans, o.depth,
                o.reply_to, o.reply_owner, o.dead_letter_id, {POLICY},
                extract(epoch FROM clock_timestamp() - o.created_at)::float8 AS age,
                o.traceparent"""


def trigger_matches(t: str, namespace: str, key: str) -> str:
    """Whether trigger ``t``'s pattern matches a mutation: the SQL form of
    :meth:`dispatcher.core.patterns.KeyPattern.matches`, over the columns the pattern was
    compiled into. The emit functions of migration 0007 hold their own copy (a migration is
    frozen at its revision), which finds prefix matches by an index range instead.

    >>> print(trigger_matches("t", "$1", "$2"))  # doctest: +NORMALIZE_WHITESPACE
    t.namespace = $1
        AND CASE t.pattern_kind
            WHEN 'exact' THEN t.match_prefix = $2
            WHEN 'prefix' THEN starts_with($2, t.match_prefix)
            ELSE ($2) LIKE t.match_like ESCAPE '\\'
        END
    """
    return f"""{t}.namespace = {namespace}
                    AND CASE {t}.pattern_kind
                        WHEN 'exact' THEN {t}.match_prefix = {key}
                        WHEN 'prefix' THEN starts_with({key}, {t}.match_prefix)
                        ELSE ({key}) LIKE {t}.match_like ESCAPE '\\'
                    END"""


class Statements:
    """The base of every statement owner: the schema, quoted once, and its wake-up channel.

    The owners cooperate (each ``__init__`` calls ``super().__init__``), so
    :class:`dispatcher.sql.Sql` builds all of them with one call.
    """

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.quoted = f'"{check_schema_name(schema)}"'
        self.channel = f"{schema}_wake"
