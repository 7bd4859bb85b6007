"""Python Celery 5.7.0 on the same scenarios as `celeriac bench`, for benches/compare.sh.

    python benches/celery_bench.py --scenario noop --broker redis://127.0.0.1:6379/12 --tasks 5000

Prints one JSON line per figure, in the shape `celeriac bench` prints. The worker is a real
`celery worker` process started here with the settings given in WORKERS (its best pool for
each scenario); burn-down time is measured from the first task leaving the queue to the last
one settled, so worker start-up is not counted. Every count is checked.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# The worker command line for each scenario: Celery's fastest settings for it on this box.
# solo runs tasks in the consumer itself (no IPC); prefork -c 2 uses both cores.
WORKERS = {
    'noop': ['-P', 'solo', '--prefetch-multiplier', '128'],
    'results': ['-P', 'prefork', '-c', '2', '--prefetch-multiplier', '64', '-O', 'fair'],
    'acks-late': ['-P', 'solo', '--prefetch-multiplier', '128'],
    'latency': ['-P', 'solo'],
    'chain': ['-P', 'prefork', '-c', '2', '-O', 'fair'],
    'chord': ['-P', 'prefork', '-c', '2', '-O', 'fair'],
}
COMMON = ['--without-mingle', '--without-gossip', '--without-heartbeat', '-l', 'warning']


def start_worker(broker, scenario):
    env = dict(os.environ, BENCH_BROKER=broker, PYTHONPATH=HERE)
    cmd = [sys.executable, '-m', 'celery', '-A', 'celery_bench_app', 'worker', *WORKERS[scenario], *COMMON]
    return subprocess.Popen(cmd, env=env, cwd=HERE, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_worker(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def rss_peak_mib(pid):
    """Peak RSS of the worker and its pool children (VmHWM), MiB."""
    total = 0
    pids = [pid]
    try:
        out = subprocess.run(['pgrep', '-g', str(os.getpgid(pid))], capture_output=True, text=True).stdout
        pids = [int(p) for p in out.split()] or [pid]
    except (OSError, ValueError):
        pass
    for p in pids:
        try:
            with open(f'/proc/{p}/status') as fh:
                for line in fh:
                    if line.startswith('VmHWM:'):
                        total += int(line.split()[1])
        except OSError:
            pass
    return round(total / 1024, 1)


def emit(scenario, **fields):
    print(json.dumps({'scenario': scenario, 'impl': 'celery', **fields}), flush=True)


def burn_down(app, r, scenario, task, n, results):
    from celery_bench_app import QUEUE
    r.delete(QUEUE, 'unacked', 'unacked_index')
    ids = []
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            ids.append(task.apply_async(producer=producer).id)
    proc = start_worker(app.conf.broker_url, scenario)
    try:
        while r.llen(QUEUE) == n:
            if proc.poll() is not None:
                raise SystemExit(f'celery worker exited: {proc.stderr.read().decode()[-2000:]}')
            time.sleep(0.001)
        started = time.monotonic()
        deadline = started + 600
        while r.llen(QUEUE) or r.hlen('unacked'):
            if time.monotonic() > deadline:
                raise SystemExit(f'{scenario}: not drained after 600 s')
            time.sleep(0.002)
        if results:
            last = app.AsyncResult(ids[-1])
            last.get(timeout=60)
            missing = sum(1 for i in ids if r.get(f'celery-task-meta-{i}') is None)
            if missing:
                raise SystemExit(f'{scenario}: {missing} results missing')
        secs = time.monotonic() - started
        rss = rss_peak_mib(proc.pid)
    finally:
        stop_worker(proc)
    emit(scenario, tasks=n, tasks_per_s=round(n / secs, 1), worker_rss_mib=rss,
         worker=' '.join(WORKERS[scenario]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--scenario', required=True)
    ap.add_argument('--broker', required=True)
    ap.add_argument('--tasks', type=int, default=5000)
    args = ap.parse_args()
    os.environ['BENCH_BROKER'] = args.broker
    import redis
    from celery_bench_app import QUEUE, app, echo, late, noop
    r = redis.Redis.from_url(args.broker)
    n = args.tasks
    s = args.scenario
    if s == 'enqueue':
        r.delete(QUEUE)
        k = min(n, 5000)
        t = time.monotonic()
        for _ in range(k):
            noop.apply_async()
        emit('enqueue (delay in a loop)', tasks=k, tasks_per_s=round(k / (time.monotonic() - t), 1))
        r.delete(QUEUE)
        t = time.monotonic()
        with app.producer_or_acquire() as producer:
            for _ in range(n):
                noop.apply_async(producer=producer)
        emit('enqueue (batched)', tasks=n, tasks_per_s=round(n / (time.monotonic() - t), 1))
        r.delete(QUEUE)
    elif s == 'noop':
        burn_down(app, r, s, noop, n, False)
    elif s == 'results':
        burn_down(app, r, s, echo.s(7), n, True)
    elif s == 'acks-late':
        burn_down(app, r, s, late, n, False)
    elif s in ('latency', 'chain', 'chord'):
        r.delete(QUEUE)
        proc = start_worker(args.broker, s)
        try:
            echo.delay(0).get(timeout=30)  # warm: the worker is up
            if s == 'latency':
                ms = []
                for i in range(min(n, 2000)):
                    t = time.perf_counter()
                    assert echo.delay(i).get(timeout=10) == i
                    ms.append((time.perf_counter() - t) * 1000)
                ms.sort()
                pick = lambda p: round(ms[round((len(ms) - 1) * p)], 3)
                emit('delay().get()', tasks=len(ms), p50_ms=pick(0.5), p90_ms=pick(0.9), p99_ms=pick(0.99),
                     worker_rss_mib=rss_peak_mib(proc.pid))
            elif s == 'chain':
                from celery import chain
                k = max(1, min(n // 3, 2000))
                t = time.monotonic()
                rs = [chain(echo.s(i), echo.si(i), echo.si(i)).delay() for i in range(k)]
                for x in rs:
                    x.get(timeout=120)
                emit('chain of 3', tasks=3 * k, tasks_per_s=round(3 * k / (time.monotonic() - t), 1),
                     worker_rss_mib=rss_peak_mib(proc.pid))
            else:
                from celery import chord
                from celery_bench_app import count
                for size in (100, 10000):
                    t = time.monotonic()
                    got = chord([echo.s(i) for i in range(size)])(count.s()).get(timeout=600)
                    assert got == size, got
                    emit(f'chord of {size}', tasks=size, seconds=round(time.monotonic() - t, 3),
                         worker_rss_mib=rss_peak_mib(proc.pid))
        finally:
            stop_worker(proc)
    else:
        raise SystemExit(f'unknown scenario {s}')


if __name__ == '__main__':
    main()
