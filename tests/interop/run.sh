#!/usr/bin/env bash
# Python interop tests: Celeriac and real Celery 5.7.0 on one Redis database.
#
#   tests/interop/run.sh [pytest options]
#
# Builds the interop worker and the celeriac CLI, creates (or reuses) the pinned venv, checks
# Redis at 127.0.0.1:6379, flushes DB 12 (INTEROP_REDIS_DB to change it) and runs
# tests/interop/test_interop.py, test_control.py (inspect, control, Flower) and
# test_shared_queue.py (a Python and a Rust worker on one queue, SIGKILL). Without Redis
# it prints "SKIPPED: ..." and exits 0, unless CELERIAC_REQUIRE_SERVICES=1 (then it fails).
# Every process it starts is stopped on exit.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
REDIS_HOST=127.0.0.1
REDIS_PORT=6379
DB="${INTEROP_REDIS_DB:-12}"
STARTED=$SECONDS

RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/celeriac-interop.XXXXXX")"
export INTEROP_PIDS_FILE="$RUN_DIR/pids"
PYTEST_PID=""

stop_pid() { # pid: SIGTERM, up to 10 s to exit, then SIGKILL
    local pid="$1"
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    # pytest stops its workers itself (fixture teardown). On an interrupted run, stop pytest
    # (SIGTERM unwinds it like Ctrl-C, running that teardown), then any worker it listed in
    # $INTEROP_PIDS_FILE that is still there.
    [[ -n "$PYTEST_PID" ]] && stop_pid "$PYTEST_PID"
    if [[ -f "$INTEROP_PIDS_FILE" ]]; then
        while read -r pid _name; do
            # Only our own children: the pid must still run one of the workers started here.
            if grep -qa -e interop_worker -e interop_app "/proc/$pid/cmdline" 2>/dev/null; then
                stop_pid "$pid"
            fi
        done <"$INTEROP_PIDS_FILE"
    fi
    rm -rf "$RUN_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

skip_or_fail() {
    if [[ "${CELERIAC_REQUIRE_SERVICES:-0}" == "1" ]]; then
        echo "FAILED: $1 (CELERIAC_REQUIRE_SERVICES=1)" >&2
        exit 1
    fi
    echo "SKIPPED: $1"
    exit 0
}

# 1. Redis (checked first: without it there is nothing to build for).
redis_ping() {
    # A RESP PING over bash's /dev/tcp (no redis-cli needed), in a subshell with a time limit.
    timeout 5 bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        printf "PING\r\n" >&3
        IFS= read -r -t 3 reply <&3 || exit 1
        [[ "$reply" == "+PONG"* ]]
    ' "$REDIS_HOST" "$1"
}
if ! redis_ping "$REDIS_PORT" 2>/dev/null; then
    skip_or_fail "no Redis server at $REDIS_HOST:$REDIS_PORT for the Python interop tests"
fi

# 2. Binaries (one cargo build; it waits for the lock if another build runs).
cd "$REPO"
echo "interop: building the interop worker and the celeriac CLI" >&2
# (--bin: the --example flags would otherwise leave celeriac-cli's binary unbuilt.)
cargo build --quiet -p celeriac --example interop_worker --example interop_client -p celeriac-cli --bin celeriac
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
export INTEROP_WORKER_BIN="$TARGET_DIR/debug/examples/interop_worker"
export INTEROP_CELERIAC_BIN="$TARGET_DIR/debug/celeriac"

# 3. The pinned venv (celery 5.7.0, flower 2.2.0, pytest).
PY="$("$HERE/venv.sh")"

# 4. A dedicated, empty DB.
export INTEROP_REDIS_URL="redis://$REDIS_HOST:$REDIS_PORT/$DB"
"$PY" -c 'import redis, sys; redis.Redis.from_url(sys.argv[1]).flushdb()' "$INTEROP_REDIS_URL"

# 5. The tests. No bytecode or cache files in the source tree.
export PYTHONDONTWRITEBYTECODE=1
cd "$HERE"
set +e
"$PY" -m pytest -p no:cacheprovider --timeout 60 -v -rfEsxX --basetemp "$RUN_DIR/pytest" \
    test_interop.py test_control.py test_shared_queue.py "$@" &
PYTEST_PID=$!
wait "$PYTEST_PID"
status=$?
set -e
PYTEST_PID=""
echo "interop: finished in $((SECONDS - STARTED)) s (exit $status)" >&2
exit "$status"
