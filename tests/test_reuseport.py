"""The reuseport affinity program: its bytes, and what it computes, run by a small cBPF interpreter.

The interpreter executes the encoded program on IPv4 and IPv6 headers the
way the kernel does for a reuseport group (loads relative to SKF_NET_OFF
read the IP header, big-endian), so `worker_for` is checked against the
program itself, not against a second copy of the formula.  The kernel's
own behaviour is checked in tests/integration/test_workers.py.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import struct

import pytest

from socksident.reuseport import (
    SKF_NET_OFF,
    affinity_program,
    attach_program,
    encode_program,
    open_group,
    worker_for,
)

BPF_MAXINSNS = 4096


def run_cbpf(code: bytes, packet: bytes) -> int:
    """Execute a classic BPF program on a packet whose IP header starts at SKF_NET_OFF."""
    program = [struct.unpack("=HBBI", code[i : i + 8]) for i in range(0, len(code), 8)]
    a = x = 0
    pc = 0
    while True:
        op, jt, jf, k = program[pc]
        pc += 1
        klass = op & 0x07
        if klass == 0x00:  # LD ABS
            offset = k - (SKF_NET_OFF & 0xFFFFFFFF)
            size = {0x00: 4, 0x08: 2, 0x10: 1}[op & 0x18]
            assert op & 0xE0 == 0x20 and 0 <= offset <= len(packet) - size, (op, k)
            a = int.from_bytes(packet[offset : offset + size], "big")
        elif klass == 0x04:  # ALU
            operand = x if op & 0x08 else k
            a = {
                0x20: lambda: a * operand,
                0x70: lambda: a >> operand,
                0x90: lambda: a % operand,
                0xA0: lambda: a ^ operand,
            }[op & 0xF0]() & 0xFFFFFFFF
        elif klass == 0x05:  # JMP
            if op & 0xF0 == 0x00:
                pc += k
            else:
                assert op & 0xF0 == 0x10
                pc += jt if a == k else jf
        elif klass == 0x07:  # MISC: TAX
            assert op == 0x07
            x = a
        elif klass == 0x06:  # RET A
            assert op == 0x16
            return a
        else:
            raise AssertionError(f"unexpected opcode {op:#x}")


def ip_header(source: str) -> bytes:
    address = ipaddress.ip_address(source)
    if address.version == 4:
        return bytes([0x45, 0, 0, 60, 0, 0, 0x40, 0, 64, 6, 0, 0]) + address.packed + bytes(
            [127, 0, 0, 1]
        )
    return bytes([0x60, 0, 0, 0, 0, 40, 6, 64]) + address.packed + bytes(15) + b"\1"


def test_the_program_for_two_workers_is_these_bytes():
    assert encode_program(affinity_program(2)).hex() == "".join(
        [
            "30000000" "0000f0ff",  # ldb [net+0]: version
            "74000000" "04000000",  # rsh #4
            "15000200" "06000000",  # jeq #6 (jt 2, jf 0): IPv6 skips the next two
            "20000000" "0c00f0ff",  # ld [net+12]: the IPv4 source
            "05000000" "0a000000",  # ja +10: to the hash
            "20000000" "0800f0ff",  # ld [net+8]: IPv6 source, word 1
            "07000000" "00000000",  # tax
            "20000000" "0c00f0ff",  # ld [net+12]
            "ac000000" "00000000",  # xor x
            "07000000" "00000000",  # tax
            "20000000" "1000f0ff",  # ld [net+16]
            "ac000000" "00000000",  # xor x
            "07000000" "00000000",  # tax
            "20000000" "1400f0ff",  # ld [net+20]
            "ac000000" "00000000",  # xor x
            "24000000" "b179379e",  # mul #0x9e3779b1
            "74000000" "10000000",  # rsh #16
            "94000000" "02000000",  # mod #2
            "16000000" "00000000",  # ret a
        ]
    )


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 64])
def test_the_program_computes_worker_for_on_ipv4_and_ipv6(count):
    code = encode_program(affinity_program(count))
    assert len(code) // 8 <= BPF_MAXINSNS
    rng = random.Random(count)
    sources = [f"127.0.0.{n}" for n in range(1, 40)] + ["::1", "fd00::2", "2001:db8::1:2"]
    sources += [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(100)]
    sources += [str(ipaddress.IPv6Address(rng.getrandbits(128))) for _ in range(100)]
    for source in sources:
        index = run_cbpf(code, ip_header(source))
        assert index == worker_for(source, count) and 0 <= index < count, source


def test_an_ipv4_client_of_a_dual_stack_listener_hashes_as_ipv4():
    assert worker_for("::ffff:127.0.0.5", 3) == worker_for("127.0.0.5", 3)


def test_neighbouring_addresses_spread_over_the_workers():
    counts = [0, 0, 0, 0]
    for n in range(1, 255):
        counts[worker_for(f"10.0.0.{n}", 4)] += 1
    assert min(counts) > 254 // 4 // 2, counts


def test_a_group_needs_a_socket():
    with pytest.raises(ValueError):
        affinity_program(0)


def test_the_kernel_accepts_the_program_and_the_group_shares_one_port():
    group = open_group(socket.AF_INET, "127.0.0.1", 0, 16, 3)
    try:
        assert group.port != 0
        assert [s.getsockname() for s in group.sockets] == [("127.0.0.1", group.port)] * 3
        attach_program(group.sockets[1], affinity_program(3))  # any member may replace it
    finally:
        group.close()


def test_a_port_held_by_another_listener_is_refused_even_with_reuseport():
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    try:
        with pytest.raises(OSError):
            open_group(socket.AF_INET, "127.0.0.1", holder.getsockname()[1], 16, 2)
    finally:
        holder.close()
