#!/usr/bin/env python3
"""Instructions per request from a callgrind dump (tests/load/profile.sh).

    cgreport.py DUMP REQUESTS [N] [PATTERN]

Prints the total instructions (Ir) per request, the N functions with the
most self cost, and the N functions matching PATTERN (a regex, default
"plangate") with the most inclusive cost. callgrind_annotate chokes on some
Rust symbol names; this reads the format directly.
"""

import collections
import re
import sys


def parse(path):
    names = {}
    self_cost = collections.Counter()
    call_cost = collections.Counter()
    cur = cfn = None
    pending_call = False
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("fn="):
                m = re.match(r"fn=\((\d+)\)(?: (.*))?", line)
                if m.group(2):
                    names[m.group(1)] = m.group(2)
                cur = names.get(m.group(1), m.group(1))
            elif line.startswith("cfn="):
                m = re.match(r"cfn=\((\d+)\)(?: (.*))?", line)
                if m.group(2):
                    names[m.group(1)] = m.group(2)
                cfn = names.get(m.group(1), m.group(1))
            elif line.startswith("calls="):
                pending_call = True
            elif line and (line[0].isdigit() or line[0] in "+-*"):
                parts = line.split()
                if len(parts) < 2:
                    continue
                cost = int(parts[1])
                if pending_call:
                    call_cost[(cur, cfn)] += cost
                    pending_call = False
                else:
                    self_cost[cur] += cost
    return self_cost, call_cost


def main():
    path, reqs = sys.argv[1], int(sys.argv[2])
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 25
    pattern = sys.argv[4] if len(sys.argv) > 4 else "plangate"
    self_cost, call_cost = parse(path)
    total = sum(self_cost.values())
    print(f"Ir per request: {total / reqs:,.0f} ({reqs} requests)")
    print(f"\ntop {n} by self cost (Ir/request):")
    for name, v in self_cost.most_common(n):
        print(f"{v / reqs:10,.0f}  {100 * v / total:5.1f}%  {name[:140]}")
    incl = collections.Counter(self_cost)
    for (caller, callee), v in call_cost.items():
        if caller != callee:
            incl[caller] += v
    print(f"\ntop {n} matching /{pattern}/ by inclusive cost (Ir/request):")
    rows = sorted(((v, k) for k, v in incl.items() if k and re.search(pattern, k)), reverse=True)
    for v, name in rows[:n]:
        print(f"{v / reqs:10,.0f}  self {self_cost[name] / reqs:8,.0f}  {name[:140]}")


if __name__ == "__main__":
    main()
