"""``mil plugins``: list every installed plugin and whether it loads (``--no-load``: no torch)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("plugins", help="list every installed plugin and whether it loads")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--kind", choices=["modality", "projector", "method", "aggregator"])
    p.add_argument("--no-load", action="store_true",
                   help="list what is installed without importing it (fast: no torch)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mil_plugins.plugins import all_records

    rows = all_records(load=not args.no_load)
    if args.kind:
        rows = [r for r in rows if r["kind"] == args.kind]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    headers = ("kind", "name", "distribution", "version", "status")
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) if rows else len(h) for h in headers]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for r in rows:
        print("  ".join(str(r[h]).ljust(w) for h, w in zip(headers, widths)))
        if r["error"]:
            print(f"    entry point {r['entry_point']}: {r['error']}")
    failed = sum(r["status"] == "failed" for r in rows)
    if failed:
        print(f"\n{failed} plugin(s) failed to load; the others are usable.")
    return 0
