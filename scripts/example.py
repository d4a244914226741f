"""The README's first command (`bash scripts/demo.sh` runs this): eventlog's demo.

Real processes on one log: three producers append keyed orders, a consumer group of three
processes shares the six partitions while a second group reads everything; one consumer is
killed with SIGKILL midway and its partitions move, a poison order ends in the dead-letter
file, and the second group is replayed from the start. It prints what happens and a table of
checks, and exits 0 only if every check holds.

    python scripts/example.py [--dir FOLDER] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from eventlog._demo import run_demo
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from eventlog._demo import run_demo


def main() -> int:
    parser = argparse.ArgumentParser(
        description="eventlog demo: real processes, a kill -9, a poison event, a replay"
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="run in this folder and keep it (default: a temporary folder, "
        "removed when every check holds)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smaller scenario (600 events instead of 3,000)"
    )
    args = parser.parse_args()
    return run_demo(args.dir, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
