"""Python side of the Celeriac <-> Celery interop tests (tests/interop/test_interop.py).

One Celery app on one Redis database, used as broker and result backend by both
languages:

- ``rust.*`` are stubs of the tasks that ``examples/interop_worker`` runs (same
  names and parameters, so Celery's argument check passes); their bodies never
  run. They are routed to the queue ``rust``.
- ``py.*`` are real tasks, run by a Python worker on the queue ``python``
  (``celery -A interop_app worker -Q python``), for messages sent by Rust.
- ``shared.work`` is a real task on both sides (here and in ``examples/interop_worker``),
  routed to the queue ``shared`` that a Python and a Rust worker consume together
  (``test_shared_queue.py``).

Environment:
  INTEROP_REDIS_URL           broker and backend URL (default redis://127.0.0.1:6379/12)
  INTEROP_SHARED_LOG          the file ``shared.work`` logs its runs to (no log when unset)
  INTEROP_VISIBILITY_TIMEOUT  kombu's ``visibility_timeout`` in seconds, with the unacked
                              restore scan every second (default: kombu's, one hour)
"""

import os
import time

from celery import Celery

REDIS_URL = os.environ.get("INTEROP_REDIS_URL", "redis://127.0.0.1:6379/12")

app = Celery("interop_app", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    # Everything else stays at Celery's defaults: json, protocol 2, UTC.
    task_routes={"rust.*": {"queue": "rust"}, "py.*": {"queue": "python"}, "shared.*": {"queue": "shared"}},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

if os.environ.get("INTEROP_VISIBILITY_TIMEOUT"):
    app.conf.broker_transport_options = {
        "visibility_timeout": float(os.environ["INTEROP_VISIBILITY_TIMEOUT"]),
        # kombu 5.7 scans every unacked_restore_interval * unacked_restore_throttle seconds
        # (100 by default): every second here.
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }

NOT_HERE = "runs on the Rust worker (examples/interop_worker), not in Python"


# --------------------------------------------------------------------------
# Stubs of the Rust tasks (queue "rust")
# --------------------------------------------------------------------------


@app.task(name="rust.add")
def rust_add(x, y):
    raise NotImplementedError(NOT_HERE)


@app.task(name="rust.mul")
def rust_mul(x, y):
    raise NotImplementedError(NOT_HERE)


@app.task(name="rust.echo")
def rust_echo(value):
    raise NotImplementedError(NOT_HERE)


@app.task(name="rust.fail")
def rust_fail(message):
    raise NotImplementedError(NOT_HERE)


@app.task(name="rust.custom_error")
def rust_custom_error():
    raise NotImplementedError(NOT_HERE)


@app.task(name="rust.retry_once")
def rust_retry_once(x):
    raise NotImplementedError(NOT_HERE)


@app.task(name="rust.kwargs_only")
def rust_kwargs_only(a, b=None):
    raise NotImplementedError(NOT_HERE)


@app.task(name="rust.sleep")
def rust_sleep(seconds):
    raise NotImplementedError(NOT_HERE)


@app.task(name="rust.tsum")
def rust_tsum(numbers):
    raise NotImplementedError(NOT_HERE)


# --------------------------------------------------------------------------
# Real Python tasks (queue "python")
# --------------------------------------------------------------------------


@app.task(name="py.add")
def py_add(x, y):
    return x + y


@app.task(name="py.mul")
def py_mul(x, y):
    return x * y


@app.task(name="py.tsum")
def py_tsum(numbers):
    return sum(numbers)


@app.task(name="py.fail")
def py_fail(message):
    raise ValueError(message)


@app.task(name="py.retry_once", bind=True)
def py_retry_once(self, x):
    """Retries once (1 s later), then returns x."""
    if self.request.retries == 0:
        raise self.retry(countdown=1)
    return x


# --------------------------------------------------------------------------
# A task of both languages (queue "shared")
# --------------------------------------------------------------------------


def _shared_log(what, n, redelivered):
    path = os.environ.get("INTEROP_SHARED_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{what} {n} py {os.getpid()} {str(bool(redelivered)).lower()}\n")


@app.task(name="shared.work", acks_late=True, bind=True)
def shared_work(self, n, seconds):
    """Logs its start and end (``<n> py <pid>``), sleeping ``seconds`` in between."""
    redelivered = (self.request.delivery_info or {}).get("redelivered")
    _shared_log("start", n, redelivered)
    time.sleep(seconds)
    _shared_log("done", n, redelivered)
    return ["py", n]
