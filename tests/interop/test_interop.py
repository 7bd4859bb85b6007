"""Celeriac and Python Celery 5.7.0 on one Redis: each sends tasks the other runs.

Run by ``tests/interop/run.sh`` (see ``docs/CELERY_INTEROP.md``, "Python interop tests").

- Python -> Rust: a Celery client calls the ``rust.*`` tasks of ``examples/interop_worker``
  (arguments, JSON values, countdown/eta/expires/priority, link, errors, retries).
- Rust -> Python: the ``celeriac`` command line calls the ``py.*`` tasks of a Celery worker.
- Workflows across both: a chain alternating workers, chords whose header and body run in
  different languages.
"""

import json
import math
import os
import subprocess
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from celery import chain, chord, group
from celery.exceptions import ChordError, NotRegistered, TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from conftest import INTEROP_CLIENT_BIN, REDIS_URL, RUST_ENV, Process, rust_env, rust_worker_cmd
from interop_app import (
    app,
    py_add,
    py_mul,
    py_tsum,
    rust_add,
    rust_custom_error,
    rust_echo,
    rust_fail,
    rust_kwargs_only,
    rust_mul,
    rust_retry_once,
    rust_tsum,
)

TIMEOUT = 15


def utc(dt):
    """A result's `date_done` as an aware UTC datetime (Celery may hand back a naive one)."""
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def states_until_ready(result, timeout=TIMEOUT, every=0.02):
    """Polls `result.state`; returns the distinct states seen, in order."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = result.state
        if not seen or seen[-1] != state:
            seen.append(state)
        if state in ("SUCCESS", "FAILURE", "REVOKED"):
            return seen
        time.sleep(every)
    pytest.fail(f"{result.id} not ready after {timeout} s; states seen: {seen}")


# --------------------------------------------------------------------------
# Python -> Rust
# --------------------------------------------------------------------------


@pytest.mark.usefixtures("rust_worker")
class TestPythonCallsRust:
    def test_delay(self):
        assert rust_add.delay(2, 3).get(timeout=TIMEOUT) == 5

    def test_keyword_arguments(self):
        assert rust_add.apply_async(kwargs={"x": 2, "y": 3}).get(timeout=TIMEOUT) == 5
        assert rust_add.apply_async((2,), {"y": 40}).get(timeout=TIMEOUT) == 42
        assert rust_kwargs_only.apply_async(kwargs={"a": 1, "b": "zwei"}).get(timeout=TIMEOUT) == {
            "a": 1,
            "b": "zwei",
        }
        # A missing Option parameter is None.
        assert rust_kwargs_only.delay(a=7).get(timeout=TIMEOUT) == {"a": 7, "b": None}

    @pytest.mark.parametrize(
        "value",
        [
            pytest.param(
                {
                    "ключ": "значение",
                    "日本語": ["テキスト", "emoji 🚀 outside the BMP"],
                    "nested": {"list": [1, [2, [3, []]], {}], "empty": {}, "none": None},
                    "flags": [True, False, None],
                },
                id="nested-unicode",
            ),
            pytest.param(
                [0.1, 1e-05, 1.5, 1e100, 123456789.123, 2.5e-300, -3.25, 0.30000000000000004],
                id="floats",
            ),
            pytest.param([0, -1, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1], id="integers"),
            pytest.param('quote " backslash \\ slash / tab \t newline \n nul \x00 del \x7f', id="escapes"),
            pytest.param(None, id="null"),
            pytest.param(True, id="true"),
            pytest.param(False, id="false"),
            pytest.param([], id="empty-list"),
            pytest.param({}, id="empty-dict"),
            pytest.param("", id="empty-string"),
        ],
    )
    def test_json_round_trip(self, value):
        got = rust_echo.delay(value).get(timeout=TIMEOUT)
        assert got == value
        # Types survive too: a bool stays a bool, an int stays an int.
        assert json.dumps(got, sort_keys=True) == json.dumps(value, sort_keys=True)

    @pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 10**30], ids=["2**64", "-2**63-1", "10**30"])
    def test_integers_beyond_64_bits(self, value):
        got = rust_echo.delay(value).get(timeout=TIMEOUT)
        assert type(got) is int and got == value

    def test_negative_zero_keeps_its_sign(self):
        got = rust_echo.delay(-0.0).get(timeout=TIMEOUT)
        assert got == 0.0 and math.copysign(1.0, got) == -1.0

    def test_send_task_by_name(self):
        # How a Python client without the task's code calls it: by name, routed by task_routes.
        assert app.send_task("rust.add", (2, 3)).get(timeout=5) == 5

    def test_unknown_task_and_bad_arguments_fail(self):
        # ignore_result=False: see test_send_task_by_name for the header send_task writes by default.
        unknown = app.send_task("rust.nope", (1,), queue="rust", ignore_result=False)
        with pytest.raises(NotRegistered):
            unknown.get(timeout=TIMEOUT)
        with pytest.raises(TypeError, match="argument `x`"):
            rust_add.apply_async(("x", 1)).get(timeout=TIMEOUT)
        with pytest.raises(TypeError, match="argument `y`: missing"):
            app.send_task("rust.add", (1,), ignore_result=False).get(timeout=TIMEOUT)

    def test_countdown(self):
        sent = time.monotonic()
        result = rust_add.apply_async((1, 2), countdown=2)
        time.sleep(1.0)
        assert result.state == "PENDING", "ran before its countdown"
        assert result.get(timeout=TIMEOUT) == 3
        assert time.monotonic() - sent >= 1.9

    def test_eta(self):
        eta = datetime.now(timezone.utc) + timedelta(seconds=2)
        result = rust_add.apply_async((2, 2), eta=eta)
        assert result.get(timeout=TIMEOUT) == 4
        assert utc(result.date_done) >= eta - timedelta(milliseconds=50)

    def test_expired_is_revoked(self):
        result = rust_add.apply_async((1, 1), expires=datetime.now(timezone.utc) - timedelta(seconds=30))
        with pytest.raises(TaskRevokedError):
            result.get(timeout=TIMEOUT)
        assert result.state == "REVOKED"

    def test_priority(self):
        # Plain: a prioritised message (kombu's `q\x06\x169` list) reaches the Rust worker.
        assert rust_add.apply_async((4, 5), priority=9).get(timeout=TIMEOUT) == 9

    def test_link_callback(self):
        callback = rust_mul.s(10)
        callback_result = callback.freeze()
        result = rust_add.apply_async((2, 3), link=callback)
        assert result.get(timeout=TIMEOUT) == 5
        assert callback_result.get(timeout=TIMEOUT) == 50
        children = result.children
        assert [c.id for c in children] == [callback_result.id]
        assert children[0].get(timeout=TIMEOUT) == 50

    def test_error_is_python_value_error(self):
        result = rust_fail.delay("bad input: 42")
        with pytest.raises(ValueError, match="bad input: 42"):
            result.get(timeout=TIMEOUT)
        assert result.state == "FAILURE"
        assert isinstance(result.result, ValueError)

    def test_custom_error_class(self):
        result = rust_custom_error.delay()
        with pytest.raises(Exception) as raised:
            result.get(timeout=TIMEOUT)
        assert type(raised.value).__name__ == "PaymentDeclined"
        assert "card declined by the issuer" in str(raised.value)
        assert result.state == "FAILURE"

    def test_retry_then_success(self):
        result = rust_retry_once.delay(7)
        seen = states_until_ready(result)
        assert "RETRY" in seen, seen
        assert seen[-1] == "SUCCESS", seen
        assert result.get(timeout=TIMEOUT) == 7

    def test_group(self):
        assert group(rust_add.s(i, i) for i in range(5))().get(timeout=TIMEOUT) == [0, 2, 4, 6, 8]


def test_priority_order(workers, log_dir):
    """Messages published with priorities before a worker starts run in kombu's Redis order
    (0 first) on a Rust worker with one slot."""
    queue = f"rust_prio_{uuid.uuid4().hex[:8]}"
    low = [rust_echo.apply_async((f"low-{i}",), queue=queue, priority=9) for i in range(3)]
    high = [rust_echo.apply_async((f"high-{i}",), queue=queue, priority=0) for i in range(3)]
    worker = Process(
        "rust-prio-worker",
        rust_worker_cmd(queue, 1, "prio@interop", ["--prefetch-multiplier", "1"]),
        rust_env(),
        b"worker ready",
        log_dir,
    )
    worker.start()
    try:
        for r in low + high:
            r.get(timeout=TIMEOUT)
    finally:
        worker.stop()
    order = [r.result for r in sorted(low + high, key=lambda r: utc(r.date_done))]
    assert order == ["high-0", "high-1", "high-2", "low-0", "low-1", "low-2"]


# --------------------------------------------------------------------------
# Rust -> Python (the celeriac command line as the client)
# --------------------------------------------------------------------------


@pytest.mark.usefixtures("python_worker")
class TestRustCallsPython:
    def test_call_and_wait(self, celeriac):
        run = celeriac("call", "py.add", "--args", "[2, 3]", "-Q", "python", "--wait", "--timeout", TIMEOUT)
        assert run.code == 0, run
        meta = run.meta()
        assert (meta["status"], meta["result"], meta["task_id"]) == ("SUCCESS", 5, run.task_id())

    def test_keywords_routed_by_task_routes(self, celeriac):
        # No -Q: CELERIAC_TASK_ROUTES sends py.* to the Python worker's queue (priority 9:
        # kombu's `python\x06\x169` list).
        run = celeriac(
            "call", "py.add", "--kwargs", '{"x": 40, "y": 2}', "--priority", 9, "--wait", "--timeout", TIMEOUT
        )
        assert run.code == 0, run
        assert run.meta()["result"] == 42

    def test_countdown(self, celeriac):
        sent = time.monotonic()
        run = celeriac(
            "call", "py.mul", "--args", "[6, 7]", "-Q", "python", "--countdown", 2, "--wait", "--timeout", TIMEOUT
        )
        assert run.code == 0, run
        assert run.meta()["result"] == 42
        assert time.monotonic() - sent >= 1.9

    def test_failure(self, celeriac):
        run = celeriac("call", "py.fail", "--args", '["kaput"]', "-Q", "python", "--wait", "--timeout", TIMEOUT)
        assert run.code == 1, run
        meta = run.meta()
        assert meta["status"] == "FAILURE"
        assert meta["result"]["exc_type"] == "ValueError"
        assert meta["result"]["exc_module"] == "builtins"
        assert meta["result"]["exc_message"] == ["kaput"]
        assert "Traceback" in (meta["traceback"] or "")
        again = celeriac("result", run.task_id())
        assert again.code == 1 and again.meta()["status"] == "FAILURE", again

    def test_retry_then_success(self, celeriac):
        sent = celeriac("call", "py.retry_once", "--args", "[9]", "-Q", "python")
        assert sent.code == 0, sent
        task_id = sent.task_id()
        seen = []
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            run = celeriac("result", task_id)
            state = run.meta()["status"]
            if not seen or seen[-1] != state:
                seen.append(state)
            if state == "SUCCESS":
                assert run.code == 0 and run.meta()["result"] == 9, run
                break
            time.sleep(0.05)
        assert "RETRY" in seen and seen[-1] == "SUCCESS", seen


# --------------------------------------------------------------------------
# Workflows across both workers
# --------------------------------------------------------------------------


@pytest.mark.usefixtures("workers")
class TestWorkflows:
    def test_chain_alternating_workers(self):
        result = chain(rust_add.s(1, 1), py_mul.s(10), rust_add.s(5)).apply_async()
        assert result.get(timeout=TIMEOUT) == 25
        assert result.parent.get(timeout=TIMEOUT) == 20
        assert result.parent.parent.get(timeout=TIMEOUT) == 2

    @pytest.mark.parametrize(
        "scenario, expected",
        [
            ("chain", 25),
            ("group", [0, 2, 4]),
            ("chord", 6),
            ("mixed_chain", 25),
            ("link", [5, 50]),
        ],
    )
    def test_canvas_built_in_rust(self, scenario, expected):
        """Canvases built by the Rust client (examples/interop_client) run on Python workers
        (py.* steps) and on both (mixed_chain), with Celery's JSON and chord counting."""
        out = subprocess.run(
            [str(INTEROP_CLIENT_BIN), REDIS_URL, scenario],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **RUST_ENV},
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.strip().splitlines()[-1]) == expected

    def test_chord_rust_header_python_body(self):
        assert chord([rust_add.s(i, i) for i in range(5)], py_tsum.s())().get(timeout=TIMEOUT) == 20

    def test_chord_python_header_rust_body(self):
        assert chord([py_add.s(i, i) for i in range(5)], rust_tsum.s())().get(timeout=TIMEOUT) == 20

    @pytest.mark.parametrize("body", [rust_tsum, py_tsum], ids=["rust-body", "python-body"])
    def test_chord_mixed_header(self, body):
        header = [rust_add.s(1, 1), py_add.s(2, 2), rust_add.s(3, 3), py_add.s(4, 4), rust_mul.s(2, 3)]
        assert chord(header, body.s())().get(timeout=TIMEOUT) == 26

    def test_chord_failing_rust_member(self):
        result = chord([rust_add.s(1, 1), rust_fail.s("broken member")], py_tsum.s())()
        # As with Celery's own workers, get() on the chord re-raises the failed header member
        # (the body's parent) ...
        with pytest.raises(ValueError, match="broken member"):
            result.get(timeout=TIMEOUT)
        # ... and the body, which never ran, is stored as FAILURE with a ChordError.
        body = AsyncResult(result.id)
        with pytest.raises(ChordError, match=r"Dependency .* raised ValueError\('broken member'\)"):
            body.get(timeout=TIMEOUT)
        assert body.state == "FAILURE"
