"""Run benchmark sections and merge their figures into bench/results/latest.json.

Sections measure side by side in one run; the machine is shared and noisy, so
each figure is the median of several runs, with the runs kept beside it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from bench import accept, backup, ceiling, edge, failover
from bench.results_file import RESULTS, merge
from tests.support.stack import Stack

Section = Callable[[Stack], tuple[dict[str, Any], dict[str, Any]]]
SECTIONS: dict[str, Section] = {
    "accept": accept.run,
    "ceiling": ceiling.run,
    "failover": failover.run,
    "edge": edge.run,
    "backup": backup.run,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", choices=sorted(SECTIONS), help="run one section")
    args = parser.parse_args(argv)
    stack = Stack()
    for name in [args.only] if args.only else sorted(SECTIONS):
        print(f"bench section {name}", flush=True)
        figures, parameters = SECTIONS[name](stack)
        merge(name, figures, parameters)
        for key, value in figures.items():
            print(f"  {name}.{key} = {value}")
    print(f"results in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
