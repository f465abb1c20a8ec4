"""The package's shape: public names re-exported, `__all__` everywhere and true."""

import importlib
import pkgutil

import pytest

import socksident


def test_the_package_re_exports_the_public_names():
    from socksident import policy, server, settings, socks4

    assert socksident.SOCKS4ServerFactory is server.SOCKS4ServerFactory
    assert socksident.ServerSettings is settings.ServerSettings
    assert socksident.IPolicy is policy.IPolicy and socksident.check_ident is policy.check_ident
    assert socksident.RequestRejectedOrFailed is socks4.RequestRejectedOrFailed
    assert sorted(socksident.__all__) == socksident.__all__
    for name in socksident.__all__:
        assert getattr(socksident, name) is not None
    with pytest.raises(AttributeError):
        socksident.no_such_name


MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(socksident.__path__, "socksident.")
    if not name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_every_module_says_what_it_exports(name):
    module = importlib.import_module(name)
    assert isinstance(module.__all__, list) and module.__all__, name
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert missing == []
