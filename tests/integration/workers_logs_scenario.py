"""`--workers 2` with `--metrics` and `--access-log`, in a private network namespace.

Run by tests/integration/test_workers_logs.py as root under ``unshare -n``
(fixed ports, clients on 127.0.0.1-127.0.0.12, so both workers serve some).
It starts an echo server and the real twistd with two workers, a metrics
endpoint and an access log, then, in order:

counts      three echoed CONNECTs and one refused one (91) from each client
            address; once every access line is in, a scrape of /metrics
held        two relays held open on worker 0: the gauges count them; then
            SIGKILL to worker 0: once it is restarted its gauges are gone
            from the sum and the counts it made are still there
rotation    four clients (two per worker) make refused CONNECTs while the
            file is renamed and SIGUSR1 sent to the parent three times; the
            records of all files are counted, and scraped once more
terminate   SIGTERM: the parent exits 0 and removes its metrics directory

It prints one JSON object with what it saw; the test judges it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from workers_scenario import (
    CLIENTS,
    ECHO_PORT,
    PROXY_PORT,
    WAIT,
    EchoServer,
    Twistd,
    _Echo,
    access_workers,
    connect_once,
    open_client,
    poll,
    recv_exactly,
    request,
)

METRICS_PORT = 9108
CLOSED_PORT = 9  # nothing listens there: a granted CONNECT that fails, 91
ROTATIONS = 3
LOAD_CLIENTS = 4
LOAD_REQUESTS = 100


def scrape() -> dict[str, float]:
    """Every sample of /metrics as ``name{label=value,...}`` -> value."""
    url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
    with urllib.request.urlopen(url, timeout=WAIT) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def records(workdir: Path) -> dict[str, Any]:
    """The access log's files: their records, and whether each ends in a whole line."""
    found: list[dict[str, Any]] = []
    whole = True
    names = []
    for path in sorted(workdir.glob("access.json*")):
        text = path.read_text()
        whole = whole and (text == "" or text.endswith("\n"))
        names.append((path.name, text.count("\n")))
        found.extend(json.loads(line) for line in text.splitlines())
    return {"records": found, "whole": whole, "files": names}


def refused(source: str) -> int:
    with open_client(source) as sock:
        sock.sendall(request(1, CLOSED_PORT, "127.0.0.1"))
        return recv_exactly(sock, 8)[1]


class Proxy(Twistd):
    """twistd with TMPDIR in the work directory, to see its metrics directory."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.out = workdir / "twistd-0.log"
        twistd = str(Path(sys.executable).with_name("twistd"))
        with open(self.out, "wb") as out:
            self.process = subprocess.Popen(
                [twistd, "-n", "--pidfile=", "socks4", *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
                env=dict(os.environ, TMPDIR=str(workdir)),
            )


def run(workdir: Path) -> dict[str, Any]:
    from socksident.reuseport import worker_for

    report: dict[str, Any] = {}
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    echo = EchoServer(("127.0.0.1", ECHO_PORT), _Echo)
    threading.Thread(target=echo.serve_forever, args=(0.05,), daemon=True).start()
    access = workdir / "access.json"
    proxy = Proxy(workdir, "--workers", "2", "--port", f"tcp:{PROXY_PORT}:interface=127.0.0.1",
                  "--metrics", f"tcp:{METRICS_PORT}:interface=127.0.0.1",
                  "--access-log", str(access))
    try:
        pids = {}
        for worker in (0, 1):
            pids[worker] = poll(lambda: proxy.alive() or proxy.serving(worker),
                                f"worker {worker} to serve")[0]
        report["metrics_dirs"] = [p.name for p in workdir.glob("socksident-metrics-*")]

        # counts
        connects = [connect_once(source, f"{source}-{n}".encode())
                    for n in range(3) for source in CLIENTS]
        report["refused_codes"] = [refused(source) for source in CLIENTS]
        report["connects"] = connects
        expected = len(connects) + len(CLIENTS)
        poll(lambda: len(records(workdir)["records"]) >= expected, "an access record each")
        report["counts_records"] = records(workdir)
        report["counts_workers"] = sorted(set(access_workers(proxy).values()))
        report["counts_metrics"] = scrape()

        # held relays, then a killed worker
        zero = [source for source in CLIENTS if worker_for(source, 2) == 0]
        held = [open_client(source) for source in zero[:2]]
        for sock in held:
            sock.sendall(request(1, ECHO_PORT, "127.0.0.1"))
            assert recv_exactly(sock, 8)[1] == 90
        report["held_metrics"] = poll(
            lambda: (m := scrape()).get("socksident_active_relays{}") == 2 and m,
            "the gauges to count the held relays")
        mark = len(proxy.text.splitlines())
        os.kill(pids[0], signal.SIGKILL)
        report["restarted"] = poll(lambda: proxy.alive() or proxy.serving(0, after=mark),
                                   "worker 0 to be restarted")[0]
        for sock in held:
            sock.close()
        report["after_kill_metrics"] = poll(
            lambda: (m := scrape()).get("socksident_open_connections{}") == 0 and m,
            "the dead worker's gauges to leave the sum")

        # rotation under load
        load_sources = zero[:2] + [s for s in CLIENTS if worker_for(s, 2) == 1][:2]
        codes: list[int] = []
        errors: list[str] = []
        lock = threading.Lock()

        def load(source: str) -> None:
            try:
                for _ in range(LOAD_REQUESTS):
                    code = refused(source)
                    with lock:
                        codes.append(code)
            except Exception as error:  # reported in the JSON
                errors.append(repr(error))

        threads = [threading.Thread(target=load, args=(s,)) for s in load_sources]
        for thread in threads:
            thread.start()
        for n in range(1, ROTATIONS + 1):
            poll(lambda: len(codes) >= n * LOAD_REQUESTS * LOAD_CLIENTS // (ROTATIONS + 1),
                 "load before a rotation")
            access.rename(workdir / f"access.json.{n}")
            proxy.process.send_signal(signal.SIGUSR1)
        for thread in threads:
            thread.join(WAIT * 5)
        report["load_codes"] = sorted(set(codes))
        report["load_count"] = len(codes)
        report["load_errors"] = errors
        total = expected + len(codes)
        poll(lambda: len(records(workdir)["records"]) >= total, "every record after rotation")
        report["rotation_metrics"] = scrape()
        report["load_sources"] = load_sources

        # terminate
        proxy.process.send_signal(signal.SIGTERM)
        report["exit_status"] = proxy.process.wait(WAIT)
        report["final_records"] = records(workdir)
        report["metrics_dirs_after"] = [p.name for p in workdir.glob("socksident-metrics-*")]
    finally:
        if proxy.process.poll() is None:
            proxy.process.kill()
            proxy.process.wait()
        report["log"] = proxy.text
    echo.shutdown()
    return report


def main() -> int:
    workdir = Path(sys.argv[1])
    try:
        report = run(workdir)
    except Exception as error:  # the test shows it with whatever was logged
        import traceback

        report = {"error": "".join(traceback.format_exception(error))}
        logs = sorted(workdir.glob("twistd-*.log"))
        report["log"] = "\n".join(p.read_text(errors="replace") for p in logs)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
