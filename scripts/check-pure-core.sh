#!/usr/bin/env bash
# Architecture invariant: repair-rules does no I/O. Fails if an async runtime, NATS client, HTTP
# stack or database driver is in its dependency tree.
set -euo pipefail
cd "$(dirname "$0")/.."
if cargo tree -p repair-rules -e normal --prefix none --quiet \
    | grep -E '^(tokio|async-nats|reqwest|hyper|axum|sqlx|mio) '; then
  echo "repair-rules must stay pure: the crates above pull I/O into it." >&2
  exit 1
fi
