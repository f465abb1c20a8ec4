#!/usr/bin/env python3
"""Instructions the proxy executes per CONNECT round trip, under callgrind.

A figure that does not move with the machine's load, for deciding whether a
change to the handshake path pays: `twistd socks4` runs under
``valgrind --tool=callgrind`` with instrumentation off; it is switched on
for exactly ``--count`` round trips (connect, request, reply, 16 bytes
echoed, close; 8 in flight) from `loadgen`, then the totals are read.

    python benchmarks/callgrind_handshake.py                  # default options
    python benchmarks/callgrind_handshake.py -- --ident       # extra socks4 options
    callgrind_annotate benchmarks/.build/callgrind.out.*      # where they went

Needs valgrind (Debian package valgrind), gcc, and, for ``--ident``, root
and oidentd (it then runs in a private network namespace, as bench.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("socks4_options", nargs="*")
    args = parser.parse_args()
    ident = "--ident" in args.socks4_options
    if ident:
        bench.enter_namespace()
        bench.prepare_namespace()
    if not os.environ.get(bench.NETNS_ENV):
        bench.ECHO_PORT, bench.BULK_PORT = bench.free_port(), bench.free_port()
    build = bench.HERE / ".build"
    loadgen = bench.LoadGen(bench.build_loadgen(build))
    workdir = Path(tempfile.mkdtemp(prefix="socksident-callgrind-"))
    workdir.chmod(0o755)
    port = bench.free_port()
    out = build / f"callgrind.out.{os.getpid()}"
    processes = [bench.Process("destinations", [loadgen.binary, "serve", str(bench.ECHO_PORT),
                                                str(bench.BULK_PORT)], workdir)]
    try:
        processes[0].wait_listening(bench.ECHO_PORT)
        if ident:
            processes.append(bench.start_oidentd(workdir))
        proxy = bench.Process("proxy", [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out}", bench.twistd(), "-n", "--pidfile=",
            "-l", str(workdir / "proxy.log"), "socks4",
            "--port", f"tcp:{port}:interface={bench.LOOPBACK}", *args.socks4_options], workdir)
        processes.append(proxy)
        proxy.wait_listening(port, seconds=120)
        target = (f"{bench.LOOPBACK}:{port}", f"{bench.LOOPBACK}:{bench.ECHO_PORT}")
        loadgen.run("rtt", *target, 8, 200, 120, 16, "root")  # warm-up
        subprocess.run(["callgrind_control", "-i", "on", str(proxy.pid)], check=True,
                       capture_output=True, timeout=60)
        result = loadgen.run("rtt", *target, 8, args.count, 600, 16, "root", timeout=900)
        subprocess.run(["callgrind_control", "-d", str(proxy.pid)], check=True,
                       capture_output=True, timeout=120)
        time.sleep(0.5)
    finally:
        for process in reversed(processes):
            process.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    dumps = sorted(build.glob(f"callgrind.out.{os.getpid()}*"), key=lambda p: p.stat().st_mtime)
    total = 0
    for dump in dumps:
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
                break
    done = result["done"]
    print(f"{done} round trips ({result['errors']} errors), {total} instructions: "
          f"{total / max(done, 1):,.0f} instructions per round trip; profile: {dumps[-1]}")
    return 0 if done and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
