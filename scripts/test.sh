#!/usr/bin/env bash
# Command 2 of the README: installs what is missing, builds, starts a throwaway PostgreSQL
# and runs every test under ctest. Extra arguments go to ctest (e.g. `-L lua`, `-R cli`).
#   PUP_SANITIZE=1           build with AddressSanitizer/UBSan into build-asan/
#   PUP_TEST_DATABASE_URL=…  use that database instead of a throwaway server
#   PUP_TEST_JOBS=N          ctest parallelism (default 4)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bash scripts/deps.sh test

# Release, as run.sh and users build (optimisation also finds warnings -O0 does not).
build=build
cmake_args=(-DPUP_WERROR=ON -DCMAKE_BUILD_TYPE=Release)
if [ "${PUP_SANITIZE:-0}" = 1 ]; then
  build=build-asan
  cmake_args=(-DPUP_WERROR=ON -DPUP_SANITIZE=ON)
fi
cmake -S . -B "$build" "${cmake_args[@]}" >/dev/null
cmake --build "$build" -j2

tmpdir=""
# The specs' directories (spec/helpers.lua, M.tmpdir), removed with the run: a test that
# fails or is killed before its own cleanup leaves nothing behind. Readable by the
# `postgres` user, which runs the servers some specs start in them.
spec_tmp=$(mktemp -d /tmp/pupsourcing-spec.XXXXXX)
chmod 755 "$spec_tmp"
export PUP_SPEC_TMPDIR=$spec_tmp
cleanup() {
  if [ -n "$tmpdir" ]; then
    bash scripts/pg.sh stop "$tmpdir/data" || true
    rm -rf "$tmpdir"
  fi
  rm -rf "$spec_tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM


if [ -n "${PUP_TEST_DATABASE_URL:-}" ]; then
  DATABASE_URL=$PUP_TEST_DATABASE_URL
else
  tmpdir=$(mktemp -d /tmp/pupsourcing-test.XXXXXX)
  chmod 755 "$tmpdir"
  DATABASE_URL=$(bash scripts/pg.sh start "$tmpdir/data" 54330)
fi
export DATABASE_URL

status=0
ctest --test-dir "$build" --output-on-failure -j "${PUP_TEST_JOBS:-4}" "$@" || status=$?
exit "$status"
