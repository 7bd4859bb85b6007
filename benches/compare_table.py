"""The side-by-side table of benches/compare.sh, from its JSON lines.

    python compare_table.py last-compare.jsonl [--cores N] [--md OUT.md]
"""
import argparse
import json
import sys


def load(path):
    rows = []
    with open(path, encoding='utf-8') as fh:
        for line in fh:
            line = line.strip()
            if line.startswith('{'):
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    return rows


def value(row):
    """The figure a row is about: tasks/s, or ms for latencies, or s for chords."""
    for key, unit in (('tasks_per_s', '/s'), ('per_s', '/s'), ('p50_ms', 'ms p50'), ('seconds', 's')):
        if key in row:
            return row[key], unit
    return None, ''


def fmt(v, unit):
    if v is None:
        return '-'
    if unit == '/s':
        return f'{v:,.0f}/s'
    if unit == 'ms p50':
        return f'{v:.3f} ms'
    return f'{v:.3f} s'


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('jsonl')
    ap.add_argument('--cores', type=int, default=0)
    ap.add_argument('--md')
    args = ap.parse_args()
    rows = load(args.jsonl)
    by = {}
    order = []
    for r in rows:
        key = r['scenario']
        if key not in order:
            order.append(key)
        by.setdefault(key, {})[r.get('impl', '?')] = r
    lines = [f'Machine: {args.cores} cores. Celery: Python Celery 5.7.0 worker (pool per scenario below); '
             'Celeriac: release build; same Redis, same run.', '',
             '| scenario | Celery | Celeriac | Celeriac ÷ Celery | Celeriac worker RSS | Celery worker RSS |',
             '|---|---|---|---|---|---|']
    for key in order:
        impls = by[key]
        if 'ceiling' in impls or 'peer' in impls:
            continue
        c, rs = impls.get('celery'), impls.get('celeriac')
        cv, unit = value(c) if c else (None, '')
        rv, unit2 = value(rs) if rs else (None, '')
        unit = unit or unit2
        ratio = '-'
        if cv and rv:
            # Higher is better for rates, lower for times.
            ratio = f'{rv / cv:,.1f}×' if unit == '/s' else f'{cv / rv:,.1f}× faster'
        rss = lambda r: f"{r['worker_rss_mib']} MiB" if r and 'worker_rss_mib' in r else '-'
        lines.append(f'| {key} | {fmt(cv, unit)} | {fmt(rv, unit)} | {ratio} | {rss(rs)} | {rss(c)} |')
    ceil = [(k, by[k]['ceiling']) for k in order if 'ceiling' in by[k]]
    if ceil:
        lines += ['', '| Redis-bound ceiling (no task queue around it) | rate |', '|---|---|']
        lines += [f"| {k.replace('ceiling: ', '')} | {r['per_s']:,.0f}/s |" for k, r in ceil]
        noop = by.get('noop', {}).get('celeriac')
        batched = next((r for k, r in ceil if 'LMPOP' in k), None)
        if noop and batched:
            lines += ['', f"Celeriac's no-op burn-down is {100 * noop['tasks_per_s'] / batched['per_s']:.0f} % of the batched-pop ceiling."]
    peers = [(k, by[k]['peer']) for k in order if 'peer' in by[k]]
    if peers:
        lines += ['', '| Rust peer (no-op burn-down) | rate |', '|---|---|']
        lines += [f"| {k} | {r.get('tasks_per_s', r.get('per_s', 0)):,.0f}/s |" for k, r in peers]
    text = '\n'.join(lines) + '\n'
    sys.stdout.write(text)
    if args.md:
        with open(args.md, 'w', encoding='utf-8') as fh:
            fh.write(text)


if __name__ == '__main__':
    main()
