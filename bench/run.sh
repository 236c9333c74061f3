#!/usr/bin/env bash
# pupsourcing benchmarks (issues 6, 13): W1, W2, W6, W3, W3-set, W4, W5, Idle and memory, each next to what
# PostgreSQL itself does on the same machine in the same run. See bench/README.md.
#
#   bash bench/run.sh            full run (about 5 minutes); rewrites the figures in bench/RESULTS.md
#   bash bench/run.sh --quick    1/50 sizes, no 30 s idle wait; prints only (a smoke test:
#                                it checks results for exactness, never a time)
#
# Uses BENCH_DATABASE_URL (a server where it may CREATE/DROP DATABASE pupbench_*) when set,
# else starts its own PostgreSQL (scripts/pg.sh) in a temporary directory.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bench=$here/bench
quick=0
for a in "$@"; do
  case "$a" in
  --quick) quick=1 ;;
  -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
  *) echo "run.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done

# ---- sizes (issue 6; --quick divides by 50) ----
div=1; [ $quick = 1 ] && div=50
W1_N=$((20000 / div))        # appends of 1 event
W2_N=$((2000 / div))         # appends of 50 events
W3_AGGS=$((10000 / div))     # aggregates, 10 UserCreated each
W3_PER=10
W3_EVENTS=$((W3_AGGS * W3_PER))
W5_N=$((2000 / div))         # appends, one every 10 ms
W6_N=$((8000 / div))         # appends of 1 event per W6 measurement, shared by the writers
W6_WRITERS="1 8 16"
IDLE_S=30; [ $quick = 1 ] && IDLE_S=2

log() { printf '%s\n' "$*" >&2; }

# ---- build (Release, its own build dir) ----
log "== building build-bench (Release)"
cmake -S "$here" -B "$here/build-bench" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$here/build-bench" -j2 --target pupsourcing >/dev/null
bin=$here/build-bench/pupsourcing

bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
PSQL=$bindir/psql
PGBENCH=$bindir/pgbench
for t in "$PSQL" "$PGBENCH"; do
  [ -x "$t" ] || { log "run.sh: $t not found (install postgresql / postgresql-contrib)"; exit 1; }
done
TIME=/usr/bin/time
[ -x $TIME ] || { log "run.sh: GNU time (/usr/bin/time) not found (apt-get install time)"; exit 1; }

# ---- database ----
tmp=$(mktemp -d /tmp/pupbench.XXXXXX)
chmod 755 "$tmp"
bgpids=()
own_pg=0
cleanup() {
  for p in "${bgpids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  if [ $own_pg = 1 ]; then bash "$here/scripts/pg.sh" stop "$tmp/pg" || true
  else
    for d in $(sql "$ADMIN" -c "SELECT datname FROM pg_database WHERE datname LIKE 'pupbench\_%'" 2>/dev/null); do
      sql "$ADMIN" -c "DROP DATABASE IF EXISTS $d WITH (FORCE)" >/dev/null 2>&1 || true
    done
  fi
  rm -rf "$tmp"
}
ADMIN=""
trap cleanup EXIT

if [ -n "${BENCH_DATABASE_URL:-}" ]; then
  base=$BENCH_DATABASE_URL
else
  port=$(( 56000 + RANDOM % 4000 ))
  while (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; do port=$((port + 1)); done
  log "== starting a private PostgreSQL in $tmp/pg on port $port"
  base=$(bash "$here/scripts/pg.sh" start "$tmp/pg" "$port")
  own_pg=1
fi
# URL of database $1 on the same server (query string kept).
dburl() {
  local pre=${base%%\?*} q=""
  [ "$pre" != "$base" ] && q="?${base#*\?}"
  printf '%s/%s%s' "${pre%/*}" "$1" "$q"
}
ADMIN=$(dburl postgres)
sql() { PGOPTIONS="-c client_min_messages=warning" "$PSQL" -X -qAt -v ON_ERROR_STOP=1 "$@"; }
# newdb NAME [TEMPLATE]: a fresh database for one workload.
newdb() {
  sql "$ADMIN" -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)" >/dev/null
  if [ -n "${2:-}" ]; then
    sql "$ADMIN" -c "CREATE DATABASE $1 TEMPLATE $2 STRATEGY FILE_COPY" >/dev/null
  else
    sql "$ADMIN" -c "CREATE DATABASE $1" >/dev/null
    "$bin" migrate --database-url "$(dburl "$1")" >/dev/null
  fi
  dburl "$1"
}
pg_version=$(sql "$ADMIN" -c "SHOW server_version")
pg_settings=$(sql "$ADMIN" -c "SELECT string_agg(name || '=' || setting, ', ' ORDER BY name) FROM pg_settings WHERE name IN ('fsync','synchronous_commit','shared_buffers','wal_level','max_wal_size')")

# ---- results ----
R=$tmp/results
: >"$R"
put() { printf '%s=%s\n' "$1" "$2" >>"$R"; }
get() { awk -F= -v k="$1" '$1 == k { v = substr($0, length(k) + 2) } END { print v }' "$R"; }
field() { tr ' ' '\n' <<<"$1" | awk -F= -v k="$2" '$1 == k { print $2 }'; }
calc() { awk "BEGIN { printf \"%.${2:-1}f\", $1 }"; }
fail=0
check() { # check NAME GOT WANT
  if [ "$2" != "$3" ]; then log "CHECK FAILED: $1: got $2, want $3"; fail=1; put "check_$1" "FAILED ($2, want $3)"
  else log "   check $1: $2 ok"; fi
}
# pgbench_eps FILE CLIENTS TRANSACTIONS EVENTS_PER_TX URL [PGBENCH ARGS] -> events/s (tps
# without connection time)
pgbench_eps() {
  local out
  out=$("$PGBENCH" -n -M prepared -c "$2" -j "$2" -t "$3" "${@:6}" -f "$1" "$5" 2>&1) || { log "$out"; return 1; }
  local tps
  tps=$(awk '/^tps = / { print $3 }' <<<"$out" | tail -n 1)
  calc "$tps * $4"
}

# Each library figure and its ceiling are measured alternately in ROUNDS rounds and
# reported as total events / total time, so that drift of the machine (fsync latency of a
# virtual disk, neighbours) hits both alike.
ROUNDS=4; [ $quick = 1 ] && ROUNDS=1
PROUNDS=2; [ $quick = 1 ] && PROUNDS=1
A=$tmp/acc
: >"$A"
acc() { echo "$1 $2 $3" >>"$A"; } # acc NAME EVENTS SECONDS
eps() { awk -v k="$1" '$1 == k { e += $2; t += $3 } END { if (t > 0) printf "%.1f", e / t }' "$A"; }

# The second W1/W6 ceiling: the library's own 1-event append statement without its wake-up
# (bench/own_statement.lua writes the pgbench script from the statement the store prepares),
# with W1's values.
u=$(newdb pupbench_own)
"$bin" "$bench/own_statement.lua" --url "$u" >"$tmp/ceiling_own.sql"
sql "$ADMIN" -c "DROP DATABASE pupbench_own WITH (FORCE)" >/dev/null
own_args=(-D t=User -D et=UserCreated -D v=0 -D ev=1 -D 'm={}'
  -D "p=\\x$(printf '%s' '{"email":"u@example.com","name":"User"}' | od -An -tx1 | tr -d ' \n')")

# ---- W1: 1 event per append; W2: 50 events per append ----
# ceiling_round KEY DB FILE CLIENTS N EVENTS [PGBENCH ARGS]: N transactions of EVENTS events
# per client of pgbench FILE in a fresh database DB, recorded as KEY; the events are counted.
ceiling_round() {
  local key=$1 db=$2 file=$3 c=$4 n=$5 k=$6 u e
  u=$(newdb "$db")
  e=$(pgbench_eps "$file" "$c" "$n" "$k" "$u" "${@:7}")
  acc "$key" $((c * n * k)) "$(calc "$c * $n * $k / $e" 4)"
  check "${db#pupbench_}_events" "$(sql "$u" -c "SELECT count(*) FROM events")" $((c * n * k))
  sql "$ADMIN" -c "DROP DATABASE $db WITH (FORCE)" >/dev/null
}

# append_round NAME K N: N appends of K events by the library, then the same by pgbench.
append_round() {
  local name=$1 k=$2 n=$3 u out
  u=$(newdb "pupbench_$name")
  out=$("$bin" "$bench/append.lua" --url "$u" --appends "$n" --events "$k")
  acc "$name" "$(field "$out" events)" "$(field "$out" seconds)"
  check "${name}_events" "$(sql "$u" -c "SELECT count(*) FROM events")" $(((n + 5) * k))
  ceiling_round "${name}_ceiling" "pupbench_${name}c" "$bench/ceiling_$name.sql" 1 "$n" "$k"
  [ "$name" = w1 ] || return 0
  ceiling_round "${name}_own" "pupbench_${name}o" "$tmp/ceiling_own.sql" 1 "$n" "$k" "${own_args[@]}"
}
for w in w1 w2; do
  if [ $w = w1 ]; then k=1 n=$W1_N; else k=50 n=$W2_N; fi
  log "== ${w^^}: $n appends of $k event(s), in $ROUNDS rounds alternating with the pgbench ceiling"
  for ((r = 0; r < ROUNDS; r++)); do append_round $w $k $((n / ROUNDS)); done
  put $w "$(eps $w)"
  put ${w}_ceiling "$(eps ${w}_ceiling)"
  log "   ${w^^} $(get $w) events/s, ceiling $(get ${w}_ceiling)"
done
put w1_own "$(eps w1_own)"
log "   W1's second ceiling (the library's own statement without its wake-up): $(get w1_own) events/s"

# ---- W6: concurrent writers of 1-event appends ----
# w6_round C N: C processes of bench/append.lua, N appends each, started together (they
# connect and warm up first, then wait for a common wall-clock time); events / (last end -
# first start). Then the same N appends from C pgbench clients (ceiling_w1.sql, no NOTIFY).
w6_round() {
  local c=$1 n=$2 u i at out
  u=$(newdb "pupbench_w6_$c")
  at=$(date +%s.%N | awk -v c="$c" '{ printf "%.3f", $1 + 2 + c * 0.15 }')
  local pids=()
  for ((i = 0; i < c; i++)); do
    "$bin" "$bench/append.lua" --url "$u" --appends "$n" --events 1 --start-at "$at" >"$tmp/w6.$i" &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || { log "W6 writer failed"; return 1; }; done
  out=$(cat "$tmp"/w6.* | tr ' ' '\n' | awk -F= '$1 == "start" && (s == "" || $2 < s) { s = $2 }
    $1 == "end" && $2 > e { e = $2 } END { printf "%.4f", e - s }')
  rm -f "$tmp"/w6.*
  acc "w6_$c" $((c * n)) "$out"
  check "w6_${c}_events" "$(sql "$u" -c "SELECT count(*) FROM events")" $((c * (n + 5)))
  sql "$ADMIN" -c "DROP DATABASE pupbench_w6_$c WITH (FORCE)" >/dev/null
  ceiling_round "w6_${c}_ceiling" "pupbench_w6c_$c" "$bench/ceiling_w1.sql" "$c" "$n" 1
  ceiling_round "w6_${c}_own" "pupbench_w6o_$c" "$tmp/ceiling_own.sql" "$c" "$n" 1 "${own_args[@]}"
}
log "== W6: $W6_N appends of 1 event from 1, 8 and 16 concurrent writers, in $PROUNDS rounds alternating with pgbench -c 1/8/16"
for ((r = 0; r < PROUNDS; r++)); do
  for c in $W6_WRITERS; do w6_round "$c" $((W6_N / PROUNDS / c)); done
done
for c in $W6_WRITERS; do
  put "w6_$c" "$(eps "w6_$c")"
  put "w6_${c}_ceiling" "$(eps "w6_${c}_ceiling")"
  put "w6_${c}_own" "$(eps "w6_${c}_own")"
  log "   W6 $c writer(s): $(get "w6_$c") events/s, ceiling $(get "w6_${c}_ceiling"), own statement $(get "w6_${c}_own")"
done

# ---- W3/W4 seed ----
log "== seeding $W3_EVENTS UserCreated over $W3_AGGS aggregates"
u=$(newdb pupbench_seed)
seed_out=$(sql "$u" -v aggs="$W3_AGGS" -v per="$W3_PER" -f "$bench/seed_w3.sql" 2>&1)
put seed_ms "$(awk '/^Time:/ { print $2; exit }' <<<"$seed_out")"
check seed_events "$(sql "$u" -c "SELECT count(*) FROM events")" "$W3_EVENTS"

# proj_run NAME FILE WORKERS BATCH: `pupsourcing run --once` on a fresh copy of the seed;
# records NAME (events/s over the process's wall time), NAME_rss_kib (peak RSS) and
# checks the read model and the checkpoints.
proj_run() {
  local name=$1 file=$2 workers=$3 batch=$4 u
  u=$(newdb "pupbench_$name" pupbench_seed)
  sql "$u" -c "CHECKPOINT" >/dev/null
  $TIME -f "%e %M %U %S" -o "$tmp/time.$name" \
    "$bin" run --once --workers "$workers" --batch-size "$batch" --database-url "$u" "$file" \
    2>"$tmp/run.$name.log" || { cat "$tmp/run.$name.log" >&2; return 1; }
  read -r el rss ut st <"$tmp/time.$name"
  acc "$name" "$W3_EVENTS" "$el"
  acc "${name}_cpu" "$(calc "($ut + $st) * 100" 2)" "$el"
  put "${name}_rss_kib" "$rss"
  local head
  head=$(sql "$u" -c "SELECT max(global_position) FROM events")
  check "${name}_checkpoints" "$(sql "$u" -c "SELECT count(*) FILTER (WHERE last_global_position = $head) || '/' || count(*) FROM projection_checkpoints")" "$workers/$workers"
  if [ "$file" = "$bench/proj_stats.lua" ] || [ "$file" = "$bench/proj_stats_set.lua" ]; then
    check "${name}_sum_n" "$(sql "$u" -c "SELECT coalesce(sum(n), 0) FROM user_stats")" "$W3_EVENTS"
    check "${name}_rows" "$(sql "$u" -c "SELECT count(*) FILTER (WHERE n = $W3_PER) FROM user_stats")" "$W3_AGGS"
  fi
  log "   $name: $(calc "$W3_EVENTS / $el") events/s (${el}s, peak RSS ${rss} KiB, CPU $(calc "($ut + $st) / $el * 100" 0)% of a core)"
  sql "$ADMIN" -c "DROP DATABASE pupbench_$name WITH (FORCE)" >/dev/null
}
# pipe_ceiling NAME CLIENTS BATCH: the same upserts, pipelined by pgbench, BATCH a transaction,
# CLIENTS connections each owning its own aggregates (as partitions do).
pipe_ceiling() {
  local name=$1 c=$2 b=$3 f=$tmp/pipe_$2_$3.sql u i t
  t=$((W3_EVENTS / b / c)); [ $t -ge 1 ] || t=1 # (--quick only)
  {
    echo "\\set base random(0, $((W3_AGGS / c - 1)))"
    echo "\\startpipeline"
    echo "BEGIN;"
    for ((i = 0; i < b; i++)); do
      echo "INSERT INTO user_stats (user_id, last_event, n) VALUES (md5((((:base + $i) % $((W3_AGGS / c))) * $c + :client_id + 1)::text)::uuid::text, :base + $i, 1) ON CONFLICT (user_id) DO UPDATE SET last_event = EXCLUDED.last_event, n = user_stats.n + 1;"
    done
    echo "COMMIT;"
    echo "\\endpipeline"
  } >"$f"
  u=$(newdb "pupbench_$name" pupbench_seed)
  sql "$u" -c "CHECKPOINT" >/dev/null
  local e
  e=$(pgbench_eps "$f" "$c" $t "$b" "$u")
  acc "$name" $((t * b * c)) "$(calc "$t * $b * $c / $e" 4)"
  check "${name}_sum_n" "$(sql "$u" -c "SELECT coalesce(sum(n), 0) FROM user_stats")" $((t * b * c))
  log "   $name: $e events/s"
  sql "$ADMIN" -c "DROP DATABASE pupbench_$name WITH (FORCE)" >/dev/null
}

# set_ceiling NAME BATCH: the W3 read model by one set-based upsert per BATCH positions, a
# server-side loop (bench/ceiling_w3_set.sql), on a copy of the seeded database.
set_ceiling() {
  local name=$1 b=$2 u ms
  u=$(newdb "pupbench_$name" pupbench_seed)
  sql "$u" -c "CHECKPOINT" >/dev/null
  ms=$(sql "$u" -v batch="$b" -f "$bench/ceiling_w3_set.sql" | awk '/^Time:/ { print $2 }' | tail -n 1)
  acc "$name" "$W3_EVENTS" "$(calc "$ms / 1000" 4)"
  check "${name}_sum_n" "$(sql "$u" -c "SELECT coalesce(sum(n), 0) FROM user_stats")" "$W3_EVENTS"
  log "   $name: $(calc "$W3_EVENTS / $ms * 1000") events/s"
  sql "$ADMIN" -c "DROP DATABASE pupbench_$name WITH (FORCE)" >/dev/null
}

for ((r = 0; r < PROUNDS; r++)); do
  log "== W3-set: handle_batch, one statement per batch of 1000 (round $((r + 1))/$PROUNDS)"
  proj_run w3set_b1000 "$bench/proj_stats_set.lua" 1 1000
  set_ceiling w3setc_b1000 1000
  log "== W3: projection catch-up, 1 worker (round $((r + 1))/$PROUNDS)"
  for b in 100 1000; do
    proj_run "w3_b$b" "$bench/proj_stats.lua" 1 $b
    pipe_ceiling "w3c_b$b" 1 $b
  done
  log "== Lua-handler overhead: W3 with a handler that does nothing"
  for b in 100 1000; do proj_run "noop_b$b" "$bench/proj_noop.lua" 1 $b; done
  log "== W4: projection catch-up, --workers 4"
  for b in 100 1000; do
    proj_run "w4_b$b" "$bench/proj_stats.lua" 4 $b
    pipe_ceiling "w4c_b$b" 4 $b
  done
done
for n in w3set_b1000 w3setc_b1000 w3_b100 w3_b1000 w3c_b100 w3c_b1000 noop_b100 noop_b1000 w4_b100 w4_b1000 w4c_b100 w4c_b1000; do
  put $n "$(eps $n)"
done
for n in w3set_b1000 w3_b100 w3_b1000 noop_b1000 w4_b1000; do put ${n}_cpu "$(eps ${n}_cpu | cut -d. -f1)"; done

# ---- W5 latency and Idle ----
log "== W5: one append every 10 ms, $W5_N appends, processor idle"
u=$(newdb pupbench_w5)
sql "$u" -f "$bench/latency_tables.sql" >/dev/null
"$bin" run --database-url "$u" "$bench/proj_latency.lua" 2>"$tmp/run.w5.log" &
ppid=$!
bgpids+=("$ppid")
# One warm-up event, so the processor is running, connected and caught up.
sql "$u" -c "SELECT 1" >/dev/null
"$bin" "$bench/append.lua" --url "$u" --appends 0 --events 1 >/dev/null
for _ in $(seq 100); do
  [ "$(sql "$u" -c "SELECT count(*) FROM seen")" -ge 5 ] && break
  sleep 0.1
done
status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
sleep 1
rss0=$(status_kib "$ppid" VmRSS)
out=$("$bin" "$bench/latency.lua" --url "$u" --appends "$W5_N" --interval 0.01)
log "   $out"
put w5_p50 "$(field "$out" p50_ms)"
put w5_p99 "$(field "$out" p99_ms)"
put w5_max "$(field "$out" max_ms)"
put w5_over5 "$(field "$out" over5ms)"
put w5_call_p50 "$(field "$out" from_call_p50_ms)"
put w5_call_p99 "$(field "$out" from_call_p99_ms)"
check w5_seen "$(field "$out" seen)" "$W5_N"
rss1=$(status_kib "$ppid" VmRSS)
put w5_rss_start_kib "$rss0"
put w5_rss_end_kib "$rss1"
put w5_hwm_kib "$(status_kib "$ppid" VmHWM)"

log "== Idle: CPU of the caught-up processor over ${IDLE_S}s"
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
sleep 1
t0=$(ticks "$ppid")
sleep "$IDLE_S"
t1=$(ticks "$ppid")
hz=$(getconf CLK_TCK)
put idle_pct "$(calc "($t1 - $t0) / $hz / $IDLE_S * 100" 2)"
put idle_rss_kib "$(status_kib "$ppid" VmRSS)"
kill -TERM "$ppid"
wait "$ppid" || { log "processor exited with $?"; fail=1; }
bgpids=()
log "   idle: $(get idle_pct)% of a core"

# ---- report ----
nproc_=$(nproc)
cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
ge() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a >= b) }'; }
lt() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a < b) }'; }
fmt() { awk -v a="$1" 'BEGIN { printf "%\047.0f", a }' 2>/dev/null || printf '%s' "$1"; }
mib() { calc "$1 / 1024" 1; }

w1=$(get w1) w1c=$(get w1_ceiling) w2=$(get w2) w2c=$(get w2_ceiling)
w3a=$(get w3_b100) w3b=$(get w3_b1000) c3a=$(get w3c_b100) c3b=$(get w3c_b1000)
w4a=$(get w4_b100) w4b=$(get w4_b1000) c4a=$(get w4c_b100) c4b=$(get w4c_b1000)
na=$(get noop_b100) nb=$(get noop_b1000)
verdict() { if "$@"; then echo met; else echo MISSED; fi; }

table=$tmp/table.md
{
  echo "| workload | events/s | ceiling events/s | ratio | goal | result |"
  echo "|---|---:|---:|---:|---|---|"
  echo "| W1 append 1 event/tx | $(fmt "$w1") | $(fmt "$w1c") | $(ratio "$w1" "$w1c") | ≥ 0.95 of ceiling (issue 13; 0.9 in issue 6) | $(verdict ge "$(ratio "$w1" "$w1c")" 0.95) ($(ratio "$w1" "$w1c") / 0.95 = $(calc "$w1 / $w1c / 0.95" 2)x) |"
  w1o=$(get w1_own)
  echo "| W1, ceiling: the library's own statement without its wake-up | $(fmt "$w1") | $(fmt "$w1o") | $(ratio "$w1" "$w1o") | ≥ 0.95 | $(verdict ge "$(ratio "$w1" "$w1o")" 0.95) |"
  echo "| W2 append 50 events/tx | $(fmt "$w2") | $(fmt "$w2c") | $(ratio "$w2" "$w2c") | ≥ 40,000 events/s | $(verdict ge "$w2" 40000) ($(calc "$w2 / 40000" 2)x of goal) |"
  for c in $W6_WRITERS; do
    a=$(get "w6_$c") b=$(get "w6_${c}_ceiling")
    if [ "$c" = 8 ]; then goal="≥ 0.9 of ceiling"; res="$(verdict ge "$(ratio "$a" "$b")" 0.9) ($(ratio "$a" "$b") / 0.9 = $(calc "$a / $b / 0.9" 2)x)"
    else goal="(reported)"; res=""; fi
    echo "| W6 $c concurrent writer(s), 1 event/append | $(fmt "$a") | $(fmt "$b") | $(ratio "$a" "$b") | $goal | $res |"
  done
  for c in $W6_WRITERS; do
    a=$(get "w6_$c") b=$(get "w6_${c}_own")
    if [ "$c" = 8 ]; then goal="≥ 0.9"; res=$(verdict ge "$(ratio "$a" "$b")" 0.9); else goal="(reported)"; res=""; fi
    echo "| W6 $c writer(s), ceiling: the library's own statement without its wake-up | $(fmt "$a") | $(fmt "$b") | $(ratio "$a" "$b") | $goal | $res |"
  done
  echo "| W3 catch-up, batch 100 | $(fmt "$w3a") | $(fmt "$c3a") | $(ratio "$w3a" "$c3a") | (Go: ~6,200) | $(calc "$w3a / 6200" 1)x Go |"
  echo "| W3 catch-up, batch 1000 | $(fmt "$w3b") | $(fmt "$c3b") | $(ratio "$w3b" "$c3b") | ≥ 30,000 and ≥ 0.6 of ceiling | $(verdict ge "$w3b" 30000) ($(calc "$w3b / 30000" 2)x of 30,000), $(verdict ge "$(ratio "$w3b" "$c3b")" 0.6) ($(ratio "$w3b" "$c3b") vs 0.6) |"
  ws=$(get w3set_b1000) cs=$(get w3setc_b1000)
  echo "| W3-set (handle_batch, 1 statement/batch), batch 1000 | $(fmt "$ws") | $(fmt "$cs") | $(ratio "$ws" "$cs") | ≥ 150,000 and ≥ 0.8 of set-based ceiling | $(verdict ge "$ws" 150000) ($(calc "$ws / 150000" 2)x of 150,000), $(verdict ge "$(ratio "$ws" "$cs")" 0.8) ($(ratio "$ws" "$cs") vs 0.8) |"
  echo "| W4 --workers 4, batch 100 | $(fmt "$w4a") | $(fmt "$c4a") | $(ratio "$w4a" "$c4a") | exact; faster than W3 given the cores | exact: $( [ -z "$(get check_w4_b100_sum_n)" ] && echo yes || echo NO ); $(ratio "$w4a" "$w3a")x W3 |"
  echo "| W4 --workers 4, batch 1000 | $(fmt "$w4b") | $(fmt "$c4b") | $(ratio "$w4b" "$c4b") | exact; faster than W3 given the cores | exact: $( [ -z "$(get check_w4_b1000_sum_n)" ] && echo yes || echo NO ); $(ratio "$w4b" "$w3b")x W3 |"
  echo "| no-op handler, batch 100 | $(fmt "$na") | | | (Lua-handler overhead) | |"
  echo "| no-op handler, batch 1000 | $(fmt "$nb") | | | ≥ 400,000 (catch-up) | $(verdict ge "$nb" 400000) ($(calc "$nb / 400000" 2)x) |"
  echo
  echo "| measure | value | goal | result |"
  echo "|---|---:|---|---|"
  echo "| W5 commit-to-handler median | $(get w5_p50) ms | < 5 ms | $(verdict lt "$(get w5_p50)" 5) |"
  echo "| W5 commit-to-handler p99 | $(get w5_p99) ms (max $(get w5_max) ms; $(get w5_over5) of $W5_N over 5 ms) | < 50 ms | $(verdict lt "$(get w5_p99)" 50) |"
  echo "| W5 from the append call (upper bound) median / p99 | $(get w5_call_p50) / $(get w5_call_p99) ms | | |"
  echo "| Idle CPU (${IDLE_S} s) | $(get idle_pct)% of a core | < 1% | $(verdict lt "$(get idle_pct)" 1) |"
  echo "| peak RSS, W3 batch 1000, 1 worker | $(mib "$(get w3_b1000_rss_kib)") MiB | < 32 MiB per worker | $(verdict lt "$(get w3_b1000_rss_kib)" 32768) |"
  echo "| peak RSS, W4 batch 1000, 4 workers (per worker) | $(mib "$(get w4_b1000_rss_kib)") MiB ($(mib "$(($(get w4_b1000_rss_kib) / 4))") MiB) | < 32 MiB per worker | $(verdict lt "$(($(get w4_b1000_rss_kib) / 4))" 32768) |"
  echo "| RSS over time (W5 processor: start, after W5, after idle; VmHWM) | $(mib "$(get w5_rss_start_kib)") → $(mib "$(get w5_rss_end_kib)") → $(mib "$(get idle_rss_kib)") MiB (HWM $(mib "$(get w5_hwm_kib)")) | flat | $(verdict lt "$(get idle_rss_kib)" $(( $(get w5_rss_start_kib) + 1024 ))) |"
  echo
  echo "CPU of \`pupsourcing run\` during catch-up (user+sys over wall time): W3-set b1000 $(get w3set_b1000_cpu)%, W3 b100 $(get w3_b100_cpu)%, W3 b1000 $(get w3_b1000_cpu)%, no-op b1000 $(get noop_b1000_cpu)%, W4 b1000 $(get w4_b1000_cpu)% of one core."
  echo "Library figures and ceilings alternate: W1/W2 in $ROUNDS rounds, W3/W4 and the no-op runs in $PROUNDS; each is total events / total time over its rounds."
  echo "Set-based insert of the $W3_EVENTS seed events (one INSERT ... SELECT): $(get seed_ms) ms."
} >"$table"

echo
echo "pupsourcing benchmarks$([ $quick = 1 ] && echo " (--quick: 1/50 sizes, times not meaningful)")"
echo "machine: $nproc_ CPUs, $cpu; PostgreSQL $pg_version ($pg_settings)"
echo
cat "$table"
if grep -q '^check_' "$R"; then echo; echo "FAILED CHECKS:"; grep '^check_' "$R"; fi

if [ $quick = 0 ]; then
  res=$bench/RESULTS.md
  {
    echo "<!-- figures:begin (written by bench/run.sh; edit outside these markers) -->"
    echo "Run: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$here" diff --quiet 2>/dev/null || echo ' (with local changes)')."
    echo "Machine: $nproc_ CPUs ($cpu), $(awk '/MemTotal/ { printf "%.0f GiB RAM", $2 / 1048576 }' /proc/meminfo); PostgreSQL $pg_version on the same machine ($pg_settings); $([ $own_pg = 1 ] && echo 'private server from scripts/pg.sh' || echo 'server from BENCH_DATABASE_URL')."
    echo
    cat "$table"
    echo "<!-- figures:end -->"
  } >"$tmp/figures.md"
  if [ -f "$res" ] && grep -q '<!-- figures:begin' "$res"; then
    awk -v f="$tmp/figures.md" '
      /<!-- figures:begin/ { while ((getline l < f) > 0) print l; skip = 1; next }
      /<!-- figures:end/ { skip = 0; next }
      !skip { print }' "$res" >"$tmp/RESULTS.md"
    cp "$tmp/RESULTS.md" "$res"
  else
    { echo "# Benchmark results"; echo; cat "$tmp/figures.md"; } >"$res"
  fi
  echo
  echo "figures written to bench/RESULTS.md"
fi
exit $fail
