#!/usr/bin/env bash
# A private PostgreSQL for development and tests: its own data directory, loopback only,
# trust auth. Usage:
#   scripts/pg.sh start [DIR [PORT]]   init (first time) and start; prints the DATABASE_URL
#   scripts/pg.sh stop  [DIR]          stop it
# DIR defaults to .pg in the working tree, PORT to 54329. A port that is taken is skipped
# (the next free one up to PORT+69 is used, and said on stderr); a server already running
# in DIR keeps its port. As root the server runs as the `postgres` user (PostgreSQL
# refuses to run as root).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cmd=${1:-start}
dir=${2:-$here/.pg}
want=${3:-54329}
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -x "$bindir/pg_ctl" ] || { echo "pg.sh: PostgreSQL server binaries not found (run scripts/deps.sh)" >&2; exit 1; }

as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

port_in_use() {
  if command -v ss >/dev/null 2>&1; then
    ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

case "$cmd" in
start)
  mkdir -p "$dir"
  [ "$(id -u)" -eq 0 ] && chown postgres: "$dir" && chmod 700 "$dir"
  if [ ! -f "$dir/PG_VERSION" ]; then
    as_pg "$bindir/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 --locale=C >"$dir/../.pg-initdb.log" 2>&1 \
      || { cat "$dir/../.pg-initdb.log" >&2; exit 1; }
  fi
  port=""
  if as_pg "$bindir/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    port=$(sed -n 4p "$dir/postmaster.pid") # the port of the server already running here
  else
    # Skip taken ports; another process may still take one between the check and the
    # start, so a start that fails to bind moves on too.
    for p in $(seq "$want" $((want + 69))); do
      port_in_use "$p" && continue
      if as_pg "$bindir/pg_ctl" -D "$dir" -w -t 60 -l "$dir/server.log" \
          -o "-p $p -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=200 -c max_prepared_transactions=10 -c fsync=on" \
          start >/dev/null; then
        port=$p
        break
      fi
      grep -q "could not bind\|Address already in use" "$dir/server.log" 2>/dev/null || { tail -n 20 "$dir/server.log" >&2; exit 1; }
    done
    [ -n "$port" ] || { echo "pg.sh: no free port in $want-$((want + 69))" >&2; exit 1; }
    [ "$port" = "$want" ] || echo "pg.sh: port $want is taken; using $port" >&2
  fi
  url="postgresql://postgres@127.0.0.1:$port/pupsourcing"
  as_pg "$bindir/psql" -qAt "postgresql://postgres@127.0.0.1:$port/postgres" \
    -c "SELECT 1 FROM pg_database WHERE datname='pupsourcing'" | grep -q 1 \
    || as_pg "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres pupsourcing
  echo "$url"
  ;;
stop)
  [ -f "$dir/PG_VERSION" ] && as_pg "$bindir/pg_ctl" -D "$dir" -m fast -w stop >/dev/null 2>&1 || true
  ;;
*) echo "usage: $0 start|stop [DIR [PORT]]" >&2; exit 2 ;;
esac
