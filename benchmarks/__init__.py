"""fastpeft benchmarks: ``fastpeft-bench --help`` (installed as ``fastpeft.benchmarks``), or ``python -m benchmarks``
from a clone."""
