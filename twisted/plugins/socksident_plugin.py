"""twistd dropin: `twistd socks4`.  Imports nothing heavy, never the reactor."""

from twisted.application.service import ServiceMaker

socks4 = ServiceMaker(
    "socksident SOCKS4/4A proxy",
    "socksident.tap",
    "A SOCKS4 and SOCKS4A proxy with RFC 1413 IDENT verification (replies 92/93).",
    "socks4",
)
