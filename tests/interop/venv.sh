#!/usr/bin/env bash
# Create (or reuse) the Python venv used to capture Celery interop fixtures.
#
#   tests/interop/venv.sh        -> prints the venv's python path on stdout
#
# The venv lives at <repo>/target/interop-venv. It is rebuilt only when
# tests/interop/requirements.txt (or the base interpreter's version) changes:
# a sha256 stamp of both is kept in the venv. Progress goes to stderr so that
# callers can do:  PY="$(tests/interop/venv.sh)"
# Set PYTHON to choose the base interpreter (default: python3).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
REQ="$HERE/requirements.txt"
VENV="$REPO/target/interop-venv"
STAMP="$VENV/.requirements.sha256"
BASE_PY="${PYTHON:-python3}"

want="$( { cat "$REQ"; "$BASE_PY" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)"

if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    echo "$VENV/bin/python"
    exit 0
fi

mkdir -p "$REPO/target"
# Serialise concurrent builders when flock(1) is available.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$REPO/target/interop-venv.lock"
    flock 9
    # Someone else may have finished the build while we waited.
    if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
        echo "$VENV/bin/python"
        exit 0
    fi
fi

echo "interop venv: (re)creating $VENV" >&2
rm -rf "$VENV"
"$BASE_PY" -m venv "$VENV"
# Everything is pinned, transitive dependencies included: install exactly the
# listed set (--no-deps) and let `pip check` prove it is complete.
"$VENV/bin/python" -m pip install --disable-pip-version-check --quiet --no-deps -r "$REQ" >&2
"$VENV/bin/python" -m pip check >&2
echo "$want" >"$STAMP"
echo "$VENV/bin/python"
