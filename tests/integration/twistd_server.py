"""One real `twistd socks4` in a child process, watched from outside.

For the tests that measure the server as an operator would: its descriptors
(/proc/PID/fd), its resident memory (/proc/PID/status) and its log file.
Everything here blocks, so the tests that use it are plain functions (or run
it in a thread), never on the reactor.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

LOOPBACK = "127.0.0.1"

#: What must never appear in a server's log: a logged failure (traceback) or a
#: Deferred garbage-collected with a failure nobody handled.
LOG_POISON = ("Traceback", "Unhandled error", "Unhandled Error")


def twistd_path() -> str:
    return str(Path(sys.executable).with_name("twistd"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> None:
    """Poll `predicate` until it holds; fail after `timeout` seconds (a bound, not a measure)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


class TwistdServer:
    """`twistd -n socks4 ARGS` on a free loopback port, logging to a file."""

    def __init__(
        self,
        directory: Path,
        args: Sequence[str] = (),
        port: Optional[int] = None,
        interface: str = LOOPBACK,
        preexec: Optional[Callable[[], None]] = None,
        wrapper: Sequence[str] = (),
        endpoint: str = "tcp:{port}:interface={interface}",
    ) -> None:
        self.directory = directory
        self.port = port if port is not None else _free_port()
        self.host = interface
        self.logfile = directory / f"twistd-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("COV")}
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        command = [
            *wrapper,
            twistd_path(),
            "-n",
            "--pidfile=",
            f"--logfile={self.logfile}",
            "socks4",
            "--port",
            endpoint.format(port=self.port, interface=interface),
            *args,
        ]
        self.process = subprocess.Popen(
            command,
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=preexec,
        )
        try:
            wait_for(self._listening, 30, "twistd's start-up line")
        except AssertionError:
            self.stop()
            raise AssertionError(f"twistd did not start:\n{self.log()}\n{self._stderr()}")

    @property
    def pid(self) -> int:
        """The server's own process (under `unshare`/`prlimit`, the last exec'd child)."""
        return self.process.pid

    def _stderr(self) -> str:
        if self.process.poll() is None or self.process.stderr is None:
            return ""
        return self.process.stderr.read().decode(errors="replace")

    def _listening(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"twistd exited ({self.process.returncode}):\n{self.log()}"
                                 f"\n{self._stderr()}")
        return "listening on" in self.log()

    def log(self) -> str:
        """The whole log, oldest first: twistd rotates its file every megabyte
        (``twistd.log.N``, the highest N the oldest)."""
        rotated = sorted(
            (int(path.suffix[1:]), path)
            for path in self.directory.glob(self.logfile.name + ".*")
            if path.suffix[1:].isdigit()
        )
        parts = [path for _, path in reversed(rotated)] + [self.logfile]
        text = []
        for path in parts:
            try:
                text.append(path.read_text(errors="replace"))
            except FileNotFoundError:
                pass
        return "".join(text)

    def access_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if "[socksident.access" in line]

    def descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def socket_descriptors(self) -> int:
        count = 0
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                if os.readlink(f"/proc/{self.pid}/fd/{name}").startswith("socket:"):
                    count += 1
            except FileNotFoundError:
                pass
        return count

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS line")

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_descriptors(self, at_most: int, timeout: float, what: str = "") -> None:
        wait_for(
            lambda: self.descriptors() <= at_most,
            timeout,
            f"the server's descriptors back to {at_most} {what}(now {self.descriptors()})",
        )

    def poison(self) -> list[str]:
        """Log lines that show a traceback or an unhandled failure."""
        return [line for line in self.log().splitlines() if any(p in line for p in LOG_POISON)]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stderr is not None:
            self.process.stderr.close()
