# Shared helpers for the example tests (sourced, not run). Each test drives one example the
# way its README does, on a database of its own (ex_<name>) on the server in DATABASE_URL,
# so the tests can run in parallel with each other and with the other suites.
#
# Environment: PUP_BIN (the host binary), DATABASE_URL (any database on the test server),
# PUP_SOURCE_DIR (the source tree; defaults to this file's ../..).
set -euo pipefail
# Job control: background processes then receive SIGINT the way a terminal delivers Ctrl+C
# (without it, bash starts them with SIGINT ignored), each in its own process group.
set -m

SRC=${PUP_SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
PUP=${PUP_BIN:-$SRC/build/pupsourcing}
cd "$SRC"
[ -x "$PUP" ] || { echo "host binary not found: $PUP (set PUP_BIN)" >&2; exit 1; }
: "${DATABASE_URL:?DATABASE_URL must point at a PostgreSQL server}"
command -v psql >/dev/null || { echo "psql not found" >&2; exit 1; }

ADMIN_URL=$DATABASE_URL
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pup-example.XXXXXX")
declare -A PID=()
now_ms() {
  if [ -n "${EPOCHREALTIME:-}" ]; then local t=${EPOCHREALTIME/[.,]/}; echo $((t / 1000)); else date +%s%3N; fi
}
T0=$(now_ms)

note() { local d=$(($(now_ms) - T0)); printf '[%3d.%02ds] %s\n' $((d / 1000)) $((d % 1000 / 10)) "$*"; }

dump() {
  local f
  for f in "$WORK"/*.out "$WORK"/*.err; do
    [ -s "$f" ] || continue
    echo "----- ${f##*/} -----" >&2
    tail -n 60 "$f" >&2
  done
}

fail() {
  echo "FAIL: $*" >&2
  dump
  exit 1
}

cleanup() {
  local rc=$? name
  for name in "${!PID[@]}"; do
    kill -KILL "${PID[$name]}" 2>/dev/null || true
  done
  if [ "$rc" -eq 0 ]; then
    rm -rf "$WORK"
    [ -n "${TEST_DB:-}" ] && psql "$ADMIN_URL" -qAtX -c "DROP DATABASE IF EXISTS $TEST_DB WITH (FORCE)" >/dev/null 2>&1 || true
  else
    echo "(outputs kept in $WORK; database ${TEST_DB:-?} kept)" >&2
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# DATABASE_URL with another database name (URL or key=value form).
url_with_db() {
  local url=$1 db=$2
  case $url in
    postgres://*|postgresql://*)
      local query="" base=$url
      if [[ $url == *\?* ]]; then query="?${url#*\?}"; base=${url%%\?*}; fi
      local scheme=${base%%://*} rest=${base#*://}
      echo "$scheme://${rest%%/*}/$db$query" ;;
    *)
      if [[ $url == *dbname=* ]]; then echo "$url" | sed -E "s/dbname=[^ ]*/dbname=$db/"
      else echo "$url dbname=$db"; fi ;;
  esac
}

# A fresh database for this test: ex_<name>; DATABASE_URL points at it afterwards.
use_fresh_db() {
  TEST_DB="ex_$1"
  psql "$ADMIN_URL" -qAtX -v ON_ERROR_STOP=1 \
    -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS $TEST_DB WITH (FORCE)" \
    -c "CREATE DATABASE $TEST_DB" >/dev/null \
    || fail "cannot create database $TEST_DB"
  DATABASE_URL=$(url_with_db "$ADMIN_URL" "$TEST_DB")
  export DATABASE_URL
  note "using database $TEST_DB"
}

# q SQL: one value/rows, unaligned.
q() { psql "$DATABASE_URL" -qAtX -v ON_ERROR_STOP=1 -c "$1"; }

# wait_until SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds.
wait_until() {
  local timeout=$1 what=$2; shift 2
  local deadline=$(($(now_ms) + timeout * 1000))
  until "$@" >/dev/null 2>&1; do
    if [ "$(now_ms)" -gt "$deadline" ]; then
      fail "timed out after ${timeout}s waiting for: $what"
    fi
    sleep 0.1
  done
}

# start NAME [VAR=value...] -- ARGS...: run `pupsourcing ARGS` in the background, output
# in $WORK/NAME.out and NAME.err.
start() {
  local name=$1; shift
  local envs=()
  while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
  [ "${1:-}" = "--" ] && shift
  env "${envs[@]}" "$PUP" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
  PID[$name]=$!
  note "started $name (pid ${PID[$name]}): ${envs[*]} pupsourcing $*"
}

# run NAME [VAR=value...] -- ARGS...: run to completion (at most 60 s), must exit 0.
run() {
  local name=$1; shift
  local envs=()
  while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
  [ "${1:-}" = "--" ] && shift
  note "run $name: ${envs[*]} pupsourcing $*"
  local rc=0
  env "${envs[@]}" timeout 60 "$PUP" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" || rc=$?
  [ "$rc" -eq 0 ] || fail "$name exited with status $rc"
}

out() { cat "$WORK/$1.out"; }
has_output() { grep -Eq -- "$2" "$WORK/$1.out"; }
wait_output() { wait_until "${3:-20}" "$1 to print /$2/" has_output "$1" "$2"; }

alive() { local s; s=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) && [ "$s" != Z ]; }
gone() { ! alive "$1"; }

# stop NAME [SIGNAL]: send SIGINT (Ctrl+C) or SIGNAL, wait at most 15 s, require exit 0.
stop() {
  local name=$1 sig=${2:-INT} pid=${PID[$1]}
  note "SIG$sig -> $name"
  kill -s "$sig" "$pid" 2>/dev/null || true
  wait_until 15 "$name to exit after SIG$sig" gone "$pid"
  local rc=0
  wait "$pid" || rc=$?
  unset "PID[$name]"
  [ "$rc" -eq 0 ] || fail "$name exited with status $rc after SIG$sig"
}

# wait_exit NAME: wait for a process that stops by itself (--once), require exit 0.
wait_exit() {
  local name=$1 pid=${PID[$1]}
  wait_until "${2:-30}" "$name to finish" gone "$pid"
  local rc=0
  wait "$pid" || rc=$?
  unset "PID[$name]"
  [ "$rc" -eq 0 ] || fail "$name exited with status $rc"
}

# The number N in the last line of NAME's output that matches "PREFIX N".
number_after() {
  grep -Eo -- "$2 [0-9]+" "$WORK/$1.out" | tail -n 1 | grep -Eo '[0-9]+$' || true
}

# expect_eq WHAT ACTUAL EXPECTED
expect_eq() { [ "$2" = "$3" ] || fail "$1: got '$2', expected '$3'"; }

# Checkpoints: "partition_key total position" lines of one projection.
checkpoints() {
  q "SELECT partition_key, total_partitions, last_global_position FROM projection_checkpoints
     WHERE projection_name = '$1' ORDER BY total_partitions, partition_key"
}

# partition_counts TOTAL [WHERE]: "key count last_position" per partition of the events
# matching WHERE.
partition_counts() {
  "$PUP" examples/tests/_partitions.lua "$1" "${2:-true}"
}

# partitions_caught_up PROJECTION TOTAL: every partition's checkpoint is at or past the last
# event of that partition (and the projection has TOTAL checkpoint rows for this layout).
partitions_caught_up() {
  local name=$1 total=$2 k n last pos rows
  rows=$(q "SELECT count(*) FROM projection_checkpoints WHERE projection_name = '$name' AND total_partitions = $total")
  [ "$rows" = "$total" ] || return 1
  while read -r k n last; do
    pos=$(q "SELECT last_global_position FROM projection_checkpoints WHERE projection_name = '$name'
             AND total_partitions = $total AND partition_key = $k")
    [ -n "$pos" ] && [ "$pos" -ge "$last" ] || return 1
  done < <(partition_counts "$total")
}
