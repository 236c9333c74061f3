#!/usr/bin/env bash
# Installs the Debian packages a command needs. Idempotent: only missing packages are
# installed, so a second run costs one dpkg query.
#   scripts/deps.sh run    what `scripts/run.sh` needs: build, PostgreSQL, Lua, libraries
#   scripts/deps.sh test   that and what the tests need (default)
set -euo pipefail
what=${1:-test}
pkgs=(build-essential cmake pkg-config libpq-dev postgresql lua5.4 liblua5.4-dev
      libyajl-dev libmicrohttpd-dev uuid-dev lua-argparse)
case "$what" in
run) ;;
test) pkgs+=(lua-busted lua-check procps iproute2 valgrind luarocks prometheus curl pgbouncer) ;;
*) echo "usage: $0 [run|test]" >&2; exit 2 ;;
esac
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}" >&2
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
