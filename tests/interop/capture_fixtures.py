#!/usr/bin/env python3
"""Capture golden fixtures of real Celery 5.7.0 traffic on Redis.

Run through ``tests/interop/capture.sh`` (which builds the pinned venv first).

What it does:

1. messages/: with no worker consuming, publishes tasks with a real Celery
   client to the Redis broker (DB 9) and saves each list value that kombu
   LPUSHed, byte for byte, as ``tests/fixtures/messages/<case>.json``.
2. results/: starts a real worker (``celery -A fixture_tasks worker -P solo
   ...``) as a subprocess, runs tasks and saves the exact value stored under
   ``celery-task-meta-<id>`` in the result backend (DB 10) as
   ``tests/fixtures/results/<case>.json``. A second worker with
   ``result_extended=True`` captures ``extended_success``. Workers are
   stopped by their own pid (SIGTERM, warm shutdown).
3. backoff/: a table of ``celery.utils.time.get_exponential_backoff_interval``.
4. canvas/: ``signatures/`` holds kombu's JSON of canvas signatures (as built
   and frozen); ``messages/`` the list values a client publishes for nested
   canvases (no worker), plus the keys it wrote to the backend DB meanwhile;
   ``runs/`` one JSON document per canvas run on a real worker: the value
   ``.get()`` returned, the result tree, every stored task meta, and, from a
   Redis ``MONITOR`` connection, every message LPUSHed to the broker DB and
   every command sent to the backend DB by the worker (and its Lua scripts).
5. events/: with PSUBSCRIBE on ``/9.celeryev/*`` and ``/9.celery.pidbox`` and
   a ``MONITOR`` connection open, starts a worker with heartbeats and task
   events on (``-E``), runs a successful, a failing and a retried task, a
   revoked id, ``ping``, ``inspect().stats()`` and ``enable_events``, and
   saves each pub/sub payload and each pidbox reply the worker LPUSHed to
   ``<oid>.reply.celery.pidbox`` as ``tests/fixtures/events/<name>.json``,
   with ``index.json`` giving each file's channel or list and a description.

``--only SECTION...`` picks sections; ``--out DIR`` writes under DIR instead
of tests/fixtures (to check a capture without touching the committed files).

Only Redis DBs 9 and 10 are touched (and flushed). Paths are derived from
this file's location; nothing machine-specific is written into the fixtures
except what Celery itself puts on the wire (e.g. the ``origin`` header).
"""

import argparse
import base64
import datetime as dt
import decimal
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_FIXTURES = REPO / "tests" / "fixtures"


def set_output_root(root):
    """Point every output directory at `root` (default: tests/fixtures)."""
    global FIXTURES, MESSAGES_DIR, RESULTS_DIR, BACKOFF_DIR, CANVAS_DIR
    FIXTURES = Path(root).resolve()
    MESSAGES_DIR = FIXTURES / "messages"
    RESULTS_DIR = FIXTURES / "results"
    BACKOFF_DIR = FIXTURES / "backoff"
    CANVAS_DIR = FIXTURES / "canvas"


set_output_root(DEFAULT_FIXTURES)

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
BROKER_DB = 9
BACKEND_DB = 10
BROKER_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{BROKER_DB}"
BACKEND_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{BACKEND_DB}"
WORKER_NODENAME = "fixtures@celeriac"

os.environ["CELERIAC_FIXTURE_BROKER"] = BROKER_URL
os.environ["CELERIAC_FIXTURE_BACKEND"] = BACKEND_URL
os.environ.pop("CELERIAC_FIXTURE_EXTENDED", None)
os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # inherited by the worker
sys.dont_write_bytecode = True  # no __pycache__ in tests/interop
sys.path.insert(0, str(HERE))

import celery  # noqa: E402
import kombu  # noqa: E402
import redis  # noqa: E402
from celery import chain, chord, group  # noqa: E402
from celery.utils.time import get_exponential_backoff_interval  # noqa: E402

import fixture_tasks as T  # noqa: E402

# Deterministic task ids: uuid5 of the case name in a fixed namespace.
ID_NAMESPACE = uuid.UUID("6c0e1a2c-5e1e-4ac0-9c1a-c0ffee5ca1ed")


def tid(name):
    return str(uuid.uuid5(ID_NAMESPACE, name))


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def rel(path):
    try:
        return path.relative_to(REPO).as_posix()
    except ValueError:
        return path.as_posix()


def write_bytes(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    log(f"  wrote {rel(path)} ({len(data)} bytes)")


broker = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=BROKER_DB)
backend = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=BACKEND_DB)


def check_no_foreign_consumers():
    """Refuse to run if something else is consuming from the broker DB."""
    for client in broker.client_list():
        if int(client.get("db", -1)) == BROKER_DB and client.get("cmd") in ("brpop", "blpop"):
            raise SystemExit(
                f"another client is blocking on redis DB {BROKER_DB} "
                f"({client.get('addr')}, cmd={client.get('cmd')}); stop it first"
            )


def flush():
    broker.flushdb()
    backend.flushdb()


def drain_lists():
    """RPOP every value of every list in the broker DB, in publish order.

    Returns [(key_bytes, value_bytes), ...].
    """
    out = []
    for key in sorted(broker.keys("*")):
        if broker.type(key) != b"list":
            continue
        while True:
            value = broker.rpop(key)
            if value is None:
                break
            out.append((key, value))
    return out


# --------------------------------------------------------------------------
# 1. Messages
# --------------------------------------------------------------------------

FIXED_ETA = dt.datetime(2031, 1, 2, 3, 4, 5, 678901, tzinfo=dt.timezone.utc)
FIXED_ETA_OFFSET = dt.datetime(
    2031, 1, 2, 5, 4, 5, 678901, tzinfo=dt.timezone(dt.timedelta(hours=2))
)

UNICODE_ARGS = (
    "héllo wörld",
    "日本語テキスト",
    "emoji 🚀 outside the BMP",
    'quote " backslash \\ slash / tab \t newline \n nul \x00 del \x7f',
    {"ключ": "значение", "nested": {"list": [1, [2, [3, []]], {}], "empty": {}}},
    [0.1, 1e-05, 1.5, -0.0, 1e100, 123456789.123, 2.5e-300],
    [0, -1, 2**53 + 1, 2**63, -(2**63)],
    None,
    True,
    False,
)
UNICODE_KWARGS = {"naïve": "café", "zh": "中文", "float": 0.1, "none": None}

KOMBU_TYPES_ARGS = (
    dt.datetime(2026, 11, 25, 12, 34, 56, 789012, tzinfo=dt.timezone.utc),
    dt.datetime(2026, 11, 25, 12, 34, 56),
    dt.date(2026, 11, 25),
    dt.time(12, 34, 56, 789),
    decimal.Decimal("3.14159265358979323846"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    b"hello bytes",
    b"\xff\x00\xfe binary",
)
KOMBU_TYPES_KWARGS = {
    "when": dt.datetime(2030, 1, 1, 0, 0, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
    "amount": decimal.Decimal("-0.10"),
}


def msg_add_basic():
    T.add.apply_async((2, 3), task_id=tid("add_basic"))


def msg_add_kwargs():
    T.add.apply_async(kwargs={"x": 2, "y": 3}, task_id=tid("add_kwargs"))


def msg_add_kwargs_mixed():
    T.add.apply_async((2,), {"y": 3}, task_id=tid("add_kwargs_mixed"))


def msg_countdown_expires_priority():
    T.add.apply_async(
        (2, 3), countdown=30, expires=600, priority=5,
        task_id=tid("countdown_expires_priority"),
    )


def msg_eta_explicit():
    T.add.apply_async((2, 3), eta=FIXED_ETA, task_id=tid("eta_explicit"))


def msg_eta_explicit_offset():
    T.add.apply_async(
        (2, 3), eta=FIXED_ETA_OFFSET, expires=FIXED_ETA_OFFSET + dt.timedelta(hours=1),
        task_id=tid("eta_explicit_offset"),
    )


def msg_custom_queue():
    T.add.apply_async((2, 3), queue="emails", task_id=tid("custom_queue"))


def msg_custom_task_id_headers():
    T.add.apply_async(
        (2, 3), task_id="11111111-2222-3333-4444-555555555555",
        headers={"x-trace": "abc"},
    )


def msg_unicode_args():
    T.collect.apply_async(UNICODE_ARGS, UNICODE_KWARGS, task_id=tid("unicode_args"))


def msg_kombu_types():
    T.collect.apply_async(KOMBU_TYPES_ARGS, KOMBU_TYPES_KWARGS, task_id=tid("kombu_types"))


def msg_link_and_link_error():
    T.add.apply_async(
        (2, 3),
        # No ids set on the callbacks: they go out unfrozen ("options": {}).
        link=T.mul.s(3),
        link_error=T.on_err.s(),
        task_id=tid("link_and_link_error"),
    )


def msg_chain3():
    chain(
        T.add.s(1, 2).set(task_id=tid("chain3.0")),
        T.mul.s(10).set(task_id=tid("chain3.1")),
        T.add.si(100, 200).set(task_id=tid("chain3.2")),
    ).apply_async()


def msg_group3():
    group(
        T.add.s(i, i).set(task_id=tid(f"group3.{i}")) for i in range(3)
    ).apply_async(task_id=tid("group3.group"))


def msg_chord3():
    # The chord's own task_id option becomes the group id; apply_async's
    # task_id is the body's id.
    chord(
        [T.add.s(i, i).set(task_id=tid(f"chord3.{i}")) for i in range(3)],
        T.tsum.s(),
    ).set(task_id=tid("chord3.group")).apply_async(task_id=tid("chord3.body"))


def msg_chain_with_group():
    # Celery upgrades group+task inside a chain to a celery.chord signature;
    # that chord's group id is generated (random) by Celery.
    chain(
        T.add.s(1, 1).set(task_id=tid("chain_with_group.0")),
        group(
            T.add.s(1).set(task_id=tid("chain_with_group.g0")),
            T.add.s(2).set(task_id=tid("chain_with_group.g1")),
        ).set(task_id=tid("chain_with_group.group")),
        T.tsum.s().set(task_id=tid("chain_with_group.body")),
    ).apply_async()


def msg_timelimit():
    T.add.apply_async((2, 3), time_limit=10, soft_time_limit=5, task_id=tid("timelimit"))


def msg_shadow_name():
    T.add.apply_async((2, 3), shadow="alias", task_id=tid("shadow_name"))


PRIO5_KEY = b"celery\x06\x163"

# (case, publish function, expected list key, number of messages)
MESSAGE_CASES = [
    ("add_basic", msg_add_basic, b"celery", 1),
    ("add_kwargs", msg_add_kwargs, b"celery", 1),
    ("add_kwargs_mixed", msg_add_kwargs_mixed, b"celery", 1),
    ("countdown_expires_priority", msg_countdown_expires_priority, PRIO5_KEY, 1),
    ("eta_explicit", msg_eta_explicit, b"celery", 1),
    ("eta_explicit_offset", msg_eta_explicit_offset, b"celery", 1),
    ("custom_queue", msg_custom_queue, b"emails", 1),
    ("custom_task_id_headers", msg_custom_task_id_headers, b"celery", 1),
    ("unicode_args", msg_unicode_args, b"celery", 1),
    ("kombu_types", msg_kombu_types, b"celery", 1),
    ("link_and_link_error", msg_link_and_link_error, b"celery", 1),
    ("chain3", msg_chain3, b"celery", 1),
    ("group3", msg_group3, b"celery", 3),
    ("chord3", msg_chord3, b"celery", 3),
    ("chain_with_group", msg_chain_with_group, b"celery", 1),
    ("timelimit", msg_timelimit, b"celery", 1),
    ("shadow_name", msg_shadow_name, b"celery", 1),
]


def check_message(case, value):
    env = json.loads(value)
    for key in ("body", "content-encoding", "content-type", "headers", "properties"):
        assert key in env, (case, key)
    assert env["properties"]["body_encoding"] == "base64", case
    body = json.loads(base64.b64decode(env["body"]))
    assert isinstance(body, list) and len(body) == 3, (case, body)
    assert isinstance(body[0], list) and isinstance(body[1], dict), (case, body)
    assert body[2] is None or isinstance(body[2], dict), (case, body)
    return env, body


def capture_messages(only=None):
    log("== messages (no worker running)")
    MESSAGES_DIR.mkdir(parents=True, exist_ok=True)
    for case, publish, key, count in MESSAGE_CASES:
        if only and case not in only:
            continue
        flush()
        publish()
        got = drain_lists()
        keys = {k for k, _ in got}
        if keys != {key} or len(got) != count:
            raise SystemExit(
                f"{case}: expected {count} message(s) on {key!r}, got "
                f"{[(k, len(v)) for k, v in got]}"
            )
        values = [v for _, v in got]
        if count == 1:
            env, _ = check_message(case, values[0])
            write_bytes(MESSAGES_DIR / f"{case}.json", values[0])
        else:
            # Name members by their group_index header (publish order too).
            for i, value in enumerate(values):
                env, _ = check_message(case, value)
                assert env["headers"]["group_index"] == i, (case, i)
                write_bytes(MESSAGES_DIR / f"{case}_{i}.json", value)
    flush()


# --------------------------------------------------------------------------
# 2. Results (real worker)
# --------------------------------------------------------------------------


# Worker options besides the pool, node name and log level (the results and
# canvas sections): no gossip, mingle or heartbeat, so no events at all.
QUIET_WORKER_FLAGS = ("--without-gossip", "--without-mingle", "--without-heartbeat")


class Worker:
    """A real `celery worker` subprocess, stopped by its own pid."""

    def __init__(self, extended=False, flags=QUIET_WORKER_FLAGS):
        self.extended = extended
        self.flags = tuple(flags)
        self.proc = None
        self.logfile = None

    def start(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        env["PYTHONUNBUFFERED"] = "1"
        if self.extended:
            env["CELERIAC_FIXTURE_EXTENDED"] = "1"
        else:
            env.pop("CELERIAC_FIXTURE_EXTENDED", None)
        celery_bin = Path(sys.executable).parent / "celery"
        cmd = [str(celery_bin)] if celery_bin.exists() else [sys.executable, "-m", "celery"]
        cmd += [
            "-A", "fixture_tasks", "worker", "-P", "solo", "-c", "1",
            *self.flags,
            "-n", WORKER_NODENAME, "-l", "INFO",
        ]
        self.logfile = tempfile.NamedTemporaryFile(
            prefix="celeriac-fixture-worker-", suffix=".log", delete=False
        )
        log(f"  starting worker (extended={self.extended})")
        self.proc = subprocess.Popen(
            cmd, cwd=str(HERE), env=env, stdin=subprocess.DEVNULL,
            stdout=self.logfile, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.dump_log()
                raise SystemExit(f"worker exited early with {self.proc.returncode}")
            if b" ready." in Path(self.logfile.name).read_bytes():
                log(f"  worker ready (pid {self.proc.pid})")
                return
            time.sleep(0.2)
        self.dump_log()
        raise SystemExit("worker did not become ready in 60 s")

    def dump_log(self):
        if self.logfile is not None:
            data = Path(self.logfile.name).read_bytes().decode("utf-8", "replace")
            log("---- worker log ----\n" + data[-6000:] + "\n---- end worker log ----")

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            log(f"  stopping worker pid {self.proc.pid} (SIGTERM, warm shutdown)")
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log(f"  worker pid {self.proc.pid} did not stop; SIGKILL")
                self.proc.kill()
                self.proc.wait(timeout=10)
        rc = self.proc.returncode
        self.proc = None
        if self.logfile is not None:
            self.logfile.close()
            if rc not in (0, -signal.SIGTERM):
                self.dump_log()
            os.unlink(self.logfile.name)
            self.logfile = None


def meta_key(task_id):
    return f"celery-task-meta-{task_id}"


def wait_meta(task_id, states, timeout=30.0):
    """Poll the result key until its status is in `states`; return raw bytes."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        raw = backend.get(meta_key(task_id))
        if raw is not None:
            last = raw
            if json.loads(raw)["status"] in states:
                return raw
        time.sleep(0.02)
    raise SystemExit(f"timeout waiting for {task_id} in {states}; last={last!r}")


# Tracebacks stored by the worker name source files by absolute path, under
# this checkout (the venv is in <repo>/target/interop-venv, the tasks module
# in <repo>/tests/interop). The fixtures must not carry this machine's paths,
# so the repository root prefix is cut out of the raw bytes: the only change
# made to captured bytes, and only ever inside "traceback" strings (checked).
REPO_PREFIX_JSON = json.dumps(str(REPO) + os.sep)[1:-1].encode()


def scrub_repo_paths(case, raw):
    if REPO_PREFIX_JSON not in raw:
        return raw
    meta = json.loads(raw)
    tb = meta.get("traceback")
    outside = {k: v for k, v in meta.items() if k != "traceback"}
    if REPO_PREFIX_JSON.decode() in json.dumps(outside):
        raise SystemExit(f"{case}: repository path outside the traceback: {raw!r}")
    scrubbed = raw.replace(REPO_PREFIX_JSON, b"")
    new_meta = json.loads(scrubbed)
    assert new_meta["traceback"] == tb.replace(str(REPO) + os.sep, ""), case
    assert {k: v for k, v in new_meta.items() if k != "traceback"} == outside, case
    return scrubbed


def save_result(case, raw, expect_status):
    meta = json.loads(raw)
    assert meta["status"] == expect_status, (case, meta)
    write_bytes(RESULTS_DIR / f"{case}.json", scrub_repo_paths(case, raw))
    return meta


def simple_result(case, sig_apply, states=("SUCCESS",), expect=None):
    task_id = tid(f"result.{case}")
    sig_apply(task_id)
    raw = wait_meta(task_id, states)
    return save_result(case, raw, expect or states[0])


def wait_queue_empty(timeout=10.0):
    """Wait until the worker has taken every message off the broker lists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(
            broker.type(k) == b"list" and broker.llen(k) for k in broker.keys("*")
        ):
            return
        time.sleep(0.02)
    raise SystemExit("worker did not consume the queue")


UNICODE_RESULT = 'héllo wörld — 日本語 🚀 "quoted" \\ tab\t newline\n'
NESTED_RESULT = {
    "list": [1, 2.5, 0.1, 1e-05, None, True, False, "x"],
    "dict": {"a": {"b": [[], {}]}, "ключ": "значение"},
    "big": 2**63,
}


def capture_results_main():
    simple_result("success_int", lambda i: T.add.apply_async((2, 3), task_id=i))
    simple_result(
        "success_str_unicode", lambda i: T.echo.apply_async((UNICODE_RESULT,), task_id=i)
    )
    simple_result("success_nested", lambda i: T.echo.apply_async((NESTED_RESULT,), task_id=i))
    simple_result("success_none", lambda i: T.echo.apply_async((None,), task_id=i))
    simple_result(
        "failure_builtin", lambda i: T.fail.apply_async(task_id=i), states=("FAILURE",)
    )
    simple_result(
        "failure_custom",
        lambda i: T.fail.apply_async(("custom",), task_id=i),
        states=("FAILURE",),
    )

    # RETRY: the retry message (countdown=60) waits in the worker's ETA timer
    # while the stored state is RETRY.
    simple_result(
        "retry_state",
        lambda i: T.retry_twice.apply_async(kwargs={"countdown": 60}, task_id=i),
        states=("RETRY",),
    )
    simple_result(
        "retry_state_with_exc",
        lambda i: T.retry_twice.apply_async(
            kwargs={"countdown": 60, "with_exc": True}, task_id=i
        ),
        states=("RETRY",),
    )

    # STARTED: track_started task, read while it sleeps.
    started_id = tid("result.started")
    T.sleepy.apply_async((3.0,), task_id=started_id)
    save_result("started", wait_meta(started_id, ("STARTED",)), "STARTED")
    wait_meta(started_id, ("SUCCESS",), timeout=30)

    # REVOKED: the worker holds the task (eta in 5 minutes) when it is revoked.
    revoked_id = tid("result.revoked")
    T.add.apply_async((2, 3), countdown=300, task_id=revoked_id)
    wait_queue_empty()
    time.sleep(0.5)
    assert backend.get(meta_key(revoked_id)) is None
    T.app.control.revoke(revoked_id)
    save_result("revoked", wait_meta(revoked_id, ("REVOKED",)), "REVOKED")

    # Chain: the first task's meta lists its child; the child has parent_id.
    c0, c1 = tid("result.chain.0"), tid("result.chain.1")
    chain(T.add.s(1, 2).set(task_id=c0), T.mul.s(10).set(task_id=c1)).apply_async()
    wait_meta(c1, ("SUCCESS",))
    save_result("chain_parent_with_children", wait_meta(c0, ("SUCCESS",)), "SUCCESS")
    save_result("chain_child", wait_meta(c1, ("SUCCESS",)), "SUCCESS")

    # Group member: meta carries group_id.
    members = [tid(f"result.group.{i}") for i in range(3)]
    group(T.add.s(i, i).set(task_id=m) for i, m in enumerate(members)).apply_async(
        task_id=tid("result.group")
    )
    for m in members:
        wait_meta(m, ("SUCCESS",))
    save_result("group_member", wait_meta(members[0], ("SUCCESS",)), "SUCCESS")

    # Chord body: stored after the header completed (group_id + parent_id).
    heads = [tid(f"result.chord.{i}") for i in range(3)]
    body = tid("result.chord.body")
    chord(
        [T.add.s(i, i).set(task_id=h) for i, h in enumerate(heads)], T.tsum.s()
    ).set(task_id=tid("result.chord.group")).apply_async(task_id=body)
    save_result("chord_body", wait_meta(body, ("SUCCESS",)), "SUCCESS")

    # max_retries=1 and always retrying: the final FAILURE meta.
    simple_result(
        "max_retries_exceeded",
        lambda i: T.always_retry.apply_async(kwargs={"countdown": 0}, task_id=i),
        states=("FAILURE",),
    )
    simple_result(
        "max_retries_exceeded_with_exc",
        lambda i: T.always_retry.apply_async(
            kwargs={"countdown": 0, "with_exc": True}, task_id=i
        ),
        states=("FAILURE",),
    )


def capture_results_extended():
    simple_result("extended_success", lambda i: T.add.apply_async((2, 3), task_id=i))


def capture_results():
    log("== results (real worker)")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    flush()
    worker = Worker(extended=False)
    try:
        worker.start()
        capture_results_main()
    finally:
        worker.stop()
    # Drop messages the worker restored on shutdown (ETA'd retry/revoked).
    flush()
    worker = Worker(extended=True)
    try:
        worker.start()
        capture_results_extended()
    finally:
        worker.stop()
    flush()


# --------------------------------------------------------------------------
# 3. Backoff table
# --------------------------------------------------------------------------


class _RandomProbe:
    """Stands in for the `random` module inside celery.utils.time."""

    def __init__(self, pick):
        self.pick = pick
        self.stops = []

    def randrange(self, stop):
        self.stops.append(stop)
        return self.pick(stop)


def jitter_bounds(factor, retries, maximum):
    """Exact jitter range: the `stop` Celery passes to random.randrange and
    the values returned when randrange yields its lowest / highest value."""
    import celery.utils.time as cut

    real = cut.random
    try:
        cut.random = hi_probe = _RandomProbe(lambda stop: stop - 1)
        highest = get_exponential_backoff_interval(factor, retries, maximum, full_jitter=True)
        cut.random = lo_probe = _RandomProbe(lambda stop: 0)
        lowest = get_exponential_backoff_interval(factor, retries, maximum, full_jitter=True)
    finally:
        cut.random = real
    assert hi_probe.stops == lo_probe.stops and len(hi_probe.stops) == 1
    return hi_probe.stops[0], lowest, highest


def capture_backoff():
    log("== backoff")
    table = []
    for factor in (1, 2, 3, 5):
        for maximum in (600, 30):
            for retries in range(13):
                table.append({
                    "factor": factor, "maximum": maximum, "retries": retries,
                    "countdown": get_exponential_backoff_interval(
                        factor, retries, maximum, full_jitter=False
                    ),
                })
    rng_state = random.getstate()
    random.seed(20261125)
    jitter = []
    samples = 2000
    for retries in range(13):
        values = [
            get_exponential_backoff_interval(1, retries, 600, full_jitter=True)
            for _ in range(samples)
        ]
        stop, lowest, highest = jitter_bounds(1, retries, 600)
        jitter.append({
            "factor": 1, "maximum": 600, "retries": retries,
            "countdown": get_exponential_backoff_interval(1, retries, 600, full_jitter=False),
            "samples": samples, "min": min(values), "max": max(values),
            "randrange_stop": stop, "lowest_possible": lowest, "highest_possible": highest,
        })
    random.setstate(rng_state)

    def dump(rows):
        return ("[\n" + ",\n".join("  " + json.dumps(r) for r in rows) + "\n]\n").encode()

    write_bytes(BACKOFF_DIR / "celery_backoff_table.json", dump(table))
    write_bytes(BACKOFF_DIR / "celery_backoff_full_jitter.json", dump(jitter))


# --------------------------------------------------------------------------
# 4. Canvas: signature serialization, published messages, real runs
# --------------------------------------------------------------------------
#
# canvas/signatures/<case>[.<form>].json  kombu JSON of a signature
# canvas/messages/<case>_<n>.json         list values in publish order (no worker)
# canvas/messages/<case>.redis.json       keys the client wrote to DB 10 meanwhile
# canvas/runs/<case>.json                 a run on a real worker (document made
#                                         by this script, not raw bytes)


def sid(case, label):
    """Fixed task/group id for the signature cases."""
    return tid(f"sig.{case}.{label}")


def fixed_chord_header(c, group_id):
    """Wrap a chord's header in a group with a fixed id before freezing.

    chord.freeze() starts with ``self.tasks = group(self.tasks)``, which gives
    the header a random group id. Doing that first, with ``task_id=group_id``,
    yields the same frozen form with a reproducible id.
    """
    c.tasks = group(c.tasks, app=T.app, task_id=group_id)
    return c


def sig_task_sig():
    yield "", T.add.s(2, 2)
    s = T.add.s(2, 2)
    s.freeze(sid("task_sig", "0"))
    yield "frozen", s


def sig_task_sig_options():
    yield "", T.add.s(2, 2).set(queue="q", countdown=5, priority=3)
    s = T.add.s(2, 2).set(queue="q", countdown=5, priority=3)
    s.freeze(sid("task_sig_options", "0"))
    yield "frozen", s


def sig_immutable():
    yield "", T.add.si(1, 1)
    s = T.add.si(1, 1)
    s.freeze(sid("immutable", "0"))
    yield "frozen", s


def _chain3(case, ids):
    labels = ["0", "1", "2"] if ids else [None] * 3
    sigs = [T.add.s(1, 1), T.mul.s(2), T.tsum.s()]
    return chain(*[
        s.set(task_id=sid(case, label)) if label else s for s, label in zip(sigs, labels)
    ])


def sig_chain():
    yield "", _chain3("chain", ids=False)
    c = _chain3("chain", ids=True)
    c.freeze()
    yield "frozen", c


def _group2(case, ids):
    g = group(T.add.s(1, 1), T.add.s(2, 2))
    if ids:
        g = group(
            T.add.s(1, 1).set(task_id=sid(case, "0")),
            T.add.s(2, 2).set(task_id=sid(case, "1")),
        ).set(task_id=sid(case, "group"))
    return g


def sig_group():
    yield "", _group2("group", ids=False)
    g = _group2("group", ids=True)
    g.freeze()
    yield "frozen", g


def sig_chord():
    yield "", chord([T.add.s(1, 1), T.add.s(2, 2)], T.tsum.s())
    c = chord(
        [T.add.s(1, 1).set(task_id=sid("chord", "0")),
         T.add.s(2, 2).set(task_id=sid("chord", "1"))],
        T.tsum.s().set(task_id=sid("chord", "body")),
    )
    fixed_chord_header(c, sid("chord", "group"))
    c.freeze()
    yield "frozen", c


def sig_chain_in_group():
    yield "", group(chain(T.add.s(1, 1), T.mul.s(2)), T.add.s(3, 3))
    g = group(
        chain(
            T.add.s(1, 1).set(task_id=sid("chain_in_group", "c0")),
            T.mul.s(2).set(task_id=sid("chain_in_group", "c1")),
        ),
        T.add.s(3, 3).set(task_id=sid("chain_in_group", "1")),
    ).set(task_id=sid("chain_in_group", "group"))
    g.freeze()
    yield "frozen", g


def sig_group_in_chain():
    def build(ids):
        def i(s, label):
            return s.set(task_id=sid("group_in_chain", label)) if ids else s
        return chain(
            i(T.add.s(1, 1), "0"),
            group(i(T.add.s(1), "g0"), i(T.add.s(2), "g1")),
            i(T.tsum.s(), "body"),
        )
    c = build(False)
    yield "", c
    yield "unchain_tasks", c.unchain_tasks()
    c = build(True)
    # chain(a, group, b) is already chain(a, celery.chord) at this point.
    fixed_chord_header(c.tasks[1], sid("group_in_chain", "group"))
    c.freeze()
    yield "frozen", c


def sig_chord_in_chain():
    def build(ids):
        def i(s, label):
            return s.set(task_id=sid("chord_in_chain", label)) if ids else s
        return chain(
            i(T.add.s(1, 1), "0"),
            chord([i(T.add.s(1), "h0"), i(T.add.s(2), "h1")], i(T.tsum.s(), "body")),
            i(T.mul.s(10), "2"),
        )
    c = build(False)
    yield "", c
    yield "unchain_tasks", c.unchain_tasks()
    c = build(True)
    for t in c.tasks:
        if isinstance(t, chord):
            fixed_chord_header(t, sid("chord_in_chain", "group"))
    c.freeze()
    yield "frozen", c


def sig_chain_in_chord_header():
    yield "", chord([chain(T.add.s(1, 1), T.mul.s(2)), T.add.s(3, 3)], T.tsum.s())
    case = "chain_in_chord_header"
    c = chord(
        [chain(T.add.s(1, 1).set(task_id=sid(case, "c0")),
               T.mul.s(2).set(task_id=sid(case, "c1"))),
         T.add.s(3, 3).set(task_id=sid(case, "1"))],
        T.tsum.s().set(task_id=sid(case, "body")),
    )
    fixed_chord_header(c, sid(case, "group"))
    c.freeze()
    yield "frozen", c


def sig_nested_group():
    yield "", group(group(T.add.s(1, 1), T.add.s(2, 2)), T.add.s(3, 3))
    case = "nested_group"
    g = group(
        group(T.add.s(1, 1).set(task_id=sid(case, "a")),
              T.add.s(2, 2).set(task_id=sid(case, "b"))).set(task_id=sid(case, "inner")),
        T.add.s(3, 3).set(task_id=sid(case, "c")),
    ).set(task_id=sid(case, "outer"))
    g.freeze()
    yield "frozen", g


def sig_link_options():
    def build():
        s = T.add.s(1, 1)
        s.link(T.mul.s(2))
        s.link_error(T.on_err.s())
        return s
    yield "", build()
    s = build()
    s.freeze(sid("link_options", "0"))
    yield "frozen", s


SIGNATURE_CASES = [
    ("task_sig", sig_task_sig),
    ("task_sig_options", sig_task_sig_options),
    ("immutable", sig_immutable),
    ("chain", sig_chain),
    ("group", sig_group),
    ("chord", sig_chord),
    ("chain_in_group", sig_chain_in_group),
    ("group_in_chain", sig_group_in_chain),
    ("chord_in_chain", sig_chord_in_chain),
    ("chain_in_chord_header", sig_chain_in_chord_header),
    ("nested_group", sig_nested_group),
    ("link_options", sig_link_options),
]


def capture_canvas_signatures():
    from kombu.utils.json import dumps as kombu_dumps

    log("== canvas/signatures (kombu JSON of signatures)")
    out = CANVAS_DIR / "signatures"
    for case, build in SIGNATURE_CASES:
        for form, sig in build():
            data = kombu_dumps(sig).encode("utf-8")
            json.loads(data)
            name = f"{case}.{form}.json" if form else f"{case}.json"
            write_bytes(out / name, data)


# -- messages ---------------------------------------------------------------


def mid(case, label):
    return tid(f"canvas.{case}.{label}")


def cmsg_chain_in_chord_header():
    case = "chain_in_chord_header"
    chord(
        [chain(T.add.s(1, 1).set(task_id=mid(case, "c0")),
               T.mul.s(2).set(task_id=mid(case, "c1"))),
         T.add.s(3, 3).set(task_id=mid(case, "1"))],
        T.tsum.s(),
    ).set(task_id=mid(case, "group")).apply_async(task_id=mid(case, "body"))


def cmsg_chord_in_chain():
    case = "chord_in_chain"
    chain(
        T.add.s(1, 1).set(task_id=mid(case, "0")),
        chord([T.add.s(1).set(task_id=mid(case, "h0")),
               T.add.s(2).set(task_id=mid(case, "h1"))],
              T.tsum.s().set(task_id=mid(case, "body"))),
        T.mul.s(10).set(task_id=mid(case, "2")),
    ).apply_async()


def cmsg_nested_group():
    case = "nested_group"
    group(
        group(T.add.s(1, 1).set(task_id=mid(case, "a")),
              T.add.s(2, 2).set(task_id=mid(case, "b"))).set(task_id=mid(case, "inner")),
        T.add.s(3, 3).set(task_id=mid(case, "c")),
    ).apply_async(task_id=mid(case, "outer"))


def cmsg_chain_in_group():
    case = "chain_in_group"
    group(
        chain(T.add.s(1, 1).set(task_id=mid(case, "c0")),
              T.mul.s(2).set(task_id=mid(case, "c1"))),
        T.add.s(3, 3).set(task_id=mid(case, "1")),
    ).apply_async(task_id=mid(case, "group"))


def cmsg_chord_chain_body():
    case = "chord_chain_body"
    chord(
        [T.add.s(1, 1).set(task_id=mid(case, "0")),
         T.add.s(2, 2).set(task_id=mid(case, "1"))],
        chain(T.tsum.s().set(task_id=mid(case, "b0")),
              T.mul.s(10).set(task_id=mid(case, "b1"))),
    ).set(task_id=mid(case, "group")).apply_async()


def cmsg_chain_group_in_chord_header():
    case = "chain_group_in_chord_header"
    chord(
        [chain(T.add.s(1, 1).set(task_id=mid(case, "c0")),
               group(T.add.s(1).set(task_id=mid(case, "g0")),
                     T.add.s(2).set(task_id=mid(case, "g1"))).set(task_id=mid(case, "inner"))),
         T.add.s(3, 3).set(task_id=mid(case, "1"))],
        T.echo.s(),
    ).set(task_id=mid(case, "group")).apply_async(task_id=mid(case, "body"))


# (case, publish function, number of messages, all on the `celery` list)
CANVAS_MESSAGE_CASES = [
    ("chain_in_chord_header", cmsg_chain_in_chord_header, 2),
    ("chord_in_chain", cmsg_chord_in_chain, 1),
    ("nested_group", cmsg_nested_group, 3),
    ("chain_in_group", cmsg_chain_in_group, 2),
    ("chord_chain_body", cmsg_chord_chain_body, 2),
    ("chain_group_in_chord_header", cmsg_chain_group_in_chord_header, 2),
]


def backend_string_keys(exclude_prefixes=()):
    """{key: value} of every key in the backend DB, all of which must be strings."""
    out = {}
    for key in sorted(backend.keys("*")):
        name = key.decode()
        if name.startswith(tuple(exclude_prefixes)):
            continue
        kind = backend.type(key)
        if kind != b"string":
            raise SystemExit(f"unexpected {kind!r} key {name!r} in DB {BACKEND_DB}")
        out[name] = backend.get(key).decode()
    return out


def capture_canvas_messages():
    log("== canvas/messages (no worker running)")
    out = CANVAS_DIR / "messages"
    for case, publish, count in CANVAS_MESSAGE_CASES:
        flush()
        publish()
        got = drain_lists()
        keys = {k for k, _ in got}
        if keys != {b"celery"} or len(got) != count:
            raise SystemExit(
                f"canvas {case}: expected {count} message(s) on b'celery', got "
                f"{[(k, len(v)) for k, v in got]}"
            )
        for i, (_, value) in enumerate(got):
            check_message(case, value)
            write_bytes(out / f"{case}_{i}.json", value)
        written = backend_string_keys()
        data = json.dumps(written, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        write_bytes(out / f"{case}.redis.json", data.encode("utf-8"))
    flush()


# -- runs on a real worker --------------------------------------------------


def unescape_monitor_arg(data, i):
    """Parse one "..."-quoted MONITOR argument (sdscatrepr) starting at data[i]."""
    assert data[i:i + 1] == b'"', data[i:i + 40]
    i += 1
    out = bytearray()
    simple = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("a"): 7, ord("b"): 8,
              ord("\\"): 92, ord('"'): 34}
    while True:
        c = data[i]
        if c == 0x5C:  # backslash
            e = data[i + 1]
            if e == ord("x"):
                out.append(int(data[i + 2:i + 4], 16))
                i += 4
            else:
                out.append(simple[e])
                i += 2
        elif c == 0x22:
            return bytes(out), i + 1
        else:
            out.append(c)
            i += 1


def parse_monitor_line(line):
    """'+<ts> [<db> <client>] "ARG" "ARG" ...' -> (db, client, [arg bytes])."""
    if not line.startswith(b"+") or b" [" not in line:
        return None
    head, rest = line[1:].split(b" [", 1)
    info, rest = rest.split(b"] ", 1)
    db, client = info.split(b" ", 1)
    args, i = [], 0
    while i < len(rest):
        if rest[i] == 0x20:
            i += 1
            continue
        arg, i = unescape_monitor_arg(rest, i)
        args.append(arg)
    return int(db), client.decode(), args


class RedisMonitor:
    """A raw `MONITOR` connection read by a thread (exact argument bytes)."""

    def __init__(self):
        self.sock = None
        self.thread = None
        self.stopping = threading.Event()
        self.buf = b""
        self.lines = []
        self.lock = threading.Lock()

    def start(self):
        self.sock = socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=10)
        self.sock.sendall(b"MONITOR\r\n")
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise SystemExit("redis closed the MONITOR connection")
            self.buf += chunk
        first, self.buf = self.buf.split(b"\r\n", 1)
        if first != b"+OK":
            raise SystemExit(f"MONITOR refused: {first!r}")
        self.sock.settimeout(0.1)
        self.thread = threading.Thread(target=self._run, name="redis-monitor", daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping.is_set():
            try:
                chunk = self.sock.recv(1 << 16)
            except socket.timeout:
                continue
            except OSError:
                break
            if not chunk:
                break
            self.buf += chunk
            if b"\r\n" in self.buf:
                *done, self.buf = self.buf.split(b"\r\n")
                with self.lock:
                    self.lines.extend(done)

    def take(self):
        """Everything seen so far, up to a marker sent now (a barrier)."""
        marker = f"fixture-monitor-marker-{uuid.uuid4()}".encode()
        broker.echo(marker)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self.lock:
                for n, line in enumerate(self.lines):
                    if marker in line and b'"ECHO"' in line.upper():
                        taken, self.lines = self.lines[:n], self.lines[n + 1:]
                        return [p for p in map(parse_monitor_line, taken) if p]
            time.sleep(0.01)
        raise SystemExit("MONITOR did not see the marker")

    def stop(self):
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        if self.sock is not None:
            self.sock.close()
        self.sock = self.thread = None


def redis_client_ports(pid):
    """Local ports of `pid`'s TCP connections to Redis (Linux /proc; else empty)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return set()
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            parts = row.split()
            if len(parts) > 9 and parts[9] in inodes:
                if int(parts[2].rsplit(":", 1)[1], 16) == REDIS_PORT:
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


# Commands that only read: left out of `backend_commands` when this process
# (the client, or this script's own polling) issued them.
READ_COMMANDS = {
    "GET", "MGET", "EXISTS", "TTL", "PTTL", "TYPE", "KEYS", "SCAN", "PING", "ECHO",
    "SUBSCRIBE", "UNSUBSCRIBE", "PSUBSCRIBE", "PUNSUBSCRIBE", "CLIENT", "INFO",
    "HELLO", "SELECT", "ZRANGE", "LRANGE", "ZCARD", "LLEN", "STRLEN", "HGET",
    "HGETALL", "SMEMBERS", "COMMAND", "MONITOR",
}
HEADER_FIELDS = ("task", "id", "root_id", "parent_id", "group", "group_index")
RUN_ID_PREFIX = "run."


def rid(case, label):
    return tid(f"{RUN_ID_PREFIX}{case}.{label}")


def scrub_obj(obj):
    """Cut the repository prefix out of every string (tracebacks only)."""
    prefix = str(REPO) + os.sep
    if isinstance(obj, str):
        return obj.replace(prefix, "")
    if isinstance(obj, list):
        return [scrub_obj(x) for x in obj]
    if isinstance(obj, dict):
        return {scrub_obj(k): scrub_obj(v) for k, v in obj.items()}
    return obj


class RunRecorder:
    def __init__(self, monitor, worker, lua_scripts):
        self.monitor = monitor
        self.worker = worker
        self.lua_scripts = lua_scripts
        self.ports = {"worker": set(), "client": set()}

    def note_ports(self):
        self.ports["worker"] |= redis_client_ports(self.worker.proc.pid)
        self.ports["client"] |= redis_client_ports(os.getpid())

    def who(self, client):
        if client == "lua":
            return "lua"
        try:
            port = int(client.rsplit(":", 1)[1])
        except (IndexError, ValueError):
            return "unknown"
        for name, ports in self.ports.items():
            if port in ports:
                return name
        return "unknown"


def decode_published(value):
    env = json.loads(value)
    body = json.loads(base64.b64decode(env["body"]))
    return {
        "headers": {k: env["headers"].get(k) for k in HEADER_FIELDS},
        "body": body,
    }


def describe_results(res):
    """Flatten the result tree reachable by .parent, .children and
    GroupResult.results: ({"tasks": {id: ...}, "groups": {id: ...}}, top)."""
    from celery.result import GroupResult

    tasks, groups = {}, {}

    def ref(r):
        return {"group": r.id} if isinstance(r, GroupResult) else {"task": r.id}

    todo = [res]
    while todo:
        r = todo.pop(0)
        if r is None:
            continue
        if isinstance(r, GroupResult):
            if r.id in groups:
                continue
            groups[r.id] = {
                "results": [ref(x) for x in r.results],
                "parent": ref(r.parent) if r.parent is not None else None,
            }
            todo.extend(r.results)
            todo.append(r.parent)
        else:
            if r.id in tasks:
                continue
            children = r.children or []
            tasks[r.id] = {
                "parent": ref(r.parent) if r.parent is not None else None,
                "children": [ref(c) for c in children],
            }
            todo.extend(children)
            todo.append(r.parent)
    return {"tasks": tasks, "groups": groups}, ref(res)


READY = {"SUCCESS", "FAILURE", "REVOKED"}


def settle(monitor, published, commands, timeout=30.0):
    """Wait until every published task has a ready meta, the queues are empty
    and nothing new was published for a while."""
    deadline = time.monotonic() + timeout
    quiet_since = None
    while time.monotonic() < deadline:
        new = monitor.take()
        commands.extend(new)
        new_pub = [c for c in new if c[0] == BROKER_DB and c[2][0].upper() == b"LPUSH"]
        published.extend(new_pub)
        ids = [decode_published(c[2][2])["headers"]["id"] for c in published]
        metas = [backend.get(meta_key(i)) for i in ids]
        done = all(m is not None and json.loads(m)["status"] in READY for m in metas)
        queues_empty = not any(
            broker.type(k) == b"list" and broker.llen(k) for k in broker.keys("*")
        )
        if done and queues_empty and not new_pub:
            if quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 0.5:
                return
        else:
            quiet_since = None
        time.sleep(0.05)
    raise SystemExit("canvas run did not settle")


def run_case(recorder, case, description, start, expect):
    from celery.result import GroupResult

    """Run one canvas on the worker and write canvas/runs/<case>.json.

    `start()` publishes and returns (result, {label: id}); `expect` is the
    value .get() must return, or the exception class name it must raise.
    """
    log(f"  run {case}")
    monitor = recorder.monitor
    backend.flushdb()
    monitor.take()  # drop whatever came before
    recorder.note_ports()
    res, ids = start()

    def get(**kwargs):
        try:
            return {"value": res.get(timeout=30, propagate=True, **kwargs)}
        except Exception as exc:  # noqa: BLE001 -- the raised error is the fixture
            return {"raised": {
                "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
                "message": str(exc),
            }}

    got = get()
    if "raised" in got and not isinstance(res, GroupResult):
        # .get() raises the first failure found among the parents; what the
        # result itself holds shows with follow_parents=False.
        got["follow_parents_false"] = get(follow_parents=False)
    if isinstance(expect, str):
        assert "raised" in got and got["raised"]["type"].endswith("." + expect), (case, got)
    else:
        assert got.get("value") == expect, (case, got, expect)
    commands, published = [], []
    settle(monitor, published, commands)
    recorder.note_ports()

    tree, top = describe_results(res)
    task_ids = list(tree["tasks"])
    for c in published:
        i = decode_published(c[2][2])["headers"]["id"]
        if i not in task_ids:
            task_ids.append(i)
    metas = {}
    for i in task_ids:
        raw = backend.get(meta_key(i))
        metas[i] = None if raw is None else scrub_repo_paths(f"{case}:{i}", raw).decode("utf-8")
    group_metas = {}
    for g in tree["groups"]:
        raw = backend.get(f"celery-taskset-meta-{g}")
        if raw is not None:
            group_metas[g] = raw.decode("utf-8")

    backend_keys = {}
    for key in sorted(backend.keys("*")):
        name = key.decode()
        if name.startswith("celery-task-meta-") or name == T.ERRBACK_LIST:
            continue
        kind = backend.type(key).decode()
        if kind == "string":
            value = backend.get(key).decode("utf-8", "replace")
        elif kind == "list":
            value = [v.decode("utf-8", "replace") for v in backend.lrange(key, 0, -1)]
        elif kind == "zset":
            value = [[m.decode("utf-8", "replace"), s]
                     for m, s in backend.zrange(key, 0, -1, withscores=True)]
        else:
            value = f"<{kind}>"
        backend_keys[name] = {"type": kind, "ttl": backend.ttl(key), "value": value}
    errbacks = [json.loads(v) for v in backend.lrange(T.ERRBACK_LIST, 0, -1)]

    def decoded_args(args):
        return [a.decode("utf-8", "replace") for a in args]

    doc = {
        "case": case,
        "canvas": description,
        "ids": ids,
        "get": got,
        "result": top,
        "result_tree": tree,
        "metas": metas,
        "group_metas": group_metas,
        "published": [
            {"by": recorder.who(client), "key": args[1].decode("utf-8", "replace"),
             **decode_published(args[2])}
            for db, client, args in published
        ],
        "lua_scripts": recorder.lua_scripts,
        "backend_commands": [
            {"by": by, "command": args[0].decode().upper(), "args": decoded_args(args[1:])}
            for db, client, args in commands
            for by in [recorder.who(client)]
            if db == BACKEND_DB
            and (by in ("worker", "lua") or args[0].decode().upper() not in READ_COMMANDS)
            and not (len(args) > 1 and args[1].decode("utf-8", "replace").startswith("fixture-"))
        ],
        "backend_keys_after": backend_keys,
        "errbacks": errbacks,
    }
    doc = scrub_obj(doc)
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if str(REPO) in text:
        raise SystemExit(f"{case}: repository path left in the run document")
    write_bytes(CANVAS_DIR / "runs" / f"{case}.json", text.encode("utf-8"))
    return doc


def run_chain3():
    c = "chain3_run"
    ids = {k: rid(c, k) for k in ("0", "1", "2")}
    res = chain(T.add.s(1, 2).set(task_id=ids["0"]), T.mul.s(10).set(task_id=ids["1"]),
                T.add.s(5).set(task_id=ids["2"])).apply_async()
    return res, ids


def run_group():
    c = "group_run"
    ids = {k: rid(c, k) for k in ("0", "1", "2", "group")}
    res = group(T.add.s(i, i).set(task_id=ids[str(i)]) for i in range(3)).apply_async(
        task_id=ids["group"])
    return res, ids


def run_chord():
    c = "chord_run"
    ids = {k: rid(c, k) for k in ("0", "1", "2", "group", "body")}
    res = chord([T.add.s(i, i).set(task_id=ids[str(i)]) for i in range(3)], T.tsum.s()).set(
        task_id=ids["group"]).apply_async(task_id=ids["body"])
    return res, ids


def run_chord_with_failure():
    c = "chord_with_failure_run"
    ids = {k: rid(c, k) for k in ("0", "1", "2", "group", "body")}
    body = T.tsum.s()
    body.link_error(T.errback_new.s())
    body.link_error(T.errback_old.s())
    res = chord(
        [T.add.s(1, 1).set(task_id=ids["0"]), T.fail.s().set(task_id=ids["1"]),
         T.add.s(2, 2).set(task_id=ids["2"])],
        body,
    ).set(task_id=ids["group"]).apply_async(task_id=ids["body"])
    return res, ids


def run_chain_failure():
    c = "chain_failure_run"
    ids = {k: rid(c, k) for k in ("0", "1", "2")}
    res = chain(
        T.add.s(1, 1).set(task_id=ids["0"]),
        T.fail.s().set(task_id=ids["1"]),
        T.mul.s(3).set(task_id=ids["2"]),
    ).on_error(T.on_err.s()).on_error(T.errback_new.s()).on_error(
        T.errback_old.s()).apply_async()
    return res, ids


def run_link():
    c = "link_run"
    ids = {k: rid(c, k) for k in ("0", "link")}
    res = T.add.s(1, 1).set(task_id=ids["0"]).apply_async(
        link=T.mul.s(3).set(task_id=ids["link"]))
    return res, ids


def run_group_in_chain():
    c = "group_in_chain_run"
    ids = {k: rid(c, k) for k in ("0", "g0", "g1", "group", "body")}
    res = chain(
        T.add.s(1, 1).set(task_id=ids["0"]),
        group(T.add.s(1).set(task_id=ids["g0"]),
              T.add.s(2).set(task_id=ids["g1"])).set(task_id=ids["group"]),
        T.tsum.s().set(task_id=ids["body"]),
    ).apply_async()
    return res, ids


def run_chord_in_chain():
    c = "chord_in_chain_run"
    ids = {k: rid(c, k) for k in ("0", "h0", "h1", "body", "2")}
    res = chain(
        T.add.s(1, 1).set(task_id=ids["0"]),
        chord([T.add.s(1).set(task_id=ids["h0"]), T.add.s(2).set(task_id=ids["h1"])],
              T.tsum.s().set(task_id=ids["body"])),
        T.mul.s(10).set(task_id=ids["2"]),
    ).apply_async()
    return res, ids


def run_chain_in_chord_header():
    c = "chain_in_chord_header_run"
    ids = {k: rid(c, k) for k in ("c0", "c1", "1", "group", "body")}
    res = chord(
        [chain(T.add.s(1, 1).set(task_id=ids["c0"]), T.mul.s(2).set(task_id=ids["c1"])),
         T.add.s(3, 3).set(task_id=ids["1"])],
        T.tsum.s(),
    ).set(task_id=ids["group"]).apply_async(task_id=ids["body"])
    return res, ids


def run_nested_group():
    c = "nested_group_run"
    ids = {k: rid(c, k) for k in ("a", "b", "inner", "c", "outer")}
    res = group(
        group(T.add.s(1, 1).set(task_id=ids["a"]),
              T.add.s(2, 2).set(task_id=ids["b"])).set(task_id=ids["inner"]),
        T.add.s(3, 3).set(task_id=ids["c"]),
    ).apply_async(task_id=ids["outer"])
    return res, ids


def run_chain_in_group():
    c = "chain_in_group_run"
    ids = {k: rid(c, k) for k in ("c0", "c1", "1", "group")}
    res = group(
        chain(T.add.s(1, 1).set(task_id=ids["c0"]), T.mul.s(2).set(task_id=ids["c1"])),
        T.add.s(3, 3).set(task_id=ids["1"]),
    ).apply_async(task_id=ids["group"])
    return res, ids


def run_chord_chain_body():
    c = "chord_chain_body_run"
    ids = {k: rid(c, k) for k in ("0", "1", "group", "b0", "b1")}
    res = chord(
        [T.add.s(1, 1).set(task_id=ids["0"]), T.add.s(2, 2).set(task_id=ids["1"])],
        chain(T.tsum.s().set(task_id=ids["b0"]), T.mul.s(10).set(task_id=ids["b1"])),
    ).set(task_id=ids["group"]).apply_async()
    return res, ids


def run_chain_group_in_chord_header():
    c = "chain_group_in_chord_header_run"
    ids = {k: rid(c, k) for k in ("c0", "g0", "g1", "inner", "1", "group", "body")}
    res = chord(
        [chain(T.add.s(1, 1).set(task_id=ids["c0"]),
               group(T.add.s(1).set(task_id=ids["g0"]),
                     T.add.s(2).set(task_id=ids["g1"])).set(task_id=ids["inner"])),
         T.add.s(3, 3).set(task_id=ids["1"])],
        T.echo.s(),
    ).set(task_id=ids["group"]).apply_async(task_id=ids["body"])
    return res, ids


# (case, canvas as written, start function, expected .get() value or the
#  name of the exception class it raises)
CANVAS_RUN_CASES = [
    ("chain3_run", "chain(add.s(1, 2), mul.s(10), add.s(5))", run_chain3, 35),
    ("group_run", "group(add.s(i, i) for i in range(3))", run_group, [0, 2, 4]),
    ("chord_run", "chord([add.s(i, i) for i in range(3)], tsum.s())", run_chord, 6),
    ("chord_with_failure_run",
     "chord([add.s(1, 1), fail.s(), add.s(2, 2)], "
     "tsum.s() with link_error errback_new.s() and errback_old.s())",
     run_chord_with_failure, "KeyError"),
    ("chain_failure_run",
     "chain(add.s(1, 1), fail.s(), mul.s(3))"
     ".on_error(on_err.s()).on_error(errback_new.s()).on_error(errback_old.s())",
     run_chain_failure, "KeyError"),
    ("link_run", "add.s(1, 1).apply_async(link=mul.s(3))", run_link, 2),
    ("group_in_chain_run", "chain(add.s(1, 1), group(add.s(1), add.s(2)), tsum.s())",
     run_group_in_chain, 7),
    ("chord_in_chain_run",
     "chain(add.s(1, 1), chord([add.s(1), add.s(2)], tsum.s()), mul.s(10))",
     run_chord_in_chain, 70),
    ("chain_in_chord_header_run",
     "chord([chain(add.s(1, 1), mul.s(2)), add.s(3, 3)], tsum.s())",
     run_chain_in_chord_header, 10),
    ("nested_group_run", "group(group(add.s(1, 1), add.s(2, 2)), add.s(3, 3))",
     run_nested_group, [2, 4, 6]),
    ("chain_in_group_run", "group(chain(add.s(1, 1), mul.s(2)), add.s(3, 3))",
     run_chain_in_group, [4, 6]),
    ("chord_chain_body_run",
     "chord([add.s(1, 1), add.s(2, 2)], chain(tsum.s(), mul.s(10)))",
     run_chord_chain_body, 60),
    ("chain_group_in_chord_header_run",
     "chord([chain(add.s(1, 1), group(add.s(1), add.s(2))), add.s(3, 3)], echo.s())",
     run_chain_group_in_chord_header, [[3, 4], 6]),
]


def load_chord_scripts():
    """SCRIPT LOAD the Redis backend's chord Lua scripts: {sha1: name}.

    The worker runs them with EVALSHA and falls back to SCRIPT LOAD only when
    the server lacks them, so loading them first keeps the recorded command
    sequence the same whether or not this Redis server has seen them before.
    """
    import celery.backends.redis as celery_redis

    scripts = {}
    for name in sorted(dir(celery_redis)):
        if name.endswith("_LUA") and isinstance(getattr(celery_redis, name), str):
            sha = backend.script_load(getattr(celery_redis, name))
            scripts[sha] = f"celery.backends.redis.{name}"
    return scripts


def capture_canvas_runs():
    log("== canvas/runs (real worker, MONITOR)")
    flush()
    lua_scripts = load_chord_scripts()
    worker = Worker(extended=False)
    monitor = RedisMonitor()
    try:
        worker.start()
        monitor.start()
        recorder = RunRecorder(monitor, worker, lua_scripts)
        for case, description, start, expect in CANVAS_RUN_CASES:
            run_case(recorder, case, description, start, expect)
    finally:
        monitor.stop()
        worker.stop()
    flush()


def capture_canvas():
    capture_canvas_signatures()
    check_no_foreign_consumers()
    capture_canvas_messages()
    capture_canvas_runs()


# --------------------------------------------------------------------------
# 5. Events and remote control (pidbox)
# --------------------------------------------------------------------------
#
# events/<name>.json  one Redis pub/sub payload (a PUBLISH on /9.celeryev/<rk>
#                     or /9.celery.pidbox) or one pidbox reply (the value the
#                     worker LPUSHed to <oid>.reply.celery.pidbox), raw bytes
# events/index.json   {file: {"channel" | "list": key, "description": text}}

# Heartbeats on (worker-online/heartbeat/offline) and task events on (-E).
EVENTS_WORKER_FLAGS = ("--without-gossip", "--without-mingle", "-E")
EVENT_CHANNEL_PREFIX = f"/{BROKER_DB}.celeryev/"
PIDBOX_CHANNEL = f"/{BROKER_DB}.celery.pidbox"
REPLY_LIST_SUFFIX = ".reply.celery.pidbox"


class PubSubRecorder:
    """PSUBSCRIBEs the event and pidbox channels; a thread keeps every message
    as (channel, payload bytes), in arrival order."""

    def __init__(self):
        self.client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=BROKER_DB)
        self.pubsub = self.client.pubsub()
        self.messages = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = None

    def start(self):
        patterns = [EVENT_CHANNEL_PREFIX + "*", PIDBOX_CHANNEL]
        self.pubsub.psubscribe(*patterns)
        # Wait for both confirmations: nothing published from now on is missed.
        confirmed, deadline = 0, time.monotonic() + 10
        while confirmed < len(patterns):
            if time.monotonic() > deadline:
                raise SystemExit("PSUBSCRIBE not confirmed")
            msg = self.pubsub.get_message(timeout=1.0)
            if msg is not None:
                assert msg["type"] == "psubscribe", msg
                confirmed += 1
        self.thread = threading.Thread(target=self._run, name="redis-pubsub", daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping.is_set():
            msg = self.pubsub.get_message(timeout=0.1)
            if msg is None or msg["type"] != "pmessage":
                continue
            with self.lock:
                self.messages.append((msg["channel"].decode(), msg["data"]))

    def count(self):
        with self.lock:
            return len(self.messages)

    def wait_for(self, pred, start=0, timeout=30.0, what="message"):
        """Index of the first message at or after `start` for which pred(channel, raw)."""
        deadline = time.monotonic() + timeout
        i = start
        while time.monotonic() < deadline:
            with self.lock:
                todo = self.messages[i:]
            for channel, raw in todo:
                if pred(channel, raw):
                    return i
                i += 1
            time.sleep(0.02)
        raise SystemExit(f"no {what} on pub/sub within {timeout} s")

    def get(self, i):
        with self.lock:
            return self.messages[i]

    def between(self, start, end):
        with self.lock:
            return list(self.messages[start:end])

    def stop(self):
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        try:
            self.pubsub.close()
        finally:
            self.client.close()
        self.thread = None


def decode_envelope(raw):
    env = json.loads(raw)
    assert env["properties"]["body_encoding"] == "base64", env
    return env, json.loads(base64.b64decode(env["body"]))


def events_in(channel, raw):
    """The event dicts of a celeryev payload (a task.multi body is a list)."""
    if not channel.startswith(EVENT_CHANNEL_PREFIX):
        return []
    _, body = decode_envelope(raw)
    return body if isinstance(body, list) else [body]


def is_event(type_, uuid_=None):
    def pred(channel, raw):
        return any(
            e.get("type") == type_ and (uuid_ is None or e.get("uuid") == uuid_)
            for e in events_in(channel, raw)
        )
    return pred


def is_pidbox_request(method):
    def pred(channel, raw):
        return channel == PIDBOX_CHANNEL and decode_envelope(raw)[1].get("method") == method
    return pred


def scrub_event_paths(name, raw):
    """Cut the repository prefix out of "traceback" strings of task events.

    The prefix sits inside the base64 body, so the body's JSON text is edited
    (only inside "traceback" values, checked) and base64-encoded again; the
    rest of the envelope keeps its bytes.
    """
    repo = str(REPO).encode()
    env, body = decode_envelope(raw)
    text = base64.b64decode(env["body"])
    if REPO_PREFIX_JSON not in text:
        if repo in raw or repo in text:
            raise SystemExit(f"{name}: repository path in {raw!r}")
        return raw
    events = body if isinstance(body, list) else [body]
    for e in events:
        outside = {k: v for k, v in e.items() if k != "traceback"}
        if str(REPO) in json.dumps(outside):
            raise SystemExit(f"{name}: repository path outside a traceback: {e!r}")
    new_text = text.replace(REPO_PREFIX_JSON, b"")
    new_body = json.loads(new_text)
    new_events = new_body if isinstance(new_body, list) else [new_body]
    assert len(new_events) == len(events), name
    for old, new in zip(events, new_events):
        assert {k: v for k, v in new.items() if k != "traceback"} == {
            k: v for k, v in old.items() if k != "traceback"}, name
        if "traceback" in old:
            assert new["traceback"] == old["traceback"].replace(str(REPO) + os.sep, ""), name
    old_b64 = env["body"].encode()
    assert base64.b64encode(text) == old_b64, name  # kombu's base64 is canonical
    needle = b'"body": "' + old_b64 + b'"'
    assert raw.count(needle) == 1, name
    out = raw.replace(needle, b'"body": "' + base64.b64encode(new_text) + b'"')
    new_env = json.loads(out)
    assert {k: v for k, v in new_env.items() if k != "body"} == {
        k: v for k, v in env.items() if k != "body"}, name
    if repo in out or repo in new_text:
        raise SystemExit(f"{name}: repository path left after scrubbing")
    return out


def describe_events(channel, raw):
    return ", ".join(e["type"] for e in events_in(channel, raw))


# (case, what was run, apply(task_id), the task's last event)
EVENT_TASK_CASES = [
    ("success", "add(2, 3)",
     lambda i: T.add.apply_async((2, 3), task_id=i), "task-succeeded"),
    ("failure", "fail() raising KeyError('nope')",
     lambda i: T.fail.apply_async(task_id=i), "task-failed"),
    ("retry", "retry_twice(countdown=0, with_exc=True): two retries, then success",
     lambda i: T.retry_twice.apply_async(kwargs={"countdown": 0, "with_exc": True}, task_id=i),
     "task-succeeded"),
]


def capture_events():
    log("== events (worker -E: celeryev and pidbox pub/sub, pidbox replies)")
    out_dir = FIXTURES / "events"
    flush()
    files, index = {}, {}

    def save(name, kind, key, description, raw):
        fname = f"{name}.json"
        assert fname not in files, fname
        files[fname] = scrub_event_paths(name, raw)
        index[fname] = {kind: key, "description": description}

    def save_published(name, i, description):
        channel, raw = sub.get(i)
        save(name, "channel", channel, description, raw)

    def control(name, call, method, description, reply_description=None):
        """Run `call`, save the pidbox request it published and, if it asked
        for replies, the reply the worker LPUSHed (seen by MONITOR)."""
        start = sub.count()
        monitor.take()
        got = call()
        i = sub.wait_for(is_pidbox_request(method), start, what=f"{method} request")
        channel, raw = sub.get(i)
        save(f"pidbox_{name}_request", "channel", channel, description, raw)
        commands = monitor.take()
        published = [a for _, _, a in commands if a[0].upper() == b"PUBLISH"
                     and a[1].decode() == channel and a[2] == raw]
        assert len(published) == 1, f"{name}: PUBLISH not seen once by MONITOR"
        _, body = decode_envelope(raw)
        if reply_description is None:
            assert "ticket" not in body and "reply_to" not in body, body
            return got
        replies = [
            (a[1].decode(), a[2]) for _, _, a in commands
            if a[0].upper() == b"LPUSH" and a[1].decode().endswith(REPLY_LIST_SUFFIX)
            and json.loads(a[2])["headers"].get("ticket") == body["ticket"]
        ]
        assert len(replies) == 1, f"{name}: {len(replies)} replies"
        key, value = replies[0]
        assert key == body["reply_to"]["routing_key"] + REPLY_LIST_SUFFIX, key
        save(f"pidbox_{name}_reply", "list", key, reply_description, value)
        return got

    sub = PubSubRecorder()
    monitor = RedisMonitor()
    worker = Worker(flags=EVENTS_WORKER_FLAGS)
    try:
        sub.start()
        monitor.start()
        worker.start()

        i = sub.wait_for(is_event("worker-online"), what="worker-online")
        save_published("worker-online", i, "worker-online, sent when the worker starts")
        i = sub.wait_for(is_event("worker-heartbeat"), i + 1, what="worker-heartbeat")
        save_published("worker-heartbeat", i, "first worker-heartbeat (every 2 s), no task run yet")

        for case, what, apply, last in EVENT_TASK_CASES:
            task_id = tid(f"events.{case}")
            start = sub.count()
            apply(task_id)
            end = sub.wait_for(is_event(last, task_id), start, what=f"{case} {last}")
            n = 0
            for channel, raw in sub.between(start, end + 1):
                if not channel.startswith(EVENT_CHANNEL_PREFIX + "task."):
                    continue
                assert all(e.get("uuid") == task_id for e in events_in(channel, raw)), case
                save(f"task_events_{case}_{n}", "channel", channel,
                     f"{what}, batch {n}: {describe_events(channel, raw)}", raw)
                n += 1

        # Revoke an id, then send a task with that id: the worker drops it
        # with a task-revoked event.
        revoked_id = tid("events.revoked")
        control("revoke", lambda: T.app.control.revoke(revoked_id), "revoke",
                "app.control.revoke(<id>) (broadcast, no reply asked)")
        wait_meta(revoked_id, ("REVOKED",))
        start = sub.count()
        T.add.apply_async((2, 3), task_id=revoked_id)
        end = sub.wait_for(is_event("task-revoked", revoked_id), start, what="task-revoked")
        n = 0
        for channel, raw in sub.between(start, end + 1):
            if channel.startswith(EVENT_CHANNEL_PREFIX + "task."):
                save(f"task_events_revoked_{n}", "channel", channel,
                     "add(2, 3) sent with an id revoked before, batch "
                     f"{n}: {describe_events(channel, raw)}", raw)
                n += 1

        got = control("ping", T.app.control.ping, "ping",
                      "app.control.ping() (to all workers, replies asked)",
                      "reply to app.control.ping()")
        assert got == [{WORKER_NODENAME: {"ok": "pong"}}], got
        got = control("ping_destination",
                      lambda: T.app.control.ping(destination=[WORKER_NODENAME]), "ping",
                      f"app.control.ping(destination=[{WORKER_NODENAME!r}])",
                      "reply to the ping with a destination")
        assert got == [{WORKER_NODENAME: {"ok": "pong"}}], got
        got = control("stats", lambda: T.app.control.inspect().stats(), "stats",
                      "app.control.inspect().stats()",
                      "reply to inspect().stats(), after the tasks above")
        assert set(got) == {WORKER_NODENAME}, got
        control("enable_events", T.app.control.enable_events, "enable_events",
                "app.control.enable_events() (broadcast, no reply asked)")

        i = sub.wait_for(is_event("worker-heartbeat"), sub.count(), what="worker-heartbeat")
        save_published("worker-heartbeat_after_tasks", i,
                       "a worker-heartbeat after the tasks above (processed > 0)")
        start = sub.count()
        worker.stop()
        i = sub.wait_for(is_event("worker-offline"), start, what="worker-offline")
        save_published("worker-offline", i, "worker-offline, sent on warm shutdown (SIGTERM)")
    finally:
        worker.stop()
        monitor.stop()
        sub.stop()
        flush()

    # Replace the directory's contents: file names depend on how Celery
    # batched the task events.
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.json"):
        old.unlink()
    for fname, data in files.items():
        write_bytes(out_dir / fname, data)
    text = json.dumps(index, indent=2, ensure_ascii=False) + "\n"
    if str(REPO) in text:
        raise SystemExit("repository path in events/index.json")
    write_bytes(out_dir / "index.json", text.encode("utf-8"))


# --------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sections = ["messages", "results", "backoff", "canvas", "events"]
    ap.add_argument("--only", nargs="+", choices=sections, default=sections)
    ap.add_argument(
        "--out", metavar="DIR", default=None,
        help="write fixtures under DIR instead of tests/fixtures "
             "(e.g. a temporary directory, to check a capture without "
             "rewriting the committed files)",
    )
    args = ap.parse_args()
    if args.out is not None:
        set_output_root(args.out)
        log(f"writing fixtures under {FIXTURES}")
    log(
        f"celery {celery.__version__}, kombu {kombu.__version__}, "
        f"redis-py {redis.__version__}, python {sys.version.split()[0]}"
    )
    if celery.__version__ != "5.7.0":
        raise SystemExit(f"expected celery 5.7.0, got {celery.__version__}")
    # Turn SIGTERM/SIGHUP into SystemExit so that the worker is still stopped.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    broker.ping()
    check_no_foreign_consumers()
    started = time.monotonic()
    try:
        if "messages" in args.only:
            capture_messages()
        if "results" in args.only:
            capture_results()
        if "backoff" in args.only:
            capture_backoff()
        if "canvas" in args.only:
            capture_canvas()
        if "events" in args.only:
            capture_events()
    finally:
        try:
            T.app.close()
        except Exception:
            pass
    log(f"done in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
