"""Exit 0 when the Kafka broker answers and lists itself in the cluster metadata.

An open port is not enough: a KRaft broker accepts connections before it has
registered with the controller, and topic creation fails until it has.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from aiokafka.admin import AIOKafkaAdminClient


async def broker_ready(bootstrap: str, request_timeout_ms: int) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=request_timeout_ms)
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
        return bool(cluster["brokers"])
    except Exception:
        # Any failure only means "not ready yet"; the caller retries and owns the deadline.
        return False
    finally:
        await admin.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds for one attempt")
    args = parser.parse_args()
    attempt = broker_ready(args.bootstrap, int(args.timeout * 1000))
    try:
        ready = asyncio.run(asyncio.wait_for(attempt, args.timeout))
    except TimeoutError:
        ready = False
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
