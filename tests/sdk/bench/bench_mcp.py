"""`run_command` through `alcove mcp` (stdio, the official `mcp` client) vs the SDK's
`commands.run`, on one warm base sandbox, interleaved in one process: medians, p90 and their
ratio. Also the same tool call over `/mcp` (Streamable HTTP). Asserts nothing.

  tests/sdk/bench.sh mcp -n 50          (starts a server, sets E2B_* and ALCOVE_BIN)
"""

import asyncio
import json
import os
import statistics
import time

import httpx2
from e2b import Sandbox
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client


def pct(xs, p):
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def row(name, xs):
    ms = [x * 1000 for x in xs]
    return {"name": name, "n": len(ms), "p50_ms": round(statistics.median(ms), 2),
            "p90_ms": round(pct(ms, 90), 2), "min_ms": round(min(ms), 2), "max_ms": round(max(ms), 2)}


async def measure(n, command):
    sbx = Sandbox.create("base", timeout=900)
    sdk, stdio, http = [], [], []
    params = StdioServerParameters(
        command=os.environ["ALCOVE_BIN"], args=["mcp"],
        env={k: os.environ[k] for k in ("E2B_API_URL", "E2B_API_KEY", "PATH")},
    )
    url = os.environ["E2B_API_URL"].rstrip("/") + "/mcp"
    try:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as s1, \
                httpx2.AsyncClient(headers={"X-API-KEY": os.environ["E2B_API_KEY"]}, timeout=60) as hc, \
                streamable_http_client(url, http_client=hc) as (r2, w2), ClientSession(r2, w2) as s2:
            await s1.initialize()
            await s2.initialize()
            args = {"sandboxId": sbx.sandbox_id, "command": command}
            for _ in range(3):  # warm every path (connections, the server's token cache)
                sbx.commands.run(command)
                await s1.call_tool("run_command", args)
                await s2.call_tool("run_command", args)
            for _ in range(n):  # interleaved, so drift hits all three alike
                t = time.perf_counter()
                sbx.commands.run(command)
                sdk.append(time.perf_counter() - t)
                t = time.perf_counter()
                r = await s1.call_tool("run_command", args)
                stdio.append(time.perf_counter() - t)
                assert not r.is_error, r
                t = time.perf_counter()
                r = await s2.call_tool("run_command", args)
                http.append(time.perf_counter() - t)
                assert not r.is_error, r
    finally:
        sbx.kill()
    return sdk, stdio, http


def bench_mcp(n, command="echo ok"):
    sdk, stdio, http = asyncio.run(measure(n, command))
    a, b, c = row("sdk_commands_run", sdk), row("mcp_stdio_run_command", stdio), row("mcp_http_run_command", http)
    for r in (a, b, c):
        print(json.dumps(r), flush=True)
    print(json.dumps({
        "name": "mcp_vs_sdk_ratio",
        "stdio_p50": round(b["p50_ms"] / a["p50_ms"], 2), "stdio_p90": round(b["p90_ms"] / a["p90_ms"], 2),
        "http_p50": round(c["p50_ms"] / a["p50_ms"], 2), "http_p90": round(c["p90_ms"] / a["p90_ms"], 2),
    }), flush=True)


if __name__ == "__main__":
    import sys
    bench_mcp(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
