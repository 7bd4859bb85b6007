"""Redis-side cost of the broker's CLAIM script, per message, in isolation.

    target/interop-venv/bin/python benches/claim_script.py [base|nosearch|noout|nowrite] [--db 12]

Fills a queue with 50,000 kombu envelopes, claims them 100 at a time with the script from
crates/celeriac/src/broker/redis/scripts.rs, and prints the server's own time per message
(INFO commandstats: the script, and the commands inside it). The variants cut one part of the
script out, to see what each costs. Flushes the DB it uses.
"""
import os, re
import redis, time, json, base64, uuid, sys
HERE = os.path.dirname(os.path.abspath(__file__))
DB = int(sys.argv[sys.argv.index('--db') + 1]) if '--db' in sys.argv else 12
r = redis.Redis(db=DB)
_src = open(os.path.join(HERE, '..', 'crates', 'celeriac', 'src', 'broker', 'redis', 'scripts.rs')).read()
claim = re.search(r'pub\(super\) const CLAIM: &str = r#"(.*?)"#;', _src, re.S).group(1)
ORIGINAL = claim
variant = sys.argv[1] if len(sys.argv) > 1 else 'base'
if variant == 'nosearch':
    # No tag and routing search: what finding them in the envelope text costs.
    claim = re.sub(r"local tag = field\(.*", "local tag = now .. ':' .. got", claim)
    claim = re.sub(r"local ex = field\(.*", "local ex = ''", claim)
    claim = re.sub(r"local rk = field\(.*", "local rk = queue", claim)
if variant == 'noout':
    claim = claim.replace("out[#out + 1] = m", "out[#out + 1] = ''")
if variant == 'nowrite':
    claim = claim.replace("if #hu > 0 then", "if false then")
sha = r.script_load(claim)
assert variant == 'base' or claim != ORIGINAL, 'variant not applied'

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
keys += ['unacked', 'unacked_index', 'claims']
t = time.time(); got = 0
while got < N:
    out = r.evalsha(sha, len(keys), *keys, 100, str(time.time()), 'celery', 'celery', 'celery', 'celery')
    got += len(out) // 3
    if not out: break
el = time.time() - t
st = r.info('commandstats')
print(variant, 'claimed', got, 'wall %.2fs' % el, 'evalsha usec/msg %.2f' % (st['cmdstat_evalsha']['usec'] / got),
      'inner', {k: round(v['usec'] / got, 2) for k, v in st.items() if k != 'cmdstat_evalsha'})
