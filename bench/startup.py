"""Wall time of `kubetune validate jobs/` (process start to exit), the CI pre-merge check.

Target: under 0.5 s. Run: `make bench` or `.venv/bin/python bench/startup.py [runs]`.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KUBETUNE = Path(sys.executable).with_name("kubetune")


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    cmd = [str(KUBETUNE), "validate", "-q", str(ROOT / "jobs")]
    subprocess.run(cmd, check=True)  # warm the file cache and .pyc files
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        times.append(time.perf_counter() - start)
    print(f"machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(
        f"kubetune validate jobs/: median {statistics.median(times) * 1000:.0f} ms, "
        f"min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms over {runs} runs"
    )


if __name__ == "__main__":
    main()
