#!/usr/bin/env python3
"""Relay benchmark: flow control under a slow reader, and throughput with a fast one.

Starts the real proxy (`twistd -n socks4` from this interpreter's directory) on a
free loopback port, and a destination server on loopback in this process, then
pushes data through one SOCKS4 CONNECT at a time:

* slow phases: N MiB client -> destination while the destination reads 64 KiB
  every few milliseconds, and N MiB destination -> client while the client reads
  as slowly.  The proxy must pause the fast side (producer/consumer), so its
  memory stays flat; we sample its VmRSS and read its VmHWM from /proc.
* fast phases: N MiB each way with both ends reading as fast as they can; we
  report MiB/s (the sender, the receiver and the proxy share the machine, so on
  a 2-core box this measures all three together).

Prints a table and exits 1 if the proxy's peak RSS grew by more than --max-growth
MiB (default 16) over its idle baseline, or if any byte went missing.

    .venv/bin/python benchmarks/relay_throughput.py            # 512 MiB, as in README
    .venv/bin/python benchmarks/relay_throughput.py --mib 64   # a quick look
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from socksident.socks4 import Command, ReplyCode, build_request, parse_reply

MiB = 1024 * 1024
LOOPBACK = "127.0.0.1"
BLOCK = random.Random(1080).randbytes(MiB)  # sent over and over


# -- the proxy process ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Proxy:
    def __init__(self, workdir: str, relay: str = "splice") -> None:
        twistd = Path(sys.executable).with_name("twistd")
        if not twistd.exists():
            sys.exit(f"no twistd next to {sys.executable}; run `make venv` first")
        self.port = free_port()
        self.log = open(os.path.join(workdir, "proxy.log"), "wb")
        self.process = subprocess.Popen(
            [str(twistd), "-n", "--pidfile=", "socks4",
             "--port", f"tcp:{self.port}:interface={LOOPBACK}", "--relay", relay],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir,
        )
        self.pid = self.process.pid
        deadline = time.monotonic() + 15
        while True:
            if self.process.poll() is not None:
                sys.exit(f"twistd exited with {self.process.returncode}; see {self.log.name}")
            try:
                socket.create_connection((LOOPBACK, self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    sys.exit("twistd did not start listening within 15 s")
                threading.Event().wait(0.05)

    def rss_mib(self) -> float:
        return proc_status_kib(self.pid, "VmRSS") / 1024

    def hwm_mib(self) -> float:
        return proc_status_kib(self.pid, "VmHWM") / 1024

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


# -- the two ends ----------------------------------------------------------------


def send(sock: socket.socket, total: int, stop: threading.Event) -> None:
    view = memoryview(BLOCK)
    left = total
    while left and not stop.is_set():
        n = min(left, len(view))
        sock.sendall(view[:n])
        left -= n
    sock.shutdown(socket.SHUT_WR)


def receive(sock: socket.socket, chunk: int, pause: float, stop: threading.Event) -> int:
    """Read until EOF, `chunk` bytes per recv, waiting `pause` s between reads."""
    buffer = bytearray(chunk)
    count = 0
    wait = threading.Event().wait
    while not stop.is_set():
        n = sock.recv_into(buffer)
        if not n:
            break
        count += n
        if pause:
            wait(pause)
    return count


@dataclass
class Result:
    name: str
    mib: int
    seconds: float
    received: int
    peak_growth: float
    timed_out: bool

    @property
    def rate(self) -> float:
        return self.received / MiB / self.seconds if self.seconds else 0.0


def connect_through(proxy: Proxy, dest_port: int) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, proxy.port), timeout=30)
    sock.sendall(build_request(Command.CONNECT, dest_port, LOOPBACK, "bench"))
    reply = b""
    while len(reply) < 8:
        more = sock.recv(8 - len(reply))
        if not more:
            raise RuntimeError("proxy closed before replying")
        reply += more
    code, _, _ = parse_reply(reply)
    if code != ReplyCode.GRANTED:
        raise RuntimeError(f"proxy replied {code}")
    return sock


def run_phase(
    proxy: Proxy,
    listener: socket.socket,
    name: str,
    mib: int,
    upload: bool,
    chunk: int,
    pause: float,
    baseline: float,
    deadline: float,
) -> Result:
    """One connection: `mib` MiB one way, the receiver reading `chunk` per `pause`."""
    total = mib * MiB
    client = connect_through(proxy, listener.getsockname()[1])
    destination, _ = listener.accept()
    for s in (client, destination):
        s.settimeout(max(1.0, deadline - time.monotonic()))
    sender, receiver = (client, destination) if upload else (destination, client)
    stop = threading.Event()
    got: list[int] = []
    errors: list[BaseException] = []

    def guarded(function: Callable[[], Optional[int]]) -> Callable[[], None]:
        def run() -> None:
            try:
                value = function()
                if value is not None:
                    got.append(value)
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)
        return run

    threads = [
        threading.Thread(target=guarded(lambda: send(sender, total, stop))),
        threading.Thread(target=guarded(lambda: receive(receiver, chunk, pause, stop))),
    ]
    reset_peak(proxy.pid)  # so each phase reports its own peak
    peak = proxy.rss_mib()
    started = time.monotonic()
    for t in threads:
        t.start()
    timed_out = False
    while any(t.is_alive() for t in threads):
        threads[1].join(0.02)
        peak = max(peak, proxy.rss_mib())
        if time.monotonic() > deadline and not timed_out:
            timed_out = True
            stop.set()
            for s in (client, destination):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
    seconds = time.monotonic() - started
    for s in (client, destination):
        s.close()
    peak = max(peak, proxy.hwm_mib())
    if errors and not timed_out:
        raise RuntimeError(f"{name}: {errors[0]!r}")
    return Result(name, mib, seconds, got[0] if got else 0, peak - baseline, timed_out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="MiB per phase (default 512)")
    parser.add_argument("--slow-chunk", type=int, default=64 * 1024,
                        help="bytes the slow reader takes per read (default 65536)")
    parser.add_argument("--slow-interval-ms", type=float, default=1.5,
                        help="pause between the slow reader's reads (default 1.5)")
    parser.add_argument("--max-growth", type=float, default=16.0,
                        help="fail if the proxy's RSS grows more than this many MiB")
    parser.add_argument("--time-budget", type=float, default=110.0,
                        help="seconds for all phases together (default 110)")
    parser.add_argument("--relay", choices=("splice", "twisted"), default="splice",
                        help="the proxy's --relay (default splice)")
    args = parser.parse_args()

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="socksident-bench-") as workdir:
        proxy = Proxy(workdir, args.relay)
        listener = socket.create_server((LOOPBACK, 0), backlog=8)
        try:
            # Warm up every code path once, then take the idle baseline.
            run_phase(proxy, listener, "warm-up", 8, True, 256 * 1024, 0, 0, time.monotonic() + 30)
            run_phase(proxy, listener, "warm-up", 8, False, 256 * 1024, 0, 0, time.monotonic() + 30)
            threading.Event().wait(0.2)
            baseline = proxy.rss_mib()
            if not reset_peak(proxy.pid):
                print("note: cannot reset VmHWM; peak includes start-up", file=sys.stderr)
            pause = args.slow_interval_ms / 1000
            slow = f"{args.slow_chunk // 1024} KiB/{args.slow_interval_ms:g} ms"
            budget_end = started + args.time_budget
            phases = [
                (f"client->dest, slow dest ({slow})", True, args.slow_chunk, pause, 0.35),
                (f"dest->client, slow client ({slow})", False, args.slow_chunk, pause, 0.35),
                ("client->dest, fast reader", True, 256 * 1024, 0.0, 0.15),
                ("dest->client, fast reader", False, 256 * 1024, 0.0, 0.15),
            ]
            results = []
            for name, upload, chunk, wait, share in phases:
                remaining = budget_end - time.monotonic()
                deadline = time.monotonic() + max(5.0, remaining * share / sum(
                    p[4] for p in phases[len(results):]))
                results.append(run_phase(proxy, listener, name, args.mib, upload,
                                         chunk, wait, baseline, deadline))
        finally:
            listener.close()
            proxy.stop()
        access_lines = sum(
            b"socksident.access" in line
            for line in Path(workdir, "proxy.log").read_bytes().splitlines()
        )

    print(f"proxy: twistd socks4 --relay {args.relay}, pid {proxy.pid}; idle RSS after warm-up {baseline:.1f} MiB")
    print(f"{'phase':<42} {'MiB':>6} {'seconds':>8} {'MiB/s':>8} {'RSS growth MiB':>15}")
    failed = False
    for r in results:
        note = ""
        if r.timed_out:
            note = " (time budget: stopped early)"
        elif r.received != r.mib * MiB:
            note = f" (LOST BYTES: got {r.received})"
            failed = True
        print(f"{r.name:<42} {r.received / MiB:>6.0f} {r.seconds:>8.2f} {r.rate:>8.1f}"
              f" {r.peak_growth:>15.2f}{note}")
    worst = max(r.peak_growth for r in results)
    verdict = "OK" if worst <= args.max_growth else "FAIL"
    print(f"peak RSS growth {worst:.2f} MiB (limit {args.max_growth:g} MiB): {verdict}; "
          f"{access_lines} access-log lines; total {time.monotonic() - started:.1f} s")
    return 1 if failed or worst > args.max_growth else 0


if __name__ == "__main__":
    sys.exit(main())
