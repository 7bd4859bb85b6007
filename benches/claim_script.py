"""Redis-side cost of the broker's claim, per message, in isolation.

    target/interop-venv/bin/python benches/claim_script.py [--db 12]

Fills a queue with 50,000 kombu envelopes and claims them 100 at a time as the broker does:
the TAKE script from crates/celeriac/src/broker/redis/scripts.rs moves them into a holding
list, then one MULTI records kombu's `unacked` entries and this node's claims and trims the
holding list. Prints the server's own time per message (INFO commandstats: the script and
each command). Flushes the DB it uses.
"""
import os, re
import redis, time, json, base64, uuid, sys
HERE = os.path.dirname(os.path.abspath(__file__))
DB = int(sys.argv[sys.argv.index('--db') + 1]) if '--db' in sys.argv else 12
r = redis.Redis(db=DB)
_src = open(os.path.join(HERE, '..', 'crates', 'celeriac', 'src', 'broker', 'redis', 'scripts.rs')).read()
take = re.search(r'pub\(super\) const TAKE: &str = r#"(.*?)"#;', _src, re.S).group(1)
sha = r.script_load(take)

def env():
    body = base64.b64encode(json.dumps([[], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]).encode()).decode()
    return json.dumps({"body": body, "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"lang": "py", "task": "celeriac.bench.noop", "id": str(uuid.uuid4()), "shadow": None, "eta": None, "expires": None, "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": str(uuid.uuid4()), "parent_id": None, "argsrepr": "()", "kwargsrepr": "{}", "origin": "gen1@vm", "ignore_result": True},
        "properties": {"correlation_id": str(uuid.uuid4()), "reply_to": str(uuid.uuid4()), "delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 0, "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())}})
N = 50000
r.flushdb()
p = r.pipeline(transaction=False)
for i in range(N):
    p.lpush('celery', env())
    if i % 1000 == 0: p.execute()
p.execute()
print('envelope bytes', len(env()))
r.config_resetstat()
keys = []
for q in ['celery', 'celery\x06\x163', 'celery\x06\x166', 'celery\x06\x169']:
    keys += ['inflight:' + q, q]
t = time.time(); got = 0
while got < N:
    out = r.evalsha(sha, len(keys), *keys, 100)
    if not out: break
    p = r.pipeline(transaction=True)
    now = '%.6f' % time.time()
    i = 0
    while i < len(out):
        pair, k = int(out[i]), int(out[i + 1])
        msgs = out[i + 2:i + 2 + k]
        i += 2 + k
        entries, scores, claims = [], [], []
        for m in msgs:
            props = json.loads(m)['properties']
            tag, info = props['delivery_tag'], props['delivery_info']
            entries += [tag, b'[' + m + (', %s, %s]' % (json.dumps(info['exchange']), json.dumps(info['routing_key']))).encode()]
            scores += [now, tag]
            claims += [tag, now]
        p.execute_command('HSET', 'unacked', *entries)
        p.execute_command('ZADD', 'unacked_index', *scores)
        p.execute_command('HSET', 'claims', *claims)
        p.execute_command('LTRIM', keys[2 * pair - 2], 0, -k - 1)
        got += k
    p.execute()
el = time.time() - t
st = r.info('commandstats')
# The commands inside the script and the MULTI are counted in evalsha and exec too.
total = sum(st.get(k, {}).get('usec', 0) for k in ('cmdstat_evalsha', 'cmdstat_multi', 'cmdstat_exec'))
parts = {k[8:]: round(v['usec'] / got, 2) for k, v in st.items() if v['usec'] / got >= 0.01 and k != 'cmdstat_flushdb'}
print('claimed', got, 'wall %.2fs' % el, 'server usec/msg %.2f' % (total / got), parts)
assert r.hlen('unacked') == N and r.zcard('unacked_index') == N, 'not every message recorded'
assert not any(r.exists(k) for k in keys), 'holding lists or queues not empty'
