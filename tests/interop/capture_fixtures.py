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
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
FIXTURES = REPO / "tests" / "fixtures"
MESSAGES_DIR = FIXTURES / "messages"
RESULTS_DIR = FIXTURES / "results"
BACKOFF_DIR = FIXTURES / "backoff"

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
    return path.relative_to(REPO).as_posix()


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


class Worker:
    """A real `celery worker` subprocess, stopped by its own pid."""

    def __init__(self, extended=False):
        self.extended = extended
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
            "--without-gossip", "--without-mingle", "--without-heartbeat",
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--only", nargs="+", choices=["messages", "results", "backoff"],
        default=["messages", "results", "backoff"],
    )
    args = ap.parse_args()
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
    finally:
        try:
            T.app.close()
        except Exception:
            pass
    log(f"done in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
