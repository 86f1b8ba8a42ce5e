#!/usr/bin/env bash
# The whole test suite: installs what it needs, builds with warnings as errors, checks
# formatting, runs every test (unit, SQLite, end-to-end over loopback HTTP with real processes).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
dpkg -s libsqlite3-dev >/dev/null 2>&1 || need+=(libsqlite3-dev)
dpkg -s zlib1g-dev >/dev/null 2>&1 || need+=(zlib1g-dev)
if [ ${#need[@]} -gt 0 ]; then
    echo "== installing ${need[*]}"
    if [ "$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q "${need[@]}"
    else sudo apt-get update -q && sudo apt-get install -y -q "${need[@]}"; fi
fi

export CONCORD_STRICT=1
echo "== build (warnings are errors)"
swift build --build-tests
export CONCORD_BIN="$(swift build --show-bin-path)/concord"

echo "== format check"
swift format lint --strict --recursive Package.swift Sources Tests

echo "== tests"
swift test --skip-build
