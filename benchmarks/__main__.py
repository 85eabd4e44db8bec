"""Entry point: ``python -m benchmarks [--quick] [--op ...] [--dtype ...] [--providers ...] [--out DIR]``."""

from __future__ import annotations

import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
