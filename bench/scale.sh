#!/usr/bin/env bash
# Issue 13 scale run (not part of run.sh, not in ctest): a catch-up of EVENTS UserCreated
# (default 10,000,000 over EVENTS/10 aggregates, the W3 seed) by `pupsourcing run --once
# --workers 4 --batch-size 1000 bench/proj_stats.lua`, sampling every 5 s the process's
# RSS (VmRSS), the lowest checkpoint and the events/s so far; checks the read model.
#   bash bench/scale.sh [EVENTS]
# Uses BENCH_DATABASE_URL (may CREATE/DROP DATABASE pupbench_scale) or a private server.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
events=${1:-10000000}
aggs=$((events / 10))
log() { printf '%s\n' "$*" >&2; }

cmake -S "$here" -B "$here/build-bench" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$here/build-bench" -j2 --target pupsourcing >/dev/null
bin=$here/build-bench/pupsourcing
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
tmp=$(mktemp -d /tmp/pupscale.XXXXXX)
chmod 755 "$tmp"
own_pg=0 run_pid=""
cleanup() {
  [ -n "$run_pid" ] && kill -TERM "$run_pid" 2>/dev/null || true
  [ $own_pg = 1 ] && bash "$here/scripts/pg.sh" stop "$tmp/pg" || true
  rm -rf "$tmp"
}
trap cleanup EXIT
if [ -n "${BENCH_DATABASE_URL:-}" ]; then
  base=$BENCH_DATABASE_URL
else
  port=$(( 56000 + RANDOM % 4000 ))
  base=$(bash "$here/scripts/pg.sh" start "$tmp/pg" "$port")
  own_pg=1
fi
pre=${base%%\?*}
admin="${pre%/*}/postgres"
url="${pre%/*}/pupbench_scale"
sql() { PGOPTIONS="-c client_min_messages=warning" "$bindir/psql" -X -qAt -v ON_ERROR_STOP=1 "$@"; }
sql "$admin" -c "DROP DATABASE IF EXISTS pupbench_scale WITH (FORCE)" -c "CREATE DATABASE pupbench_scale"
"$bin" migrate --database-url "$url" >/dev/null
log "== seeding $events events over $aggs aggregates"
t0=$(date +%s.%N)
sql "$url" -v aggs="$aggs" -v per=10 -f "$here/bench/seed_w3.sql" >/dev/null
log "   seeded in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }') s"
sql "$url" -c "CHECKPOINT" >/dev/null

log "== catch-up: run --once --workers 4 --batch-size 1000 bench/proj_stats.lua"
start=$(date +%s.%N)
"$bin" run --once --workers 4 --batch-size 1000 --database-url "$url" "$here/bench/proj_stats.lua" \
  2>"$tmp/run.log" &
run_pid=$!
printf '| t (s) | VmRSS (MiB) | lowest checkpoint | events/s so far |\n|---:|---:|---:|---:|\n'
peak=0
while kill -0 "$run_pid" 2>/dev/null; do
  sleep 5
  kill -0 "$run_pid" 2>/dev/null || break
  rss=$(awk '$1 == "VmRSS:" { print $2 }' "/proc/$run_pid/status" 2>/dev/null || echo 0)
  [ -n "$rss" ] || rss=0
  [ "$rss" -gt "$peak" ] && peak=$rss
  low=$(sql "$url" -c "SELECT coalesce(min(last_global_position), 0) FROM projection_checkpoints" 2>/dev/null || echo 0)
  now=$(date +%s.%N)
  awk -v t="$now" -v s="$start" -v r="$rss" -v l="$low" 'BEGIN { printf "| %.0f | %.1f | %d | %.0f |\n", t - s, r / 1024, l, l / (t - s) }'
done
wait "$run_pid" || { cat "$tmp/run.log" >&2; exit 1; }
run_pid=""
end=$(date +%s.%N)
sum=$(sql "$url" -c "SELECT sum(n) FROM user_stats")
head=$(sql "$url" -c "SELECT max(global_position) FROM events")
cps=$(sql "$url" -c "SELECT count(*) FILTER (WHERE last_global_position = $head) || '/' || count(*) FROM projection_checkpoints")
echo
awk -v e="$events" -v a="$start" -v b="$end" -v p="$peak" 'BEGIN { printf "%d events in %.1f s: %.0f events/s; VmRSS peak sampled %.1f MiB\n", e, b - a, e / (b - a), p / 1024 }'
echo "checks: sum(n) = $sum (want $events), checkpoints at the head $cps (want 4/4)"
sql "$admin" -c "DROP DATABASE pupbench_scale WITH (FORCE)" >/dev/null
[ "$sum" = "$events" ] && [ "$cps" = "4/4" ]
