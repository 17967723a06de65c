-- Least-privilege roles for dispatcher.
--
-- Run as the role that owns dispatcher's schema (the one `dispatcher migrate` runs as), in
-- the application's database, after `dispatcher migrate`:
--
--     psql "$OWNER_DATABASE_URL" -v ON_ERROR_STOP=1 -f docs/least_privilege.sql
--
-- It is idempotent: run it again after every `dispatcher migrate`, so that the grants match
-- the tables, views and functions of the current revision exactly. It creates four roles
-- (without passwords; set them with `\password <role>` or your secrets tooling):
--
--   dispatcher_runtime   `dispatcher run` workers (and the admin commands: triggers,
--                        dead-letters, flow control). Reads and writes dispatcher's tables;
--                        reads its views and its migration history; emits (handlers' KV
--                        writes). No DDL anywhere.
--   dispatcher_app       your application: emits and reads and writes the reference KV
--                        table (`KvStore`), nothing else.
--   dispatcher_producer  a service that only emits (its own KV, another language): EXECUTE
--                        on the emit functions and no privilege on any table.
--   dispatcher_readonly  dashboards and alert queries: SELECT on tables and views.
--
-- Producers enqueue only through `emit` and `emit_many`, functions that run as their owner
-- (the migrating role) and write the outbox rows themselves: no producer role can read or
-- write the outbox or read the triggers, so none can choose a row's target or the principal
-- it runs as, nor read other events' payloads. The migration takes EXECUTE on them away from
-- PUBLIC; only the roles below get it back.
--
-- Nothing here grants CREATE on any schema, TRUNCATE, REFERENCES or TRIGGER, nor anything
-- outside dispatcher's schema. PostgreSQL 15 and later no longer let every role create
-- objects in `public`; on older servers also run `REVOKE CREATE ON SCHEMA public FROM
-- PUBLIC` (it affects every role of the database, so it is left to you).
--
-- The schema is "dispatcher" (the default); for another one, replace the name in the
-- `schema_name` lines below.

DO $roles$
DECLARE
    role_name text;
BEGIN
    FOREACH role_name IN ARRAY ARRAY['dispatcher_runtime', 'dispatcher_app', 'dispatcher_producer',
                                     'dispatcher_readonly']
    LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = role_name) THEN
            EXECUTE format(
                'CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION '
                'NOBYPASSRLS NOINHERIT',
                role_name);
        END IF;
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), role_name);
    END LOOP;
END
$roles$;

DO $grants$
DECLARE
    schema_name constant text := 'dispatcher';
    rel record;
BEGIN
    -- Start from nothing, so that a re-run after a migration removes what no longer applies.
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM dispatcher_runtime, '
                   'dispatcher_app, dispatcher_producer, dispatcher_readonly', schema_name);
    EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA %I FROM dispatcher_runtime, '
                   'dispatcher_app, dispatcher_producer, dispatcher_readonly', schema_name);
    EXECUTE format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA %I FROM dispatcher_runtime, '
                   'dispatcher_app, dispatcher_producer, dispatcher_readonly', schema_name);
    EXECUTE format('REVOKE ALL ON SCHEMA %I FROM dispatcher_runtime, dispatcher_app, '
                   'dispatcher_producer, dispatcher_readonly', schema_name);
    -- USAGE only: look up objects, never create them.
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO dispatcher_runtime, dispatcher_app, '
                   'dispatcher_producer, dispatcher_readonly', schema_name);

    FOR rel IN
        SELECT c.relname, c.relkind
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = schema_name AND c.relkind IN ('r', 'p', 'v', 'm')
    LOOP
        EXECUTE format('GRANT SELECT ON %I.%I TO dispatcher_runtime, dispatcher_readonly',
                       schema_name, rel.relname);
        -- Tables, except the migration history, which only `dispatcher migrate` writes.
        IF rel.relkind IN ('r', 'p') AND rel.relname <> 'dispatcher_alembic_version' THEN
            EXECUTE format('GRANT INSERT, UPDATE, DELETE ON %I.%I TO dispatcher_runtime',
                           schema_name, rel.relname);
        END IF;
    END LOOP;

    -- No sequence grants: dispatcher's ids are identity columns, which draw from their
    -- sequences without USAGE on them (tests/chaos/test_least_privilege.py inserts into
    -- every one of them as these roles).

    -- emit and emit_many (migrations 0007 and 0010) match the triggers, check and count
    -- the backlog caps and write the outbox rows as their owner: emitting needs EXECUTE on
    -- them and nothing on the tables (backlog_caps included). The runtime emits too, for the
    -- KV writes handlers make, and counts the capped backlogs and changes the caps
    -- (`dispatcher backlog-caps`) through the table grants above.
    EXECUTE format('GRANT EXECUTE ON FUNCTION %I.emit, %I.emit_many TO dispatcher_runtime, '
                   'dispatcher_app, dispatcher_producer', schema_name, schema_name);
    -- KvStore: the kv table.
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I.kv TO dispatcher_app',
                   schema_name);

    -- Table capture (migration 0011): no grant at all. The writers of a captured table
    -- need none: capture_row runs as its owner, and Postgres checks EXECUTE on a trigger
    -- function when the trigger is created, not when it fires. `dispatcher capture add` and
    -- `remove` are DDL on a host table: they need a role that owns the table (usually your
    -- schema's owner, not one of the roles here), with USAGE on this schema and EXECUTE on capture_row, e.g.
    --     GRANT USAGE ON SCHEMA dispatcher TO app_owner;
    --     GRANT EXECUTE ON FUNCTION dispatcher.capture_row() TO app_owner;
    -- (the migrating role has both). EXECUTE on capture_row lets a table's owner emit any
    -- mutation from that table, so grant it as you would EXECUTE on emit. The REVOKE above
    -- only concerns the four roles here: such a grant survives a re-run of this script.
END
$grants$;
