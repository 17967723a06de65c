"""Table capture: the catalog reads and the DDL of :mod:`dispatcher.capture`.

Identifiers never reach SQL as text of ours: the table is resolved by ``to_regclass`` and
the trigger's DDL is written by the server (``format`` with ``%I``, arguments through
``quote_literal``) from values passed as parameters.
"""

from __future__ import annotations

from dispatcher.sql.common import Statements

# A table as SQL names it: schema and name, each quoted where it must be (keywords too).
QUALIFIED = "format('%I.%I', n.nspname, c.relname) AS qualified"


class CaptureSql(Statements):
    """The statements of :mod:`dispatcher.capture`."""

    def __init__(self, schema: str) -> None:
        super().__init__(schema)
        s = self.quoted
        # The trigger function of migration 0011, null before that revision. Looked up when
        # the statement runs: a '...'::regprocedure constant would be resolved once, when
        # asyncpg prepares the statement, and its oid outlive a downgrade.
        self.capture_function = f"SELECT to_regprocedure('{s}.capture_row()')::oid"
        self.parse_name = "SELECT parse_ident($1)"
        self.table = f"""
            SELECT c.oid, n.nspname, c.relname, c.relkind::text AS relkind, {QUALIFIED}
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.oid = to_regclass($1)"""
        # The table's columns, with the base type of a domain.
        self.columns = """
            SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type,
                coalesce(b.typname, t.typname) AS base
            FROM pg_attribute a
                JOIN pg_type t ON t.oid = a.atttypid
                LEFT JOIN pg_type b ON t.typtype = 'd' AND b.oid = t.typbasetype
            WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
            ORDER BY a.attnum"""
        self.primary_key = """
            SELECT a.attname
            FROM pg_index i
                CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
            WHERE i.indrelid = $1 AND i.indisprimary
            ORDER BY k.ord"""
        # The captures: triggers running the capture function (a partition's clone of its
        # parent's trigger is not one of its own). $1: the function; $2: one table or all.
        self.captures = f"""
            SELECT tg.tgname, n.nspname, c.relname, {QUALIFIED}, tg.tgargs,
                tg.tgenabled <> 'D' AS enabled
            FROM pg_trigger tg
                JOIN pg_class c ON c.oid = tg.tgrelid
                JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE tg.tgfoid = $1 AND tg.tgparentid = 0
                AND ($2::oid IS NULL OR tg.tgrelid = $2)
            ORDER BY n.nspname, c.relname, tg.tgname"""
        # A capture of a partition's ancestor (its rows are captured through it), or of a
        # partition of a partitioned table (its rows would be captured twice). $1: the
        # function; $2: the table.
        self.captured_ancestor = f"""
            SELECT {QUALIFIED}
            FROM pg_partition_ancestors($2::oid::regclass) a
                JOIN pg_trigger tg ON tg.tgrelid = a.relid AND tg.tgfoid = $1
                    AND tg.tgparentid = 0
                JOIN pg_class c ON c.oid = a.relid
                JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE a.relid <> $2::oid
            ORDER BY n.nspname, c.relname LIMIT 1"""
        self.captured_partition = f"""
            SELECT {QUALIFIED}
            FROM pg_partition_tree($2::oid::regclass) p
                JOIN pg_trigger tg ON tg.tgrelid = p.relid AND tg.tgfoid = $1
                    AND tg.tgparentid = 0
                JOIN pg_class c ON c.oid = p.relid
                JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE p.relid <> $2::oid
            ORDER BY n.nspname, c.relname LIMIT 1"""
        self.create_trigger_ddl = f"""
            SELECT format(
                'CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE ON %I.%I '
                'FOR EACH ROW EXECUTE FUNCTION %I.capture_row(%s)',
                $1::text, $2::text, $3::text, '{schema}'::text,
                (SELECT string_agg(quote_literal(a), ', ' ORDER BY i)
                 FROM unnest($4::text[]) WITH ORDINALITY AS u(a, i)))"""
        # The lock CREATE TRIGGER takes, taken first.
        self.lock_table_ddl = (
            "SELECT format('LOCK TABLE %I.%I IN SHARE ROW EXCLUSIVE MODE', $1::text, $2::text)"
        )
        self.drop_trigger_ddl = (
            "SELECT format('DROP TRIGGER %I ON %I.%I', $1::text, $2::text, $3::text)"
        )
