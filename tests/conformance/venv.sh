#!/usr/bin/env bash
# Create (or reuse) the pinned Python venv for the Celery 5.7.0 conformance run.
#
#   tests/conformance/venv.sh    -> prints the venv's python on stdout
#
# The venv is <repo>/target/conformance-venv. A sha256 of requirements.txt plus the base
# interpreter's version is stored in it; the venv is rebuilt only when that changes.
# Messages go to stderr, so callers can write:  PY="$(tests/conformance/venv.sh)"
# PYTHON picks the base interpreter (default: python3).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
REQ="$HERE/requirements.txt"
VENV="$REPO/target/conformance-venv"
STAMP="$VENV/.requirements.sha256"
BASE_PY="${PYTHON:-python3}"

want="$( { cat "$REQ"; "$BASE_PY" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)"

up_to_date() {
    [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]
}

if up_to_date; then
    echo "$VENV/bin/python"
    exit 0
fi

mkdir -p "$REPO/target"
# Two runs starting at once must not build the same venv: take a lock if flock(1) exists,
# and look again once we hold it (the other run may have finished meanwhile).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$REPO/target/conformance-venv.lock"
    flock 9
    if up_to_date; then
        echo "$VENV/bin/python"
        exit 0
    fi
fi

echo "conformance venv: building $VENV" >&2
rm -rf "$VENV"
"$BASE_PY" -m venv "$VENV"
# requirements.txt pins the whole closure, so install it as is (--no-deps) and let
# `pip check` fail the build if anything is missing or inconsistent.
"$VENV/bin/python" -m pip install --disable-pip-version-check --quiet --no-deps -r "$REQ" >&2
"$VENV/bin/python" -m pip check >&2
echo "$want" >"$STAMP"
echo "$VENV/bin/python"
