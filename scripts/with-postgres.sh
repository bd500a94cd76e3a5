#!/usr/bin/env bash
# Runs a command beside a private Postgres (Debian's postgresql-15, installed if missing): a fresh
# cluster in a temporary directory, listening on 127.0.0.1 at a free port only, trust auth from
# there, stopped and removed when the command ends. The command gets its URL in
# ALCOVE_TEST_DATABASE_URL (database `alcove`, role `alcove`). The server also takes TLS with a
# certificate for 127.0.0.1 from a CA made for the run: ALCOVE_TEST_PG_CA names that CA's PEM, and
# ALCOVE_TEST_PG_OTHER_CA another CA's, which must not be trusted for it.
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

if ! command -v openssl >/dev/null; then
  echo "[with-postgres] installing openssl" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssl >/dev/null
fi

dir=$(mktemp -d /tmp/alcove-pg.XXXXXX)
# Postgres refuses to run as root: as root, the cluster belongs to the `postgres` user.
as_owner=()
if [ "$(id -u)" = 0 ]; then
  chown postgres: "$dir"
  as_owner=(runuser -u postgres --)
fi
cleanup() {
  "${as_owner[@]}" "$PG_BIN/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT
# TLS: a CA for this run, the server's certificate (127.0.0.1) signed by it, and a second CA.
ca() {
  openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -days 2 \
    -subj "/CN=$1" -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$dir/$2.key" -out "$dir/$2.pem" 2>/dev/null
}
ca "alcove test CA" ca && ca "another CA" other-ca
openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -subj "/CN=127.0.0.1" \
  -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' >"$dir/server.ext"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial -days 2 \
  -extfile "$dir/server.ext" -out "$dir/server.pem" 2>/dev/null
chmod 600 "$dir/server.key"
if [ "$(id -u)" = 0 ]; then chown postgres: "$dir/server.key" "$dir/server.pem"; fi
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

"${as_owner[@]}" "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
  || { cat "$dir/initdb.log" >&2; exit 1; }
"${as_owner[@]}" "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c max_connections=200 -c ssl=on -c ssl_cert_file=$dir/server.pem -c ssl_key_file=$dir/server.key" start >/dev/null \
  || { cat "$dir/postgres.log" >&2; exit 1; }
"${as_owner[@]}" "$PG_BIN/psql" -h 127.0.0.1 -p "$port" -U postgres -q -v ON_ERROR_STOP=1 \
  -c "CREATE ROLE alcove LOGIN" -c "CREATE DATABASE alcove OWNER alcove" >/dev/null
echo "[with-postgres] Postgres 15 on 127.0.0.1:$port ($dir)" >&2

export ALCOVE_TEST_DATABASE_URL="postgres://alcove@127.0.0.1:$port/alcove"
export ALCOVE_TEST_PG_CA="$dir/ca.pem" ALCOVE_TEST_PG_OTHER_CA="$dir/other-ca.pem"
"$@"
