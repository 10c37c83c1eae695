#!/usr/bin/env python3
"""Redis time of the gateway's attempt and end scripts, per request.

    tests/load/script_cost.py                      # plain and credits, 5 rounds
    tests/load/script_cost.py --rounds 7 --pairs 30000
    tests/load/script_cost.py --source /tmp/variant.rs   # a changed copy

Starts a private redis-server (port 16401 unless --port), loads the scripts
from gateway/src/limiter/redis.rs (or --source: try a variant without
building the gateway), and replays request lifecycles shaped like the ones
tests/load/bench.sh sends for its plan (gpt-bench: two request windows and
a token window; with credits, 1 credit at admission and 1 per-unit credit
at the end), with 50 requests in flight: the attempt of request i, then the
end of request i - 50. The figure is `INFO commandstats`' EVALSHA time per
request (attempt + end): the script's own cost inside Redis, without the
network or the gateway, so that a change to a script is measured in
seconds, not in a 10-minute load run. Rounds alternate between the kinds;
the median is printed (a 2-core box shared with other work varies by
+-1.5 us from run to run).

Needs redis-server and redis-cli (tests/load/bench.sh installs them).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ACCOUNT = "pg:{bench-one}"
BLOCK = "qb_bench"
IN_FLIGHT = 50
BIG = "1000000000000"
GRACE = "3600000"
INSTANCE = "dffa2a4c5d922a65"


def lua(source, name):
    m = re.search(r"const " + name + r': &str = r#"(.*?)"#;', source, re.S)
    if not m:
        sys.exit(f"{name} not found in the source")
    return m.group(1)


def resp(args):
    out = [f"*{len(args)}\r\n"]
    for a in args:
        out.append(f"${len(a.encode())}\r\n{a}\r\n")
    return "".join(out)


class Redis:
    def __init__(self, port):
        self.port = str(port)

    def __call__(self, *args, stdin=None):
        r = subprocess.run(["redis-cli", "-p", self.port, *args], input=stdin,
                           capture_output=True, text=True, check=True)
        return r.stdout.strip()

    def pipe(self, data):
        subprocess.run(["redis-cli", "-p", self.port, "--pipe"], input=data,
                       capture_output=True, text=True, check=True)


def lifecycle(kind, i, now, sha):
    """The attempt and the end of request i, as the gateway sends them."""
    endpoint = "gpt-bench-credits" if kind == "credits" else "gpt-bench"
    base = f"{ACCOUNT}:{endpoint}"
    rid = f"req_{kind[0]}{i}"
    minute, day = now // 60_000, now // 86_400_000
    ttl60 = str((minute + 1) * 60_000 - now + 5_000)
    ttl_day = str((day + 1) * 86_400_000 - now + 5_000)
    keys = [f"{base}:f", f"{base}:w:60:request:{minute}",
            f"{base}:w:86400:request:{day}", f"{base}:w:60:token:{minute}"]
    args = [str(now), rid, "0", str(now + 60_000), "5000", GRACE,
            BIG, "1", ttl60, BIG, "1", ttl_day, BIG, "0", ttl60]
    if kind == "credits":
        keys += [f"{ACCOUNT}/w", f"{ACCOUNT}/o", f"{ACCOUNT}/a"]
        args += ["1", "1", endpoint, INSTANCE]
    attempt = ["EVALSHA", sha["attempt"], str(len(keys))] + keys + args
    usage = ('{"request_id":"%s","account_id":"bench-one","key_id":"key_9b564cf61b70271b",'
             '"endpoint":"%s","route":"/v1/chat/completions","units":[{"unit":"token",'
             '"measured":21,"reserved":0}],"credits":%d,"status":200,"degraded":false,'
             '"streamed":false,"cut_short":false,"started_at":"2026-12-08T01:55:26.481Z",'
             '"ended_at":"2026-12-08T01:55:26.481Z"}') % (rid, endpoint, 1 if kind == "credits" else 0)
    tok = f"{base}:w:60:token:{minute}"
    end_keys = [f"{base}:f", tok, tok, f"{ACCOUNT}/w", f"{ACCOUNT}/o", f"{ACCOUNT}/a"]
    end_args = [str(now), rid, GRACE, "21", "0", ttl60]
    if kind == "credits":
        end_args += ["1", "0", endpoint, usage, f"1|{BLOCK}=1"]
    else:
        end_args += ["0", "0", endpoint, usage, ""]
    end = ["EVALSHA", sha["end"], str(len(end_keys))] + end_keys + end_args
    return attempt, end


def run(redis, kind, pairs, sha):
    redis("flushall")
    redis("hset", f"{ACCOUNT}/w", "#v", "1", f"b:{BLOCK}", "999999999992:0:1")
    now = int(time.time() * 1000)
    calls = []
    ends = []
    for i in range(pairs + IN_FLIGHT):
        if i < pairs:
            attempt, end = lifecycle(kind, i, now, sha)
            calls.append(resp(attempt))
            ends.append(end)
        if i >= IN_FLIGHT:
            calls.append(resp(ends[i - IN_FLIGHT]))
        if i % 200 == 0:
            # The outbox writer acknowledges what it wrote.
            calls.append(resp(["XTRIM", f"{ACCOUNT}/o", "MAXLEN", "0"]))
    redis("config", "resetstat")
    redis.pipe("".join(calls))
    stats = redis("info", "commandstats")
    errors = redis("info", "errorstats")
    if "errorstat_" in errors:
        sys.exit(f"scripts failed: {errors}")
    m = re.search(r"cmdstat_evalsha:calls=(\d+),usec=(\d+)", stats)
    if not m or int(m.group(1)) != 2 * pairs:
        sys.exit(f"expected {2 * pairs} EVALSHA calls: {stats}")
    if kind == "credits":
        left = redis("hget", f"{ACCOUNT}/w", f"b:{BLOCK}").split(":")[0]
        if int(left) != 999999999992 - 2 * pairs:
            sys.exit(f"credits drawn wrongly: {left} left")
    return int(m.group(2)) / pairs


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=os.path.join(ROOT, "gateway/src/limiter/redis.rs"))
    p.add_argument("--port", type=int, default=16401)
    p.add_argument("--pairs", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--kinds", default="plain,credits")
    a = p.parse_args()
    source = open(a.source).read()
    wallet = lua(source, "WALLET_LUA")
    scripts = {"attempt": wallet + lua(source, "ATTEMPT_LUA"), "end": wallet + lua(source, "END_LUA")}
    server = subprocess.Popen(["redis-server", "--port", str(a.port), "--save", "",
                               "--appendonly", "no", "--bind", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    redis = Redis(a.port)
    try:
        for _ in range(50):
            try:
                if redis("ping") == "PONG":
                    break
            except subprocess.CalledProcessError:
                pass
            time.sleep(0.1)
        sha = {k: redis("-x", "script", "load", stdin=v) for k, v in scripts.items()}
        kinds = a.kinds.split(",")
        got = {k: [] for k in kinds}
        for _ in range(a.rounds):
            for k in kinds:
                got[k].append(run(redis, k, a.pairs, sha))
        print(f"EVALSHA time per request (attempt + end), {a.pairs} requests x {a.rounds} rounds, "
              f"{IN_FLIGHT} in flight; {os.path.relpath(a.source, ROOT)}")
        for k in kinds:
            runs = " / ".join(f"{x:.1f}" for x in got[k])
            print(f"  {k:8} median {statistics.median(got[k]):5.1f} us   ({runs})")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
