"""socksident: a SOCKS4 and SOCKS4A server for Twisted with RFC 1413 IDENT checks."""

__version__ = "0.1.0"
