-- The host table the recipes in this directory update: your own data, in the same database
-- as dispatcher's schema. Once per database, after `dispatcher migrate`:
--
--     psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f examples/accounts.sql
CREATE TABLE IF NOT EXISTS accounts (id integer PRIMARY KEY, plan text NOT NULL);
INSERT INTO accounts (id, plan) VALUES (42, 'free') ON CONFLICT (id) DO NOTHING;
