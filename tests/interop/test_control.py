"""Monitoring and remote control of a Celeriac worker with Celery's own tools.

Run by ``tests/interop/run.sh`` (see ``docs/CELERY_INTEROP.md``, "Monitoring and remote
control").

- ``celery -A interop_app inspect ping|stats|active|registered|active_queues`` (the real CLI, as
  a subprocess, ``--destination`` the Rust node) against the session's Rust worker.
- ``celery control revoke|terminate|rate_limit|shutdown``, each against a Rust worker of its
  own (its node name and queue unique to the test), as these change the worker's state.
- ``celery control add_consumer|cancel_consumer|enable_events|disable_events|time_limit`` and
  ``celery inspect reserved|scheduled|query_task`` (also with the worker of the test's own).
- Flower 2.2.0 on the same Redis, with a Rust worker sending task events (``-E``): its
  ``/api/workers`` (which runs the inspect commands) and ``/api/tasks`` (built from events).
"""

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from celery.exceptions import TaskRevokedError, TimeLimitExceeded

from conftest import HERE, REDIS_URL, Process, rust_env, rust_worker_cmd
from interop_app import app, rust_add, rust_fail, rust_sleep

TIMEOUT = 15
SHARED_NODE = "rust@interop"  # conftest's session worker: -Q rust -c 4
RUST_TASKS = [
    "rust.add",
    "rust.custom_error",
    "rust.echo",
    "rust.fail",
    "rust.kwargs_only",
    "rust.mul",
    "rust.retry_once",
    "rust.sleep",
    "rust.tsum",
    "shared.work",
]


def python_env(**extra):
    return {
        **os.environ,
        "INTEROP_REDIS_URL": REDIS_URL,
        "PYTHONPATH": os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        **extra,
    }


def celery(*args, timeout=60):
    """Runs the real `celery -A interop_app ...` command line of the venv."""
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "interop_app", *map(str, args)],
        cwd=str(HERE), env=python_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=timeout,
    )


def inspect(method, node, *args):
    """`celery inspect <method> --destination <node> --json`: that node's answer."""
    run = celery("inspect", method, *args, "--destination", node, "--json", "--timeout", 5)
    assert run.returncode == 0, run
    replies = json.loads(run.stdout)
    assert list(replies) == [node], replies
    return replies[node]


def control(command, node, *args):
    """`celery control <command> --destination <node> --json`: that node's answer."""
    run = celery("control", command, *args, "--destination", node, "--json", "--timeout", 5)
    assert run.returncode == 0, run
    replies = json.loads(run.stdout)  # a list of {node: reply}, unlike inspect's dict
    assert [list(r) for r in replies] == [[node]], replies
    return replies[0][node]


def wait_for(what, probe, timeout=TIMEOUT, every=0.1, seen=None):
    """Calls `probe()` until it returns something truthy; returns it. `seen`: a dict the probe
    fills with what it last saw, printed if it never matches."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    pytest.fail(f"{what}: not seen after {timeout} s (last: {last!r}; seen: {seen!r})")


def polled(method, node):
    """An inspect answer through the Python API (no CLI start-up: for polling)."""
    replies = getattr(app.control.inspect([node], timeout=2), method)() or {}
    return replies.get(node) or []


def active_ids(node):
    return {t["id"] for t in polled("active", node)}


@pytest.fixture
def dedicated_worker(log_dir):
    """Starts a Rust worker of the test's own: `start(label, concurrency, extra)` returns it
    with `.node` (`<label>-<hex>@interop`) and `.queue` (`ctl_<label>_<hex>`)."""
    started = []

    def start(label, concurrency=1, extra=()):
        tag = uuid.uuid4().hex[:8]
        node, queue = f"{label}-{tag}@interop", f"ctl_{label}_{tag}"
        worker = Process(
            f"rust-{label}-worker", rust_worker_cmd(queue, concurrency, node, list(extra)), rust_env(),
            b"worker ready", log_dir,
        )
        worker.node, worker.queue = node, queue
        started.append(worker)
        worker.start()
        # Ready to answer: remote control subscribes just after "worker ready".
        wait_for(f"{node} answering ping", lambda: polled("ping", node))
        return worker

    yield start
    for worker in started:
        worker.stop()


# --------------------------------------------------------------------------
# celery inspect
# --------------------------------------------------------------------------


@pytest.mark.usefixtures("rust_worker")
class TestInspect:
    def test_ping(self):
        run = celery("inspect", "ping", "--destination", SHARED_NODE, "--timeout", 5)
        assert run.returncode == 0, run
        assert f"->  {SHARED_NODE}: OK" in run.stdout
        assert "pong" in run.stdout
        assert "1 node online." in run.stdout

    def test_stats_count_tasks(self):
        before = inspect("stats", SHARED_NODE)["total"]
        results = [rust_add.delay(i, i) for i in range(3)] + [rust_fail.delay("counted")]
        for r in results:
            r.get(timeout=TIMEOUT, propagate=False)
        stats = inspect("stats", SHARED_NODE)
        total = stats["total"]
        assert total.get("rust.add", 0) - before.get("rust.add", 0) == 3, (before, total)
        assert total.get("rust.fail", 0) - before.get("rust.fail", 0) == 1, (before, total)
        assert stats["pool"]["max-concurrency"] == 4
        broker = stats["broker"]
        assert broker["transport"] == "redis"
        assert (broker["hostname"], broker["port"]) == ("127.0.0.1", 6379)
        assert broker["virtual_host"] == REDIS_URL.rsplit("/", 1)[1]
        assert isinstance(stats["pid"], int) and stats["pid"] > 0
        assert isinstance(stats["uptime"], int)
        assert stats["prefetch_count"] == 16  # 4 slots × worker_prefetch_multiplier 4
        assert stats["rusage"]["maxrss"] > 0

    def test_active_lists_running_task(self):
        sleeper = rust_sleep.delay(4)
        wait_for("rust.sleep running", lambda: sleeper.id in active_ids(SHARED_NODE))
        [info] = [t for t in inspect("active", SHARED_NODE) if t["id"] == sleeper.id]
        assert info["name"] == info["type"] == "rust.sleep"
        assert info["args"] == [4] and info["kwargs"] == {}
        assert info["hostname"] == SHARED_NODE
        assert info["acknowledged"] is True
        assert info["time_start"] > 0
        assert info["delivery_info"]["routing_key"] == "rust"
        # query_task finds it too, as active.
        found = app.control.inspect([SHARED_NODE], timeout=5).query_task(sleeper.id)[SHARED_NODE]
        assert found[sleeper.id][0] == "active", found
        assert sleeper.get(timeout=TIMEOUT) == 4
        assert sleeper.id not in active_ids(SHARED_NODE)

    def test_registered(self):
        assert inspect("registered", SHARED_NODE) == RUST_TASKS

    def test_active_queues(self):
        [queue] = inspect("active_queues", SHARED_NODE)
        assert queue["name"] == queue["routing_key"] == "rust"
        assert queue["exchange"]["name"] == "rust"
        assert queue["exchange"]["type"] == "direct"


# --------------------------------------------------------------------------
# celery control (a worker per test: these change the worker's state)
# --------------------------------------------------------------------------


def test_revoke_before_start(dedicated_worker):
    """Revoked while waiting (behind a sleeping task on one slot, or on its countdown): stored
    REVOKED at once, and never run when the worker reaches it."""
    worker = dedicated_worker("revoke", 1, ["--prefetch-multiplier", "1"])
    node, queue = worker.node, worker.queue
    # 5 s: time for the command line (a second or two to start) to revoke while it runs.
    blocker = rust_sleep.apply_async((5,), queue=queue)
    waiting = rust_add.apply_async((1, 2), queue=queue)
    later = rust_add.apply_async((3, 4), queue=queue, countdown=2)
    wait_for("the waiting task reserved", lambda: waiting.id in {t["id"] for t in polled("reserved", node)})

    reply = control("revoke", node, waiting.id, later.id)
    assert reply["ok"].startswith("tasks {") and reply["ok"].endswith("} flagged as revoked"), reply
    assert f"'{waiting.id}'" in reply["ok"] and f"'{later.id}'" in reply["ok"], reply
    # Still waiting behind the sleeper ...
    assert [t["id"] for t in polled("reserved", node)] == [waiting.id]
    assert [t["id"] for t in polled("active", node)] == [blocker.id]
    # ... but Celery 5.7 stores REVOKED at once for tasks that have not started.
    assert waiting.state == later.state == "REVOKED"
    assert set(inspect("revoked", node)) == {waiting.id, later.id}

    # Markers behind each of them (FIFO on one slot, the ETA one after `later`'s): when they
    # have run, the worker has reached the revoked tasks.
    marker = rust_add.apply_async((10, 10), queue=queue)
    late_marker = rust_add.apply_async((20, 20), queue=queue, countdown=2.5)
    assert blocker.get(timeout=TIMEOUT) == 5
    assert marker.get(timeout=TIMEOUT) == 20
    assert late_marker.get(timeout=TIMEOUT) == 40
    for revoked in (waiting, later):
        with pytest.raises(TaskRevokedError):
            revoked.get(timeout=TIMEOUT)
        assert revoked.state == "REVOKED"
    # Never run: only the sleeper and the two markers count.
    assert inspect("stats", node)["total"] == {"rust.sleep": 1, "rust.add": 2}


def test_revoke_terminate_running(dedicated_worker):
    """`celery control terminate SIGTERM <id>` and `revoke(..., terminate=True)` stop running
    `rust.sleep` tasks: REVOKED long before they would have finished."""
    worker = dedicated_worker("terminate", 2)
    node, queue = worker.node, worker.queue
    by_cli = rust_sleep.apply_async((30,), queue=queue)
    by_api = rust_sleep.apply_async((30,), queue=queue)
    wait_for("both sleepers active", lambda: {by_cli.id, by_api.id} <= active_ids(node))
    started = time.monotonic()

    assert control("terminate", node, "SIGTERM", by_cli.id) == {"ok": f"terminate: {by_cli.id}"}
    replies = app.control.revoke(by_api.id, terminate=True, destination=[node], reply=True, timeout=5)
    assert replies == [{node: {"ok": f"terminate: {by_api.id}"}}]
    for r in (by_cli, by_api):
        with pytest.raises(TaskRevokedError):
            r.get(timeout=TIMEOUT)
        assert r.state == "REVOKED"
    assert time.monotonic() - started < 10
    assert active_ids(node) == set()
    assert control("terminate", node, "SIGTERM", str(uuid.uuid4())) == {"ok": "terminate: tasks unknown"}
    # Revoking a finished task leaves its result alone (Celery 5.7).
    done = rust_add.apply_async((1, 1), queue=queue)
    assert done.get(timeout=TIMEOUT) == 2
    assert "flagged as revoked" in control("revoke", node, done.id)["ok"]
    assert done.state == "SUCCESS"


def spread(results):
    done = [r.date_done for r in results]
    return (max(done) - min(done)).total_seconds()


def test_rate_limit(dedicated_worker):
    worker = dedicated_worker("ratelimit", 4)
    node, queue = worker.node, worker.queue
    free = [rust_add.apply_async((i, i), queue=queue) for i in range(4)]
    assert [r.get(timeout=TIMEOUT) for r in free] == [0, 2, 4, 6]
    assert spread(free) < 1.0

    assert control("rate_limit", node, "rust.add", "2/s") == {"ok": "new rate limit set successfully"}
    # As Celery lists a task with a rate limit.
    assert "rust.add [rate_limit=2/s]" in polled("registered", node)
    limited = [rust_add.apply_async((i, i), queue=queue) for i in range(4)]
    assert [r.get(timeout=TIMEOUT) for r in limited] == [0, 2, 4, 6]
    # Starts spaced 0.5 s apart: 0, 0.5, 1.0, 1.5.
    assert spread(limited) >= 1.4, [r.date_done for r in limited]

    def rate_limit(task, rate):
        [reply] = app.control.rate_limit(task, rate, destination=[node], reply=True, timeout=5)
        return reply[node]

    assert rate_limit("rust.nope", "1/s") == {"error": "unknown task"}
    assert "Invalid rate limit string" in rate_limit("rust.add", "fast")["error"]
    assert rate_limit("rust.add", "") == {"ok": "rate limit disabled successfully"}
    assert "rust.add" in polled("registered", node)


def test_shutdown(dedicated_worker):
    worker = dedicated_worker("shutdown")
    node = worker.node
    # Celery's worker exits without a reply (the CLI then says "No nodes replied"); Celeriac
    # answers first, then shuts down warm.
    assert control("shutdown", node) == {"ok": "Warm shutdown"}
    assert worker.proc.wait(timeout=TIMEOUT) == 0
    assert b"worker stopped" in worker.log_path.read_bytes()
    gone = celery("inspect", "ping", "--destination", node, "--timeout", 1)
    assert gone.returncode != 0 and "No nodes replied" in gone.stdout + gone.stderr, gone


def test_add_and_cancel_consumer(dedicated_worker, redis_client):
    worker = dedicated_worker("consumer", 2)
    node, queue = worker.node, worker.queue
    extra, routed = f"{queue}_extra", f"{queue}_routed"
    assert not redis_client.exists(f"_kombu.binding.{extra}")

    assert control("add_consumer", node, extra) == {"ok": f"add consumer {extra}"}
    # Declared by the worker (kombu's binding) before anything was published to it.
    assert redis_client.smembers(f"_kombu.binding.{extra}") == {f"{extra}\x06\x16\x06\x16{extra}".encode()}
    assert sorted(q["name"] for q in inspect("active_queues", node)) == sorted([queue, extra])
    assert rust_add.apply_async((2, 2), queue=extra).get(timeout=TIMEOUT) == 4

    # `add_consumer <queue> <exchange> <type> <routing_key>`: bound as given, so a message
    # published to that exchange with that routing key (not the queue name) reaches it.
    reply = control("add_consumer", node, routed, f"{routed}.ex", "direct", f"{routed}.key")
    assert reply == {"ok": f"add consumer {routed}"}
    binding = f"{routed}.key\x06\x16\x06\x16{routed}".encode()
    assert redis_client.smembers(f"_kombu.binding.{routed}.ex") == {binding}
    sent = rust_add.apply_async((3, 3), exchange=f"{routed}.ex", routing_key=f"{routed}.key")
    assert sent.get(timeout=TIMEOUT) == 6

    assert control("cancel_consumer", node, extra) == {"ok": f"no longer consuming from {extra}"}
    assert sorted(q["name"] for q in inspect("active_queues", node)) == sorted([queue, routed])
    waiting = rust_add.apply_async((4, 4), queue=extra)
    marker = rust_add.apply_async((5, 5), queue=queue)
    assert marker.get(timeout=TIMEOUT) == 10
    time.sleep(1)  # the cancelled queue is not consumed: its message stays
    assert waiting.state == "PENDING"
    assert redis_client.llen(extra) == 1


def task_events(pubsub, ids, seconds):
    """`{task id: [event types]}` of the task events received within `seconds`."""
    seen = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.1)
        if not message or message["type"] != "pmessage":
            continue
        envelope = json.loads(message["data"])
        event = json.loads(base64.b64decode(envelope["body"]))
        if event.get("uuid") in ids:
            seen.setdefault(event["uuid"], []).append(event["type"])
    return seen


def test_enable_and_disable_events(dedicated_worker, redis_client):
    worker = dedicated_worker("events", 1)  # started without -E
    node, queue = worker.node, worker.queue
    pubsub = redis_client.pubsub()
    pubsub.psubscribe(f"/{REDIS_URL.rsplit('/', 1)[1]}.celeryev/task.*")
    try:
        quiet = rust_add.apply_async((1, 1), queue=queue)
        assert quiet.get(timeout=TIMEOUT) == 2

        assert control("enable_events", node) == {"ok": "task events enabled"}
        assert control("enable_events", node) == {"ok": "task events already enabled"}
        loud = rust_add.apply_async((2, 2), queue=queue)
        assert loud.get(timeout=TIMEOUT) == 4
        seen = task_events(pubsub, {quiet.id, loud.id}, 2)
        assert set(seen) == {loud.id}, seen
        assert {"task-received", "task-started", "task-succeeded"} <= set(seen[loud.id]), seen

        assert control("disable_events", node) == {"ok": "task events disabled"}
        assert control("disable_events", node) == {"ok": "task events already disabled"}
        quiet_again = rust_add.apply_async((3, 3), queue=queue)
        assert quiet_again.get(timeout=TIMEOUT) == 6
        assert task_events(pubsub, {quiet_again.id}, 1.5) == {}
    finally:
        pubsub.close()


def test_time_limit(dedicated_worker):
    worker = dedicated_worker("timelimit", 1)
    node, queue = worker.node, worker.queue
    assert control("time_limit", node, "rust.sleep", 1, 2) == {"ok": "time limits set successfully"}
    # As Celery shows the task's attributes: Python floats.
    registered = inspect("registered", node, "time_limit", "soft_time_limit")
    assert "rust.sleep [time_limit=2.0 soft_time_limit=1.0]" in registered, registered
    started = time.monotonic()
    with pytest.raises(TimeLimitExceeded):
        rust_sleep.apply_async((8,), queue=queue).get(timeout=TIMEOUT)
    assert time.monotonic() - started < 6
    [reply] = app.control.time_limit("rust.nope", soft=1, destination=[node], reply=True, timeout=5)
    assert reply == {node: {"error": "unknown task"}}


def test_reserved_scheduled_and_query_task(dedicated_worker):
    worker = dedicated_worker("queries", 1, ["--prefetch-multiplier", "2"])
    node, queue = worker.node, worker.queue
    blocker = rust_sleep.apply_async((12,), queue=queue)
    waiting = rust_add.apply_async((5, 5), queue=queue)
    eta = datetime.now(timezone.utc) + timedelta(seconds=14)
    later = rust_add.apply_async((6, 6), queue=queue, eta=eta)
    seen = {"want": {"reserved": [waiting.id], "scheduled": [later.id], "blocker": blocker.id}}

    def one_reserved_one_scheduled():
        seen["reserved"] = [t["id"] for t in polled("reserved", node)]
        seen["scheduled"] = [t["request"]["id"] for t in polled("scheduled", node)]
        seen["active"] = sorted(active_ids(node))
        return seen["reserved"] == [waiting.id] and seen["scheduled"] == [later.id]

    wait_for("one reserved, one scheduled", one_reserved_one_scheduled, seen=seen)

    [info] = inspect("reserved", node)
    assert (info["id"], info["name"], info["type"]) == (waiting.id, "rust.add", "rust.add")
    assert (info["args"], info["kwargs"], info["hostname"]) == ([5, 5], {}, node)
    assert (info["time_start"], info["acknowledged"]) == (None, False)
    assert info["delivery_info"] == {"exchange": "", "routing_key": queue, "priority": 0, "redelivered": False}
    assert isinstance(info["worker_pid"], int)

    # ETA tasks the worker took early wait in the broker's delayed set: listed as Celery lists
    # its timer entries (`priority` is the timer's, 6 for every ETA entry).
    [entry] = inspect("scheduled", node)
    assert set(entry) == {"eta", "priority", "request"}
    assert datetime.fromisoformat(entry["eta"]) == eta
    assert entry["priority"] == 6
    request = entry["request"]
    assert (request["id"], request["name"], request["args"], request["acknowledged"]) == (later.id, "rust.add", [6, 6], False)

    found = inspect("query_task", node, blocker.id, waiting.id, later.id, str(uuid.uuid4()))
    assert {i: kind for i, (kind, _) in found.items()} == {
        blocker.id: "active", waiting.id: "reserved", later.id: "scheduled",
    }, found
    assert found[waiting.id][1]["args"] == [5, 5]

    assert (blocker.get(timeout=TIMEOUT), waiting.get(timeout=TIMEOUT), later.get(timeout=TIMEOUT)) == (12, 10, 12)
    assert inspect("scheduled", node) == []


# --------------------------------------------------------------------------
# Flower
# --------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return None


def test_flower(dedicated_worker, log_dir):
    worker = dedicated_worker("flower", 2, ["-E"])
    node, queue = worker.node, worker.queue
    port = free_port()
    # Flower 2.2's API answers 401 unless an auth method is set or this variable is.
    flower = Process(
        "flower",
        [sys.executable, "-m", "celery", "-A", "interop_app", "flower", f"--port={port}", "--address=127.0.0.1"],
        python_env(FLOWER_UNAUTHENTICATED_API="true"),
        b"Visit me at",
        log_dir,
    )
    flower.start()
    base = f"http://127.0.0.1:{port}"
    try:
        # /api/workers?refresh=1 runs stats, active_queues, registered and conf on every worker.
        def workers():
            found = get_json(f"{base}/api/workers?refresh=1") or {}
            info = found.get(node, {})
            return info if {"stats", "registered", "active_queues", "conf"} <= set(info) else None

        info = wait_for(f"{node} in Flower's /api/workers", workers, timeout=30, every=0.5)
        assert info["stats"]["pool"]["max-concurrency"] == 2
        assert info["stats"]["broker"]["transport"] == "redis"
        assert info["registered"] == RUST_TASKS
        assert [q["name"] for q in info["active_queues"]] == [queue]
        # One worker in detail: also active, reserved, scheduled, revoked.
        detail = get_json(f"{base}/api/workers?workername={node}&refresh=1")[node]
        assert {"active", "reserved", "scheduled", "revoked"} <= set(detail), sorted(detail)
        # Alive from its heartbeat events.
        wait_for("the worker alive in /api/workers?status=1",
                 lambda: (get_json(f"{base}/api/workers?status=1") or {}).get(node))

        ok = [rust_add.apply_async((i, 1), queue=queue) for i in range(2)]
        failed = rust_fail.apply_async(("seen by flower",), queue=queue)
        assert [r.get(timeout=TIMEOUT) for r in ok] == [1, 2]
        with pytest.raises(ValueError):
            failed.get(timeout=TIMEOUT)

        def tasks():
            listed = get_json(f"{base}/api/tasks") or {}
            want = {r.id for r in ok} | {failed.id}
            final = {i for i in want if listed.get(i, {}).get("state") in ("SUCCESS", "FAILURE")}
            return listed if final == want else None

        listed = wait_for("the tasks' final states in /api/tasks", tasks)
        for r, value in zip(ok, ["1", "2"]):
            task = listed[r.id]
            assert (task["name"], task["state"], task["result"], task["worker"]) == ("rust.add", "SUCCESS", value, node)
            assert task["received"] and task["started"] and task["succeeded"]
        task = listed[failed.id]
        assert (task["name"], task["state"], task["worker"]) == ("rust.fail", "FAILURE", node)
        assert task["exception"] == "ValueError('seen by flower')"
        assert task["args"] == "('seen by flower',)"
    finally:
        flower.stop()
