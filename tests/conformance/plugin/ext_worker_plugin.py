"""pytest plugin: run Celery's integration suite against a worker that is already running.

Load it with ``-p ext_worker_plugin`` next to ``-p celery.contrib.pytest``.

``celery.contrib.pytest`` builds its session worker by calling
``celery.contrib.testing.worker.start_worker`` (looked up as a module attribute
when the fixture runs). We swap that attribute for a context manager that starts
nothing, so the tests publish to the broker and an out-of-process worker
(Celeriac or a real Celery worker) consumes. Everything else in the fixture
still happens in the pytest process: the session app is built, task modules are
imported and class-based tasks are registered there.
"""
from contextlib import contextmanager

import celery.contrib.testing.worker as _testing_worker
from celery.result import _set_task_join_will_block


@contextmanager
def _no_worker(app, *args, **kwargs):
    # The genuine start_worker clears the "we are inside a task" flag once its
    # thread is up. Some tests create a WorkController inside pytest, which
    # sets that flag; if it were left set, every later result.get() in the
    # pytest process would refuse to block. Clear it the same way, nothing more.
    _set_task_join_will_block(False)
    yield None


_testing_worker.start_worker = _no_worker
