"""``poc-node gaps``: the largest open gaps, asked of a running node's explorer (/api/gaps).

A client of the node's HTTP port (``http.explore: true``), so that it answers
with the live history and the same code as the page; see node/ops/explore.py.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from node.errors import NodeError

DEFAULT_URL = "http://127.0.0.1:9100"


def register(commands: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add ``gaps`` to the subcommands; returns its handler by name."""
    gaps = commands.add_parser(
        "gaps", help="print the largest open gaps of a running node's history (its explorer)"
    )
    gaps.add_argument("--top", type=int, default=10, help="how many gaps (1..100, default 10)")
    gaps.add_argument("--near", metavar="CAPTION", help="only gaps near where this caption lands")
    gaps.add_argument(
        "--modality", choices=("text", "image", "audio", "video"), help="only gaps of this modality"
    )
    gaps.add_argument(
        "--url", default=DEFAULT_URL, help=f"the node's HTTP port (default {DEFAULT_URL})"
    )
    gaps.add_argument("--json", action="store_true", help="print the API's JSON")
    return {"gaps": run}


def fetch(url: str, top: int, near: str | None, modality: str | None) -> dict[str, Any]:
    query = {"top": str(top)}
    if near is not None:
        query["near"] = near
    if modality is not None:
        query["modality"] = modality
    address = f"{url.rstrip('/')}/api/gaps?{urllib.parse.urlencode(query)}"
    try:
        with urllib.request.urlopen(address, timeout=60) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as error:
        if error.code == 404:
            raise NodeError(f"{url} serves no explorer (set http.explore: true)") from None
        try:
            message = json.loads(error.read())["error"]
        except (ValueError, KeyError, TypeError):
            message = error.reason
        raise NodeError(f"{url} answered {error.code}: {message}") from None
    except (urllib.error.URLError, OSError) as error:
        raise NodeError(f"cannot reach {url}: {getattr(error, 'reason', error)}") from None


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.top <= 100:
        raise NodeError("--top must be between 1 and 100")
    body = fetch(args.url, args.top, args.near, args.modality)
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    where = f" near {args.near!r}" if args.near is not None else ""
    print(
        f"history {body['history_size']} items, round {body['round']}, k = {body['k']}: "
        f"{len(body['gaps'])} open gaps{where}"
    )
    if body["gaps"]:
        print(f"{'size':>8}  {'modality':<8}  {'x':>8}  {'y':>8}  nearest")
    for gap in body["gaps"]:
        print(
            f"{gap['size']:8.4f}  {gap['modality']:<8}  {gap['x']:8.3f}  {gap['y']:8.3f}  "
            f"{', '.join(gap['neighbours'][:3])}"
        )
    return 0
