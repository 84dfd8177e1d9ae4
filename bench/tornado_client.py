"""Tornado's AsyncHTTPClient as a load generator for bench/run_client.sh: CONCURRENCY coroutines,
each awaiting one fetch after another, for WARMUP then SECONDS, with the simple client or the
curl client (pycurl). Prints one JSON line like examples/fetch_bench (CPU: this process's user +
system time over the measured window).

usage: python3 tornado_client.py simple|curl URL [CONCURRENCY] [SECONDS] [WARMUP]
"""

import asyncio
import json
import os
import sys
import time

from tornado.httpclient import AsyncHTTPClient


def cpu_seconds():
    t = os.times()
    return t.user + t.system


async def main(impl, url, concurrency, seconds, warmup):
    if impl == "curl":
        AsyncHTTPClient.configure("tornado.curl_httpclient.CurlAsyncHTTPClient",
                                  max_clients=concurrency)
    else:
        AsyncHTTPClient.configure(None, max_clients=concurrency)
    client = AsyncHTTPClient()
    warm_end = time.monotonic() + warmup
    stop_at = warm_end + seconds
    state = {"measuring": False, "fetches": 0, "errors": 0, "non_2xx": 0, "start": 0.0,
             "cpu": 0.0, "first_error": None}

    async def loop():
        while True:
            now = time.monotonic()
            if not state["measuring"] and now >= warm_end:
                state.update(measuring=True, start=now, cpu=cpu_seconds())
            if now >= stop_at:
                return
            try:
                response = await client.fetch(url, raise_error=False)
                if state["measuring"]:
                    state["fetches"] += 1
                    if response.code // 100 != 2:
                        state["non_2xx"] += 1
            except Exception as error:  # noqa: BLE001 - counted and reported
                if state["measuring"]:
                    state["errors"] += 1
                state["first_error"] = state["first_error"] or repr(error)

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.monotonic() - state["start"]
    cpu = cpu_seconds() - state["cpu"]
    fetches = state["fetches"]
    print(json.dumps({
        "fetches": fetches, "errors": state["errors"], "non_2xx": state["non_2xx"],
        "seconds": round(elapsed, 3), "fetches_per_s": round(fetches / elapsed),
        "cpu_us_per_fetch": round(cpu * 1e6 / max(fetches, 1), 2), "concurrency": concurrency,
    }), flush=True)
    if state["first_error"]:
        print(f"first error: {state['first_error']}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("simple", "curl"):
        sys.exit(__doc__)
    args = sys.argv[2:]
    asyncio.run(main(sys.argv[1], args[0], int(args[1]) if len(args) > 1 else 100,
                     float(args[2]) if len(args) > 2 else 10.0,
                     float(args[3]) if len(args) > 3 else 1.0))
