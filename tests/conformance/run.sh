#!/usr/bin/env bash
# Conformance: run Celery 5.7.0's own integration tests (t/integration from the sdist)
# against a worker running in its own process.
#
#   tests/conformance/run.sh [options] [--] [extra pytest args]
#
#   (default)           the worker is Celeriac: examples/conformance_worker, built with cargo
#   --python-worker     the worker is real Celery 5.7.0 (`celery -A conf57_worker_app worker -c 4`)
#   --quick             fast subset: the test_canvas.py ids in quick.txt, plus test_group_chains.py
#                       and test_redis_backend.py in full (about 3 minutes with a Python worker)
#   --files a,b         test files to run (default: test_canvas.py,test_tasks.py,
#                       test_group_chains.py,test_redis_backend.py,test_inspect.py)
#   --timeout N         pytest-timeout per test, seconds (default 60)
#   --min-passed f=N,.. fail when file f passed fewer than N items
#   --both              the Python worker first, then the Celeriac worker, and one table with
#                       both columns and the items whose outcome differs
#   anything else       passed to pytest unchanged
#
# Each file gets its own pytest session against a freshly started worker on an empty Redis
# DB 0 at 127.0.0.1:6379 (CONFORMANCE_REDIS_PORT changes the port). pytest starts no worker
# (plugin/ext_worker_plugin.py) and the node ids in deselect-5.7.0.txt, which can only pass
# with an in-process worker, are deselected by exact match (plugin/deselect_exact.py).
# At the end one table is printed and written, with the failing node ids, to
# target/conformance/last-<mode>.md. Logs, junit xml and JSON outcome lines stay in
# target/conformance/runs/<time>-<mode>/.
#
# Exit status: non-zero when pytest crashed (exit code other than 0 or 1, hang guard
# included), a worker did not start or died during a file, or --min-passed is not met.
# Failing tests alone do not make the run fail: the table is the result.
# Without Redis it prints "SKIPPED: ..." and exits 0, unless CELERIAC_REQUIRE_SERVICES=1.
# Other knobs: CONFORMANCE_HANG_GUARD (timeout(1) duration per pytest run, default 40m),
# CONFORMANCE_READY=sleep (wait a fixed 6 s for the worker instead of polling with ping).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
REDIS_HOST=127.0.0.1
REDIS_PORT="${CONFORMANCE_REDIS_PORT:-6379}"
REDIS_URL="redis://$REDIS_HOST:$REDIS_PORT/0"
CELERY_VERSION=5.7.0
DEFAULT_FILES=test_canvas.py,test_tasks.py,test_group_chains.py,test_redis_backend.py,test_inspect.py
QUICK_FILES=test_canvas.py,test_group_chains.py,test_redis_backend.py
HANG_GUARD="${CONFORMANCE_HANG_GUARD:-40m}"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

# ---------------------------------------------------------------- options
WORKER=celeriac
BOTH=0
QUICK=0
FILES=""
TIMEOUT=60
MIN_PASSED=""
EXTRA=()
while (($#)); do
    case "$1" in
        --python-worker) WORKER=python ;;
        --both) BOTH=1 ;;
        --quick) QUICK=1 ;;
        --files) FILES="${2:?--files needs a list}"; shift ;;
        --files=*) FILES="${1#*=}" ;;
        --timeout) TIMEOUT="${2:?--timeout needs seconds}"; shift ;;
        --timeout=*) TIMEOUT="${1#*=}" ;;
        --min-passed) MIN_PASSED="${2:?--min-passed needs file=N,...}"; shift ;;
        --min-passed=*) MIN_PASSED="${1#*=}" ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA+=("$@"); break ;;
        *) EXTRA+=("$1") ;;
    esac
    shift
done
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || { echo "run.sh: --timeout wants whole seconds, got '$TIMEOUT'" >&2; exit 2; }

if ((BOTH)); then
    # The same selection against a Python worker, then the Celeriac worker, in one run, and
    # one table with both columns (written to target/conformance/last-both.md).
    args=()
    ((QUICK)) && args+=(--quick)
    [[ -n "$FILES" ]] && args+=(--files "$FILES")
    args+=(--timeout "$TIMEOUT")
    both_rc=0
    "${BASH_SOURCE[0]}" --python-worker "${args[@]}" "${EXTRA[@]}" || both_rc=$?
    py_dir="$(ls -td "$REPO/target/conformance/runs/"*-python-worker* 2>/dev/null | head -1)"
    [[ -n "$MIN_PASSED" ]] && args+=(--min-passed "$MIN_PASSED")
    "${BASH_SOURCE[0]}" "${args[@]}" "${EXTRA[@]}" || both_rc=$?
    rs_dir="$(ls -td "$REPO/target/conformance/runs/"*-celeriac* 2>/dev/null | head -1)"
    if [[ -z "$py_dir" || -z "$rs_dir" ]]; then exit "$both_rc"; fi
    echo
    echo "== Celeriac worker vs Python Celery $CELERY_VERSION worker, same run"
    "$("$HERE/venv.sh")" "$HERE/compare.py" "$rs_dir" "$py_dir" --md "$REPO/target/conformance/last-both.md"
    exit "$both_rc"
fi

CUSTOM=0
if [[ -n "$FILES" || ${#EXTRA[@]} -gt 0 ]]; then CUSTOM=1; fi
if [[ -z "$FILES" ]]; then
    if ((QUICK)); then FILES="$QUICK_FILES"; else FILES="$DEFAULT_FILES"; fi
fi
SELECTED=()
IFS=',' read -r -a _raw <<<"$FILES"
for f in "${_raw[@]}"; do
    f="${f##*/}"
    [[ -z "$f" ]] && continue
    [[ "$f" == *.py ]] || f="$f.py"
    SELECTED+=("$f")
done
((${#SELECTED[@]})) || { echo "run.sh: --files selected nothing" >&2; exit 2; }

MODE="$([[ $WORKER == python ]] && echo python-worker || echo celeriac)"
((QUICK)) && MODE="$MODE-quick"
((CUSTOM)) && MODE="$MODE-custom"

# ---------------------------------------------------------------- processes and cleanup
WORKER_PID=""
PYTEST_PID=""
RUN_DIR=""

stop_pid() { # pid [grace seconds]: SIGTERM, wait, then SIGKILL to the pid's own process group
    local pid="$1" grace="${2:-10}"
    [[ -n "$pid" ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        local i
        for ((i = 0; i < grace * 10; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
    # Workers are started with setsid, so their process group id is their pid. Whatever is
    # left in that group (pool children of a killed parent) goes too.
    if kill -0 -- "-$pid" 2>/dev/null; then
        kill -KILL -- "-$pid" 2>/dev/null || true
    elif kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    [[ -n "$PYTEST_PID" ]] && stop_pid "$PYTEST_PID" 10
    [[ -n "$WORKER_PID" ]] && stop_pid "$WORKER_PID" 15
    PYTEST_PID=""
    WORKER_PID=""
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

log() { echo "conformance: $*" >&2; }

# ---------------------------------------------------------------- 1. Redis
redis_ping() {
    # RESP PING through bash's /dev/tcp, so redis-cli is not needed.
    timeout 5 bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        printf "PING\r\n" >&3
        IFS= read -r -t 3 reply <&3 || exit 1
        [[ "$reply" == "+PONG"* ]]
    ' "$REDIS_HOST" "$REDIS_PORT"
}
if ! redis_ping 2>/dev/null; then
    skip_or_fail "no Redis server at $REDIS_HOST:$REDIS_PORT for the Celery conformance suite"
fi

# ---------------------------------------------------------------- 2. worker binary
cd "$REPO"
if [[ $WORKER == celeriac ]]; then
    log "building the conformance worker"
    cargo build --quiet -p celeriac --example conformance_worker
    TARGET_DIR="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
    CELERIAC_WORKER_BIN="$TARGET_DIR/debug/examples/conformance_worker"
    [[ -x "$CELERIAC_WORKER_BIN" ]] || { echo "run.sh: $CELERIAC_WORKER_BIN was not built" >&2; exit 1; }
fi

# ---------------------------------------------------------------- 3. venv and sdist
PY="$("$HERE/venv.sh")"
VBIN="$(dirname "$PY")"
CACHE="$REPO/target/conformance"
SDIST="$CACHE/celery-$CELERY_VERSION"
mkdir -p "$CACHE"
if [[ ! -f "$SDIST/.extracted" ]]; then
    exec 8>"$CACHE/sdist.lock"
    command -v flock >/dev/null 2>&1 && flock 8
    if [[ ! -f "$SDIST/.extracted" ]]; then
        if [[ ! -f "$CACHE/celery-$CELERY_VERSION.tar.gz" ]]; then
            log "downloading the celery $CELERY_VERSION sdist"
            "$PY" -m pip download --disable-pip-version-check --quiet --no-binary :all: --no-deps \
                --dest "$CACHE" "celery==$CELERY_VERSION" >&2
        fi
        rm -rf "$SDIST" "$CACHE/extract.tmp"
        mkdir -p "$CACHE/extract.tmp"
        tar -xzf "$CACHE/celery-$CELERY_VERSION.tar.gz" -C "$CACHE/extract.tmp"
        mv "$CACHE/extract.tmp/celery-$CELERY_VERSION" "$SDIST"
        rmdir "$CACHE/extract.tmp"
        touch "$SDIST/.extracted"
    fi
    exec 8>&-
fi

# ---------------------------------------------------------------- 4. run directory
RUN_DIR="$CACHE/runs/$(date +%Y%m%d-%H%M%S)-$MODE"
mkdir -p "$RUN_DIR"
# Keep the 20 newest run directories.
ls -1d "$CACHE"/runs/*/ 2>/dev/null | sort | head -n -20 | while read -r old; do rm -rf "$old"; done
: >"$RUN_DIR/files.tsv"

# Environment shared by the worker and pytest (see the baseline method in README.md).
export TEST_BROKER="$REDIS_URL" TEST_BACKEND="$REDIS_URL"
export REDIS_HOST REDIS_PORT
export PYTHONPATH="$SDIST:$HERE/plugin"
export PATH="$VBIN:$PATH"          # test_serialization.py spawns a bare `celery`
export PYTHONDONTWRITEBYTECODE=1

flushdb() {
    "$PY" -c 'import redis, sys; redis.Redis.from_url(sys.argv[1]).flushdb()' "$REDIS_URL"
}

start_worker() { # tag
    local logf="$RUN_DIR/worker-$1.log"
    if [[ $WORKER == python ]]; then
        (cd "$SDIST" && exec setsid "$VBIN/celery" -A conf57_worker_app worker -c 4 -l info) \
            >"$logf" 2>&1 &
    else
        (cd "$RUN_DIR" && exec setsid "$CELERIAC_WORKER_BIN" worker \
            --broker "$REDIS_URL" --backend "$REDIS_URL" -c 4) >"$logf" 2>&1 &
    fi
    WORKER_PID=$!
}

wait_worker_ready() { # tag -> 0 ready (or assumed ready), 1 the worker exited
    local logf="$RUN_DIR/worker-$1.log" t0=$SECONDS
    if [[ "${CONFORMANCE_READY:-ping}" == sleep ]]; then
        sleep 6
        kill -0 "$WORKER_PID" 2>/dev/null
        return
    fi
    while ((SECONDS - t0 < 60)); do
        kill -0 "$WORKER_PID" 2>/dev/null || return 1
        if "$VBIN/celery" -b "$REDIS_URL" inspect ping --timeout 1 >/dev/null 2>&1; then
            log "worker answered ping after $((SECONDS - t0)) s"
            return 0
        fi
        sleep 0.5
    done
    log "no ping reply within 60 s; going on anyway (worker log: $logf)"
    kill -0 "$WORKER_PID" 2>/dev/null
}

show_worker_log() { # tag why
    echo "---- last lines of the worker log ($2): $RUN_DIR/worker-$1.log" >&2
    tail -n 40 "$RUN_DIR/worker-$1.log" >&2 || true
    echo "----" >&2
}

# ---------------------------------------------------------------- 5. one pytest session per file
STATUS=0
PYTEST_BASE=(
    -m pytest
    -p celery.contrib.pytest -p ext_worker_plugin -p deselect_exact -p outcome_recorder
    -p no:rerunfailures -p no:cacheprovider
    -o verbosity_subtests=1
    --timeout "$TIMEOUT" -rA
    --deselect-exact "$HERE/deselect-$CELERY_VERSION.txt"
)
log "mode $MODE, files ${SELECTED[*]}, run directory $RUN_DIR"
for file in "${SELECTED[@]}"; do
    tag="${file%.py}"
    target="t/integration/$file"
    if [[ ! -f "$SDIST/$target" ]]; then
        echo "run.sh: $target is not in the celery $CELERY_VERSION sdist" >&2
        printf '%s\t%s\t%s\t%s\t%s\n' "$file" "$tag" "-" 0 "no such file" >>"$RUN_DIR/files.tsv"
        STATUS=1
        continue
    fi
    selection=("$target")
    if ((QUICK)) && grep -q "^t/integration/$file::" "$HERE/quick.txt"; then
        mapfile -t selection < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$HERE/quick.txt" | grep "^t/integration/$file::")
    fi

    [[ -n "$WORKER_PID" ]] && stop_pid "$WORKER_PID" 15
    WORKER_PID=""
    flushdb
    start_worker "$tag"
    note=""
    if ! wait_worker_ready "$tag"; then
        show_worker_log "$tag" "the worker exited before it was ready"
        printf '%s\t%s\t%s\t%s\t%s\n' "$file" "$tag" "-" 0 "worker did not start" >>"$RUN_DIR/files.tsv"
        WORKER_PID=""
        STATUS=1
        continue
    fi

    log "pytest $file (${#selection[@]} selection argument(s), --timeout $TIMEOUT)"
    export CONFORMANCE_RECORD="$RUN_DIR/record-$tag.jsonl"
    : >"$CONFORMANCE_RECORD"
    t0="$(date +%s.%N)"
    set +e
    (cd "$SDIST" && exec timeout -k 30 "$HANG_GUARD" "$PY" "${PYTEST_BASE[@]}" \
        --junitxml="$RUN_DIR/junit-$tag.xml" "${selection[@]}" "${EXTRA[@]}") \
        > >(tee "$RUN_DIR/pytest-$tag.log") 2>&1 &
    PYTEST_PID=$!
    wait "$PYTEST_PID"
    rc=$?
    set -e
    PYTEST_PID=""
    wall="$(echo "$(date +%s.%N) $t0" | awk '{printf "%.1f", $1 - $2}')"

    if ! kill -0 "$WORKER_PID" 2>/dev/null; then
        note="worker died during the run"
        show_worker_log "$tag" "$note"
        STATUS=1
    elif ((rc != 0)); then
        show_worker_log "$tag" "pytest exit $rc"
    fi
    case $rc in
        0|1) ;;
        124|137) note="${note:+$note; }hang guard $HANG_GUARD hit"; STATUS=1 ;;
        *) note="${note:+$note; }pytest crashed (exit $rc)"; STATUS=1 ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$file" "$tag" "$rc" "$wall" "$note" >>"$RUN_DIR/files.tsv"
    log "$file: pytest exit $rc after $wall s"
done
stop_pid "$WORKER_PID" 15
WORKER_PID=""

# ---------------------------------------------------------------- 6. the table
worker_desc="$([[ $WORKER == python ]] && echo "Python Celery $CELERY_VERSION worker (celery worker -c 4)" \
    || echo "Celeriac conformance_worker (-c 4)")"
subset=""
((QUICK)) && subset="quick subset (quick.txt), "
extra_note=""
((${#EXTRA[@]})) && extra_note="$(printf ', extra pytest args: `%s`' "${EXTRA[*]}")"
preamble="Worker: $worker_desc. Broker and backend: $REDIS_URL. pytest --timeout $TIMEOUT, \
${subset}exact deselect list deselect-$CELERY_VERSION.txt. \
Run at $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) CPU(s)${extra_note}."
echo
set +e
"$PY" "$HERE/summarize.py" "$RUN_DIR" --title "Celery $CELERY_VERSION t/integration, mode $MODE" \
    --preamble "$preamble" --md "$CACHE/last-$MODE.md" --min-passed "$MIN_PASSED"
sum_rc=$?
set -e
cp "$CACHE/last-$MODE.md" "$RUN_DIR/summary.md" 2>/dev/null || true
((sum_rc == 0)) || STATUS=1
log "report: $CACHE/last-$MODE.md, logs: $RUN_DIR (exit $STATUS)"
exit "$STATUS"
