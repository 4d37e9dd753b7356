"""``python -m bench.operator_demo``: an operator who keeps changing desired state.

Used by ``make run`` so commands visibly flow: every ``--interval`` seconds it
sets a new desired state (new versions, sometimes a resource added or removed)
for each simulated environment through the operator edge.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import ssl
import sys
import time
from pathlib import Path

import aiohttp


def desired_resources(revision: int, rng: random.Random) -> list[dict[str, str]]:
    resources = [
        {"kind": "deployment", "name": f"app-{i}", "version": f"1.{revision % 1000}.{i}"}
        for i in range(3)
    ]
    if rng.random() < 0.5:
        resources.append({"kind": "job", "name": "migrate", "version": f"2.{revision % 1000}.0"})
    return resources


async def run(args: argparse.Namespace) -> int:
    context = ssl.create_default_context(cafile=str(Path(args.pki_dir) / "root-ca.pem"))
    rng = random.Random(args.seed)
    # Revisions must only grow, also across restarts of this demo.
    revision = int(time.time())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    headers = {"Authorization": f"Bearer {args.key}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        while not stop.is_set():
            revision += 1
            for c in range(args.customers):
                for e in range(args.environments_per_customer):
                    url = (
                        f"{args.operator_url}/v1/operator/customers/cust-{c}"
                        f"/environments/env-{e}/desired-state"
                    )
                    body = {"revision": revision, "resources": desired_resources(revision, rng)}
                    try:
                        async with session.put(url, json=body, headers=headers) as reply:
                            if reply.status != 202:
                                print(f"operator: {url} -> {reply.status} {await reply.text()}")
                    except aiohttp.ClientError as e:
                        print(f"operator: {url}: {e}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.interval)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.operator_demo", description=__doc__)
    parser.add_argument("--key", required=True, help="operator key (fpk_...)")
    parser.add_argument("--operator-url", default="https://127.0.0.1:18444")
    parser.add_argument("--pki-dir", default=".run/pki")
    parser.add_argument("--customers", type=int, default=4)
    parser.add_argument("--environments-per-customer", type=int, default=2)
    parser.add_argument("--interval", type=float, default=20.0, help="seconds between changes")
    parser.add_argument("--seed", type=int, default=1)
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
