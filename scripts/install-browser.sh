#!/usr/bin/env bash
# Makes sure the browser tests (tests/tests/browser.rs) can run: Debian's chromium at
# /usr/bin/chromium and the pinned playwright-core in tests/browser/node_modules (`npm ci` from the
# committed lock file). Never downloads a browser: playwright-core drives the system chromium.
# Idempotent: prints one line and changes nothing when both are there and the lock file is older
# than the installed modules.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
chromium=/usr/bin/chromium
browser_dir="$root/tests/browser"
modules="$browser_dir/node_modules/playwright-core"
lock="$browser_dir/package-lock.json"
said=()

if [ ! -x "$chromium" ]; then
  if [ "$(id -u)" -eq 0 ]; then
    sudo=()
  elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
  else
    echo "chromium is missing and installing it needs root (no sudo here):" >&2
    echo "  apt-get install chromium" >&2
    exit 1
  fi
  apt_install() {
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends chromium
  }
  if ! apt_install >/dev/null 2>&1; then
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_install >/dev/null
  fi
  if [ ! -x "$chromium" ]; then
    echo "installed the chromium package, but there is no $chromium" >&2
    exit 1
  fi
  said+=("installed $("$chromium" --version 2>/dev/null || echo chromium)")
else
  said+=("found $("$chromium" --version 2>/dev/null || echo "$chromium")")
fi

node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if ! command -v npm >/dev/null 2>&1 || [ "$node_major" -lt 20 ]; then
  echo "the browser tests need Node.js 20 or later and npm (found node ${node_major}, npm $(command -v npm || echo none))" >&2
  exit 1
fi

if [ ! -d "$modules" ] || [ "$lock" -nt "$modules" ]; then
  (
    cd "$browser_dir"
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error >/dev/null
  )
  # npm ci keeps the package's own mtime: mark the install as newer than the lock file.
  touch "$modules"
  said+=("installed playwright-core $(node -p "require('$modules/package.json').version")")
else
  said+=("found playwright-core $(node -p "require('$modules/package.json').version")")
fi

echo "Browser tests: ${said[0]}; ${said[1]}"
