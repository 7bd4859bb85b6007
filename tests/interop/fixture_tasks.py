"""Celery app and tasks used to capture the golden wire fixtures.

Task names are fixed (``tasks.*``) so that captured messages and results do
not depend on this module's import path. The worker is started from this
directory as ``celery -A fixture_tasks worker ...`` by capture_fixtures.py.

Environment:
  CELERIAC_FIXTURE_BROKER    broker URL  (default redis://127.0.0.1:6379/9)
  CELERIAC_FIXTURE_BACKEND   backend URL (default redis://127.0.0.1:6379/10)
  CELERIAC_FIXTURE_EXTENDED  "1" -> result_extended=True
"""

import os
import time

from celery import Celery

BROKER_URL = os.environ.get("CELERIAC_FIXTURE_BROKER", "redis://127.0.0.1:6379/9")
BACKEND_URL = os.environ.get("CELERIAC_FIXTURE_BACKEND", "redis://127.0.0.1:6379/10")
EXTENDED = os.environ.get("CELERIAC_FIXTURE_EXTENDED") == "1"

app = Celery("fixture_tasks", broker=BROKER_URL, backend=BACKEND_URL)
app.conf.update(
    # Everything else stays at Celery's defaults: json serializer, protocol 2,
    # UTC, result_expires = 1 day, default queue "celery".
    broker_connection_retry_on_startup=True,
    result_extended=EXTENDED,
    worker_hijack_root_logger=False,
)


class FixtureError(Exception):
    """Custom exception whose serialized form is captured (failure_custom)."""


@app.task(name="tasks.add")
def add(x, y=0):
    return x + y


@app.task(name="tasks.mul")
def mul(x, y):
    return x * y


@app.task(name="tasks.tsum")
def tsum(numbers):
    return sum(numbers)


@app.task(name="tasks.echo")
def echo(value):
    """Return the argument unchanged (success_str_unicode/nested/none)."""
    return value


@app.task(name="tasks.collect")
def collect(*args, **kwargs):
    """Return what it was called with (used for the argument-encoding cases)."""
    return [list(args), kwargs]


@app.task(name="tasks.fail")
def fail(kind="keyerror"):
    if kind == "custom":
        raise FixtureError("boom", 42)
    raise KeyError("nope")


@app.task(name="tasks.on_err")
def on_err(*args, **kwargs):
    return None


@app.task(name="tasks.retry_twice", bind=True)
def retry_twice(self, countdown=60, with_exc=False):
    """Retry (up to) twice, then succeed with the number of retries done."""
    if self.request.retries < 2:
        if with_exc:
            raise self.retry(countdown=countdown, exc=ValueError("transient"))
        raise self.retry(countdown=countdown)
    return self.request.retries


@app.task(name="tasks.always_retry", bind=True, max_retries=1)
def always_retry(self, countdown=0, with_exc=False):
    """Always retries; the second retry exceeds max_retries=1."""
    if with_exc:
        raise self.retry(countdown=countdown, exc=ValueError("still failing"))
    raise self.retry(countdown=countdown)


@app.task(name="tasks.sleepy", track_started=True)
def sleepy(seconds=2.0):
    time.sleep(seconds)
    return seconds
