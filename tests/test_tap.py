"""`twistd socks4` options: what each one turns into, and the usage errors."""

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.python import usage

from socksident import services
from socksident.policy import DefaultPolicy, IdentMode
from socksident.settings import ServerSettings
from socksident.tap import DEFAULT_PORT, ListenError, Options, makeService, with_backlog


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
    assert settings.linger_timeout == 5
    assert settings.ident_port == 113 and settings.bind_ports is None
    assert settings.bind_address is None
    assert not settings.bind_without_connect
    assert isinstance(options["policy"], DefaultPolicy)
    assert options["policy"].ident_mode is IdentMode.OFF


def test_option_defaults_are_the_settings_defaults():
    """Each default is written once, in ServerSettings; the options derive theirs."""
    assert parse()["settings"] == ServerSettings()


def test_connection_limits_are_off_by_default_and_set_by_their_options():
    assert (parse()["settings"].max_connections, parse()["settings"].max_per_host) == (0, 0)
    settings = parse("--max-connections", "500", "--max-per-host", "20")["settings"]
    assert (settings.max_connections, settings.max_per_host) == (500, 20)


def test_shutdown_timeout_defaults_to_30_s_and_may_be_zero():
    assert parse()["settings"].shutdown_timeout == 30
    assert parse("--shutdown-timeout", "0")["settings"].shutdown_timeout == 0


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
        "--bind-ports", "40000-40010", "--bind-without-connect", "--bind-address", "127.0.0.2",
        "--linger-timeout", "2.5",
    )["settings"]
    assert settings.linger_timeout == 2.5
    assert (settings.request_timeout, settings.connect_timeout, settings.bind_timeout) == (5, 7.5, 9)
    assert (settings.idle_timeout, settings.ident_timeout, settings.ident_port) == (600, 3, 1113)
    assert settings.bind_ports == (40000, 40010) and settings.bind_without_connect
    assert settings.bind_address == "127.0.0.2"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ident=maybe"], "--ident takes require, check or off"),
        (["--ident", "maybe"], "--ident takes require, check or off, not 'maybe'"),
        (["--connect-timeout", "soon"], "--connect-timeout takes a number of seconds"),
        (["--request-timeout", "0"], "--request-timeout must be a positive number"),
        (["--idle-timeout", "-1"], "--idle-timeout must be a positive number"),
        (["--linger-timeout", "0"], "--linger-timeout must be a positive number"),
        (["--bind-ports", "10-5"], "--bind-ports takes LOW-HIGH"),
        (["--bind-ports", "0-5"], "--bind-ports takes LOW-HIGH"),
        (["--bind-ports", "a-b"], "--bind-ports takes LOW-HIGH"),
        (["--ident-port", "70000"], "--ident-port takes a port number"),
        (["--bind-address", "outside"], "--bind-address takes an IP address"),
        (["--bind-address", "192.0.2.1"], "--bind-address 192.0.2.1: not an address of this host"),
        (["--max-connections", "many"], r"--max-connections takes a whole number \(0: no limit\)"),
        (["--max-per-host", "-1"], "--max-per-host takes a whole number"),
        (["--shutdown-timeout", "-1"], "--shutdown-timeout must be a positive number"),
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


def test_bad_endpoint_is_a_usage_error_while_parsing():
    with pytest.raises(usage.UsageError, match="--port 'nonsense:1': Unknown endpoint type"):
        parse("--port", "nonsense:1")


# -- --rules ---------------------------------------------------------------------


def test_rules_option_gives_a_rules_policy_with_the_ident_mode(tmp_path):
    from socksident.commands import CommandRunner
    from socksident.rules import RulesPolicy

    rules = tmp_path / "sockd.conf"
    rules.write_text("permit 10.0.0.0/8 eq http\n")
    policy = parse("--rules", str(rules), "--ident", "check")["policy"]
    assert isinstance(policy, RulesPolicy)
    assert (policy.path, policy.ident_mode) == (str(rules), IdentMode.CHECK)
    assert [r.location for r in policy.rules.rules] == [f"{rules}:1"]
    assert isinstance(policy._run_command, CommandRunner)  # rule commands really run
    assert parse("-r", str(rules))["policy"].ident_mode is IdentMode.OFF


@pytest.mark.parametrize(
    "text, message",
    [
        ("permit 10.0.0.0/8\ndeny 0.0.0.0 0.0.0.0 eq\n", ":2: missing port after 'eq'"),
        ("# only a comment\n\nallow 10.0.0.0/8\n", ":3: unknown action 'allow'"),
    ],
)
def test_bad_rules_file_is_a_usage_error_naming_file_and_line(tmp_path, text, message):
    rules = tmp_path / "sockd.conf"
    rules.write_text(text)
    with pytest.raises(usage.UsageError) as raised:
        parse("--rules", str(rules))
    assert str(raised.value).startswith(f"{rules}{message}")


def test_missing_rules_file_is_a_usage_error(tmp_path):
    missing = tmp_path / "nonexistent.conf"
    with pytest.raises(usage.UsageError) as raised:
        parse("--rules", str(missing))
    assert str(raised.value).startswith(f"{missing}: cannot read the rules file")


def test_makeservice_with_rules_reloads_on_sighup(tmp_path, monkeypatch):
    import signal

    import twisted.internet
    from socksident.services import ReloadOnHangup

    rules = tmp_path / "sockd.conf"
    rules.write_text("permit 10.0.0.0/8\n")
    options = parse("--port", "tcp:0:interface=127.0.0.1", "--rules", str(rules))
    [reload_service] = [s for s in makeService(options) if isinstance(s, ReloadOnHangup)]
    assert reload_service.policy is options["policy"]
    assert not [s for s in makeService(parse("--port", "tcp:0")) if isinstance(s, ReloadOnHangup)]

    class FakeReactor:
        def __init__(self):
            self.calls = []

        def callFromThread(self, f, *args, **kwargs):
            self.calls.append((f, args, kwargs))

    fake = FakeReactor()
    monkeypatch.setattr(twisted.internet, "reactor", fake, raising=False)

    def previous(signum, frame):
        raise AssertionError("the previous SIGHUP handler ran")

    original = signal.signal(signal.SIGHUP, previous)
    try:
        reload_service.startService()
        handler = signal.getsignal(signal.SIGHUP)
        assert callable(handler) and handler is not previous
        signal.raise_signal(signal.SIGHUP)  # Python runs the handler before this returns
        assert fake.calls == [(options["policy"].reload, (), {})]
        # The queued call re-reads the file.
        rules.write_text("deny 10.0.0.0/8\npermit 0.0.0.0/0\n")
        f, args, kwargs = fake.calls[0]
        assert f(*args, **kwargs) is True
        assert len(options["policy"].rules.rules) == 2
        reload_service.stopService()
        assert signal.getsignal(signal.SIGHUP) is previous
    finally:
        signal.signal(signal.SIGHUP, original)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_timeouts_must_be_finite(value):
    with pytest.raises(usage.UsageError, match="--connect-timeout takes a number of seconds"):
        parse("--connect-timeout", value)


def test_a_port_that_cannot_listen_stops_start_up():
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        top = makeService(parse("--port", f"tcp:{port}:interface=127.0.0.1"))
        with pytest.raises(ListenError, match=f"--port tcp:{port}:interface=127.0.0.1: .*in use"):
            top.privilegedStartService()
    finally:
        taken.close()


def test_arguments_after_a_double_dash_are_left_alone():
    from socksident.tap import _expand_bare_ident

    assert _expand_bare_ident(["--ident", "--", "--ident"]) == ["--ident=require", "--", "--ident"]
    assert _expand_bare_ident(["--", "--ident", "check"]) == ["--", "--ident", "check"]


def test_tcp_and_tls_listeners_get_a_backlog_that_holds_a_burst():
    assert with_backlog("tcp:1080:interface=127.0.0.1") == "tcp:1080:interface=127.0.0.1:backlog=1024"
    assert with_backlog("tcp6:1080") == "tcp6:1080:backlog=1024"
    assert with_backlog("ssl:1443:privateKey=k.pem") == "ssl:1443:privateKey=k.pem:backlog=1024"
    assert with_backlog("tcp:1080:backlog=7") == "tcp:1080:backlog=7"
    assert with_backlog("unix:/tmp/s") == "unix:/tmp/s"
    options = parse()
    assert options["endpoints"][0]._backlog == 1024
    assert parse("--port", "tcp:1081:backlog=9")["endpoints"][0]._backlog == 9


def test_start_up_objects_are_frozen_out_of_the_cyclic_collector_once_running(monkeypatch):
    import gc

    from twisted.internet.testing import MemoryReactor

    reactor = MemoryReactor()
    monkeypatch.setattr(services, "global_reactor", lambda: reactor)
    [freeze] = [s for s in makeService(parse("--port", "tcp:0")) if isinstance(s, services.FreezeAfterStartUp)]
    freeze.startService()
    assert [call[0] for call in reactor.whenRunningHooks] == [gc.freeze]
def test_source_address_one_per_family_of_this_host() -> None:
    from twisted.python import usage

    from socksident.tap import Options

    options = Options()
    options.parseOptions(["--source-address", "127.0.0.2", "--source-address", "::1"])
    assert options["settings"].source_addresses == ("127.0.0.2", "::1")
    for argv, message in [
        (["--source-address", "127.0.0.2", "--source-address", "127.0.0.3"], "one address per family"),
        (["--source-address", "192.0.2.1"], "not an address of this host"),
        (["--source-address", "nowhere"], "takes an IP address"),
    ]:
        with pytest.raises(usage.UsageError, match=message):
            Options().parseOptions(argv)


def test_a_next_hop_client_certificate_that_cannot_be_used_is_a_usage_error(tmp_path) -> None:
    from tests.integration.test_next_hop_chain import make_ca, make_server_certificate

    ca = make_ca(tmp_path / "ca", "test CA")
    key, cert = make_server_certificate(tmp_path, ca, "127.0.0.1", "a")
    other_key, _ = make_server_certificate(tmp_path, ca, "127.0.0.1", "b")
    junk = tmp_path / "junk.pem"
    junk.write_text("not PEM")
    hop = "tls:host=127.0.0.1:port=1443"
    assert parse("--next-hop", f"{hop}:certificate={cert}:privateKey={key}")["next_hop"] is not None
    for extra, why in [
        (f":certificate={cert}:privateKey={other_key}", "do not match"),
        (f":certificate={cert}:privateKey={junk}", "cannot read a certificate or key"),
        (f":certificate={cert}", "cannot read a certificate or key"),  # no key in it
        (f":certificate={tmp_path / 'missing.pem'}", "No such file"),
    ]:
        with pytest.raises(usage.UsageError) as info:
            parse("--next-hop", hop + extra)
        assert str(info.value).startswith("--next-hop 'tls:") and why in str(info.value)
