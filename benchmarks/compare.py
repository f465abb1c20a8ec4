#!/usr/bin/env python3
"""Compare socksident with Twisted's own SOCKSv4 server and Dante, on loopback.

For each server that is available (socksident's `twistd socks4`, Twisted's
`twistd socks`, Dante's `danted`), this starts it on a free 127.0.0.1 port and
measures, through SOCKS4 CONNECT to destinations served by a separate process:

a. CONNECT rate: --workers client threads, each doing CONNECT + --payload bytes
   echoed + close, --requests requests in all; reported as connections/s, and
   as the server's CPU time per request (utime + stime from /proc).
b. throughput: one CONNECT pushing --mib MiB client -> destination to a fast
   reader; reported as MiB/s.
c. memory: --connections concurrent relayed connections, each established and
   echoed once, then left idle.  The server's memory (VmRSS, and PSS from
   smaps_rollup; summed over the process tree, since Dante forks) before and
   after gives KiB per connection.  Then the client closes them all and we wait
   (bounded) for the server's open fd count to come back to its baseline.

The cases run in the order a, c, b (so c's baseline is not taken right after
256 MiB went through).  All of it shares --time-budget seconds; a case that runs
out of its share stops early and says so.

Prints a table.  This is a report, not a gate: the exit status is 0 unless
socksident loses or corrupts bytes, refuses or stalls a request, or still holds
more than --fd-slack fds above its baseline after the connections are closed;
then 1.
Everything listens on 127.0.0.1 only; every server is killed on exit.

    .venv/bin/python benchmarks/compare.py                 # all servers found
    .venv/bin/python benchmarks/compare.py --servers socksident,twisted
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

# Generic helpers from the relay benchmark next to this file.
from relay_throughput import BLOCK, LOOPBACK, MiB, free_port, proc_status_kib

GRANTED = 90


# -- process bookkeeping ----------------------------------------------------------


def descendants(root: int) -> list[int]:
    """`root` and every process below it (Dante forks its workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def smaps_pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def nofile_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    return -1


def tcp_connection_inodes() -> set[str]:
    """Inodes of IPv4 TCP sockets that are not listening (state 0A)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] != "0A":
            inodes.add(fields[9])
    return inodes


@dataclass
class Footprint:
    processes: int
    rss_kib: int
    pss_kib: int
    fds: int
    tcp: int  # of those fds, TCP connections (not listeners)


class Server:
    """A server process started in its own session, so we can kill its whole group."""

    def __init__(self, name: str, argv: list[str], port: int, workdir: Path) -> None:
        self.name = name
        self.port = port
        self.logpath = workdir / f"{name}.log"
        self.log = open(self.logpath, "wb")
        self.process = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=workdir, start_new_session=True,
        )
        self.pid = self.process.pid

    def wait_listening(self, seconds: float) -> Optional[str]:
        deadline = time.monotonic() + seconds
        while True:
            if self.process.poll() is not None:
                return f"exited with status {self.process.returncode}: {self.log_tail()}"
            try:
                socket.create_connection((LOOPBACK, self.port), timeout=1).close()
                return None
            except OSError:
                if time.monotonic() > deadline:
                    return f"not listening on {LOOPBACK}:{self.port} after {seconds:g} s"
                time.sleep(0.05)

    def log_tail(self) -> str:
        self.log.flush()
        try:
            text = self.logpath.read_text(errors="replace").strip().splitlines()
        except OSError:
            text = []
        return " | ".join(text[-3:]) or "(no output)"

    def footprint(self) -> Footprint:
        rss = pss = fds = count = 0
        sockets: set[str] = set()
        for pid in descendants(self.pid):
            try:
                rss += proc_status_kib(pid, "VmRSS")
                pss += smaps_pss_kib(pid)
                for fd in os.scandir(f"/proc/{pid}/fd"):
                    fds += 1
                    try:
                        target = os.readlink(fd.path)
                    except OSError:
                        continue
                    if target.startswith("socket:["):
                        sockets.add(target[8:-1])
                count += 1
            except (OSError, KeyError):
                pass  # exited while we looked
        return Footprint(count, rss, pss, fds, len(sockets & tcp_connection_inodes()))

    def cpu_seconds(self) -> float:
        """User + system CPU of the tree, plus what its reaped children used."""
        ticks = 0
        for pid in descendants(self.pid):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
            if pid == self.pid:
                ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        # The leader first: Dante's mother process then stops and reaps its workers.
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(3)
        except subprocess.TimeoutExpired:
            pass
        # Whatever is left of the group (the leader, or forked workers), kill it.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            print(f"warning: {self.name} (pid {self.pid}) did not die", file=sys.stderr)
        self.log.close()


def start_socksident(workdir: Path) -> Server:
    port = free_port()
    twistd = str(Path(sys.executable).with_name("twistd"))
    return Server("socksident", [twistd, "-n", "--pidfile=", "socks4",
                                 "--port", f"tcp:{port}:interface={LOOPBACK}"], port, workdir)


def start_twisted(workdir: Path) -> Server:
    port = free_port()
    twistd = str(Path(sys.executable).with_name("twistd"))
    return Server("twisted", [twistd, "-n", "--pidfile=", "socks",
                              "-i", LOOPBACK, "-p", str(port)], port, workdir)


def danted_path() -> Optional[str]:
    return shutil.which("danted") or next(
        (p for p in ("/usr/sbin/danted", "/usr/local/sbin/danted") if os.access(p, os.X_OK)), None)


def start_dante(workdir: Path) -> Server:
    danted = danted_path()
    assert danted
    port = free_port()
    users = "user.privileged: root\nuser.unprivileged: nobody\n" if os.geteuid() == 0 else ""
    conf = workdir / "danted.conf"
    conf.write_text(
        f"logoutput: {workdir / 'danted-own.log'}\n"
        f"internal: {LOOPBACK} port = {port}\n"
        f"external: {LOOPBACK}\n"
        "clientmethod: none\n"
        "socksmethod: none\n"
        f"{users}"
        "client pass {\n  from: 127.0.0.0/8 to: 0.0.0.0/0\n}\n"
        "socks pass {\n  from: 127.0.0.0/8 to: 127.0.0.0/8\n  command: connect\n"
        "  protocol: tcp\n  proxyprotocol: socks_v4\n}\n"
    )
    # No -D: stays in the foreground.  -N 1: one mother process.
    server = Server("dante", [danted, "-f", str(conf), "-N", "1",
                              "-p", str(workdir / "danted.pid")], port, workdir)
    server.logpath = workdir / "danted-own.log"  # where its errors go
    return server


# -- the destinations: a separate process ------------------------------------------


def serve_destinations() -> None:
    """Echo server (asyncio) and byte sink (threads); prints their ports, runs forever.

    The sink reads an 8-byte big-endian length N, then N bytes (or until EOF), and
    answers with the 8-byte count it got, so no half-close is needed.
    """
    def sink_connection(conn: socket.socket) -> None:
        with conn:
            header = b""
            while len(header) < 8:
                more = conn.recv(8 - len(header))
                if not more:
                    return
                header += more
            (want,) = struct.unpack("!Q", header)
            buffer = bytearray(256 * 1024)
            got = 0
            while got < want:
                n = conn.recv_into(buffer)
                if not n:
                    break
                got += n
            try:
                conn.sendall(struct.pack("!Q", got))
            except OSError:
                pass

    def sink_loop(listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=sink_connection, args=(conn,), daemon=True).start()

    class Echo(asyncio.Protocol):
        transport: asyncio.Transport

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        echo = await loop.create_server(Echo, LOOPBACK, 0, backlog=4096)
        sink = socket.create_server((LOOPBACK, 0), backlog=64)
        threading.Thread(target=sink_loop, args=(sink,), daemon=True).start()
        print("ports", echo.sockets[0].getsockname()[1], sink.getsockname()[1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


class Destinations:
    def __init__(self, workdir: Path) -> None:
        self.log = open(workdir / "destinations.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--destinations"], stdout=subprocess.PIPE,
            stderr=self.log, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        assert self.process.stdout
        ready, _, _ = select.select([self.process.stdout], [], [], 15)
        line = self.process.stdout.readline().decode() if ready else ""
        if not line.startswith("ports "):
            self.stop()
            raise RuntimeError(f"destination process did not start: {line!r}")
        self.echo_port, self.sink_port = map(int, line.split()[1:])

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(5)
        self.log.close()


# -- the SOCKS4 client ---------------------------------------------------------------


class Refused(Exception):
    pass


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise ConnectionError(f"EOF after {len(data)} of {n} bytes")
        data += more
    return data


def socks4_connect(proxy_port: int, dest_port: int, timeout: float) -> socket.socket:
    """A SOCKS4 CONNECT to 127.0.0.1:dest_port, built here from the RFC, not by socksident."""
    sock = socket.create_connection((LOOPBACK, proxy_port), timeout=timeout)
    try:
        sock.sendall(struct.pack("!BBH4s", 4, 1, dest_port, socket.inet_aton(LOOPBACK))
                     + b"bench\0")
        reply = recv_exact(sock, 8)
        if reply[1] != GRANTED:
            raise Refused(f"reply code {reply[1]}")
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class Errors:
    counts: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        return ", ".join(f"{n}x {what}" for what, n in sorted(self.counts.items()))


def classify(error: BaseException) -> str:
    if isinstance(error, Refused):
        return str(error)
    if isinstance(error, socket.timeout):
        return "timeout"
    return type(error).__name__


def run_workers(count: int, target: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():  # short joins: Ctrl-C still gets through
            t.join(0.1)


def op_timeout(deadline: float) -> float:
    """Per-socket-operation timeout: 10 s, less near the deadline (at least 1 s)."""
    return min(10.0, max(1.0, deadline - time.monotonic()))


def echo_once(sock: socket.socket, payload: bytes) -> bool:
    sock.sendall(payload)
    return recv_exact(sock, len(payload)) == payload


# -- the three cases -------------------------------------------------------------------


@dataclass
class Outcome:
    server: str
    conn_rate: Optional[float] = None
    cpu_per_conn: Optional[float] = None  # server CPU microseconds per request
    mib_rate: Optional[float] = None
    rss_per_conn: Optional[float] = None
    pss_per_conn: Optional[float] = None
    fds_base: Optional[int] = None
    fds_loaded: Optional[int] = None
    fds_after: Optional[int] = None
    rss_base: Optional[int] = None
    rss_after: Optional[int] = None
    procs: str = ""
    tcp: str = ""
    nofile: int = -1
    failed: bool = False  # a byte missing or wrong, a request not granted, a stall
    fd_leak: bool = False
    notes: list[str] = field(default_factory=list)


def case_connect_rate(server: Server, echo_port: int, requests: int, workers: int,
                      payload: int, deadline: float, out: Outcome) -> None:
    errors = Errors()
    done = [0]
    lock = threading.Lock()
    next_index = iter(range(requests))

    def worker(_: int) -> None:
        while time.monotonic() < deadline:
            with lock:
                if next(next_index, None) is None:
                    return
            data = os.urandom(payload)
            try:
                with socks4_connect(server.port, echo_port, op_timeout(deadline)) as sock:
                    if echo_once(sock, data):
                        with lock:
                            done[0] += 1
                    else:
                        errors.add("echo mismatch")
            except (OSError, Refused) as error:
                errors.add(classify(error))

    cpu = server.cpu_seconds()
    started = time.monotonic()
    run_workers(workers, worker)
    seconds = time.monotonic() - started
    out.conn_rate = done[0] / seconds
    if done[0]:
        out.cpu_per_conn = (server.cpu_seconds() - cpu) / done[0] * 1e6
    if done[0] + errors.total() < requests:
        out.notes.append(f"connect rate: time budget hit after {done[0] + errors.total()}"
                         f" of {requests} requests")
    if errors.total():
        out.failed = True
        out.notes.append(f"connect rate: {errors.total()} of {requests} failed ({errors})")


def case_throughput(server: Server, sink_port: int, mib: int, deadline: float,
                    out: Outcome) -> None:
    total = mib * MiB
    view = memoryview(BLOCK)
    try:
        sock = socks4_connect(server.port, sink_port, op_timeout(deadline))
    except (OSError, Refused) as error:
        out.failed = True
        out.notes.append(f"throughput: CONNECT failed ({classify(error)})")
        return
    with sock:
        started = time.monotonic()
        sent = 0
        try:
            sock.sendall(struct.pack("!Q", total))
            while sent < total and time.monotonic() < deadline:
                n = min(total - sent, len(view))
                # A 1 MiB block that takes longer than this is a stall, not slowness.
                sock.settimeout(max(5.0, deadline - time.monotonic()))
                sock.sendall(view[:n])
                sent += n
            if sent < total:
                out.notes.append(f"throughput: time budget hit after {sent // MiB} MiB")
                out.mib_rate = sent / MiB / (time.monotonic() - started)
                return
            sock.settimeout(max(5.0, deadline - time.monotonic()))
            (got,) = struct.unpack("!Q", recv_exact(sock, 8))
        except OSError as error:  # ConnectionError and socket.timeout included
            out.failed = True
            out.notes.append(f"throughput: {classify(error)} after sending {sent // MiB} MiB")
            return
        seconds = time.monotonic() - started
    out.mib_rate = got / MiB / seconds
    if got != total:
        out.failed = True
        out.notes.append(f"throughput: destination got {got} of {total} bytes")


def case_memory(server: Server, echo_port: int, connections: int, workers: int,
                fd_slack: int, deadline: float, out: Outcome) -> None:
    time.sleep(0.3)  # let the previous case's closes finish
    base = server.footprint()
    out.fds_base, out.rss_base = base.fds, base.rss_kib
    out.nofile = nofile_limit(server.pid)
    if 0 <= out.nofile < 2 * connections + 64:
        out.notes.append(f"memory: server's RLIMIT_NOFILE is {out.nofile}, less than"
                         f" the {2 * connections + 64} it needs")
    socks: list[socket.socket] = []
    errors = Errors()
    lock = threading.Lock()
    open_until = deadline - 0.35 * max(0.0, deadline - time.monotonic())  # keep time to close
    share = connections // workers

    def opener(index: int) -> None:
        todo = share + (connections % workers if index == 0 else 0)
        for _ in range(todo):
            if time.monotonic() > open_until:
                return
            try:
                sock = socks4_connect(server.port, echo_port, op_timeout(open_until))
            except (OSError, Refused) as error:
                errors.add(classify(error))
                continue
            with lock:
                socks.append(sock)
            try:
                if not echo_once(sock, b"0123456789abcdef"):
                    errors.add("echo mismatch")
            except OSError as error:
                errors.add(classify(error))

    loaded = base
    try:
        run_workers(workers, opener)
        time.sleep(0.5)  # settle: buffers allocated lazily get allocated
        loaded = server.footprint()
        opened = len(socks)
        if opened:
            out.rss_per_conn = (loaded.rss_kib - base.rss_kib) / opened
            out.pss_per_conn = (loaded.pss_kib - base.pss_kib) / opened
        out.fds_loaded = loaded.fds
        out.procs = f"{base.processes}/{loaded.processes}"
        if opened < connections:
            out.notes.append(f"memory: only {opened} of {connections} connections opened")
        if errors.total():
            out.failed = True
            out.notes.append(f"memory: {errors.total()} failures ({errors})")
    finally:
        for sock in socks:
            sock.close()
    # Wait (bounded) for the fds to come back to baseline, or, for a server whose
    # worker processes outlive the connections (Dante), for its TCP connections
    # to be gone and its fd count to stay put for a second.
    wait_until = min(deadline, time.monotonic() + 10)
    after = server.footprint()
    stable_since, last_fds = time.monotonic(), after.fds
    while after.fds > base.fds + fd_slack and time.monotonic() < wait_until:
        if after.fds != last_fds or after.tcp > base.tcp:
            stable_since, last_fds = time.monotonic(), after.fds
        elif time.monotonic() - stable_since > 1.0:
            break
        time.sleep(0.1)
        after = server.footprint()
    out.fds_after, out.rss_after = after.fds, after.rss_kib
    out.tcp = f"{base.tcp}/{loaded.tcp}/{after.tcp}"
    out.procs += f"/{after.processes}"
    if after.fds > base.fds + fd_slack:
        out.fd_leak = True
        out.notes.append(f"memory: {after.fds} fds open after close, baseline {base.fds};"
                         f" of those, TCP connections {after.tcp} (baseline {base.tcp});"
                         f" server processes {after.processes} (baseline {base.processes})")


# -- main ---------------------------------------------------------------------------------


STARTERS: dict[str, Callable[[Path], Server]] = {
    "socksident": start_socksident,
    "twisted": start_twisted,
    "dante": start_dante,
}


def machine_facts() -> list[str]:
    cpu = next((line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?")
    try:
        from importlib.metadata import version
        twisted = version("twisted")
    except Exception:  # noqa: BLE001 - informative only
        twisted = "?"
    dante = "Dante not installed"
    if danted_path():
        try:
            dante = subprocess.run([str(danted_path()), "-v"], capture_output=True, text=True,
                                   timeout=5).stdout.split(".  ")[0].strip() or "?"
        except (OSError, subprocess.TimeoutExpired):
            dante = "?"
    return [
        f"machine: {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}",
        f"Python {platform.python_version()}, Twisted {twisted}, {dante}",
    ]


def raise_nofile(needed: int) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return f"RLIMIT_NOFILE {soft} (hard {hard}); the servers inherit it"


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> int:
    if "--destinations" in sys.argv[1:]:
        serve_destinations()
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="socksident,twisted,dante",
                        help="comma-separated subset of socksident,twisted,dante")
    parser.add_argument("--requests", type=int, default=2000,
                        help="CONNECT-rate requests in all (default 2000)")
    parser.add_argument("--workers", type=int, default=4,
                        help="concurrent client threads (default 4)")
    parser.add_argument("--payload", type=int, default=100,
                        help="bytes echoed per CONNECT-rate request (default 100)")
    parser.add_argument("--mib", type=int, default=256, help="throughput MiB (default 256)")
    parser.add_argument("--connections", type=int, default=1000,
                        help="concurrent idle connections for memory (default 1000)")
    parser.add_argument("--fd-slack", type=int, default=5,
                        help="fds above baseline allowed after close (default 5)")
    parser.add_argument("--time-budget", type=float, default=140.0,
                        help="seconds for all servers and cases together (default 140)")
    args = parser.parse_args()
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    unknown = set(names) - set(STARTERS)
    if unknown:
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")

    # SIGTERM takes the same cleanup path as Ctrl-C.
    signal.signal(signal.SIGTERM, interrupted)
    started = time.monotonic()
    budget_end = started + args.time_budget
    print(*machine_facts(), sep="\n")
    print(raise_nofile(2 * args.connections + 256))

    results: list[Outcome] = []
    skipped: list[str] = []
    running: list[Server] = []
    destinations: Optional[Destinations] = None
    with tempfile.TemporaryDirectory(prefix="socksident-compare-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)  # Dante's workers run as nobody
        try:
            destinations = Destinations(workdir)
            for index, name in enumerate(names):
                if name == "dante" and not danted_path():
                    skipped.append("dante: danted not found (Debian package dante-server)")
                    continue
                if name == "socksident" or name == "twisted":
                    if not Path(sys.executable).with_name("twistd").exists():
                        skipped.append(f"{name}: no twistd next to {sys.executable}")
                        continue
                server = STARTERS[name](workdir)
                running.append(server)
                problem = server.wait_listening(15)
                if problem:
                    skipped.append(f"{name}: {problem}")
                    server.stop()
                    running.remove(server)
                    if name == "socksident":
                        results.append(Outcome(name, failed=True, notes=[problem]))
                    continue
                share = max(10.0, (budget_end - time.monotonic()) / (len(names) - index))
                t0 = time.monotonic()
                out = Outcome(name)
                print(f"{name}: pid {server.pid}, port {server.port} ...", flush=True)
                case_connect_rate(server, destinations.echo_port, args.requests, args.workers,
                                  args.payload, t0 + 0.3 * share, out)
                case_memory(server, destinations.echo_port, args.connections, args.workers,
                            args.fd_slack, time.monotonic() + 0.4 * share, out)
                case_throughput(server, destinations.sink_port, args.mib,
                                time.monotonic() + 0.25 * share, out)
                if server.process.poll() is not None:
                    out.notes.append(f"server exited with {server.process.returncode}:"
                                     f" {server.log_tail()}")
                server.stop()
                running.remove(server)
                results.append(out)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            for server in running:
                server.stop()
            if destinations:
                destinations.stop()

    print()
    n = args.connections
    print(f"{'server':<11} {'conn/s':>7} {'CPU us':>7} {'MiB/s':>7} {'KiB/conn':>9} {'(PSS)':>7}"
          f" {f'fds base/{n} open/closed':>26} {f'TCP base/{n}/closed':>19}"
          f" {'RSS MiB base/closed':>19} {'procs':>9}")
    for r in results:
        fds = (f"{fmt(r.fds_base, 'd')}/{fmt(r.fds_loaded, 'd')}/{fmt(r.fds_after, 'd')}"
               if r.fds_base is not None else "-")
        rss = (f"{r.rss_base / 1024:.1f}/{r.rss_after / 1024:.1f}"
               if r.rss_base is not None and r.rss_after is not None else "-")
        print(f"{r.server:<11} {fmt(r.conn_rate, '7.0f')} {fmt(r.cpu_per_conn, '7.0f')}"
              f" {fmt(r.mib_rate, '7.1f')}"
              f" {fmt(r.rss_per_conn, '9.1f')} {fmt(r.pss_per_conn, '7.1f')}"
              f" {fds:>26} {r.tcp or '-':>19} {rss:>19} {r.procs or '-':>9}")
    for r in results:
        for note in r.notes:
            print(f"  {r.server}: {note}")
    for line in skipped:
        print(f"  skipped {line}")
    print(f"a: {args.requests} x (CONNECT + {args.payload} B echo + close), {args.workers}"
          f" client threads (CPU us: the server's CPU time per request); b: {args.mib} MiB client->destination;"
          f" c: {args.connections} idle relayed connections. TCP: the server's TCP"
          f" connections; procs: its processes (base/loaded/closed)."
          f" Total {time.monotonic() - started:.1f} s")

    ours = [r for r in results if r.server == "socksident"]
    bad = [r for r in ours if r.failed or r.fd_leak]
    if bad:
        print("FAIL: socksident lost or corrupted bytes, refused or stalled a request,"
              " or kept fds open")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
