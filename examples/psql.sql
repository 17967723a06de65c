-- Emitting from plain SQL, in your own transaction: the update and the outbox rows commit
-- together (ROLLBACK instead of COMMIT leaves neither). After the setup in docs/embedding.md
-- ("Recipes that run"):
--
--     psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f examples/psql.sql
--
-- dispatcher.emit(event_id, scope, namespace, key, op, value) answers with how many triggers
-- matched and the ids of the outbox rows it wrote and of their triggers. The schema is the
-- library's: `dispatcher` unless you migrated with --schema.
BEGIN;
UPDATE accounts SET plan = 'pro' WHERE id = 42;
SELECT * FROM dispatcher.emit(gen_random_uuid(), 'acme', 'users', 'users/42', 'put', '{"plan": "pro"}');
COMMIT;
