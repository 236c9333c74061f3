#!/usr/bin/env bash
# Command 2 of the README: installs what is missing, builds, starts a throwaway PostgreSQL
# and runs every test under ctest. Extra arguments go to ctest (e.g. `-L lua`, `-R cli`).
#   PUP_SANITIZE=1           build with AddressSanitizer/UBSan into build-asan/
#   PUP_TEST_DATABASE_URL=…  use that database instead of a throwaway server
#   PUP_TEST_JOBS=N          ctest parallelism (default 4)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bash scripts/deps.sh

build=build
cmake_args=(-DPUP_WERROR=ON)
if [ "${PUP_SANITIZE:-0}" = 1 ]; then
  build=build-asan
  cmake_args+=(-DPUP_SANITIZE=ON)
fi
cmake -S . -B "$build" "${cmake_args[@]}" >/dev/null
cmake --build "$build" -j2

tmpdir=""
cleanup() {
  if [ -n "$tmpdir" ]; then
    bash scripts/pg.sh stop "$tmpdir/data" || true
    rm -rf "$tmpdir"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_in_use() {
  if command -v ss >/dev/null 2>&1; then
    ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

if [ -n "${PUP_TEST_DATABASE_URL:-}" ]; then
  DATABASE_URL=$PUP_TEST_DATABASE_URL
else
  tmpdir=$(mktemp -d /tmp/pupsourcing-test.XXXXXX)
  chmod 755 "$tmpdir"
  port=""
  for p in $(seq 54330 54399); do
    if ! port_in_use "$p"; then port=$p; break; fi
  done
  [ -n "$port" ] || { echo "test.sh: no free port in 54330-54399" >&2; exit 1; }
  DATABASE_URL=$(bash scripts/pg.sh start "$tmpdir/data" "$port")
fi
export DATABASE_URL

status=0
ctest --test-dir "$build" --output-on-failure -j "${PUP_TEST_JOBS:-4}" "$@" || status=$?
exit "$status"
