"""Deliver the tracking a run could not send: ``raydpo sync-tracking OUTPUT_DIR [--timeout S]``.

A run whose MLflow server was unreachable at its end keeps the undelivered operations in
``OUTPUT_DIR/tracking/`` (see ``raydpo.tracking``). A resumed run delivers them by itself; this
command does it by hand, in order, each exactly once. Exit status 0 when everything arrived.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raydpo.tracking import TrackingError, sync


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raydpo sync-tracking", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to keep retrying (default 60)")
    ns = parser.parse_args(argv)
    try:
        left = sync(ns.output_dir.expanduser().resolve(), timeout=ns.timeout)
    except TrackingError as e:
        print(f"raydpo sync-tracking: {e}", file=sys.stderr)
        return 2
    if left:
        print(f"[raydpo] {left} tracking operation(s) still undelivered: is the server up?", file=sys.stderr)
        return 1
    print(f"[raydpo] tracking of {ns.output_dir} delivered", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
