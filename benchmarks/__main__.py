"""Entry point in a clone: ``python -m benchmarks [--quick] [--op ...] [--out DIR] ...``.

Installed, the same harness is ``fastpeft-bench`` / ``python -m fastpeft.bench`` (it ships as ``fastpeft.benchmarks``).
"""

from __future__ import annotations

import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m benchmarks"))
