"""Shared by the fuzz targets: one input becomes settings, pieces and a payload."""

from __future__ import annotations

__all__ = ["pieces"]


def pieces(data: bytes) -> tuple[int, list[bytes]]:
    """(a control byte, the rest cut where the next bytes say).

    Byte 0 is left to the target (a setting); byte 1 says how many cuts
    (0-7), the next that many bytes where (as a fraction of the payload), so
    the fuzzer explores splits as well as contents.
    """
    if len(data) < 2:
        return (data[0] if data else 0), [data[1:]]
    control, count = data[0], data[1] % 8
    cuts_raw, payload = data[2 : 2 + count], data[2 + count :]
    cuts = sorted(b * len(payload) // 255 for b in cuts_raw)
    out, start = [], 0
    for cut in cuts + [len(payload)]:
        out.append(payload[start:cut])
        start = cut
    return control, out
