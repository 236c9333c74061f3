#!/usr/bin/env bash
# Installs the Debian packages the build, the examples and the tests need. Idempotent:
# only missing packages are installed, so a second run costs one dpkg query.
set -euo pipefail
pkgs=(build-essential cmake pkg-config libpq-dev postgresql lua5.4 liblua5.4-dev
      libyajl-dev lua-busted lua-check uuid-dev procps iproute2 valgrind libmicrohttpd-dev prometheus curl)
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
