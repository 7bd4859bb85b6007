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


# --------------------------------------------------------------------------
# Errbacks for the canvas runs (tasks.errback_new, tasks.errback_old). Each
# RPUSHes a JSON record of what it was called with onto the list
# ``fixture-errbacks`` in the result backend's Redis DB, for the capture
# script to read back. Everything is appended here, below the tasks above, so
# that their line numbers (which appear in captured tracebacks) do not move;
# the tasks above are unchanged (``tasks.on_err`` still records nothing).
# --------------------------------------------------------------------------

import json  # noqa: E402

ERRBACK_LIST = "fixture-errbacks"


def _record_errback(record):
    app.backend.client.rpush(ERRBACK_LIST, json.dumps(record, sort_keys=True))


def _describe_request(req):
    out = {"type": type(req).__name__}
    for name in ("id", "task", "root_id", "parent_id", "group", "group_index"):
        value = getattr(req, name, None)
        out[name] = value if value is None or isinstance(value, (str, int)) else repr(value)
    errbacks = getattr(req, "errbacks", None) or []
    out["errbacks"] = [dict(e).get("task") for e in errbacks]
    chord = getattr(req, "chord", None)
    out["chord"] = None if chord is None else dict(chord).get("task")
    return out


@app.task(name="tasks.errback_new")
def errback_new(*args, **kwargs):
    """Same signature as ``tasks.on_err`` (``*args``), so Celery treats it as
    a new-style errback and calls it in-process as ``(request, exc, traceback)``
    in the worker that saw the failure, without publishing a message."""
    record = {"errback": "tasks.errback_new", "nargs": len(args), "kwargs": sorted(kwargs)}
    if len(args) == 3:
        req, exc, tb = args
        record["request"] = _describe_request(req)
        record["exc"] = {
            "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "repr": repr(exc),
        }
        record["traceback_type"] = type(tb).__name__
    else:
        record["args"] = [repr(a) for a in args]
    _record_errback(record)


@app.task(name="tasks.errback_old", bind=True)
def errback_old(self, task_id):
    """bind=True makes Celery treat it as an old-style errback: it is sent as
    a task message with the failed task's id as its only argument."""
    _record_errback({
        "errback": "tasks.errback_old",
        "args": [task_id],
        "request": _describe_request(self.request),
    })
