"""``python -m bench.simulator``: see ``bench.simulator.cli``."""

from __future__ import annotations

import sys

from bench.simulator.cli import main

if __name__ == "__main__":
    sys.exit(main())
