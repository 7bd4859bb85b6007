"""Celery app for a real Python Celery 5.7.0 worker (run.sh --python-worker).

Start it from the sdist root with this directory on PYTHONPATH:

    celery -A conf57_worker_app worker -c 4 -l info

It is configured like the session app the integration suite builds in the
pytest process: celery.contrib.testing.app's test defaults plus
t/integration/conftest.py's celery_config, the same task modules, and the
class-based task registered by conftest's celery_class_tasks fixture.
"""
import os

from celery import Celery

BROKER = os.environ.get('TEST_BROKER', 'redis://127.0.0.1:6379/0')
BACKEND = os.environ.get('TEST_BACKEND', 'redis://127.0.0.1:6379/0')

app = Celery(
    'celery.tests',  # the main name the testing TestApp uses
    broker=BROKER,
    backend=BACKEND,
    include=['t.integration.tasks', 'celery.contrib.testing.tasks'],
)

app.conf.update(
    # test defaults from celery.contrib.testing.app
    worker_hijack_root_logger=False,
    worker_log_color=False,
    accept_content={'json'},
    enable_utc=True,
    timezone='UTC',
    broker_heartbeat=0,
    # t/integration/conftest.py: celery_config
    result_extended=True,
    task_create_missing_queues=False,
    cassandra_servers=['localhost'],
    cassandra_keyspace='tests',
    cassandra_table='tests',
    cassandra_read_consistency='ONE',
    cassandra_write_consistency='ONE',
)

# t/integration/conftest.py: celery_class_tasks
from t.integration.tasks import ClassBasedAutoRetryTask  # noqa: E402

app.register_task(ClassBasedAutoRetryTask)
