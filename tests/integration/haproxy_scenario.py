"""Two `twistd socks4` behind a real HAProxy, in a private network namespace.

Run by tests/integration/test_haproxy.py as root under ``unshare -n``; it
refuses to run in the namespace it was started from.  It brings ``lo`` up
and gives it the balancer's address 10.0.0.1 and eight client addresses
10.1.0.2-10.1.0.9, then starts

- two socksident processes, ``a`` on ``haproxy:tcp:1081`` and ``b`` on
  ``haproxy:tcp:1082`` (both on 127.0.0.1), sharing one rules file that
  refuses 127.0.0.0/8 (HAProxy's own address towards them: a server that
  judged the balancer would refuse everyone), refuses 10.1.0.9, requires
  ident for 10.1.0.7, and permits the rest of 10.1.0.0/24 with a command
  that writes ``%a`` to a file; each writes a JSON access log;
- HAProxy in TCP mode: 10.0.0.1:1081 -> a with ``send-proxy`` (v1),
  10.0.0.1:1082 -> b with ``send-proxy-v2`` (b also health-checked, which
  sends v2 LOCAL headers), 10.0.0.1:1080 round-robin over both, and
  10.0.0.1:1083 -> b with the header's destination rewritten to 192.0.2.1,
  an address this host does not have;
- oidentd on 10.1.0.7:113, an echo server on 127.0.0.1:7 and a server on
  127.0.0.1:9 that reads to EOF, then answers with what it read.

Then it runs the clients (raw sockets, each bound to its source address),
connects to the haproxy: listeners directly without a header (a SOCKS
request, and silence), waits for every access record, and prints one JSON
object; the test judges it.  Readiness is checked by trying to bind each
listening address, never by connecting, so every access record belongs to
a client of the scenario.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

VIP = "10.0.0.1"
NOT_HERE = "192.0.2.1"  # TEST-NET-1: never an address of this host
CLIENTS = [f"10.1.0.{n}" for n in range(2, 10)]
PERMITTED = CLIENTS[:5]  # 10.1.0.2-10.1.0.6
IDENT_CLIENT = "10.1.0.7"
REFUSED = "10.1.0.9"
SERVERS = {"a": 1081, "b": 1082}  # socksident, haproxy:tcp:PORT:interface=127.0.0.1
FRONTENDS = {"v1": 1081, "v2": 1082, "both": 1080, "elsewhere": 1083}
ECHO_PORT = 7
ANSWER_PORT = 9
IDENT_PORT = 113
REQUEST_TIMEOUT = 2
WAIT = 20.0
T = TypeVar("T")

HAPROXY_CFG = f"""\
global
    nbthread 1

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend v1
    bind {VIP}:{FRONTENDS['v1']}
    default_backend a

frontend v2
    bind {VIP}:{FRONTENDS['v2']}
    default_backend b

frontend both
    bind {VIP}:{FRONTENDS['both']}
    default_backend both

frontend elsewhere
    bind {VIP}:{FRONTENDS['elsewhere']}
    tcp-request connection set-dst ipv4({NOT_HERE})
    default_backend b

backend a
    server a 127.0.0.1:{SERVERS['a']} send-proxy

backend b
    server b 127.0.0.1:{SERVERS['b']} send-proxy-v2 check inter 200ms

backend both
    balance roundrobin
    server a 127.0.0.1:{SERVERS['a']} send-proxy
    server b 127.0.0.1:{SERVERS['b']} send-proxy-v2
"""

# The rules see the header's client.  127.0.0.0/8 is HAProxy's side: were it
# judged instead of the client, everything would be refused.
RULES = f"""\
deny 127.0.0.0/8
deny {REFUSED}/32
permit ?=I {IDENT_CLIENT}/32
permit ?=n 10.1.0.0/24 : echo '%a %u' >> {{commands}}
"""

OIDENTD_CONF = """\
default {
	default {
		deny spoof
		deny spoof_all
		deny spoof_privport
		deny random
		deny random_numeric
		deny numeric
		deny hide
		deny forward
	}
}
"""
OIDENTD_PEER = re.compile(r"Connection from (?:\S+ \((?P<address>[^)]*)\)|(?P<bare>\S+)):\d+$")


def log(message: str) -> None:
    print(f"[scenario {time.monotonic():.3f}] {message}", file=sys.stderr, flush=True)


def poll(check: Callable[[], T], what: str, timeout: float = WAIT) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def listening(host: str, port: int) -> bool:
    """Whether something listens on host:port, learnt without connecting to it."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


# -- destinations -------------------------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(WAIT)
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass


class _AnswerAfterEOF(socketserver.BaseRequestHandler):
    """Reads until the client's EOF, then says how much it read: only a
    half-close that reaches it gets the answer."""

    def handle(self) -> None:
        self.request.settimeout(WAIT)
        received = bytearray()
        try:
            while data := self.request.recv(65536):
                received += data
            digest = hashlib.sha256(received).hexdigest()
            self.request.sendall(f"read {len(received)} bytes {digest}\n".encode())
        except OSError:
            pass


class Threading(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve(handler: type, port: int) -> Threading:
    server = Threading(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


# -- clients ----------------------------------------------------------------------


def request(command: int, port: int, address: str, user: bytes) -> bytes:
    return bytes([4, command]) + port.to_bytes(2, "big") + socket.inet_aton(address) + user + b"\0"


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError(f"EOF after {len(out)} of {n} bytes: {out!r}")
        out += chunk
    return out


def recv_until_eof(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def open_from(source: str, host: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(WAIT)
    sock.bind((source, 0))
    sock.connect((host, port))
    return sock


def through(frontend: str, source: str, user: bytes = b"tester",
            half_close: bool = False) -> dict[str, Any]:
    """One CONNECT through HAProxy's `frontend` from `source`.

    Granted, it sends a token to the echo server and reads it back; with
    `half_close`, it sends a payload to the answer-after-EOF server, shuts its
    write side and reads the answer to its end.
    """
    with open_from(source, VIP, FRONTENDS[frontend]) as sock:
        result: dict[str, Any] = {"frontend": frontend, "source": source,
                                  "port": sock.getsockname()[1], "user": user.decode()}
        destination = ANSWER_PORT if half_close else ECHO_PORT
        try:
            sock.sendall(request(1, destination, "127.0.0.1", user))
            reply = recv_exactly(sock, 8)
        except (OSError, EOFError) as error:
            result.update(code=None, error=str(error))
            return result
        result["code"] = reply[1]
        if reply[1] != 90:
            result["after_reply"] = recv_until_eof(sock).decode("latin-1")
            return result
        if half_close:
            payload = os.urandom(50_000)
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            digest = hashlib.sha256(payload).hexdigest()
            result["expected"] = f"read {len(payload)} bytes {digest}\n"
            result["answer"] = recv_until_eof(sock).decode("latin-1")
        else:
            token = f"{frontend} {source} {result['port']}\n".encode()
            sock.sendall(token)
            result["echoed"] = recv_exactly(sock, len(token)) == token
            sock.shutdown(socket.SHUT_WR)
            result["after_echo"] = recv_until_eof(sock).decode("latin-1")
        return result


def direct(server: str, source: str, send_request: bool) -> dict[str, Any]:
    """A client that bypasses the balancer: straight to a haproxy: listener."""
    with open_from(source, "127.0.0.1", SERVERS[server]) as sock:
        result: dict[str, Any] = {"server": server, "source": source,
                                  "port": sock.getsockname()[1], "sent_request": send_request}
        started = time.monotonic()
        if send_request:
            sock.sendall(request(1, ECHO_PORT, "127.0.0.1", b"bypass"))
        try:
            result["received"] = recv_until_eof(sock).decode("latin-1")
            result["closed"] = True
        except OSError as error:
            result.update(closed=False, error=str(error))
        result["elapsed"] = time.monotonic() - started
        return result


# -- processes ---------------------------------------------------------------------


def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)


def start(command: list[str], logfile: Path, cwd: Path) -> subprocess.Popen:
    with open(logfile, "wb") as out:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, cwd=cwd)


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def run(workdir: Path, twistd: str, haproxy: str, oidentd: Optional[str]) -> dict[str, Any]:
    report: dict[str, Any] = {"oidentd": oidentd is not None}
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
    for address in [VIP, *CLIENTS]:
        subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True,
                       timeout=10)
    procs: list[subprocess.Popen] = []
    destinations = [serve(_Echo, ECHO_PORT), serve(_AnswerAfterEOF, ANSWER_PORT)]
    commands = workdir / "commands.log"
    rules = workdir / "sockd.conf"
    rules.write_text(RULES.format(commands=commands))
    confdir = Path(tempfile.mkdtemp(prefix="socksident-haproxy-"))
    try:
        if oidentd is not None:
            confdir.chmod(0o755)  # oidentd drops to an unprivileged user
            conf = confdir / "oidentd.conf"
            conf.write_text(OIDENTD_CONF)
            conf.chmod(0o644)
            procs.append(start([oidentd, "-i", "-S", "-C", str(conf), "-a", IDENT_CLIENT,
                                "-p", str(IDENT_PORT), "-t", "10"],
                               workdir / "oidentd.log", workdir))
        for name, port in SERVERS.items():
            procs.append(start(
                [twistd, "-n", "--pidfile=", "socks4",
                 "--port", f"haproxy:tcp:{port}:interface=127.0.0.1",
                 "--bind-address", "127.0.0.1", "--rules", str(rules),
                 "--request-timeout", str(REQUEST_TIMEOUT),
                 "--access-log", str(workdir / f"access-{name}.json")],
                workdir / f"twistd-{name}.log", workdir))

        def up(*where: tuple[str, int]) -> Callable[[], bool]:
            def check() -> bool:
                for proc in procs:
                    if proc.poll() is not None:
                        raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
                return all(listening(host, port) for host, port in where)
            return check

        ident = [(IDENT_CLIENT, IDENT_PORT)] if oidentd is not None else []
        poll(up(*[("127.0.0.1", p) for p in SERVERS.values()], *ident),
             "socksident and oidentd to listen")
        # HAProxy only now: a first health check that fails marks b down.
        cfg = workdir / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG)
        procs.append(start([haproxy, "-db", "-f", str(cfg)], workdir / "haproxy.log", workdir))
        poll(up(*[(VIP, p) for p in FRONTENDS.values()]), "HAProxy to listen")
        log("everything listens")

        clients: list[dict[str, Any]] = []
        report["clients"] = clients
        for frontend in ("v1", "v2"):
            for source in PERMITTED:
                clients.append(dict(through(frontend, source), case="permitted"))
            clients.append(dict(through(frontend, REFUSED), case="refused"))
            clients.append(dict(through(frontend, PERMITTED[0], half_close=True),
                                case="half-close"))
            if oidentd is not None:
                clients.append(dict(through(frontend, IDENT_CLIENT, b"root"), case="ident"))
                clients.append(dict(through(frontend, IDENT_CLIENT, b"alice"),
                                    case="ident-mismatch"))
        for _ in range(2):
            for source in PERMITTED:
                clients.append(dict(through("both", source), case="balanced"))
        clients.append(dict(through("elsewhere", IDENT_CLIENT, b"root"), case="ident-elsewhere"))
        report["direct"] = [direct("a", PERMITTED[1], True), direct("b", PERMITTED[1], True),
                            direct("a", PERMITTED[2], False)]
        log("clients done")

        expected = len(clients) + len(report["direct"])

        def all_records() -> list[dict[str, Any]]:
            both = [dict(r, server=name) for name in SERVERS
                    for r in records(workdir / f"access-{name}.json")]
            return both if len(both) >= expected else []

        granted = sum(1 for c in clients if c.get("code") == 90 and c["case"] != "ident")
        report["timed_out"] = []
        # Bounded waits that do not end the run: the tests judge what arrived.
        for check, what in (
            (all_records, f"{expected} access records"),
            (lambda: commands.exists() and len(commands.read_text().splitlines()) >= granted,
             f"{granted} rule commands"),
        ):
            try:
                poll(check, what, timeout=10)
            except TimeoutError as error:
                report["timed_out"].append(str(error))
        # Health checks (v2 LOCAL) keep arriving at b: let a few more in,
        # then check none of them left an access record.
        time.sleep(0.5)
        report["records"] = [dict(r, server=name) for name in SERVERS
                             for r in records(workdir / f"access-{name}.json")]
        report["commands"] = commands.read_text().splitlines() if commands.exists() else []
        report["alive"] = {str(p.args[0]): p.poll() is None for p in procs}
    finally:
        for proc in reversed(procs):
            stop(proc)
        for server in destinations:
            server.shutdown()
        import shutil

        shutil.rmtree(confdir, ignore_errors=True)
    report["logs"] = {path.stem: path.read_text(errors="replace")
                      for path in workdir.glob("*.log")}
    if oidentd is not None:
        report["oidentd_peers"] = oidentd_peers(report["logs"].get("oidentd", ""), clients)
    return report


def oidentd_peers(text: str, clients: list[dict[str, Any]]) -> dict[str, Any]:
    """For each ident client port: what oidentd answered and whom it answered."""
    lines = text.splitlines()
    found: dict[str, Any] = {}
    for client in clients:
        if not client["case"].startswith("ident"):
            continue
        port = client["port"]
        matching = [i for i, line in enumerate(lines)
                    if f"] {port} , " in line or f"lookup: {port} , " in line]
        peer = None
        for line in reversed(lines[:matching[0]] if matching else []):
            match = OIDENTD_PEER.match(line)
            if match:
                peer = match.group("address") or match.group("bare")
                break
        found[str(port)] = {"lines": [lines[i] for i in matching], "peer": peer}
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--twistd", required=True)
    parser.add_argument("--haproxy", required=True)
    parser.add_argument("--oidentd")
    parser.add_argument("--parent-netns", required=True,
                        help="readlink /proc/self/ns/net of the caller; we refuse to run there")
    args = parser.parse_args()
    if os.readlink("/proc/self/ns/net") == args.parent_netns:
        print("refusing to run in the caller's network namespace; run me under unshare -n",
              file=sys.stderr)
        return 3
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(4))
    workdir = args.workdir.resolve()
    try:
        report = run(workdir, args.twistd, args.haproxy, args.oidentd)
    except Exception as error:  # the test shows it with whatever was logged
        import traceback

        report = {"error": "".join(traceback.format_exception(error)),
                  "logs": {p.stem: p.read_text(errors="replace") for p in workdir.glob("*.log")}}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
