"""A raw SOCKS4/4A CONNECT probe that reports the exact reply code, as JSON.

Standard library only, so that any Python 3 can run it as any user, even from
standard input (``runuser -u nobody -- python3 - ARGS < socks4_probe.py``),
without reading files the user may not reach.  The SOCKS request and a token
line go out in one write; on reply 90 the probe reads the echoed token back,
proving that data flows through the relay.

    python3 socks4_probe.py PROXY USERID DEST_HOST DEST_PORT TOKEN

PROXY is a port on 127.0.0.1, IPV4:PORT, or [IPV6]:PORT (``[::1]:1083``,
in brackets): the probe then connects over IPv6 (AF_INET6).  DEST_HOST
is an IPv4 address (SOCKS4) or a name (SOCKS4A, resolved by the proxy).  Every
wait is bounded; the output is one JSON object on stdout, including the
address family and the local address the probe connected from.
"""

import ipaddress
import json
import socket
import struct
import sys
import time

TIMEOUT = 5.0


def request_bytes(user: str, host: str, port: int) -> bytes:
    try:
        address = ipaddress.IPv4Address(host).packed
        name = b""
    except ValueError:  # SOCKS4A: 0.0.0.1 and the name after the user id
        address = bytes([0, 0, 0, 1])
        name = host.encode("ascii") + b"\x00"
    return struct.pack("!BBH", 4, 1, port) + address + user.encode("latin-1") + b"\x00" + name


def parse_proxy(spec: str) -> tuple:
    """``PORT``, ``HOST:PORT`` or ``[IPV6]:PORT`` -> (family, host, port)."""
    if spec.isdigit():
        return socket.AF_INET, "127.0.0.1", int(spec)
    if spec.startswith("["):
        host, sep, port = spec[1:].partition("]:")
    else:
        host, sep, port = spec.rpartition(":")
        if ":" in host:
            raise ValueError(f"put an IPv6 proxy address in brackets: {spec!r}")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"PROXY must be PORT, HOST:PORT or [IPV6]:PORT, not {spec!r}")
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), host, int(port)


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def probe(proxy: str, user: str, host: str, port: int, token: str) -> dict:
    family, proxy_host, proxy_port = parse_proxy(proxy)
    result = {"user": user, "host": host, "port": port, "token": token,
              "proxy": [proxy_host, proxy_port],
              "family": "AF_INET6" if family == socket.AF_INET6 else "AF_INET"}
    started = time.monotonic()
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(TIMEOUT)
        sock.connect((proxy_host, proxy_port))
        result["source_host"], result["source_port"] = sock.getsockname()[:2]
        line = token.encode("ascii") + b"\n"
        sock.sendall(request_bytes(user, host, port) + line)
        reply = recv_exactly(sock, 8)
        result["elapsed"] = time.monotonic() - started
        result["reply_hex"] = reply.hex()
        if len(reply) != 8 or reply[0] != 0:
            result["code"] = None
            result["error"] = f"bad reply {reply!r}"
            return result
        result["code"] = reply[1]
        if reply[1] == 90:
            result["echo"] = recv_exactly(sock, len(line)).decode("ascii", "replace")
        else:
            # A refusal is the last thing the proxy sends: it must close.
            result["after_reply"] = sock.recv(100).decode("latin-1")
    except OSError as error:
        result.setdefault("code", None)
        result["error"] = f"{type(error).__name__}: {error}"
    finally:
        sock.close()
    return result


def main(argv: list) -> int:
    proxy, user, host, port, token = argv
    print(json.dumps(probe(proxy, user, host, int(port), token)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
