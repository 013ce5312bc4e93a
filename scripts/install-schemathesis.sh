#!/usr/bin/env bash
# Installs schemathesis (the OpenAPI fuzzer the dashboard's API test runs) from PyPI, pinned by
# version, into its own venv .tools/schemathesis (its dependencies are many and must not disturb the
# other tools). Idempotent: skips it when the pinned version is there.
set -euo pipefail
cd "$(dirname "$0")/.."

version=4.32.5
venv=.tools/schemathesis
bin=$venv/bin/schemathesis

if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$version"; then
  exit 0
fi
[ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$version"
echo "Installed into .tools: $("$bin" --version)"
