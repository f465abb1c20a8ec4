"""Endpoint-string dropin: ``socks4:host=H:port=P:proxy=ENDPOINT[:user=U][:timeout=S]``.

Imports nothing heavy, never the reactor: the parser is loaded on first use.
"""

from twisted.internet.interfaces import IStreamClientEndpointStringParserWithReactor
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class _SOCKS4ClientParser:
    prefix = "socks4"

    def parseStreamClient(self, reactor, *args, **kwargs):  # type: ignore[no-untyped-def]
        from socksident.client import endpoint_from_string_arguments

        return endpoint_from_string_arguments(reactor, *args, **kwargs)


socks4ClientEndpoint = _SOCKS4ClientParser()
