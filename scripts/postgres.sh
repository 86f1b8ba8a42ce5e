#!/usr/bin/env bash
# A throwaway PostgreSQL 15 server with logical decoding (wal2json) for tests and for people.
#
#   scripts/postgres.sh start DIR    start (initdb first if needed) a server whose files live in
#                                    DIR; prints its URL, postgres://concord@127.0.0.1:PORT/concord,
#                                    and writes it to DIR/url. If it is already running: only prints
#                                    the URL.
#   scripts/postgres.sh stop DIR     stop it (pg_ctl stop -m fast). Removes nothing: the caller
#                                    removes DIR.
#   scripts/postgres.sh status DIR   exit 0 and print the URL if running, else exit 3.
#
# Layout: DIR/data (the cluster), DIR/postgres.log (server log), DIR/url, DIR/port, and the unix
# socket DIR/.s.PGSQL.PORT. Authentication is trust; the server listens on 127.0.0.1 only, on a
# free port picked at each start (the previous one again if it is still free). Roles: `postgres`
# (bootstrap superuser) and `concord` (superuser, owner of database `concord`).
#
# PostgreSQL refuses to run as root: run as root, the script runs the server as the unprivileged
# user `concordpg` (created if missing; override with CONCORD_PG_USER), chowns DIR to it and, if
# an ancestor of DIR cannot be traversed by it (e.g. a `mktemp -d` folder), adds the execute bit
# (only that bit) for others on that ancestor. Run as anyone else, the server runs as that user.
# Installs postgresql-15-wal2json with apt if wal2json.so is missing.
set -euo pipefail

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PG_LIB=${PG_LIB:-/usr/lib/postgresql/15/lib}
RUN_USER=${CONCORD_PG_USER:-concordpg}

die() {
    echo "postgres.sh: $*" >&2
    exit 1
}
say() { echo "postgres.sh: $*" >&2; }

usage() {
    echo "usage: $0 start|stop|status DIR" >&2
    exit 2
}

[ $# -eq 2 ] || usage
cmd=$1

# The server outlives this script: it must not inherit descriptors other than 0-2, or a caller
# that waits for them to close (a pipe, or the socket a Swift Process watches) waits forever.
for fd in /proc/$$/fd/*; do
    fd=${fd##*/}
    if [ "$fd" -gt 2 ] 2>/dev/null; then eval "exec $fd>&-" 2>/dev/null || true; fi
done
[ -n "$2" ] || usage
if [ "$cmd" = start ]; then mkdir -p "$2"; elif [ ! -d "$2" ]; then
    echo "postgres.sh: no folder $2" >&2
    [ "$cmd" = stop ] && exit 0 || exit 3
fi
DIR=$(cd "$2" && pwd -P)
DATA=$DIR/data
LOG=$DIR/postgres.log

is_root() { [ "$(id -u)" = 0 ]; }

# Runs a command as the user who owns the cluster (from a folder that user can enter).
as_pg() {
    if is_root; then
        (cd "$DIR" && runuser -u "$RUN_USER" -- "$@")
    else
        (cd "$DIR" && "$@")
    fi
}

# The user that runs the server: the owner of an existing cluster, else RUN_USER when root.
if is_root; then
    if [ -d "$DATA" ]; then
        RUN_USER=$(stat -c %U "$DATA")
        [ "$RUN_USER" != root ] || die "$DATA is owned by root; PostgreSQL cannot run as root"
    fi
else
    RUN_USER=$(id -un)
fi

running() {
    [ -f "$DATA/PG_VERSION" ] && as_pg "$PG_BIN/pg_ctl" status -D "$DATA" >/dev/null 2>&1
}

url_of_port() { echo "postgres://concord@127.0.0.1:$1/concord"; }

current_port() {
    # The first line of postmaster.pid is the pid, the fourth the port.
    sed -n 4p "$DATA/postmaster.pid" 2>/dev/null
}

port_free() {
    python3 - "$1" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as PostgreSQL does: TIME_WAIT is fine
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
EOF
}

pick_port() {
    if [ -f "$DIR/port" ]; then
        local old
        old=$(cat "$DIR/port")
        if [[ $old =~ ^[0-9]+$ ]] && port_free "$old"; then
            echo "$old"
            return
        fi
    fi
    python3 -c '
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

ensure_wal2json() {
    [ -f "$PG_LIB/wal2json.so" ] && return
    local sudo=()
    is_root || sudo=(sudo)
    say "installing postgresql-15-wal2json"
    if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300 postgresql-15-wal2json >&2; then
        "${sudo[@]}" apt-get update -q -o DPkg::Lock::Timeout=300 >&2
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300 postgresql-15-wal2json >&2
    fi
    [ -f "$PG_LIB/wal2json.so" ] || die "wal2json.so still missing after installing postgresql-15-wal2json"
}

ensure_user() {
    is_root || return 0
    if ! id -u "$RUN_USER" >/dev/null 2>&1; then
        say "creating user $RUN_USER"
        # Another start running at the same time may create it first.
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin "$RUN_USER" || id -u "$RUN_USER" >/dev/null
    fi
    chown "$RUN_USER:" "$DIR"
    chmod 0755 "$DIR"
    # Every ancestor must be traversable by RUN_USER.
    local d=$DIR
    while [ "$d" != / ]; do
        d=$(dirname "$d")
        if ! runuser -u "$RUN_USER" -- test -x "$d" 2>/dev/null; then
            say "adding o+x to $d so that $RUN_USER can reach $DIR"
            chmod o+x "$d"
        fi
    done
}

sql() { # sql DB PORT STATEMENT: runs as the bootstrap superuser over TCP
    "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -At -h 127.0.0.1 -p "$2" -U postgres -d "$1" -c "$3"
}

write_config() { # write_config PORT
    local sockets=$DIR
    # A unix socket path is limited to 107 bytes; past that, TCP only.
    if [ $((${#DIR} + 18)) -gt 107 ]; then
        say "$DIR is too long for a unix socket path; TCP only"
        sockets=
    fi
    as_pg tee "$DATA/concord.conf" >/dev/null <<EOF
# Written by scripts/postgres.sh at each start.
listen_addresses = '127.0.0.1'
port = $1
unix_socket_directories = '$sockets'
wal_level = logical
max_replication_slots = 20
max_wal_senders = 20
shared_buffers = 256MB
max_connections = 200
EOF
    if ! grep -q "^include_if_exists = 'concord.conf'" "$DATA/postgresql.conf"; then
        printf "\ninclude_if_exists = 'concord.conf'\n" | as_pg tee -a "$DATA/postgresql.conf" >/dev/null
    fi
    # Everyone is trusted, except two roles (created by the tests that need them) that sign in
    # with a password the way a production server asks: SCRAM-SHA-256 and MD5.
    as_pg tee "$DATA/pg_hba.conf" >/dev/null <<EOF
# Written by scripts/postgres.sh at each start.
host    all             concord_scram   127.0.0.1/32    scram-sha-256
host    replication     concord_scram   127.0.0.1/32    scram-sha-256
host    all             concord_md5     127.0.0.1/32    md5
host    replication     concord_md5     127.0.0.1/32    md5
local   all             all                             trust
local   replication     all                             trust
host    all             all             127.0.0.1/32    trust
host    replication     all             127.0.0.1/32    trust
EOF
}

start() {
    if running; then
        url_of_port "$(current_port)" >"$DIR/url"
        cat "$DIR/url"
        return
    fi
    [ -x "$PG_BIN/pg_ctl" ] || die "no PostgreSQL 15 in $PG_BIN"
    command -v python3 >/dev/null || die "python3 is needed to pick a free port"
    ensure_wal2json
    ensure_user
    if [ ! -f "$DATA/PG_VERSION" ]; then
        [ ! -e "$DATA" ] || [ -z "$(ls -A "$DATA")" ] || die "$DATA exists and is not a cluster"
        say "initdb in $DATA"
        as_pg "$PG_BIN/initdb" -D "$DATA" -U postgres --auth=trust --encoding=UTF8 --locale=C \
            >"$DIR/initdb.log" 2>&1 || {
            cat "$DIR/initdb.log" >&2
            die "initdb failed"
        }
    fi
    local port attempt
    for attempt in 1 2 3 4 5; do
        port=$(pick_port)
        write_config "$port"
        if as_pg "$PG_BIN/pg_ctl" start -w -t 60 -D "$DATA" -l "$LOG" >/dev/null; then
            break
        fi
        # Somebody may have taken the port between the pick and the bind: try another.
        if [ "$attempt" -lt 5 ] && tail -n 20 "$LOG" | grep -q "could not bind\|Address already in use"; then
            rm -f "$DIR/port"
            continue
        fi
        tail -n 30 "$LOG" >&2 || true
        die "pg_ctl start failed (log: $LOG)"
    done
    echo "$port" >"$DIR/port"
    if [ "$(sql postgres "$port" "select count(*) from pg_roles where rolname = 'concord'")" = 0 ]; then
        sql postgres "$port" "create role concord with superuser login replication"
    fi
    if [ "$(sql postgres "$port" "select count(*) from pg_database where datname = 'concord'")" = 0 ]; then
        sql postgres "$port" "create database concord owner concord"
    fi
    url_of_port "$port" >"$DIR/url"
    cat "$DIR/url"
}

stop() {
    if ! running; then
        say "not running in $DIR"
        return
    fi
    as_pg "$PG_BIN/pg_ctl" stop -w -t 60 -m fast -D "$DATA" >/dev/null
}

case $cmd in
start) start ;;
stop) stop ;;
status)
    if running; then url_of_port "$(current_port)"; else exit 3; fi
    ;;
*) usage ;;
esac
