#!/usr/bin/env bash
# Makes sure PostgreSQL server binaries (initdb, postgres) are installed for the tests, which start
# their own throw-away servers (tests/src/postgres.rs). Installs Debian's postgresql package when
# there are none, without starting the package's own cluster where that can be prevented.
# Idempotent: does nothing but report when /usr/lib/postgresql/*/bin/initdb exists.
set -euo pipefail

found() {
  local initdb
  for initdb in /usr/lib/postgresql/*/bin/initdb; do
    if [ -x "$initdb" ]; then dirname "$initdb"; fi
  done | sort -V | tail -n 1
}

bin=$(found)
if [ -n "$bin" ]; then
  echo "PostgreSQL server binaries found in $bin"
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1; then
  sudo=(sudo)
else
  echo "PostgreSQL server binaries are missing and installing them needs root (no sudo here):" >&2
  echo "  apt-get install postgresql   (or set MEND_TEST_PG_BIN to a directory with initdb and postgres)" >&2
  exit 1
fi

# Keep the package from starting its own cluster: invoke-rc.d asks policy-rc.d, and 101 means
# "not allowed". An existing policy (container images often have one) is left alone.
policy=/usr/sbin/policy-rc.d
own_policy=no
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# Written by mend scripts/install-postgres.sh during its install.\nexit 101\n' |
    "${sudo[@]}" tee "$policy" >/dev/null
  "${sudo[@]}" chmod 755 "$policy"
  own_policy=yes
fi
cleanup() {
  if [ "$own_policy" = yes ]; then
    "${sudo[@]}" rm -f "$policy"
  fi
}
trap cleanup EXIT

apt_install() {
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends postgresql "$@"
}
if ! apt_install -qq >/dev/null 2>&1; then
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  apt_install -qq >/dev/null
fi

bin=$(found)
if [ -z "$bin" ]; then
  echo "installed the postgresql package, but found no /usr/lib/postgresql/*/bin/initdb" >&2
  exit 1
fi
echo "PostgreSQL server binaries installed in $bin ($("$bin/postgres" --version))"
