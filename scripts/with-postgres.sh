#!/usr/bin/env bash
# Runs a command beside a private Postgres (Debian's postgresql-15, installed if missing): a fresh
# cluster in a temporary directory, listening on 127.0.0.1 at a free port only, trust auth from
# there, stopped and removed when the command ends. The command gets its URL in
# ALCOVE_TEST_DATABASE_URL (database `alcove`, role `alcove`).
#
#   scripts/with-postgres.sh cargo test -p alcove-store
set -euo pipefail
PG_BIN=/usr/lib/postgresql/15/bin
if [ ! -x "$PG_BIN/initdb" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "with-postgres: $PG_BIN/initdb is missing; install postgresql-15 (apt-get install postgresql-15) or run as root" >&2
    exit 1
  fi
  echo "[with-postgres] installing postgresql-15" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-15 >/dev/null
fi

dir=$(mktemp -d /tmp/alcove-pg.XXXXXX)
# Postgres refuses to run as root: as root, the cluster belongs to the `postgres` user.
as_owner=()
if [ "$(id -u)" = 0 ]; then
  chown postgres: "$dir"
  as_owner=(runuser -u postgres --)
fi
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cleanup() {
  "${as_owner[@]}" "$PG_BIN/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT

"${as_owner[@]}" "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
  || { cat "$dir/initdb.log" >&2; exit 1; }
"${as_owner[@]}" "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c max_connections=200" start >/dev/null \
  || { cat "$dir/postgres.log" >&2; exit 1; }
"${as_owner[@]}" "$PG_BIN/psql" -h 127.0.0.1 -p "$port" -U postgres -q -v ON_ERROR_STOP=1 \
  -c "CREATE ROLE alcove LOGIN" -c "CREATE DATABASE alcove OWNER alcove" >/dev/null
echo "[with-postgres] Postgres 15 on 127.0.0.1:$port ($dir)" >&2

export ALCOVE_TEST_DATABASE_URL="postgres://alcove@127.0.0.1:$port/alcove"
"$@"
