"""Python side of the Celeriac <-> Celery interop tests (tests/interop/test_interop.py).

One Celery app on one Redis database, used as broker and result backend by both
languages:

- ``rust.*`` are stubs of the tasks that ``examples/interop_worker`` runs (same
  names and parameters, so Celery's argument check passes); their bodies never
  run. They are routed to the queue ``rust``.
- ``py.*`` are real tasks, run by a Python worker on the queue ``python``
  (``celery -A interop_app worker -Q python``), for messages sent by Rust.

Environment:
  INTEROP_REDIS_URL  broker and backend URL (default redis://127.0.0.1:6379/12)
"""

import os

from celery import Celery

REDIS_URL = os.environ.get("INTEROP_REDIS_URL", "redis://127.0.0.1:6379/12")

app = Celery("interop_app", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    # Everything else stays at Celery's defaults: json, protocol 2, UTC.
    task_routes={"rust.*": {"queue": "rust"}, "py.*": {"queue": "python"}},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

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
