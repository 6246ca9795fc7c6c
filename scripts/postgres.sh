#!/usr/bin/env bash
# Start a throwaway PostgreSQL server for the ledger tests and print its URL on stdout.
#
# Run as root on a fresh Debian/Ubuntu machine (CI):
#     export MESHPOOL_TEST_POSTGRES_URL="$(sudo scripts/postgres.sh)"
# Installs PostgreSQL with apt if missing, starts a cluster listening on 127.0.0.1 only
# (port $PGPORT, default 55432) in $PGDATA_DIR (default /tmp/meshpool-pg), creates the
# role and database "meshpool_test" (password "meshpool_test") and prints
#     postgresql://meshpool_test:meshpool_test@127.0.0.1:55432/meshpool_test
# Running it again reuses the running cluster. Logs go to stderr and $PGDATA_DIR/server.log.
set -euo pipefail

port="${PGPORT:-55432}"
datadir="${PGDATA_DIR:-/tmp/meshpool-pg}"
name="meshpool_test"
log() { echo "postgres.sh: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "run me as root (I install packages and switch to the postgres user)"
    exit 1
fi

bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
    log "installing postgresql with apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
    bindir="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
fi

as_pg() { su postgres -s /bin/bash -c "$*"; }

if ! as_pg "'$bindir/pg_ctl' -D '$datadir' status" >/dev/null 2>&1; then
    if [ ! -f "$datadir/PG_VERSION" ]; then
        log "creating a cluster in $datadir"
        mkdir -p "$datadir"
        chown postgres:postgres "$datadir"
        chmod 700 "$datadir"
        as_pg "'$bindir/initdb' -D '$datadir' -A scram-sha-256 -U postgres --pwfile=<(echo postgres)" >&2
    fi
    # Unix socket in the data dir so that no system directory is needed; TCP on loopback only.
    # fsync stays on: the tests kill writers and must see what a real server does.
    as_pg "'$bindir/pg_ctl' -D '$datadir' -l '$datadir/server.log' -w \
        -o \"-c listen_addresses=127.0.0.1 -p $port -k $datadir -c max_connections=200\" start" >&2
fi

psql_pg() { PGPASSWORD=postgres "$bindir/psql" -h 127.0.0.1 -p "$port" -U postgres -v ON_ERROR_STOP=1 -qtA "$@"; }
if [ "$(psql_pg -c "SELECT 1 FROM pg_roles WHERE rolname = '$name'")" != 1 ]; then
    psql_pg -c "CREATE ROLE $name LOGIN PASSWORD '$name'" >&2
fi
if [ "$(psql_pg -c "SELECT 1 FROM pg_database WHERE datname = '$name'")" != 1 ]; then
    psql_pg -c "CREATE DATABASE $name OWNER $name" >&2
fi
echo "postgresql://$name:$name@127.0.0.1:$port/$name"
