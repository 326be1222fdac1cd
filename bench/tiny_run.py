"""Wall time of the README's local example: `kubetune run jobs/tiny-local.yaml --local`.

Target: under two minutes on 2 CPU cores. Each run starts from an empty output folder (no resume).
Run: `make bench` or `.venv/bin/python bench/tiny_run.py [runs]`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KUBETUNE = Path(sys.executable).with_name("kubetune")


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    for i in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            cmd = [str(KUBETUNE), "run", str(ROOT / "jobs/tiny-local.yaml"), "--local", "--output", str(out)]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - start
            (folder,) = (out / "runs").iterdir()  # the run's folder: <output>/runs/<name>-<spec hash>/
            metrics = json.loads((folder / "metrics.json").read_text())
            print(f"run {i + 1}: wall {wall:.1f} s; metrics: {json.dumps(metrics, sort_keys=True)[:400]}")


if __name__ == "__main__":
    main()
