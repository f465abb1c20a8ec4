#!/usr/bin/env python3
"""socksident against Dante, Twisted's `twistd socks` and no proxy at all.

One run measures every server the same way, interleaved (round 1 of every
server, then round 2, ...), and reports medians with min-max:

- CONNECT round trips at 1 and 64 in flight: connect, request, 8-byte reply,
  16 bytes echoed, close; round trips/s, p50/p99 time from connect() to the
  reply, and the proxy's CPU (utime + stime of its process tree) per round trip;
- the same with ident on against a real oidentd, and oidentd's own query rate;
- bulk upload and download through one relayed connection (MiB/s);
- memory per idle relayed connection (RSS, and PSS summed over Dante's tree).

The clients and destinations are `loadgen.c`, compiled here with gcc: one
epoll process, far below the proxies' cost (its no-proxy run is the limit).
As root it runs in a private network namespace (`unshare -n`), so oidentd can
have port 113 and nothing else on the machine shares the loopback.

    python benchmarks/bench.py            # quick: 256 MiB bulk, 2000 idle relays
    python benchmarks/bench.py --full     # 2 GiB bulk, 10000 idle relays
    python benchmarks/bench.py --smoke    # one short round: does it all run?
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
LOOPBACK = "127.0.0.1"
MiB = 1024 * 1024
ECHO_PORT, BULK_PORT, IDENT_PORT = 7000, 7001, 113
NETNS_ENV = "SOCKSIDENT_BENCH_NETNS"
OIDENTD_CONF = "default {\n\tdefault {\n\t\tdeny hide\n\t\tdeny random\n\t\tdeny spoof\n\t}\n}\n"


# -- processes ---------------------------------------------------------------------


def descendants(root: int) -> list[int]:
    """`root` and every process below it (Dante forks its workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
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


def cpu_seconds(root: int) -> float:
    """utime + stime of the tree, plus what the root has reaped of its children."""
    ticks = 0
    for pid in descendants(root):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        ticks += int(fields[11]) + int(fields[12])
        if pid == root:
            ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def memory_kib(root: int) -> tuple[int, int]:
    """(RSS, PSS) of the tree in KiB."""
    rss = pss = 0
    for pid in descendants(root):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            pass
    return rss, pss


class Process:
    """A child in its own session, so the whole group can be killed."""

    def __init__(self, name: str, argv: list[str], workdir: Path) -> None:
        self.name = name
        self.logpath = workdir / f"{name}.out"
        with open(self.logpath, "ab") as out:
            self.process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=workdir, start_new_session=True)
        self.pid = self.process.pid

    def wait_listening(self, port: int, seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}): "
                                   + self.logpath.read_text(errors="replace")[-500:])
            try:
                socket.create_connection((LOOPBACK, port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not listening on {port}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(3)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(5)


# -- the servers -------------------------------------------------------------------


@dataclass
class Server:
    name: str
    start: Optional[Callable[[Path, int], Process]]  # None: no proxy
    ident: bool = False
    note: str = ""


def twistd() -> str:
    return str(Path(sys.executable).with_name("twistd"))


def socks4_help() -> str:
    done = subprocess.run([twistd(), "socks4", "--help"], capture_output=True, text=True,
                          timeout=60)
    return done.stdout


def socksident(extra: list[str]) -> Callable[[Path, int], Process]:
    def start(workdir: Path, port: int) -> Process:
        name = "socksident" + "".join(extra).replace("-", "")
        return Process(name, [twistd(), "-n", "--pidfile=", "-l", str(workdir / f"{name}.log"),
                              "socks4", "--port", f"tcp:{port}:interface={LOOPBACK}", *extra],
                       workdir)
    return start


def twisted_socks(workdir: Path, port: int) -> Process:
    return Process("twisted", [twistd(), "-n", "--pidfile=", "-l", str(workdir / "twisted.log"),
                               "socks", "-i", LOOPBACK, "-p", str(port)], workdir)


def danted_path() -> Optional[str]:
    return shutil.which("danted") or next(
        (p for p in ("/usr/sbin/danted",) if os.access(p, os.X_OK)), None)


def dante(ident: bool, log: bool = False) -> Callable[[Path, int], Process]:
    """danted with one SOCKS4 pass rule; `log` adds its lines per session
    (socksident always writes an access record), for a like-for-like figure."""
    def start(workdir: Path, port: int) -> Process:
        conf = workdir / f"danted-{port}.conf"
        method = "rfc931" if ident else "none"
        logged = "  log: connect disconnect\n" if log else ""
        conf.write_text(
            f"logoutput: {workdir / 'danted.log'}\n"
            f"internal: {LOOPBACK} port = {port}\nexternal: {LOOPBACK}\n"
            f"clientmethod: none\nsocksmethod: {method}\n"
            "user.privileged: root\nuser.unprivileged: nobody\n"
            "client pass {\n  from: 127.0.0.0/8 to: 0.0.0.0/0\n}\n"
            "socks pass {\n  from: 127.0.0.0/8 to: 127.0.0.0/8\n  command: connect\n"
            f"  protocol: tcp\n  proxyprotocol: socks_v4\n  socksmethod: {method}\n{logged}}}\n")
        # No -D: the foreground.  -N 1: one mother process.
        return Process("dante", [str(danted_path()), "-f", str(conf), "-N", "1",
                                 "-p", str(workdir / f"danted-{port}.pid")], workdir)
    return start


VIA_NEXT_HOP = "permit via=next-hop 127.0.0.0/8\n"
DIRECT = "permit 127.0.0.0/8\n"


def wait_port(port: int, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((LOOPBACK, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listening on {port}")
            time.sleep(0.05)


def socksident_rules(rules: str, hop: bool) -> Callable[[Path, int], Process]:
    """socksident with a rules file (A alone), or A sending every request through
    a second socksident B (`via=next-hop`, so the loadgen's IP requests go too).
    With a hop, one shell starts B in the background and then becomes A, so B is
    A's child: the CPU and memory figures of A's tree cover both proxies."""
    def start(workdir: Path, port: int) -> Process:
        name = "hop" if hop else "rules"
        conf = workdir / f"{name}-{port}.conf"
        conf.write_text(VIA_NEXT_HOP if hop else DIRECT)
        a = [twistd(), "-n", "--pidfile=", "-l", str(workdir / f"{name}-a.log"), "socks4",
             "--port", f"tcp:{port}:interface={LOOPBACK}", "--rules", str(conf)]
        if not hop:
            return Process(name, a, workdir)
        b_port = free_port()
        b = [twistd(), "-n", "--pidfile=", "-l", str(workdir / "hop-b.log"), "socks4",
             "--port", f"tcp:{b_port}:interface={LOOPBACK}"]
        a += ["--next-hop", f"tcp:{LOOPBACK}:{b_port}"]
        script = f"{' '.join(map(shlex.quote, b))} & exec {' '.join(map(shlex.quote, a))}"
        process = Process(name, ["sh", "-c", script], workdir)
        try:
            wait_port(b_port)
        except RuntimeError:
            process.stop()
            raise
        return process
    return start


def servers(want: list[str], ident: bool) -> tuple[list[Server], list[str]]:
    """The servers of this machine, with the socksident variants its options offer."""
    options = socks4_help()
    found = [Server("no proxy", None), Server("socksident", socksident([]))]
    skipped = []
    if "--relay" in options:
        found.append(Server("socksident --relay twisted", socksident(["--relay", "twisted"])))
    if "--workers" in options:
        found.append(Server("socksident --workers 2", socksident(["--workers", "2"])))
    if "--next-hop" in options:
        found.append(Server("socksident rules", socksident_rules(DIRECT, hop=False),
                            note="A alone: --rules permit 127.0.0.0/8"))
        found.append(Server("socksident next hop", socksident_rules(VIA_NEXT_HOP, hop=True),
                            note="A -> B: via=next-hop to a second socksident"))
    found.append(Server("twistd socks", twisted_socks))
    if danted_path():
        found.append(Server("dante", dante(False)))
        found.append(Server("dante logging", dante(False, log=True),
                            note="log: connect disconnect, a line per session as socksident writes"))
    else:
        skipped.append("dante: danted not found (Debian package dante-server)")
    if ident:
        if shutil.which("oidentd") and os.geteuid() == 0:
            found.append(Server("socksident ident", socksident(["--ident"]), ident=True))
            if "--workers" in options:
                found.append(Server("socksident ident --workers 2",
                                    socksident(["--ident", "--workers", "2"]), ident=True))
            if danted_path():
                found.append(Server("dante ident", dante(True), ident=True))
        else:
            skipped.append("ident: needs root and oidentd (Debian package oidentd)")
    chosen = [s for s in found if not want or s.name.split()[0] in want or s.name in want]
    return chosen, skipped


# -- the load generator ------------------------------------------------------------


def build_loadgen(outdir: Path) -> Path:
    outdir.mkdir(parents=True, exist_ok=True)
    binary = outdir / "loadgen"
    source = HERE / "loadgen.c"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(source)], check=True,
                       timeout=120)
    return binary


class LoadGen:
    def __init__(self, binary: Path) -> None:
        self.binary = str(binary)

    def run(self, *args: object, timeout: float = 300) -> dict[str, Any]:
        done = subprocess.run([self.binary, *map(str, args)], capture_output=True, text=True,
                              timeout=timeout)
        try:
            result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise RuntimeError(f"loadgen {args[0]} failed ({done.returncode}): "
                               f"{done.stdout[-300:]} {done.stderr[-300:]}")
        result["status"] = done.returncode
        return result


# -- one round of one server ---------------------------------------------------------


@dataclass
class Plan:
    rtt_count: dict[int, int]  # in flight -> round trips
    rtt_seconds: float
    bulk_bytes: int
    idle: int
    user: str


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def one_round(server: Server, plan: Plan, loadgen: LoadGen, workdir: Path) -> dict[str, Any]:
    port = free_port()
    proxy = "-" if server.start is None else f"{LOOPBACK}:{port}"
    process = server.start(workdir, port) if server.start is not None else None
    echo, bulk = f"{LOOPBACK}:{ECHO_PORT}", f"{LOOPBACK}:{BULK_PORT}"
    out: dict[str, Any] = {}
    try:
        if process is not None:
            process.wait_listening(port)
        loadgen.run("rtt", proxy, echo, 8, 300, 30, 16, plan.user)  # warm-up
        for inflight, count in plan.rtt_count.items():
            before = cpu_seconds(process.pid) if process else 0.0
            result = loadgen.run("rtt", proxy, echo, inflight, count, plan.rtt_seconds, 16,
                                 plan.user)
            if process is not None and result["done"]:
                result["cpu_us"] = (cpu_seconds(process.pid) - before) / result["done"] * 1e6
            out[f"rtt{inflight}"] = result
        if server.ident:
            return out
        for direction in ("up", "down"):
            before = cpu_seconds(process.pid) if process else 0.0
            out[direction] = loadgen.run("bulk", proxy, bulk, direction, plan.bulk_bytes)
            if process is not None:
                moved = out[direction]["bytes"] / (1 << 30)
                out[direction]["cpu_s_per_gib"] = (cpu_seconds(process.pid) - before) / moved
        if process is not None and plan.idle:
            out["idle"] = idle_memory(process.pid, proxy, echo, plan.idle, loadgen)
    finally:
        if process is not None:
            process.stop()
    return out


def idle_memory(pid: int, proxy: str, echo: str, count: int, loadgen: LoadGen) -> dict[str, Any]:
    """KiB of the proxy's memory per idle relayed connection."""
    time.sleep(0.3)
    rss0, pss0 = memory_kib(pid)
    holder = subprocess.Popen([loadgen.binary, "idle", proxy, echo, str(count)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        status = json.loads(holder.stdout.readline())
        holder.stdout.readline()  # "ready"
        time.sleep(0.5)
        rss1, pss1 = memory_kib(pid)
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(60)
    status.update(rss_kib=(rss1 - rss0) / count, pss_kib=(pss1 - pss0) / count)
    return status


# -- ident ---------------------------------------------------------------------------


def start_oidentd(workdir: Path) -> Process:
    conf = workdir / "oidentd.conf"
    conf.write_text(OIDENTD_CONF)
    conf.chmod(0o644)
    workdir.chmod(0o755)
    # Every loopback address: the round trips come from 127.0.0.1-8.
    identd = Process("oidentd", [str(shutil.which("oidentd")), "-i", "-S", "-C", str(conf),
                                 "-a", "0.0.0.0", "-p", str(IDENT_PORT)], workdir)
    identd.wait_listening(IDENT_PORT)
    return identd


def oidentd_rate(loadgen: LoadGen, inflight: int, count: int, seconds: float) -> dict[str, Any]:
    """oidentd's own answers per second, for one real connection."""
    with socket.create_connection((LOOPBACK, ECHO_PORT)) as held:
        local = held.getsockname()[1]
        return loadgen.run("ident", f"{LOOPBACK}:{IDENT_PORT}", inflight, count, seconds,
                           local, ECHO_PORT)


# -- the report ----------------------------------------------------------------------


METRICS = [
    # key, path, label, unit, higher is better
    ("rtt64", ("rtt64", "rate"), "CONNECT round trips/s, 64 in flight", "/s", True),
    ("rtt64_p99", ("rtt64", "p99_us"), "  p50 / p99 time to grant, 64 in flight", "us", False),
    ("rtt1", ("rtt1", "rate"), "CONNECT round trips/s, 1 in flight", "/s", True),
    ("rtt1_p99", ("rtt1", "p99_us"), "  p50 / p99 time to grant, 1 in flight", "us", False),
    ("cpu64", ("rtt64", "cpu_us"), "proxy CPU per round trip, 64 in flight", "us", False),
    ("up", ("up", "mib_s"), "upload MiB/s", "MiB/s", True),
    ("down", ("down", "mib_s"), "download MiB/s", "MiB/s", True),
    ("up_cpu", ("up", "cpu_s_per_gib"), "proxy CPU per GiB uploaded", "s", False),
    ("down_cpu", ("down", "cpu_s_per_gib"), "proxy CPU per GiB downloaded", "s", False),
    ("idle", ("idle", "rss_kib"), "RSS per idle relay", "KiB", False),
    ("idle_pss", ("idle", "pss_kib"), "PSS per idle relay", "KiB", False),
]


def summarise(rounds: list[dict[str, Any]], path: tuple[str, str]) -> Optional[dict[str, float]]:
    values = [r[path[0]][path[1]] for r in rounds if path[1] in r.get(path[0], {})]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def hop_cost(results: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """One extra hop: A -> B against A alone (the same rules, the same run)."""
    alone, chained = results.get("socksident rules"), results.get("socksident next hop")
    if not alone or not chained:
        return {}
    parts = []
    for key, path, label, _, _ in METRICS:
        if key not in ("rtt64", "rtt1", "cpu64", "up", "down", "idle"):
            continue
        a, b = summarise(alone, path), summarise(chained, path)
        if a and b and a["median"]:
            parts.append(f"{label.strip()} {fmt(b['median'])} vs {fmt(a['median'])}"
                         f" ({b['median'] / a['median']:.2f}x)")
    return {"one extra hop (A -> B vs A alone; CPU and RSS of A and B together)":
            "; ".join(parts)}


def fmt(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 1 else f"{value:.2f}"


def table(results: dict[str, list[dict[str, Any]]], extra: dict[str, Any]) -> str:
    summary = {name: {key: summarise(rounds, path) for key, path, *_ in METRICS}
               for name, rounds in results.items()}
    for name, rounds in results.items():  # p50 rides along with p99
        for n in ("64", "1"):
            p50 = summarise(rounds, (f"rtt{n}", "p50_us"))
            if p50 and summary[name][f"rtt{n}_p99"]:
                summary[name][f"rtt{n}_p99"]["p50"] = p50["median"]  # type: ignore[index]
    limit = summary.get("no proxy", {})
    lines = []
    for key, _, label, unit, _ in METRICS:
        lines.append(f"{label} ({unit})")
        for name in results:
            cell = summary[name][key]
            if cell is None:
                continue
            text = f"{fmt(cell['median'])} ({fmt(cell['min'])}-{fmt(cell['max'])})"
            if "p50" in cell:
                text = f"{fmt(cell['p50'])} / " + text
            ratios = []
            # With ident on, Dante with ident on is the one to compare with.
            dante = summary.get("dante ident" if " ident" in name else "dante", {})
            for other, ref in (("limit", limit), ("dante", dante)):
                base = ref.get(key) if ref else None
                if base and base["median"] and ref is not summary[name] and name != "no proxy":
                    ratios.append(f"{cell['median'] / base['median']:.2f}x {other}")
            lines.append(f"    {name:32} {text:34} {', '.join(ratios)}")
    for key, value in extra.items():
        lines.append(f"{key}: {value}")
    return "\n".join(lines), summary  # type: ignore[return-value]


def plot(summary: dict[str, Any], path: Path) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install -e '.[bench]'): no plot"
    panels = [m for m in METRICS if any(summary[n][m[0]] for n in summary)]
    figure, axes = plt.subplots(len(panels), 1, figsize=(9, 2.2 * len(panels)))
    for axis, (key, _, label, unit, _) in zip(axes, panels):
        names = [n for n in summary if summary[n][key]]
        medians = [summary[n][key]["median"] for n in names]
        low = [m - summary[n][key]["min"] for n, m in zip(names, medians)]
        high = [summary[n][key]["max"] - m for n, m in zip(names, medians)]
        axis.barh(names, medians, xerr=[low, high], color="tab:blue")
        axis.set_title(f"{label.strip()} ({unit})", fontsize=9)
        axis.tick_params(labelsize=8)
        axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    return None


# -- main ----------------------------------------------------------------------------


def enter_namespace() -> None:
    """Re-run this script in a private network namespace (root only)."""
    if os.environ.get(NETNS_ENV) or os.geteuid() != 0 or not shutil.which("unshare"):
        return
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        return
    os.environ[NETNS_ENV] = "1"
    os.execvp("unshare", ["unshare", "-n", "--", sys.executable, *sys.argv])


#: TIME_WAIT sockets the benchmark's namespace keeps (Linux's default is tens of thousands).
MAX_TIME_WAIT = 4096


def prepare_namespace() -> None:
    if not os.environ.get(NETNS_ENV):
        return
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
    # Round trips leave TIME_WAIT sockets: give the namespace every port.
    Path("/proc/sys/net/ipv4/ip_local_port_range").write_text("1024 65000\n")
    # ...and keep few of them.  oidentd looks every query up in the socket
    # table, so without a bound an ident case's figure depended on how many
    # TIME_WAIT sockets the cases before it in the round had left.
    Path("/proc/sys/net/ipv4/tcp_max_tw_buckets").write_text(f"{MAX_TIME_WAIT}\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="2 GiB bulk, 10000 idle relays")
    parser.add_argument("--smoke", action="store_true", help="one short round, no plot")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=int, help="idle relays to hold (default 2000; 10000 with --full)")
    parser.add_argument("--servers", default="", help="comma-separated names (first word)")
    parser.add_argument("--no-ident", action="store_true")
    parser.add_argument("--no-netns", action="store_true")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop every server on the way out
    if not args.no_netns:
        enter_namespace()
    prepare_namespace()
    global ECHO_PORT, BULK_PORT
    if not os.environ.get(NETNS_ENV):  # a shared loopback: take free ports
        ECHO_PORT, BULK_PORT = free_port(), free_port()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))

    if args.smoke:
        plan = Plan({64: 500, 1: 100}, 5.0, 8 * MiB, 50, "root")
        args.rounds = 1
    elif args.full:
        plan = Plan({64: 20000, 1: 3000}, 20.0, 2048 * MiB, 10000, "root")
    else:
        plan = Plan({64: 5000, 1: 1000}, 8.0, 256 * MiB, 2000, "root")
    if args.idle is not None:
        plan.idle = args.idle
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    fits = (limit - 100) // 2  # a proxy holds both sockets of each idle relay
    if limit != resource.RLIM_INFINITY and plan.idle > fits:
        print(f"idle relays: {fits}, not {plan.idle}: this machine allows {limit} descriptors"
              " per process", file=sys.stderr)
        plan.idle = fits
    if os.geteuid() != 0:
        plan.user = "bench"
    want = [w for w in args.servers.split(",") if w]
    chosen, skipped = servers(want, ident=not args.no_ident)
    for note in skipped:
        print("skipped:", note, file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="socksident-bench-"))
    workdir.chmod(0o755)  # Dante's workers run as nobody
    loadgen = LoadGen(build_loadgen(HERE / ".build"))
    destinations = Process("destinations", [loadgen.binary, "serve", str(ECHO_PORT),
                                            str(BULK_PORT)], workdir)
    identd: Optional[Process] = None
    results: dict[str, list[dict[str, Any]]] = {s.name: [] for s in chosen}
    extra: dict[str, Any] = {}
    started, load_before = time.monotonic(), os.getloadavg()[0]
    try:
        destinations.wait_listening(ECHO_PORT)
        if any(s.ident for s in chosen):
            identd = start_oidentd(workdir)
        for number in range(args.rounds):
            for server in chosen:
                print(f"round {number + 1}/{args.rounds}: {server.name}", file=sys.stderr,
                      flush=True)
                try:
                    results[server.name].append(one_round(server, plan, loadgen, workdir))
                except (RuntimeError, subprocess.TimeoutExpired) as error:
                    print(f"  {server.name}: {error}", file=sys.stderr)
                    results[server.name].append({"error": str(error)})
            if identd is not None:
                rate = oidentd_rate(loadgen, 64, plan.rtt_count[64], plan.rtt_seconds)
                extra.setdefault("oidentd_rates", []).append(rate)
    finally:
        for process in (identd, destinations):
            if process is not None:
                process.stop()
    if "oidentd_rates" in extra:
        rates = [r["rate"] for r in extra["oidentd_rates"]]
        extra["oidentd alone, queries/s at 64 in flight"] = (
            f"{fmt(statistics.median(rates))} ({fmt(min(rates))}-{fmt(max(rates))})")
    extra.update(hop_cost(results))
    text, summary = table(results, {k: v for k, v in extra.items() if k != "oidentd_rates"})
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
               f"Python {platform.python_version()}, load average before {load_before:.2f}")
    print(f"{machine}; {args.rounds} rounds in {time.monotonic() - started:.0f} s; "
          f"medians (min-max)")
    print(text)
    failures = [f"{name} round {i + 1}: {what}" for name, rounds in results.items()
                for i, r in enumerate(rounds) for what in problems(r)]
    for failure in failures:
        print("FAILED:", failure)
    if not args.smoke:
        args.results.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        record = {"machine": machine, "plan": plan.__dict__, "results": results,
                  "summary": summary, "extra": extra, "skipped": skipped, "table": text}
        (args.results / f"bench-{stamp}.json").write_text(json.dumps(record, indent=1))
        note = plot(summary, args.results / f"bench-{stamp}.png")
        print(note or f"saved {args.results}/bench-{stamp}.json and .png")
    shutil.rmtree(workdir, ignore_errors=True)
    return 1 if any(name.startswith("socksident") for name in failures) else 0


def problems(result: dict[str, Any]) -> list[str]:
    """What went wrong in one round: errors, refusals, lost bytes."""
    found = [result["error"]] if "error" in result else []
    for key, value in result.items():
        if isinstance(value, dict) and value.get("status"):
            found.append(f"{key}: {value}")
    return found


if __name__ == "__main__":
    sys.exit(main())
