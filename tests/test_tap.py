"""`twistd socks4` options: what each one turns into, and the usage errors."""

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.python import usage

from socksident.ident import IdentMode
from socksident.policy import DefaultPolicy
from socksident.tap import DEFAULT_PORT, Options, makeService


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_defaults_are_safe_and_documented():
    options = parse()
    assert options["ports"] == [DEFAULT_PORT] == ["tcp:1080:interface=127.0.0.1"]
    settings = options["settings"]
    assert (settings.request_timeout, settings.connect_timeout, settings.bind_timeout) == (30, 120, 120)
    assert settings.idle_timeout is None and settings.ident_timeout == 15
    assert settings.ident_port == 113 and settings.bind_ports is None
    assert not settings.bind_without_connect
    assert isinstance(options["policy"], DefaultPolicy)
    assert options["policy"].ident_mode is IdentMode.OFF


def test_ports_are_repeatable_and_a_bare_number_is_tcp():
    options = parse("--port", "1080", "-p", "tcp6:1081:interface=\\:\\:1")
    assert options["ports"] == ["tcp:1080", "tcp6:1081:interface=\\:\\:1"]


@pytest.mark.parametrize(
    "argv, mode",
    [
        (["--ident"], IdentMode.REQUIRE),
        (["--ident", "--port", "1080"], IdentMode.REQUIRE),
        (["--port", "1080", "--ident"], IdentMode.REQUIRE),
        (["--ident=require"], IdentMode.REQUIRE),
        (["--ident=check"], IdentMode.CHECK),
        (["--ident", "check"], IdentMode.CHECK),
        (["--ident=off"], IdentMode.OFF),
    ],
)
def test_ident_modes(argv, mode):
    assert parse(*argv)["policy"].ident_mode is mode


def test_timeouts_and_bind_settings():
    settings = parse(
        "--request-timeout", "5", "--connect-timeout", "7.5", "--bind-timeout", "9",
        "--idle-timeout", "600", "--ident-timeout", "3", "--ident-port", "1113",
        "--bind-ports", "40000-40010", "--bind-without-connect",
    )["settings"]
    assert (settings.request_timeout, settings.connect_timeout, settings.bind_timeout) == (5, 7.5, 9)
    assert (settings.idle_timeout, settings.ident_timeout, settings.ident_port) == (600, 3, 1113)
    assert settings.bind_ports == (40000, 40010) and settings.bind_without_connect


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ident=maybe"], "--ident takes require, check or off"),
        (["--connect-timeout", "soon"], "--connect-timeout takes a number of seconds"),
        (["--request-timeout", "0"], "--request-timeout must be a positive number"),
        (["--idle-timeout", "-1"], "--idle-timeout must be a positive number"),
        (["--bind-ports", "10-5"], "--bind-ports takes LOW-HIGH"),
        (["--bind-ports", "0-5"], "--bind-ports takes LOW-HIGH"),
        (["--bind-ports", "a-b"], "--bind-ports takes LOW-HIGH"),
        (["--ident-port", "70000"], "--ident-port takes a port number"),
        (["stray"], "Wrong number of arguments"),
    ],
)
def test_usage_errors_name_the_option(argv, message):
    with pytest.raises(usage.UsageError, match=message):
        parse(*argv)


def test_service_listens_on_every_port():
    top = makeService(parse("--port", "tcp:0:interface=127.0.0.1", "--port", "tcp:0"))
    endpoints = [s for s in top if isinstance(s, StreamServerEndpointService)]
    assert len(endpoints) == 2
    assert endpoints[0].factory is endpoints[1].factory


def test_bad_endpoint_is_a_usage_error():
    with pytest.raises(usage.UsageError, match="--port 'nonsense:1'"):
        makeService(parse("--port", "nonsense:1"))
