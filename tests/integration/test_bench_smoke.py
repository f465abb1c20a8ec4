"""The benchmark still builds and runs: one short round, no proxy and socksident.

`benchmarks/bench.py --smoke` compiles the C load generator with gcc, starts
the destinations and `twistd socks4`, and runs every case once with small
counts (CONNECT round trips, bulk both ways, idle relays).  It exits 1 when
socksident refuses a request, loses a byte or fails to start.  No figure is
asserted: performance is measured by `make bench`, not tested.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import skip_unless_strict

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench.py"


def test_benchmark_smoke_round() -> None:
    if shutil.which("gcc") is None:
        skip_unless_strict("needs gcc (Debian package gcc) to build the load generator")
    done = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--no-ident", "--servers", "no,socksident"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CONNECT round trips/s, 64 in flight" in done.stdout
    assert "FAILED" not in done.stdout
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("    socksident ")]
    assert len(rows) >= 6, done.stdout  # one row per measured case
