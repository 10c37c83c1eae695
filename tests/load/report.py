#!/usr/bin/env python3
"""Markdown tables from tests/load/bench.sh's results.tsv.

Per target: the median over rounds of requests/s, p50 and p99, the ratio of
the median requests/s to nginx's median *from the same run* (SSE targets are
compared with sse-nginx, fixed-rate runs with the direct upstream), the
gateway's RSS after its last round, and Redis calls per request.
"""

import csv
import statistics
import sys
from collections import OrderedDict


def main(path: str) -> None:
    rows = OrderedDict()
    with open(path, newline="") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            rows.setdefault(r["target"], []).append(r)

    def med(name: str, field: str) -> float:
        vals = [float(r[field]) for r in rows.get(name, []) if r.get(field) not in ("", None)]
        return statistics.median(vals) if vals else 0.0

    def base_of(name: str) -> str:
        if name.startswith("sse-"):
            return "sse-nginx"
        return "nginx"

    def fmt_us(us: float) -> str:
        return f"{us / 1000:.2f} ms"

    throughput = [n for n in rows if not n.startswith("halfload-")]
    halfload = [n for n in rows if n.startswith("halfload-")]

    print("| target | req/s (median) | rounds | p50 | p99 | vs nginx | proxy CPU/req | non-2xx | RSS | Redis scripts/req | Redis cmds/req | redis-server CPU/req | Postgres xacts/req | Postgres CPU/req |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in throughput:
        rs = rows[n]
        rps = med(n, "rps")
        base = med(base_of(n), "rps")
        ratio = f"{rps / base:.2f}x" if base else "-"
        rounds = " / ".join(f"{float(r['rps']):.0f}" for r in rs)
        non2xx = sum(int(r["non2xx"] or 0) + int(r["sock_err"] or 0) for r in rs)
        rss = int(rs[-1]["rss_kb"] or 0)
        rss_s = f"{rss / 1024:.0f} MiB" if rss else "-"
        scripts = rs[-1]["redis_scripts_per_req"] or "-"
        cmds = rs[-1]["redis_cmds_per_req"] or "-"
        cpu_v = med(n, "cpu_us_per_req")
        cpu = f"{cpu_v:.0f} µs" if cpu_v else "-"
        rcpu_v = med(n, "redis_cpu_us_per_req")
        rcpu = f"{rcpu_v:.0f} µs" if rcpu_v else "-"
        pg = rs[-1].get("pg_xacts_per_req") or "-"
        pcpu_v = med(n, "pg_cpu_us_per_req")
        pcpu = f"{pcpu_v:.0f} µs" if pcpu_v else "-"
        print(
            f"| {n} | {rps:.0f} | {rounds} | {fmt_us(med(n, 'p50_us'))} | {fmt_us(med(n, 'p99_us'))} "
            f"| {ratio} | {cpu} | {non2xx} | {rss_s} | {scripts} | {cmds} | {rcpu} | {pg} | {pcpu} |"
        )

    if halfload:
        print()
        print("Fixed rate (half of plangate-redis' max), p99 added over the direct upstream:")
        print()
        print("| target | req/s (median) | p50 | p99 | p99 added vs direct |")
        print("|---|---:|---:|---:|---:|")
        direct_p99 = med("halfload-direct", "p99_us")
        for n in halfload:
            p99 = med(n, "p99_us")
            print(
                f"| {n} | {med(n, 'rps'):.0f} | {fmt_us(med(n, 'p50_us'))} | {fmt_us(p99)} "
                f"| {fmt_us(p99 - direct_p99)} |"
            )


if __name__ == "__main__":
    main(sys.argv[1])
