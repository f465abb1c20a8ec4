"""socksident: a SOCKS4 and SOCKS4A server for Twisted with RFC 1413 IDENT checks.

The public names are importable from here (``from socksident import
SOCKS4ServerFactory``).  They load on first use, so importing a wire-format
module (`socksident.socks4`, `socksident.ident`) still imports no Twisted.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Each public name and the module that defines it.
_EXPORTS = {
    "AccessRecord": "socksident.accesslog",
    "ConnectionInfo": "socksident.connection",
    "Decision": "socksident.policy",
    "DefaultPolicy": "socksident.policy",
    "IEarlyRefusal": "socksident.policy",
    "IPolicy": "socksident.policy",
    "IdentAnswer": "socksident.ident",
    "IdentMode": "socksident.policy",
    "IdentOutcome": "socksident.ident",
    "IdentdMismatch": "socksident.socks4",
    "IdentdUnreachable": "socksident.socks4",
    "PolicyContext": "socksident.policy",
    "ReplyCode": "socksident.socks4",
    "Request": "socksident.socks4",
    "RequestRejectedOrFailed": "socksident.socks4",
    "RulesPolicy": "socksident.rules",
    "SOCKS4BindEndpoint": "socksident.client",
    "SOCKS4ClientEndpoint": "socksident.client",
    "SOCKS4Refusal": "socksident.socks4",
    "SOCKS4Server": "socksident.server",
    "SOCKS4ServerFactory": "socksident.server",
    "ServerSettings": "socksident.settings",
    "check_ident": "socksident.policy",
    "deny": "socksident.policy",
    "query_ident": "socksident.identclient",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from socksident.accesslog import AccessRecord
    from socksident.client import SOCKS4BindEndpoint, SOCKS4ClientEndpoint
    from socksident.connection import ConnectionInfo
    from socksident.ident import IdentAnswer, IdentOutcome
    from socksident.identclient import query_ident
    from socksident.policy import (
        Decision,
        DefaultPolicy,
        IdentMode,
        IEarlyRefusal,
        IPolicy,
        PolicyContext,
        check_ident,
        deny,
    )
    from socksident.rules import RulesPolicy
    from socksident.server import SOCKS4Server, SOCKS4ServerFactory
    from socksident.settings import ServerSettings
    from socksident.socks4 import (
        IdentdMismatch,
        IdentdUnreachable,
        ReplyCode,
        Request,
        RequestRejectedOrFailed,
        SOCKS4Refusal,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'socksident' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
