#!/usr/bin/env bash
# Capture golden fixtures of real Celery 5.7.0 traffic into tests/fixtures/.
# Needs a Redis server at 127.0.0.1:6379; uses (and flushes) DB 9 (broker)
# and DB 10 (result backend) only.
#
#   tests/interop/capture.sh [capture_fixtures.py options]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="$("$HERE/venv.sh")"
exec "$PY" "$HERE/capture_fixtures.py" "$@"
