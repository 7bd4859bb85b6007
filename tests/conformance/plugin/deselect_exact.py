"""pytest plugin: deselect the node ids listed in a file, by exact match.

pytest's own ``--deselect`` compares by prefix, so ``...::test_report`` would
also drop ``...::test_report_with_multiserver_result_backend``. This plugin
compares ``item.nodeid`` for equality instead.

The file is given with ``--deselect-exact FILE`` or the environment variable
``CONFORMANCE_DESELECT_FILE``. One node id per line; anything from ``#`` to the
end of a line is a comment; blank lines are ignored. Deselected items are
reported through the standard ``pytest_deselected`` hook, so the summary line
shows "N deselected".
"""
import os

import pytest

_DROPPED = pytest.StashKey[int]()


def pytest_addoption(parser):
    group = parser.getgroup('conformance')
    group.addoption(
        '--deselect-exact',
        action='store',
        default=None,
        metavar='FILE',
        help='deselect the node ids listed in FILE (exact match on item.nodeid)',
    )


def _read_ids(path):
    ids = set()
    with open(path, encoding='utf-8') as fh:
        for line in fh:
            entry = line.split('#', 1)[0].strip()
            if entry:
                ids.add(entry)
    return ids


def pytest_collection_modifyitems(session, config, items):
    path = config.getoption('deselect_exact') or os.environ.get('CONFORMANCE_DESELECT_FILE')
    if not path:
        return
    wanted = _read_ids(path)
    keep, drop = [], []
    for item in items:
        (drop if item.nodeid in wanted else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    config.stash[_DROPPED] = len(drop)


def pytest_report_header(config):
    path = config.getoption('deselect_exact') or os.environ.get('CONFORMANCE_DESELECT_FILE')
    if path:
        return f'deselect_exact: {path}'
    return None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    dropped = config.stash.get(_DROPPED, None)
    if dropped is not None:
        terminalreporter.write_line(f'deselect_exact: {dropped} item(s) deselected by exact node id')

