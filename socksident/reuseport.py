"""One listening port as N SO_REUSEPORT sockets that send each client host to one of them.

`--workers N` needs the state a worker keeps per client host (the CONNECTs a
BIND may follow, per-host limits) to see all of that host's connections, so
the kernel must not spread one host over the workers.  The group gets a
classic BPF program (`SO_ATTACH_REUSEPORT_CBPF`) that returns
``hash(source address) % N``: the index of the socket, in the order the
sockets started listening, that takes the connection.  `worker_for` computes
the same function in Python, for tests and for operators.

The parent process opens all N sockets and keeps them open for its whole
life; worker k adopts socket k.  A worker that dies and is restarted adopts
the same socket again, so the group never changes order (the kernel fills a
closed socket's slot with the last one, which would move hosts between
workers), and connections that arrive meanwhile wait in that socket's
backlog instead of being reset.

Linux only (3.9 for SO_REUSEPORT, 4.5 for the program).
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from dataclasses import dataclass

__all__ = [
    "SO_ATTACH_REUSEPORT_CBPF",
    "SKF_NET_OFF",
    "ListeningGroup",
    "affinity_program",
    "attach_program",
    "encode_program",
    "open_group",
    "worker_for",
]

SO_ATTACH_REUSEPORT_CBPF = 51
#: Offset base for loads relative to the network (IP) header: at the time
#: the program runs, skb->data already points past the TCP header.
SKF_NET_OFF = -0x100000
#: Knuth's multiplicative constant: spreads neighbouring addresses.
_GOLDEN = 0x9E3779B1

# Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
_LD_B_ABS = 0x00 | 0x10 | 0x20
_LD_W_ABS = 0x00 | 0x00 | 0x20
_ALU_RSH_K = 0x04 | 0x70 | 0x00
_ALU_MUL_K = 0x04 | 0x20 | 0x00
_ALU_MOD_K = 0x04 | 0x90 | 0x00
_ALU_XOR_X = 0x04 | 0xA0 | 0x08
_JMP_JEQ_K = 0x05 | 0x10 | 0x00
_JMP_JA = 0x05 | 0x00 | 0x00
_MISC_TAX = 0x07 | 0x00
_RET_A = 0x06 | 0x10

Instruction = tuple[int, int, int, int]  # code, jt, jf, k


def _net(offset: int) -> int:
    return (SKF_NET_OFF + offset) & 0xFFFFFFFF


def affinity_program(count: int) -> list[Instruction]:
    """The program: fold the source address to 32 bits, mix, ``% count``.

    IPv4: the source word (header bytes 12-15).  IPv6: the xor of its four
    words (bytes 8-23).  An IPv4 client of a dual-stack tcp6 listener
    arrives as an IPv4 packet, so it hashes like the same client on tcp.
    """
    if count < 1:
        raise ValueError(f"a group has at least one socket, not {count}")
    fold_v6: list[Instruction] = []
    for offset in (8, 12, 16, 20):
        fold_v6.append((_LD_W_ABS, 0, 0, _net(offset)))
        if offset != 8:
            fold_v6.append((_ALU_XOR_X, 0, 0, 0))
        if offset != 20:
            fold_v6.append((_MISC_TAX, 0, 0, 0))
    return [
        (_LD_B_ABS, 0, 0, _net(0)),  # version and header length
        (_ALU_RSH_K, 0, 0, 4),
        (_JMP_JEQ_K, 2, 0, 6),  # IPv6: skip the two IPv4 instructions
        (_LD_W_ABS, 0, 0, _net(12)),
        (_JMP_JA, 0, 0, len(fold_v6)),
        *fold_v6,
        (_ALU_MUL_K, 0, 0, _GOLDEN),
        (_ALU_RSH_K, 0, 0, 16),
        (_ALU_MOD_K, 0, 0, count),
        (_RET_A, 0, 0, 0),
    ]


def encode_program(program: list[Instruction]) -> bytes:
    """The `struct sock_filter` array the kernel reads, in host byte order."""
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


def worker_for(address: str, count: int) -> int:
    """The index `affinity_program(count)` picks for a client at `address`."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        folded = int(ip)
    else:
        packed = ip.packed
        folded = 0
        for offset in (0, 4, 8, 12):
            folded ^= int.from_bytes(packed[offset : offset + 4], "big")
    return (((folded * _GOLDEN) & 0xFFFFFFFF) >> 16) % count


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def attach_program(sock: socket.socket, program: list[Instruction]) -> None:
    """Give `sock`'s reuseport group `program` (it applies to the whole group)."""
    code = ctypes.create_string_buffer(encode_program(program))
    fprog = _SockFprog(len(program), ctypes.cast(code, ctypes.c_void_p))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))


@dataclass
class ListeningGroup:
    """N listening sockets on one address, in their group's order."""

    family: socket.AddressFamily
    host: str
    port: int
    sockets: list[socket.socket]

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def _refuse_shared_port(family: socket.AddressFamily, host: str, port: int) -> None:
    """Fail as a plain listener would when another reuseport group holds the port.

    Sockets of the same user with SO_REUSEPORT may join a group silently: a
    second server started on a busy port would share its connections
    instead of failing.  A probe without SO_REUSEPORT sees the conflict.
    """
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


def open_group(
    family: socket.AddressFamily, host: str, port: int, backlog: int, count: int
) -> ListeningGroup:
    """Bind and listen `count` sockets on (host, port) and attach the program.

    Port 0 binds the first socket to a free port and the others to it.
    Raises OSError (closing what it opened) when the address cannot listen.
    """
    if port:
        _refuse_shared_port(family, host, port)
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            port = sock.getsockname()[1]
            sock.setblocking(False)
        attach_program(sockets[0], affinity_program(count))
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return ListeningGroup(family, host, port, sockets)

