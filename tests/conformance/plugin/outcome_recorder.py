"""pytest plugin: append one JSON line per test report to a file.

The file is named by the environment variable ``CONFORMANCE_RECORD`` (nothing
is written when it is unset). Each line is an object with:

  nodeid    the item's node id
  when      "setup", "call" or "teardown" ("collect" for a failed collection)
  outcome   "passed", "failed" or "skipped"
  wasxfail  the xfail reason when the report is an xfail/xpass, else null
  duration  seconds spent in that phase
  subtest   for a subtest report, its message and parameters; else null

Reports are only recorded, never changed, so loading this plugin does not
alter any outcome.
"""
import json
import os

import pytest

_PATH = os.environ.get('CONFORMANCE_RECORD')


def _write(obj):
    if not _PATH:
        return
    with open(_PATH, 'a', encoding='utf-8') as fh:
        fh.write(json.dumps(obj, default=str) + '\n')


def _subtest(report):
    # pytest >= 9 reports subtests with a SubtestReport carrying .context.
    ctx = getattr(report, 'context', None)
    if ctx is None:
        return None
    return {
        'msg': getattr(ctx, 'msg', None),
        'kwargs': dict(getattr(ctx, 'kwargs', None) or {}),
    }


# trylast: pytest's subtests support turns a passed top-level call into "failed"
# when one of its subtests failed; run after that so the recorded outcome agrees.
@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    _write({
        'nodeid': report.nodeid,
        'when': report.when,
        'outcome': report.outcome,
        'wasxfail': getattr(report, 'wasxfail', None),
        'duration': round(getattr(report, 'duration', 0.0) or 0.0, 3),
        'subtest': _subtest(report),
    })


def pytest_collectreport(report):
    if report.failed:
        _write({
            'nodeid': report.nodeid,
            'when': 'collect',
            'outcome': report.outcome,
            'wasxfail': None,
            'duration': 0.0,
            'subtest': None,
        })
