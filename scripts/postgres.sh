#!/usr/bin/env bash
# A throw-away PostgreSQL server for tests/test_postgres.py, in a folder of its own.
#
#   eval "$(bash scripts/postgres.sh start DIR)"   # prints the two exports the tests read
#   bash scripts/postgres.sh pause|resume [DIR]    # pg_ctl stop -m fast / start (the restart test)
#   bash scripts/postgres.sh stop [DIR]            # stop the server and delete DIR
#
# DIR defaults to $HPSEARCH_TEST_POSTGRES_DIR. The server listens on 127.0.0.1 only, on the first
# free port from ${HPSEARCH_TEST_POSTGRES_PORT:-54329}, with its socket in DIR (nothing system-wide
# is touched). initdb refuses root, so as root the cluster belongs to the `postgres` user that
# Debian's package creates; otherwise to the caller. TCP needs a password (scram), so a wrong
# one is refused, as on a real server.
set -euo pipefail

cmd=${1:-}
dir=${2:-${HPSEARCH_TEST_POSTGRES_DIR:-}}
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|pause|resume|stop DIR" >&2; exit 2; }
data="$dir/data"
user=hpsearch
password=hpsearch-test-pw
database=hpsearch_test

bin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
[ -x "$bin/initdb" ] || { echo "postgres.sh: no PostgreSQL server binaries (apt-get install postgresql)" >&2; exit 1; }

as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Logs go to DIR/server.log, so a failing start can be shown, and the tests stay quiet.
pg_start() {
  as_owner "$bin/pg_ctl" -D "$data" -l "$dir/server.log" -w -t 30 -o "-p $(cat "$dir/port")" start >/dev/null \
    || { tail -n 20 "$dir/server.log" >&2; exit 1; }
}

start() {
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres: "$dir"
  as_owner "$bin/initdb" -D "$data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
  local port=${HPSEARCH_TEST_POSTGRES_PORT:-54329}
  while ! port_free "$port"; do port=$((port + 1)); done  # another run on this machine holds it
  cat >>"$data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
fsync = off
max_connections = 200
EOF
  echo "$port" >"$dir/port"
  pg_start
  as_owner "$bin/psql" -h "$dir" -p "$port" -U postgres -d postgres -qAt -v ON_ERROR_STOP=1 >/dev/null <<EOF
CREATE ROLE $user LOGIN CREATEDB PASSWORD '$password';
CREATE DATABASE $database OWNER $user;
EOF
  echo "export HPSEARCH_TEST_POSTGRES='postgresql+psycopg://$user:$password@127.0.0.1:$port/$database'"
  echo "export HPSEARCH_TEST_POSTGRES_DIR='$dir'"
}

case "$cmd" in
  start) start ;;
  pause) as_owner "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null ;;
  resume) pg_start ;;
  stop)
    if [ -f "$data/postmaster.pid" ]; then as_owner "$bin/pg_ctl" -D "$data" -m immediate -w stop >/dev/null || true; fi
    rm -rf "$dir" ;;
  *) echo "usage: $0 start|pause|resume|stop DIR" >&2; exit 2 ;;
esac
