-- Roles and databases the examples in this directory expect, for the postgres container of
-- docker-compose.yml (mounted into /docker-entrypoint-initdb.d, so it runs once, when the
-- data volume is first created, connected to mydb as the superuser). Passwords match
-- userlist.txt: pgcorral logs in with them.

CREATE ROLE app_user LOGIN PASSWORD 'app-pass';
CREATE ROLE users_svc LOGIN PASSWORD 'users-pass';
CREATE ROLE orders_svc LOGIN PASSWORD 'orders-pass';
CREATE ROLE reports_svc LOGIN PASSWORD 'reports-pass';
-- read-replica.ini's mydb_ro logs in as this role; read-only, so a write routed to the
-- "replica" fails even though in compose the replica is the primary.
CREATE ROLE app_ro LOGIN PASSWORD 'app-ro-pass';
GRANT pg_read_all_data TO app_ro;

-- Since PostgreSQL 15 only the owner may create objects in public; the writing roles get
-- that right in mydb, the reporting role owns its own database.
GRANT CREATE, USAGE ON SCHEMA public TO app_user, users_svc, orders_svc;
CREATE DATABASE analytics OWNER reports_svc;
