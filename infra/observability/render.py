"""Renders a config template: ``${NAME}`` placeholders from the environment.

Usage: python render.py TEMPLATE OUTPUT
A placeholder without a value is an error (string.Template.substitute), so a
config is never written with a hole in it; ``$$`` writes a literal ``$``.
Standard library only: infra/local/observability.sh runs it before anything else
is known to be installed, and the tests render the same templates through it.
"""

from __future__ import annotations

import os
import string
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: render.py TEMPLATE OUTPUT", file=sys.stderr)
        return 2
    template = string.Template(Path(argv[1]).read_text())
    try:
        text = template.substitute(os.environ)
    except KeyError as e:
        print(f"render.py: {argv[1]} needs the variable {e.args[0]}", file=sys.stderr)
        return 1
    Path(argv[2]).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
