"""Fixtures of the Python interop tests: a Rust worker and a Python worker on one Redis DB.

Run through ``tests/interop/run.sh``, which builds the binaries and the pinned venv first.

- ``rust_worker``: ``examples/interop_worker`` (``worker -Q rust -c 4``), the ``rust.*`` tasks.
- ``python_worker``: ``celery -A interop_app worker -Q python -P solo``, the ``py.*`` tasks.
- ``celeriac``: runs the ``celeriac`` command line (a Rust client) against the same DB.

Both workers are started once per session, each stopped by its own pid at the end (SIGTERM,
then SIGKILL if it does not stop). Their logs go to files; a failing test gets the end of
each log attached to its report.

Environment (``run.sh`` sets them):
  INTEROP_REDIS_URL     broker and backend URL (default redis://127.0.0.1:6379/12)
  INTEROP_WORKER_BIN    the interop worker binary (default target/debug/examples/interop_worker)
  INTEROP_CELERIAC_BIN  the celeriac binary (default target/debug/celeriac)
  INTEROP_PIDS_FILE     where to list the pids of the workers started (for run.sh's cleanup)
"""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TARGET = REPO / "target" / "debug"

REDIS_URL = os.environ.get("INTEROP_REDIS_URL", "redis://127.0.0.1:6379/12")
RUST_WORKER_BIN = Path(os.environ.get("INTEROP_WORKER_BIN", TARGET / "examples" / "interop_worker"))
CELERIAC_BIN = Path(os.environ.get("INTEROP_CELERIAC_BIN", TARGET / "celeriac"))
INTEROP_CLIENT_BIN = Path(os.environ.get("INTEROP_CLIENT_BIN", TARGET / "examples" / "interop_client"))

# Rust processes route like the Python app does (interop_app.task_routes), so a chain step
# sent by the Rust worker reaches the Python worker's queue and vice versa.
RUST_ENV = {
    "CELERIAC_TASK_ROUTES": '{ "py.*" = "python", "rust.*" = "rust" }',
    "CELERIAC_LOG": "info",
    "NO_COLOR": "1",
}

sys.path.insert(0, str(HERE))
sys.dont_write_bytecode = True  # no __pycache__ in tests/interop

# Every process started here, for the failure report and the final cleanup.
RUNNING = []
# run.sh's list of the pids started here ("<pid> <name>" lines), so that it can stop them even
# if this session is killed.
PID_FILE = os.environ.get("INTEROP_PIDS_FILE")


def _terminate(signum, frame):
    # SIGTERM would end Python at once, skipping fixture teardown; unwind like Ctrl-C instead.
    raise KeyboardInterrupt(f"signal {signum}")


signal.signal(signal.SIGTERM, _terminate)


class Process:
    """A worker subprocess with its log in a file; stopped by its own pid."""

    def __init__(self, name, cmd, env, ready_marker, log_dir, cwd=HERE):
        self.name = name
        self.cmd = [str(c) for c in cmd]
        self.env = env
        self.ready_marker = ready_marker
        self.log_path = Path(log_dir) / f"{name}.log"
        self.cwd = cwd
        self.proc = None

    def start(self, timeout=60):
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.cmd, cwd=str(self.cwd), env=self.env, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        RUNNING.append(self)
        if PID_FILE:
            with open(PID_FILE, "a") as f:
                f.write(f"{self.proc.pid} {self.name}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited early with {self.proc.returncode}\n{self.log_tail()}"
                )
            if self.ready_marker in self.log_path.read_bytes():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout} s\n{self.log_tail()}")

    def log_tail(self, limit=8000):
        try:
            text = self.log_path.read_bytes().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return text[-limit:]

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self in RUNNING:
            RUNNING.remove(self)


def rust_worker_cmd(queues, concurrency, node, extra=()):
    return [
        RUST_WORKER_BIN, "--broker", REDIS_URL, "worker",
        "-Q", queues, "-c", str(concurrency), "-n", node, *extra,
    ]


def rust_env():
    return {**os.environ, **RUST_ENV}


@pytest.fixture(scope="session")
def redis_client():
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    return client


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("worker-logs")


@pytest.fixture(scope="session")
def clean_db(redis_client):
    """Starts the session on an empty DB (run.sh flushes it too)."""
    redis_client.flushdb()


@pytest.fixture(scope="session")
def rust_worker(clean_db, log_dir):
    if not RUST_WORKER_BIN.exists():
        pytest.fail(f"{RUST_WORKER_BIN} is missing: cargo build -p celeriac --example interop_worker")
    worker = Process(
        "rust-worker", rust_worker_cmd("rust", 4, "rust@interop"), rust_env(),
        b"worker ready", log_dir,
    )
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def python_worker(clean_db, log_dir):
    env = {
        **os.environ,
        "INTEROP_REDIS_URL": REDIS_URL,
        "PYTHONPATH": os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    worker = Process(
        "python-worker",
        [
            sys.executable, "-m", "celery", "-A", "interop_app", "worker", "-Q", "python", "-P", "solo",
            "-n", "python@interop", "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO",
        ],
        env, b" ready.", log_dir,
    )
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def workers(rust_worker, python_worker):
    return rust_worker, python_worker


@dataclass
class CliRun:
    code: int
    stdout: str
    stderr: str

    def task_id(self):
        return self.stdout.splitlines()[0].strip()

    def meta(self):
        """The result record `call --wait` / `result` printed after the task id line."""
        text = self.stdout
        start = text.index("{")
        return json.loads(text[start:])


@pytest.fixture(scope="session")
def celeriac():
    """Runs the `celeriac` command line (a Rust client) against the interop DB."""
    if not CELERIAC_BIN.exists():
        pytest.fail(f"{CELERIAC_BIN} is missing: cargo build -p celeriac-cli")

    def run(*args, timeout=60):
        cmd = [str(CELERIAC_BIN), "--broker", REDIS_URL, "--backend", REDIS_URL, *map(str, args)]
        done = subprocess.run(
            cmd, cwd=str(HERE), env=rust_env(), stdin=subprocess.DEVNULL,
            capture_output=True, timeout=timeout,
        )
        return CliRun(done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace"))

    return run


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        for proc in list(RUNNING):
            report.sections.append((f"{proc.name} log (last lines)", proc.log_tail()))
    return report


def pytest_sessionfinish(session, exitstatus):
    # Fixtures stop their workers; this catches any left by an interrupted session.
    for proc in list(RUNNING):
        proc.stop()
