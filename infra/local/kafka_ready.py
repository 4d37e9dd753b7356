"""Exit 0 when the Kafka broker answers and lists itself in the cluster metadata.

An open port is not enough: a KRaft broker accepts connections before it has
registered with the controller, and topic creation fails until it has.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from aiokafka.admin import AIOKafkaAdminClient


async def broker_ready(bootstrap: str, timeout: float) -> bool:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000)
    )
    try:
        async with asyncio.timeout(timeout):
            await admin.start()
            cluster = await admin.describe_cluster()
            return bool(cluster["brokers"])
    except Exception:  # noqa: BLE001 - any failure only means "not ready yet"
        return False
    finally:
        await admin.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    return 0 if asyncio.run(broker_ready(args.bootstrap, args.timeout)) else 1


if __name__ == "__main__":
    sys.exit(main())
