"""Put a Celeriac run and a Python-worker run of the suite side by side.

    python compare.py CELERIAC_RUN_DIR PYTHON_RUN_DIR [--md OUT.md]

Both directories are run.sh run directories (files.tsv + record-*.jsonl). Prints one table
(per file: items, and passed / failed / error / skipped / xfail / xpass for each worker) and the
items whose outcome differs between the two, so a difference caused by the worker, not by the
suite, stands out.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from summarize import classify, read_records, summarize  # noqa: E402

SHOWN = ('passed', 'failed', 'error', 'skipped', 'xfail', 'xpass')


def outcomes(run_dir):
    out = {}
    with open(os.path.join(run_dir, 'files.tsv'), encoding='utf-8') as fh:
        for line in fh:
            parts = line.rstrip('\n').split('\t')
            if len(parts) < 2:
                continue
            items, _ = read_records(os.path.join(run_dir, f'record-{parts[1]}.jsonl'))
            for nodeid, slot in items.items():
                primary, errors, _, _ = classify(slot)
                out[nodeid] = (primary or 'error') + ''.join(f' +{e} error' for e in errors)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('celeriac_run')
    ap.add_argument('python_run')
    ap.add_argument('--md')
    args = ap.parse_args(argv)
    ours, _ = summarize(args.celeriac_run)
    theirs, _ = summarize(args.python_run)
    by_file = {r['file']: r for r in theirs}
    head = ['file', 'items'] + [f'{c} (Celeriac / Python)' for c in SHOWN] + ['wall s (Celeriac / Python)']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in ours:
        p = by_file.get(r['file'], {})
        cells = [r['file'], str(r['items'])]
        cells += [f"{r[c]} / {p.get(c, '-')}" for c in SHOWN]
        cells.append(f"{r['wall']:.0f} / {p.get('wall', 0):.0f}")
        lines.append('| ' + ' | '.join(cells) + ' |')
    a, b = outcomes(args.celeriac_run), outcomes(args.python_run)
    files = {n.split('::', 1)[0] for n in a}
    diff = sorted(n for n in set(a) | set(b) if n.split('::', 1)[0] in files and a.get(n) != b.get(n))
    text = '\n'.join(lines) + '\n\n'
    if diff:
        text += 'Items whose outcome differs (Celeriac / Python):\n\n'
        text += ''.join(f"- `{n}`: {a.get(n, 'not run')} / {b.get(n, 'not run')}\n" for n in diff)
    else:
        text += 'Every item has the same outcome with both workers.\n'
    if args.md:
        with open(args.md, 'w', encoding='utf-8') as fh:
            fh.write(text)
    sys.stdout.write(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
