"""A Python Celery 5.7.0 worker and a Celeriac worker consuming the same queue with acks_late.

Run by ``tests/interop/run.sh`` (see ``docs/CELERY_INTEROP.md``, "Migrating a queue from Python
to Rust workers").

Both workers run ``shared.work(n, seconds)`` (``interop_app.py`` and
``examples/interop_worker``), which logs a ``start`` and a ``done`` line per run to one file.
Both have ``visibility_timeout`` = 5 s; the Python worker scans for stale unacked messages every
second (kombu's ``unacked_restore_interval`` / ``unacked_restore_throttle``).

- N tasks on the shared queue: each finishes exactly once, whichever worker takes it.
- The Celeriac worker is killed with SIGKILL while it runs some: the Python worker restores
  the killed worker's entries from kombu's ``unacked`` (the layout both share) after the
  visibility timeout and runs them; each task still finishes exactly once and none is lost.
"""

import collections
import os
import signal
import sys
import time
import uuid

import pytest

from conftest import HERE, REDIS_URL, Process, rust_env, rust_worker_cmd
from interop_app import shared_work

VISIBILITY = 5  # seconds, both workers


def python_env(**extra):
    return {
        **os.environ,
        "INTEROP_REDIS_URL": REDIS_URL,
        "PYTHONPATH": os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        **extra,
    }


class RunLog:
    """The lines both workers append: ``start|done <n> py|rust <pid> <redelivered>``."""

    def __init__(self, path):
        self.path = path

    def lines(self):
        try:
            with open(self.path) as f:
                return [line.split() for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def done(self):
        return collections.Counter(int(n) for what, n, *_ in self.lines() if what == "done")

    def running(self, lang, pid=None):
        """Numbers started by `lang` (optionally by that pid) and not finished by it."""
        started, finished = set(), set()
        for what, n, who, p, *_ in self.lines():
            if who == lang and (pid is None or int(p) == pid):
                (started if what == "start" else finished).add(int(n))
        return started - finished

    def by(self, lang):
        return {int(n) for what, n, who, *_ in self.lines() if what == "done" and who == lang}


@pytest.fixture
def shared(log_dir, tmp_path):
    """A Python and a Rust worker on the queue `shared`; yields (python, rust, RunLog)."""
    log = RunLog(tmp_path / "shared-runs.log")
    tag = uuid.uuid4().hex[:6]
    python = Process(
        "shared-python-worker",
        [
            sys.executable, "-m", "celery", "-A", "interop_app", "worker", "-Q", "shared", "-P", "solo",
            "-n", f"shared-py-{tag}@interop", "--prefetch-multiplier", "1",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO",
        ],
        python_env(INTEROP_SHARED_LOG=str(log.path), INTEROP_VISIBILITY_TIMEOUT=str(VISIBILITY)),
        b" ready.",
        log_dir,
    )
    rust = Process(
        "shared-rust-worker",
        rust_worker_cmd("shared", 4, f"shared-rs-{tag}@interop", ["--prefetch-multiplier", "1"]),
        {
            **rust_env(),
            "INTEROP_SHARED_LOG": str(log.path),
            "CELERIAC_BROKER_TRANSPORT_OPTIONS": f"{{ visibility_timeout = {float(VISIBILITY)} }}",
        },
        b"worker ready",
        log_dir,
    )
    python.start()
    rust.start()
    yield python, rust, log
    rust.stop()
    python.stop()


def wait_for(what, probe, timeout, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(every)
    pytest.fail(f"{what}: not seen after {timeout} s")


def test_each_task_runs_once_on_a_shared_queue_even_when_the_rust_worker_is_killed(shared, redis_client):
    python, rust, log = shared

    # 1. Both alive: every task finishes exactly once.
    first = {n: shared_work.delay(n, 0.2) for n in range(16)}
    for n, r in first.items():
        lang, got = r.get(timeout=30)
        assert got == n and lang in ("py", "rust")
    assert log.done() == {n: 1 for n in first}, log.lines()

    # 2. SIGKILL the Rust worker while it runs tasks (acks_late: they stay in kombu's unacked).
    second = {n: shared_work.delay(n, 0.4) for n in range(100, 124)}
    wait_for("the Rust worker running two tasks", lambda: len(log.running("rust", rust.proc.pid)) >= 2, 20)
    rust.proc.send_signal(signal.SIGKILL)
    rust.proc.wait(timeout=10)
    killed = log.running("rust", rust.proc.pid)
    assert killed, "the Rust worker was killed in the middle of tasks"
    killed_at = time.monotonic()

    for n, r in second.items():
        lang, got = r.get(timeout=45)
        assert got == n
    everything = set(first) | set(second)
    done = log.done()
    assert set(done) == everything, f"lost: {everything - set(done)}"
    assert [n for n, times in done.items() if times != 1] == [], log.lines()
    # The killed runs were restored by Python (visibility timeout) and finished there.
    assert killed <= log.by("py"), (killed, log.lines())
    assert log.by("rust") and log.by("py")
    print(f"killed while running {sorted(killed)}; all {len(everything)} done once, "
          f"{time.monotonic() - killed_at:.1f} s after the kill")
    # Everything acknowledged: nothing of these tasks left in kombu's unacked.
    wait_for("unacked emptied", lambda: not [v for v in redis_client.hvals("unacked") if b"shared.work" in v], 15)
    assert redis_client.llen("shared") == 0
