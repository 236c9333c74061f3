#!/usr/bin/env bash
# Command 1 of the README: installs what is missing, builds (Release), starts a private
# PostgreSQL in .pg/ of the working tree (port 54329, or the next free one) unless
# DATABASE_URL is set, migrates and runs examples/basic/main.lua.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bash scripts/deps.sh run
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j2

if [ -z "${DATABASE_URL:-}" ]; then
  DATABASE_URL=$(bash scripts/pg.sh start "$root/.pg" 54329)
  echo "run.sh: private PostgreSQL at $DATABASE_URL (stop it with: bash scripts/pg.sh stop)" >&2
fi
export DATABASE_URL

build/pupsourcing migrate
exec build/pupsourcing examples/basic/main.lua "$@"
