"""``python -m benchmarks``: every benchmark with its defaults, each in its own process.

Separate processes keep each benchmark's peak-memory reading its own (a process's peak RSS never
goes down) and free every model between them. Extra arguments are not forwarded: run a benchmark's
own module to change its settings.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # so ``-m benchmarks.<name>`` imports from any cwd
BENCHMARKS = (
    "benchmarks.generation_throughput",
    "benchmarks.default_pack",
    "benchmarks.cost_profile",
    "benchmarks.remote_backend",
    "benchmarks.serving",
    "benchmarks.perturbation",
    "benchmarks.hostile_input",
)


def main() -> int:
    failed = []
    for module in BENCHMARKS:
        print(f"\n=== {module} ===", flush=True)
        if subprocess.call([sys.executable, "-m", module], cwd=REPO) != 0:
            failed.append(module)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
