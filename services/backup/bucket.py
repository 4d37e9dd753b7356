"""``python -m services.backup.bucket``: exit 0 once the S3 server answers and the
backup bucket exists, creating it if needed.

Run by infra/local/s3.sh after starting the server, and by compose's ``s3-init``
step; reads FLEETPLANE_S3_*.
"""

from __future__ import annotations

import argparse
import sys

from services.backup.settings import S3Settings
from services.backup.storage import S3Storage, StorageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.backup.bucket", description=__doc__)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    args = parser.parse_args(argv)
    settings = S3Settings(
        connect_timeout_s=args.timeout, read_timeout_s=args.timeout, max_attempts=1
    )
    try:
        S3Storage(settings).ensure_bucket()
    except StorageError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
