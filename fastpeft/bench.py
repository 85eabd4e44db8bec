"""``fastpeft-bench`` / ``python -m fastpeft.bench``: the benchmark harness, runnable from any directory.

The harness lives in the repository's ``benchmarks/`` folder, which installs as ``fastpeft.benchmarks`` (setup.py
maps it like ``kernels/``); see its README for the options.  Results go to ``--out DIR`` (default: the user cache,
``~/.cache/fastpeft/bench``), never into the source tree.
"""

from __future__ import annotations

import sys
from typing import Optional


def main(argv: Optional[list] = None) -> int:
    """Run the benchmarks with command-line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        from fastpeft.benchmarks.run import main as run_main
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.startswith("fastpeft.benchmarks"):
            raise
        print("error: fastpeft.benchmarks is not installed; reinstall fastpeft from its repository "
              "(pip install -e '.[bench]' in a clone, or pip install 'fastpeft[bench] @ git+<url>')", file=sys.stderr)
        return 2
    return run_main(argv, prog="fastpeft-bench")


if __name__ == "__main__":
    sys.exit(main())
