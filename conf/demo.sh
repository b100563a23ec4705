#!/usr/bin/env bash
# Runs pgcorral in front of a PostgreSQL on a machine that has PostgreSQL's binaries but no
# server running: starts a throwaway cluster (port 5433, data in a temp dir, removed on exit),
# creates user app_user/app-pass and database app, and runs pgcorral on port 6432 in the
# foreground with conf/pgcorral.ini's settings. Ctrl-C stops both.
#
#   conf/demo.sh                # then: PGPASSWORD=app-pass psql -h 127.0.0.1 -p 6432 -U app_user app
#   PG_PORT=5432 conf/demo.sh   # use an existing local server on that port instead (needs app_user)
set -euo pipefail
cd "$(dirname "$0")/.."
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PG_PORT=${PG_PORT:-}
work=$(mktemp -d /tmp/pgcorral-demo.XXXXXX)
chmod 755 "$work"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
  [ -n "${started_pg:-}" ] && as_pg "$PG_BIN/pg_ctl" -D "$work/pg" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

cargo build --release --quiet
if [ -z "$PG_PORT" ]; then
  PG_PORT=5433
  [ "$(id -u)" = 0 ] && chown postgres "$work"
  as_pg "$PG_BIN/initdb" -D "$work/pg" -U postgres --auth=trust >/dev/null
  cat >> "$work/pg/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$work'
password_encryption = 'scram-sha-256'
CONF
  echo "host all all 127.0.0.1/32 scram-sha-256" > "$work/pg/pg_hba.conf"
  echo "local all all trust" >> "$work/pg/pg_hba.conf"
  as_pg "$PG_BIN/pg_ctl" -D "$work/pg" -l "$work/pg.log" -w start >/dev/null
  started_pg=1
  psql -X -q -h "$work" -p "$PG_PORT" -U postgres -c "CREATE ROLE app_user LOGIN PASSWORD 'app-pass'" \
       -c "CREATE DATABASE app OWNER app_user"
  echo "PostgreSQL 15 running on 127.0.0.1:$PG_PORT (data in $work/pg)"
fi
sed -e "s/^app = .*/app = host=127.0.0.1 port=$PG_PORT dbname=app/" \
    -e "s|^auth_file = .*|auth_file = $PWD/conf/userlist.txt|" \
    -e "s|^pidfile = .*|pidfile = $work/pgcorral.pid|" conf/pgcorral.ini > "$work/pgcorral.ini"
echo "pgcorral on 127.0.0.1:6432: PGPASSWORD=app-pass psql -h 127.0.0.1 -p 6432 -U app_user app"
target/release/pgcorral "$work/pgcorral.ini"
