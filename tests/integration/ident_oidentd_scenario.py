"""socksident against the real oidentd, inside a private network namespace.

Run by tests/integration/test_ident_oidentd.py as root under ``unshare -n``;
it refuses to run in the namespace it was started from, so it never binds
port 113 of the real machine.  It brings ``lo`` up, starts

- oidentd in the foreground on 127.0.0.1:113 and [::1]:113 with a
  system-wide config that denies every capability (everyone answers with
  their real name), except that the user ``daemon`` is forced to hide
  (ERROR : HIDDEN-USER);
- a "silent identd" on 127.0.0.1:1113 that accepts connections and never
  answers (the kernel completes the handshake; nobody calls accept);
- an echo server and an HTTP server as destinations;
- four twistd socks4 servers: strict (bare ``--ident``) on 1080, lenient
  (``--ident=check``) on 1081, strict with ``--ident-port 1113
  --ident-timeout 1`` on 1082, all on 127.0.0.1, and strict on [::1]:1083
  (its ident queries go to [::1]:113 from ::1; the destinations stay IPv4,
  as a SOCKS4 DSTIP is);

then runs the clients case by case (a raw SOCKS4 probe over IPv4 or IPv6,
and curl, as root, nobody and daemon), stops oidentd and runs the no-identd
cases, waits for
each request's access-log line, stops everything and prints one JSON object
on stdout.  Every wait has a deadline.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
PROBE = HERE / "socks4_probe.py"

IDENT_PORT = 113
SILENT_IDENT_PORT = 1113
SERVERS = {
    # name: (listening address, port, socks4 options)
    "require": ("127.0.0.1", 1080, ["--ident", "--ident-timeout", "5"]),
    "check": ("127.0.0.1", 1081, ["--ident=check", "--ident-timeout", "5"]),
    "silent": ("127.0.0.1", 1082, ["--ident=require", "--ident-port",
                                   str(SILENT_IDENT_PORT), "--ident-timeout", "1"]),
    "require6": ("::1", 1083, ["--ident", "--ident-timeout", "5"]),
}
IDENT_ADDRESSES = ("127.0.0.1", "::1")
# System-wide oidentd.conf: no user may hide, spoof or randomise (these are
# oidentd's defaults, spelled out so that a distribution default cannot
# change them), and "daemon" is forced to hide, for a real ERROR answer.
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
user daemon {
	default {
		force hide
	}
}
"""
CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
             "LC_ALL": "C", "HOME": "/"}
CURL_CODE = re.compile(r"SOCKS4 connection to \S+ \((\d+)\)")
# oidentd: "Connection from localhost (127.0.0.1):47002", or "Connection from
# ::1:40514" when the address has no name.
OIDENTD_PEER = re.compile(r"Connection from (?:\S+ \((?P<address>[^)]*)\)|(?P<bare>\S+)):\d+$")


def log(message: str) -> None:
    print(f"[scenario {time.monotonic():.3f}] {message}", file=sys.stderr, flush=True)


def wait_for_port(host: str, port: int, deadline: float,
                  proc: Optional[subprocess.Popen] = None) -> None:
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on [{host}]:{port}")
            time.sleep(0.05)


def port_refuses(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)


# -- destinations ---------------------------------------------------------------


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(10)
        buffer = b""
        try:
            while True:
                data = self.request.recv(4096)
                if not data:
                    return
                if b"\n" in buffer + data and b"\n" not in buffer:
                    first = (buffer + data).split(b"\n", 1)[0]
                    self.server.seen.append(first.decode("latin-1"))  # type: ignore[attr-defined]
                buffer += data
                self.request.sendall(data)
        except OSError:
            pass


class HTTPHandler(http.server.BaseHTTPRequestHandler):
    timeout = 10

    def do_GET(self) -> None:
        self.server.seen.append(self.path)  # type: ignore[attr-defined]
        body = f"destination saw {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class ThreadingTCP(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class ThreadingHTTP(http.server.ThreadingHTTPServer):
    daemon_threads = True


def serve(server: socketserver.BaseServer) -> socketserver.BaseServer:
    server.seen = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                     daemon=True).start()
    return server


# -- clients --------------------------------------------------------------------


def python_for(user: str) -> tuple[Optional[str], str]:
    """A Python 3 that `user` may run (the venv's may sit in an unreadable home)."""
    candidates = ["/usr/bin/python3", "/usr/local/bin/python3",
                  shutil.which("python3", path=CLEAN_ENV["PATH"]),
                  getattr(sys, "_base_executable", None), os.path.realpath(sys.executable)]
    tried = []
    for candidate in dict.fromkeys(c for c in candidates if c):
        if not os.path.exists(candidate):
            continue
        tried.append(candidate)
        try:
            done = subprocess.run(
                ["runuser", "-u", user, "--", candidate, "-c",
                 "import ipaddress, json, socket, struct"],
                env=CLEAN_ENV, capture_output=True, timeout=15, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            continue
        if done.returncode == 0:
            return candidate, ""
    return None, f"no Python 3 that user {user} can run (tried {', '.join(tried) or 'none'})"


def run_probe(as_user: str, python: str, proxy: str, claim: str, host: str, port: int,
              token: str) -> dict:
    args = [proxy, claim, host, str(port), token]
    if as_user == "root":
        command = [sys.executable, str(PROBE), *args]
        stdin = None
    else:  # from stdin: the probe's file may not be readable by the user
        command = ["runuser", "-u", as_user, "--", python, "-", *args]
        stdin = PROBE.read_bytes()
    try:
        done = subprocess.run(command, input=stdin, capture_output=True, timeout=30,
                              env=CLEAN_ENV)
    except subprocess.TimeoutExpired as error:
        return {"code": None, "error": f"probe timed out: {error}"}
    try:
        result = json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"code": None, "error": f"probe failed ({done.returncode}): "
                f"{done.stdout!r} {done.stderr!r}"}
    return result


def run_curl(as_user: str, proxy: int, claim: str, http_port: int, path: str,
             local_port: int) -> dict:
    command = ["curl", "-q", "-sS", "--max-time", "15", "--noproxy", "",
               "-x", f"socks4://{claim}@127.0.0.1:{proxy}", "--local-port", str(local_port),
               f"http://127.0.0.1:{http_port}{path}"]
    if as_user != "root":
        command = ["runuser", "-u", as_user, "--", *command]
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, timeout=30, env=CLEAN_ENV,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as error:
        return {"code": None, "error": f"curl timed out: {error}"}
    result: dict = {
        "source_port": local_port,
        "elapsed": time.monotonic() - started,
        "curl_exit": done.returncode,
        "curl_stderr": done.stderr.decode("latin-1").strip(),
        "body": done.stdout.decode("latin-1"),
    }
    match = CURL_CODE.search(result["curl_stderr"])
    # curl names the code only for a refusal; success means the proxy said 90.
    result["code"] = 90 if done.returncode == 0 else (int(match.group(1)) if match else None)
    return result


# -- the scenario -----------------------------------------------------------------


CASES = [
    # name, server, client, run as, claimed USERID, destination, phase
    ("require-root-as-root", "require", "probe", "root", "root", "127.0.0.1", 1),
    ("require-root-claims-alice", "require", "probe", "root", "alice", "127.0.0.1", 1),
    ("require-socks4a-root", "require", "probe", "root", "root", "localhost", 1),
    ("require-nobody-curl", "require", "curl", "nobody", "nobody", "127.0.0.1", 1),
    ("require-nobody-claims-root-curl", "require", "curl", "nobody", "root", "127.0.0.1", 1),
    ("require-nobody-probe", "require", "probe", "nobody", "nobody", "127.0.0.1", 1),
    ("require-hidden-daemon-curl", "require", "curl", "daemon", "daemon", "127.0.0.1", 1),
    ("check-root-as-root", "check", "probe", "root", "root", "127.0.0.1", 1),
    ("check-root-claims-alice", "check", "probe", "root", "alice", "127.0.0.1", 1),
    ("check-hidden-daemon-curl", "check", "curl", "daemon", "daemon", "127.0.0.1", 1),
    # the client reaches the proxy over IPv6; the proxy asks oidentd on [::1]:113
    ("ipv6-require-root-as-root", "require6", "probe", "root", "root", "127.0.0.1", 1),
    ("ipv6-require-root-claims-alice", "require6", "probe", "root", "alice", "127.0.0.1", 1),
    ("silent-identd-times-out", "silent", "probe", "root", "root", "127.0.0.1", 1),
    ("require-no-identd", "require", "probe", "root", "root", "127.0.0.1", 2),
    ("check-no-identd", "check", "probe", "root", "root", "127.0.0.1", 2),
    ("check-no-identd-claims-alice", "check", "probe", "root", "alice", "127.0.0.1", 2),
]


def access_line(log_text: str, source_port: int) -> Optional[str]:
    """The access line of the request from `source_port`, whatever the client's address."""
    pattern = re.compile(rf"\] \S+:{source_port} user=")
    for line in log_text.splitlines():
        if "[socksident.access#" in line and pattern.search(line):
            return line
    return None


def has_ipv6_loopback() -> tuple[bool, str]:
    """Whether ::1 exists in this namespace (not where the kernel has no IPv6)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as error:
        return False, f"no IPv6 loopback ::1 in the namespace: {error}"
    return True, ""


def tcp_listeners() -> str:
    """`ss -ltn` inside the namespace, for the report."""
    try:
        done = subprocess.run(["ss", "-ltnH"], capture_output=True, timeout=10,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"ss failed: {error}"
    return done.stdout.decode(errors="replace")


def run(workdir: Path, twistd: str, oidentd: str) -> dict:
    out: dict = {"cases": {}, "skipped": {}}
    procs: list[subprocess.Popen] = []
    confdir = Path(tempfile.mkdtemp(prefix="socksident-oidentd-"))
    try:
        confdir.chmod(0o755)  # oidentd drops to an unprivileged user
        conf = confdir / "oidentd.conf"
        conf.write_text(OIDENTD_CONF)
        conf.chmod(0o644)
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
        ipv6, no_ipv6 = has_ipv6_loopback()
        ident_addresses = [a for a in IDENT_ADDRESSES if ipv6 or ":" not in a]
        servers_here = {name: spec for name, spec in SERVERS.items()
                        if ipv6 or ":" not in spec[0]}

        # -i: foreground; -S: log to stderr, not syslog; -C: our config only;
        # -a (one per address)/-p: 127.0.0.1:113 and [::1]:113; -t: close idle
        # query connections after 10 s.
        oidentd_log = (workdir / "oidentd.log").open("wb")
        addresses = [arg for a in ident_addresses for arg in ("-a", a)]
        oident = subprocess.Popen(
            [oidentd, "-i", "-S", "-C", str(conf), *addresses, "-p", str(IDENT_PORT),
             "-t", "10"],
            stdout=oidentd_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append(oident)
        silent = socket.socket()
        silent.bind(("127.0.0.1", SILENT_IDENT_PORT))
        silent.listen(16)  # never accepted: connects, then silence

        echo = serve(ThreadingTCP(("127.0.0.1", 0), EchoHandler))
        web = serve(ThreadingHTTP(("127.0.0.1", 0), HTTPHandler))
        echo_port, http_port = echo.server_address[1], web.server_address[1]

        servers = {}
        for name, (host, port, options) in servers_here.items():
            logfile = workdir / f"socks-{name}.log"
            escaped = host.replace(":", "\\:")  # endpoint syntax: tcp6:1083:interface=\:\:1
            endpoint = (f"tcp6:{port}:interface={escaped}" if ":" in host
                        else f"tcp:{port}:interface={host}")
            proc = subprocess.Popen(
                [twistd, "-n", "--pidfile=", "--logfile", str(logfile), "socks4",
                 "--port", endpoint, *options],
                cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
            procs.append(proc)
            servers[name] = (host, port, proc, logfile)
        deadline = time.monotonic() + 30
        for address in ident_addresses:
            wait_for_port(address, IDENT_PORT, deadline, oident)
        for host, port, proc, _ in servers.values():
            wait_for_port(host, port, deadline, proc)
        out["listeners"] = tcp_listeners()
        log("oidentd and servers are up:\n" + out["listeners"])

        pythons: dict = {}
        local_port = 20000  # below the ephemeral range: no collisions
        assert [c[-1] for c in CASES] == sorted(c[-1] for c in CASES), "phase 1 first"
        for name, server, client, as_user, claim, dest, phase in CASES:
            if phase == 2 and oident.poll() is None:
                stop(oident)
                out["oidentd_exit"] = oident.returncode
                out["ident_port_refuses_after_stop"] = {
                    address: port_refuses(address, IDENT_PORT) for address in ident_addresses}
                log("oidentd stopped")
            if server not in servers:
                out["skipped"][name] = no_ipv6
                continue
            host, proxy, _, _ = servers[server]
            if as_user != "root":
                try:
                    import pwd

                    pwd.getpwnam(as_user)
                except KeyError:
                    out["skipped"][name] = f"there is no user {as_user!r}"
                    continue
            if client == "curl":
                local_port += 1
                assert ":" not in host, "curl cases use IPv4 proxies"
                result = run_curl(as_user, proxy, claim, http_port, f"/{name}", local_port)
            else:
                if as_user not in pythons:
                    pythons[as_user] = ("", "") if as_user == "root" else python_for(as_user)
                python, why = pythons[as_user]
                if as_user != "root" and python is None:
                    out["skipped"][name] = why
                    continue
                where = f"[{host}]:{proxy}" if ":" in host else f"{host}:{proxy}"
                result = run_probe(as_user, python, where, claim, dest, echo_port, name)
            result.update(server=server, client=client, as_user=as_user, claim=claim,
                          dest=dest, proxy_host=host, proxy_port=proxy)
            out["cases"][name] = result
            log(f"{name}: {result.get('code')}")

        # Each request logs when it ends; wait (bounded) for every line.
        deadline = time.monotonic() + 10
        while True:
            missing = []
            for name, result in out["cases"].items():
                logfile = servers[result["server"]][3]
                text = logfile.read_text(errors="replace") if logfile.exists() else ""
                result["log_line"] = access_line(text, result.get("source_port", -1))
                if result["log_line"] is None:
                    missing.append(name)
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.1)

        out["echo_seen"] = list(echo.seen)  # type: ignore[attr-defined]
        out["http_seen"] = list(web.seen)  # type: ignore[attr-defined]
        echo.shutdown()
        web.shutdown()
        silent.close()
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(confdir, ignore_errors=True)

    oidentd_text = (workdir / "oidentd.log").read_text(errors="replace")
    out["oidentd_log"] = oidentd_text
    oidentd_lines = oidentd_text.splitlines()
    for name, result in out["cases"].items():
        port = result.get("source_port")
        matching = [i for i, line in enumerate(oidentd_lines)
                    if f"] {port} , " in line or f"lookup: {port} , " in line]
        result["oidentd_lines"] = [oidentd_lines[i] for i in matching]
        # Who sent the query: the "Connection from" line just before the answer
        # (cases run one at a time, so queries do not interleave).
        result["oidentd_peer"] = None
        for line in reversed(oidentd_lines[:matching[0]] if matching else []):
            peer = OIDENTD_PEER.match(line)
            if peer:
                result["oidentd_peer"] = peer.group("address") or peer.group("bare")
                break
    out["server_logs"] = {
        name: (logfile.read_text(errors="replace") if logfile.exists() else "")
        for name, (_, _, _, logfile) in servers.items()}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--twistd", required=True)
    parser.add_argument("--oidentd", default="oidentd")
    parser.add_argument("--parent-netns", required=True,
                        help="readlink /proc/self/ns/net of the caller; we refuse to run there")
    args = parser.parse_args()
    ours = os.readlink("/proc/self/ns/net")
    if ours == args.parent_netns:
        print(f"refusing to run: still in the caller's network namespace {ours}; "
              "run me under unshare -n", file=sys.stderr)
        return 3
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(4))
    print(json.dumps(run(args.workdir.resolve(), os.path.abspath(args.twistd), args.oidentd)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
