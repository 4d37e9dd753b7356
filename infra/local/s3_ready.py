"""Exit 0 once the S3 server answers and the backup bucket exists (creating it).

Used by infra/local/s3.sh after starting the server; reads FLEETPLANE_S3_*.
"""

from __future__ import annotations

import argparse
import sys

from services.backup.settings import S3Settings
from services.backup.storage import S3Storage, StorageError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    settings = S3Settings(
        connect_timeout_s=args.timeout, read_timeout_s=args.timeout, max_attempts=1
    )
    storage = S3Storage(settings)
    try:
        storage.ensure_bucket()
    except StorageError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
