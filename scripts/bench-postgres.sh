#!/usr/bin/env bash
# PostgreSQL to PostgreSQL benchmark: PostgreSQL's own logical replication (CREATE SUBSCRIPTION)
# against Concord (serve --postgres, follow --postgres) on the same rows, in one run. Starts two
# throwaway PostgreSQL 15 servers (scripts/postgres.sh): the source, and the replicas' server, as
# a service's own database would be; stops and removes them afterwards.
#
#   scripts/bench-postgres.sh [--records 1000000] [--changes 200000] [--json]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
folder=$(mktemp -d /tmp/concord-bench-pg.XXXXXX)
cleanup() {
    "$root/scripts/postgres.sh" stop "$folder/source" >/dev/null 2>&1 || true
    "$root/scripts/postgres.sh" stop "$folder/replicas" >/dev/null 2>&1 || true
    rm -rf "$folder"
}
trap cleanup EXIT
source_url=$("$root/scripts/postgres.sh" start "$folder/source" | tail -n 1)
replica_url=$("$root/scripts/postgres.sh" start "$folder/replicas" | tail -n 1)
cd "$root"
swift build -c release --product concord >&2
.build/release/concord bench postgres --postgres "$source_url" --replica-postgres "$replica_url" "$@"
