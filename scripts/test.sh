#!/usr/bin/env bash
# The whole test suite: installs what it needs, builds with warnings as errors, checks
# formatting, runs every test (unit, SQLite, end-to-end over loopback HTTP with real processes,
# PostgreSQL capture against a real PostgreSQL 15 it starts in a temporary folder and stops).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
dpkg -s libsqlite3-dev >/dev/null 2>&1 || need+=(libsqlite3-dev)
dpkg -s zlib1g-dev >/dev/null 2>&1 || need+=(zlib1g-dev)
# The dashboard is checked in a real headless browser; TLS tests make their certificates with openssl.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
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

echo "== PostgreSQL for the capture tests"
pg_dir="$(mktemp -d /tmp/concord-test-pg.XXXXXX)"
stop_postgres() { scripts/postgres.sh stop "$pg_dir" >/dev/null 2>&1 || true; rm -rf "$pg_dir" "$pg_dir.start.log"; }
trap stop_postgres EXIT
# Output to a file, not a pipe: the server would keep a pipe open.
scripts/postgres.sh start "$pg_dir" >"$pg_dir.start.log" 2>&1 || { cat "$pg_dir.start.log"; exit 1; }
export CONCORD_TEST_POSTGRES_URL="$(cat "$pg_dir/url")"
export CONCORD_TEST_POSTGRES_DIR="$pg_dir"

echo "== tests"
swift test --skip-build
