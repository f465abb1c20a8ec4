"""`--port haproxy:ENDPOINT`: our own PROXY header reading, one shared factory."""

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.python import usage

from socksident.server import ProxyListenerFactory, SOCKS4ServerFactory
from socksident.tap import Options, makeService, split_proxy


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_split_proxy_keeps_twisteds_spelling():
    assert split_proxy("haproxy:tcp:1080") == ("tcp:1080", True)
    assert split_proxy("haproxy:1080") == ("tcp:1080", True)
    assert split_proxy("tcp:1080") == ("tcp:1080", False)


def test_a_haproxy_port_is_a_plain_endpoint_with_a_header_reading_factory():
    options = parse(
        "--port", "haproxy:tcp:0:interface=127.0.0.1",
        "--port", "tcp:0:interface=127.0.0.1",
        "--bind-address", "127.0.0.1",
    )
    assert options["proxied"] == [True, False]
    # not Twisted's wrapper: the transport stays the real one
    assert all(isinstance(e, TCP4ServerEndpoint) for e in options["endpoints"])
    proxied, direct = [s for s in makeService(options) if isinstance(s, StreamServerEndpointService)]
    assert isinstance(proxied.factory, ProxyListenerFactory)
    assert isinstance(direct.factory, SOCKS4ServerFactory)
    assert proxied.factory.server is direct.factory  # one registry for both
    assert proxied.description == "haproxy:tcp:0:interface=127.0.0.1"


def test_a_haproxy_port_needs_a_bind_address():
    with pytest.raises(usage.UsageError, match="needs --bind-address"):
        parse("--port", "haproxy:tcp:1080")
