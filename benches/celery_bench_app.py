"""The Celery app of benches/celery_bench.py: the same tasks, under the same names, as
`celeriac bench` (crates/celeriac/src/cli/bench.rs)."""
import os

from celery import Celery

QUEUE = 'celery'
app = Celery('celeriac_bench', broker=os.environ.get('BENCH_BROKER', 'redis://127.0.0.1:6379/12'))
app.conf.update(
    result_backend=app.conf.broker_url,
    task_default_queue=QUEUE,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name='celeriac.bench.noop', ignore_result=True)
def noop():
    return None


@app.task(name='celeriac.bench.echo')
def echo(n):
    return n


@app.task(name='celeriac.bench.late', ignore_result=True, acks_late=True)
def late():
    return None


@app.task(name='celeriac.bench.count')
def count(values):
    return len(values)
