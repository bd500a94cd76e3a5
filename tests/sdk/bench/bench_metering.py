"""Command latency on two servers that differ only in their flags (metering tick, run traces),
in one run.

Two servers (tests/sdk/bench/metering.sh starts them, A_FLAGS and B_FLAGS); one
`base` sandbox on each, `true` run through the official SDK on A and B in turn, N times after a
warm-up. Prints p50/p90 of each and the ratios A/B (JSON on the last line).
"""

import json
import os
import statistics
import sys
import time

from e2b import Sandbox


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, round(p / 100 * (len(v) - 1)))]


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    a = Sandbox.create("base", timeout=600, api_key=os.environ["A_KEY"],
                       api_url=os.environ["A_URL"], sandbox_url=os.environ["A_URL"])
    b = Sandbox.create("base", timeout=600, api_key=os.environ["B_KEY"],
                       api_url=os.environ["B_URL"], sandbox_url=os.environ["B_URL"])
    try:
        times = {"a": [], "b": []}
        for i in range(n + 5):
            for name, s in (("a", a), ("b", b)) if i % 2 == 0 else (("b", b), ("a", a)):
                t = time.perf_counter()
                s.commands.run("true")
                if i >= 5:
                    times[name].append((time.perf_counter() - t) * 1000)
        out = {}
        for name in ("a", "b"):
            out[name] = {"n": len(times[name]), "p50": pct(times[name], 50), "p90": pct(times[name], 90),
                         "mean": statistics.mean(times[name])}
            print(f"{name}: p50 {out[name]['p50']:.1f} ms  p90 {out[name]['p90']:.1f} ms")
        out["ratio_p50"] = out["a"]["p50"] / out["b"]["p50"]
        out["ratio_p90"] = out["a"]["p90"] / out["b"]["p90"]
        print(f"A/B p50 {out['ratio_p50']:.3f}  p90 {out['ratio_p90']:.3f}")
        print(json.dumps(out))
    finally:
        a.kill()
        b.kill()


main()
