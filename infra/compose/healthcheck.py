#!/usr/bin/env python3
"""Container health check: GET a URL; exit 0 on a 2xx answer, 1 on anything else.

The service image has no curl, so docker-compose.yml's health checks for the API
and the controllers run this (installed as ``fleetplane-healthcheck``). For https
it trusts only ``--cafile``: the API's check then also proves that the API
presents a certificate the edge will accept. Standard library only.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fleetplane-healthcheck", description=__doc__)
    parser.add_argument("url", help="http:// or https:// URL to GET")
    parser.add_argument("--cafile", help="CA bundle that must verify an https server (required)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    args = parser.parse_args(argv)
    scheme = urllib.parse.urlsplit(args.url).scheme
    if scheme not in ("http", "https"):
        parser.error(f"{args.url}: only http and https URLs are checked")
    # The system store knows nothing of our internal CA; falling back to it would
    # only turn a configuration mistake into a puzzling certificate error.
    if scheme == "https" and not args.cafile:
        parser.error("an https URL needs --cafile")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    context = ssl.create_default_context(cafile=args.cafile) if args.cafile else None
    try:
        # The scheme is restricted to http(s) in _parse_args.
        with urllib.request.urlopen(args.url, timeout=args.timeout, context=context) as response:  # noqa: S310
            status = int(response.status)
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, OSError) as e:
        print(f"unhealthy: {args.url}: {e}", file=sys.stderr)
        return 1
    if not 200 <= status < 300:
        print(f"unhealthy: {args.url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
