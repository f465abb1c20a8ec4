"""--max-connections and --max-per-host on a real twistd: a burst past the
limits gets 91 naming them, others are served, and once the burst has ended
the full limits are available again (no count leaked)."""

from __future__ import annotations

import socket
from pathlib import Path

from socksident.socks4 import Command, ReplyCode, build_request, parse_reply
from tests.integration.test_shutdown import Echo
from tests.integration.twistd_server import LOOPBACK, TwistdServer, wait_for


def connect(server: TwistdServer, echo: Echo, source: str) -> tuple[socket.socket, int]:
    client = socket.create_connection((server.host, server.port), timeout=10,
                                      source_address=(source, 0))
    client.sendall(build_request(Command.CONNECT, echo.port, LOOPBACK, "alice"))
    reply = b""
    while len(reply) < 8:
        chunk = client.recv(8 - len(reply))
        assert chunk, "closed without a reply"
        reply += chunk
    return client, parse_reply(reply)[0]


def test_a_burst_past_the_limits_and_its_end(tmp_path: Path) -> None:
    echo = Echo()
    server = TwistdServer(tmp_path, ["--max-connections", "5", "--max-per-host", "3"])
    try:
        for round_ in range(2):  # the second round finds every slot free again
            held = []
            codes = []
            for n in range(5):  # 3 granted, then 2 past the per-host limit
                client, code = connect(server, echo, "127.0.0.1")
                held.append(client)
                codes.append(code)
            assert codes == [ReplyCode.GRANTED] * 3 + [ReplyCode.REJECTED] * 2, round_
            for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
                client, code = connect(server, echo, source)
                held.append(client)
                codes.append(code)
            # 127.0.0.2 and .3 fill the 5 slots; .4 finds the server full.
            assert codes[5:] == [ReplyCode.GRANTED, ReplyCode.GRANTED, ReplyCode.REJECTED]
            for client in held:
                client.close()
            wait_for(lambda: len(server.access_lines()) == 8 * (round_ + 1), 15,
                     "every record of the round")
        lines = server.access_lines()
        assert sum("per-host limit 3 reached for 127.0.0.1" in line for line in lines) == 4
        assert sum("connection limit 5 reached" in line for line in lines) == 2
        assert server.poison() == []
    finally:
        server.stop()
        echo.close()
