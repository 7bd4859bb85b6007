"""Turn the outcome recorder's JSON lines into the conformance table.

Used by run.sh; it can also be pointed at an old run directory:

    python summarize.py RUN_DIR [--title TEXT] [--md OUT.md] [--min-passed file=N,...]

RUN_DIR holds files.tsv (one line per test file: file, tag, pytest exit code, wall seconds,
worker note), record-<tag>.jsonl (plugin/outcome_recorder.py) and pytest-<tag>.log.

How items are counted (the same way pytest counts them):
  * an item is one collected test (each parametrized case once); deselected items are not
    items, they are counted in their own column;
  * setup failed -> error; setup skipped -> skipped (xfail if it carries wasxfail);
  * otherwise the call decides: passed / failed / skipped, xfail (skipped + wasxfail) or
    xpass (passed + wasxfail); an item with a failed subtest counts as failed;
  * a failed teardown adds an error on top of the item's call outcome.
Exit status: 0, or 1 when a --min-passed threshold is not met.
"""
import argparse
import json
import os
import re
import sys
from collections import OrderedDict

COLUMNS = ('items', 'passed', 'failed', 'error', 'skipped', 'xfail', 'xpass')


def read_records(path):
    items = OrderedDict()  # nodeid -> {'setup':rep, 'call':rep, 'teardown':rep, 'sub':[..]}
    collect_errors = []
    if not os.path.exists(path):
        return items, collect_errors
    with open(path, encoding='utf-8') as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get('when') == 'collect':
                collect_errors.append(rec['nodeid'])
                continue
            slot = items.setdefault(rec['nodeid'], {'sub': []})
            if rec.get('subtest') is not None:
                slot['sub'].append(rec)
            else:
                slot[rec['when']] = rec
    return items, collect_errors


def classify(slot):
    """Return (primary outcome or None, list of error phases, subtests passed, failed)."""
    errors = []
    primary = None
    setup = slot.get('setup')
    call = slot.get('call')
    teardown = slot.get('teardown')
    sub_pass = sum(1 for r in slot['sub'] if r['outcome'] == 'passed')
    sub_fail = sum(1 for r in slot['sub'] if r['outcome'] == 'failed')
    if setup is not None and setup['outcome'] == 'failed':
        errors.append('setup')
    elif setup is not None and setup['outcome'] == 'skipped':
        primary = 'xfail' if setup.get('wasxfail') is not None else 'skipped'
    elif call is not None:
        out = call['outcome']
        if out == 'failed':
            primary = 'failed'
        elif out == 'skipped':
            primary = 'xfail' if call.get('wasxfail') is not None else 'skipped'
        elif call.get('wasxfail') is not None:
            primary = 'xpass'
        else:
            primary = 'passed'
        if sub_fail and primary == 'passed':
            primary = 'failed'
    elif setup is not None:
        # setup passed but no call report: the run was cut off (hang guard, crash).
        primary = 'failed'
    if teardown is not None and teardown['outcome'] == 'failed':
        errors.append('teardown')
    return primary, errors, sub_pass, sub_fail


def deselected_from_log(path):
    if not os.path.exists(path):
        return None
    last = None
    with open(path, encoding='utf-8', errors='replace') as fh:
        for line in fh:
            # plugin/deselect_exact.py prints "deselect_exact: N item(s) deselected ..." even
            # for N = 0; pytest's own summary line says "N deselected" only when N > 0.
            m = re.search(r'deselect_exact: (\d+) item', line) or re.search(r'(\d+) deselected', line)
            if m:
                last = int(m.group(1))
    return last


def summarize(run_dir):
    rows, problems = [], []
    with open(os.path.join(run_dir, 'files.tsv'), encoding='utf-8') as fh:
        for line in fh:
            parts = line.rstrip('\n').split('\t')
            if len(parts) < 5:
                continue
            fname, tag, rc, wall, note = parts[:5]
            items, collect_errors = read_records(os.path.join(run_dir, f'record-{tag}.jsonl'))
            counts = dict.fromkeys(COLUMNS, 0)
            sub_p = sub_f = 0
            for nodeid, slot in items.items():
                primary, errors, sp, sf = classify(slot)
                sub_p += sp
                sub_f += sf
                counts['items'] += 1
                if primary:
                    counts[primary] += 1
                counts['error'] += len(errors)
                if primary == 'failed':
                    problems.append((nodeid, 'failed'))
                for phase in errors:
                    problems.append((nodeid, f'error in {phase}'))
            for nodeid in collect_errors:
                counts['error'] += 1
                problems.append((nodeid, 'collection error'))
            rows.append({
                'file': fname, 'rc': rc, 'wall': float(wall or 0), 'note': note,
                'deselected': deselected_from_log(os.path.join(run_dir, f'pytest-{tag}.log')),
                'subtests': (sub_p, sub_f), **counts,
            })
    return rows, problems


def render(rows, problems, title):
    head = ['file', *COLUMNS, 'deselected', 'subtests pass/fail', 'wall time (s)', 'pytest exit', 'note']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    total = dict.fromkeys(COLUMNS, 0)
    tot_wall = 0.0
    tot_desel = 0
    tot_sub = [0, 0]
    for r in rows:
        for c in COLUMNS:
            total[c] += r[c]
        tot_wall += r['wall']
        tot_desel += r['deselected'] or 0
        tot_sub[0] += r['subtests'][0]
        tot_sub[1] += r['subtests'][1]
        lines.append('| ' + ' | '.join([
            r['file'], *(str(r[c]) for c in COLUMNS),
            '-' if r['deselected'] is None else str(r['deselected']),
            f"{r['subtests'][0]} / {r['subtests'][1]}",
            f"{r['wall']:.1f}", r['rc'], r['note'] or '',
        ]) + ' |')
    if len(rows) > 1:
        lines.append('| ' + ' | '.join([
            '**total**', *(str(total[c]) for c in COLUMNS), str(tot_desel),
            f'{tot_sub[0]} / {tot_sub[1]}', f'{tot_wall:.1f}', '', '',
        ]) + ' |')
    out = [f'## {title}', '', *lines, '']
    if problems:
        out += ['Failing node ids:', '']
        out += [f'- `{nodeid}` ({what})' for nodeid, what in problems]
    else:
        out += ['Failing node ids: none.']
    return '\n'.join(out) + '\n'


def check_min_passed(rows, spec):
    bad = []
    if not spec:
        return bad
    by_file = {r['file']: r for r in rows}
    for part in spec.split(','):
        part = part.strip()
        if not part:
            continue
        name, _, num = part.partition('=')
        name = os.path.basename(name.strip())
        if not name.endswith('.py'):
            name += '.py'
        want = int(num)
        got = by_file[name]['passed'] if name in by_file else 0
        if got < want:
            bad.append(f'{name}: {got} passed, fewer than the required {want}')
    return bad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('run_dir')
    ap.add_argument('--title', default='Conformance run')
    ap.add_argument('--preamble', default='', help='markdown put between title and table')
    ap.add_argument('--md', help='also write the report to this file')
    ap.add_argument('--min-passed', default='')
    args = ap.parse_args(argv)

    rows, problems = summarize(args.run_dir)
    text = render(rows, problems, args.title)
    if args.preamble:
        head, _, rest = text.partition('\n\n')
        text = f'{head}\n\n{args.preamble}\n\n{rest}'
    bad = check_min_passed(rows, args.min_passed)
    if bad:
        text += '\nBelow --min-passed:\n\n' + ''.join(f'- {b}\n' for b in bad)
    if args.md:
        with open(args.md, 'w', encoding='utf-8') as fh:
            fh.write(text)
    # The terminal gets the table (and the threshold verdict), not the whole id list.
    table = text.split('\nFailing node ids', 1)[0]
    sys.stdout.write(table.rstrip('\n') + '\n')
    n = len(problems)
    sys.stdout.write(f'\n{n} failing/erroring item(s) listed in {args.md}\n' if (n and args.md) else '')
    for b in bad:
        sys.stdout.write(f'BELOW --min-passed: {b}\n')
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
