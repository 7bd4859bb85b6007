#!/usr/bin/env bash
# Celeriac and Python Celery 5.7.0 side by side, in one run, on the same Redis and machine.
#
#   benches/compare.sh [--tasks N] [--celery-tasks M] [--with-peers] [--db 12]
#
# For each scenario (enqueue, noop, results, acks-late, latency, chain, chord) it runs Python
# Celery (benches/celery_bench.py, its best pool for the scenario, settings printed), then
# Celeriac (`celeriac bench`, release build), one after the other, then the Redis-bound
# ceiling loop (benches/redis_ceiling.rs), and prints one table with the ratios; SQLite (the
# embedded default) is Celeriac's alone. --with-peers also builds and runs the no-op benches
# of other Rust task queues (benches/peers/, a cargo project the workspace does not build).
# The JSON lines of every figure are kept in target/bench/last-compare.jsonl and the table in
# target/bench/last-compare.md. Needs Redis at 127.0.0.1:6379 (DB 12 is flushed).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
DB=12
TASKS=200000
CELERY_TASKS=5000
PEERS=0
while (($#)); do
    case "$1" in
        --tasks) TASKS="$2"; shift ;;
        --celery-tasks) CELERY_TASKS="$2"; shift ;;
        --with-peers) PEERS=1 ;;
        --db) DB="$2"; shift ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "compare.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
URL="redis://127.0.0.1:6379/$DB"
OUT="$REPO/target/bench"
mkdir -p "$OUT"
JSONL="$OUT/last-compare.jsonl"
: >"$JSONL"
STARTED=$SECONDS

redis_ping() {
    timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/6379 && printf "PING\r\n" >&3 && IFS= read -r -t 3 r <&3 && [[ "$r" == "+PONG"* ]]'
}
redis_ping 2>/dev/null || { echo "compare.sh: no Redis at 127.0.0.1:6379" >&2; exit 1; }

echo "== building (release)" >&2
cd "$REPO"
cargo build --release --quiet -p celeriac-cli --bin celeriac -p celeriac --example redis_ceiling
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
CELERIAC="$TARGET_DIR/release/celeriac"
CEILING="$TARGET_DIR/release/examples/redis_ceiling"
PY="$("$REPO/tests/interop/venv.sh")"

flush() { "$PY" -c "import redis; redis.Redis.from_url('$URL').flushdb()"; }

run_celery() { # scenario
    flush
    echo "== celery: $1" >&2
    # Celery failing a scenario (e.g. a result wait timing out on a loaded machine) leaves
    # that figure out of the table; it does not stop the comparison. Celeriac's runs stay
    # fatal: they check their own counts.
    "$PY" "$HERE/celery_bench.py" --scenario "$1" --broker "$URL" --tasks "$CELERY_TASKS" | tee -a "$JSONL" \
        || echo "compare.sh: celery $1 failed; its figure is left out of the table" >&2
}

run_celeriac() { # scenario [--tasks N] [extra args]
    local s="$1" n="$TASKS"; shift
    if [[ "${1:-}" == "--tasks" ]]; then n="$2"; shift 2; fi
    flush
    echo "== celeriac: $s" >&2
    "$CELERIAC" --broker "$URL" --backend "$URL" --loglevel warn bench --scenario "$s" --tasks "$n" "$@" \
        | grep '^{' | sed 's/^{/{"impl": "celeriac", /' | tee -a "$JSONL"
}

for s in enqueue noop results acks-late; do
    run_celery "$s"
    run_celeriac "$s"
done
# Latency at half the measured capacity (results burn-down).
cap="$(grep '"impl": "celeriac"' "$JSONL" | grep '"scenario":"results"' | sed -n 's/.*"tasks_per_s":\([0-9.]*\).*/\1/p' | tail -1)"
rate="$(awk -v c="${cap:-10000}" 'BEGIN { printf "%.0f", c / 2 }')"
run_celery latency
run_celeriac latency --rate "$rate"
for s in chain chord; do
    run_celery "$s"
    run_celeriac "$s"
done
run_celeriac sqlite --tasks "$(( TASKS / 4 ))"
flush
echo "== redis ceiling" >&2
"$CEILING" --url "$URL" --n "$TASKS" | sed 's/^{/{"impl": "ceiling", /' | tee -a "$JSONL"

if ((PEERS)); then
    echo "== peers (benches/peers)" >&2
    (cd "$HERE/peers" && CARGO_TARGET_DIR="$REPO/target/peers" cargo build --release --quiet)
    # apalis-redis 1.0.0 with its defaults ran no job at all here with 10,000 or more queued
    # (it stalled at 0 done; 5,000 ran), so it gets 5,000; each peer gives up after 30 s
    # without progress rather than hang the comparison.
    for run in "rusty_celery_noop $(( TASKS / 4 ))" "apalis_noop 5000"; do
        set -- $run
        flush
        "$REPO/target/peers/release/$1" --url "$URL" --n "$2" | sed 's/^{/{"impl": "peer", /' | tee -a "$JSONL" \
            || echo "compare.sh: peer $1 failed" >&2
    done
fi
flush

"$PY" "$HERE/compare_table.py" "$JSONL" --cores "$(nproc)" --md "$OUT/last-compare.md"
echo "compare.sh: done in $((SECONDS - STARTED)) s; figures in $JSONL, table in $OUT/last-compare.md" >&2
