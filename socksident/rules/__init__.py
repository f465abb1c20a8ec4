"""The rules file: classic CSTC ``sockd.conf`` lines, parsed and decided.

One rule a line, the first matching line wins, no matching line denies (91)::

    permit|deny [connect|bind] [?=I|?=i|?=n] [*=userlist] [via=next-hop|via=direct]
                src_addr src_mask
                [dst_addr dst_mask] [op dst_port] [: command]

``#`` starts a comment, except on the two special lines ``#NO_IDENTD: cmd``
and ``#BAD_ID: cmd`` (they must start in the first column; the last one of
each kind wins).  Lines are at most 1023 characters.  Addresses match as
``(addr & mask) == (rule_addr & mask)``, so classic non-contiguous masks
work.  ``op`` is one of eq, neq, lt, gt, le, ge with a port number or a TCP
service name.  ``*=`` takes comma-separated user ids and absolute file names
(entries starting with ``/``) of files holding user ids (whitespace or comma
separated, ``#`` comments); they are matched exactly against the request's
USERID, byte for byte (the rules file is read as UTF-8, list files and
USERIDs as raw octets).  ``?=I``/``?=i``/``?=n`` override the global ident
mode (require/check/off) for that line; identd is asked only when the
matching line permits and its mode is not off.

Commands: ``: cmd`` runs once the client has its reply 90; ``#NO_IDENTD`` when
a permitting line's ident query got no usable answer (in check mode both
it and the line's command run, in that order); ``#BAD_ID`` on a mismatch
(93).  A command written on a deny line is accepted for compatibility with
old files but never runs; `RulesPolicy` logs a warning for it at load time.
See `expand_command` for the ``%`` substitutions.

Extensions to the classic format:

- CIDR (``10.0.0.0/8``) wherever an address and mask go, as one field.
- IPv6 networks in CIDR form (``2001:db8::/32``).  An IPv6 rule never
  matches an IPv4 address and vice versa; IPv4-mapped IPv6 clients
  (``::ffff:10.1.2.3``) are matched as IPv4.  So ``0.0.0.0 0.0.0.0`` as a
  *source* matches every IPv4 client and no IPv6 one.
- ``connect`` or ``bind`` right after the action limits a line to that
  SOCKS command.
- A destination written as a domain suffix (``.example.com``, one field)
  matches SOCKS4A host names ending in it, and ``example.com`` itself.  It
  never matches a plain SOCKS4 request: we do no reverse lookups.
- ``via=next-hop`` / ``via=direct`` on a permit line (`Decision.route`):
  through ``--next-hop`` even when the destination resolves here, or never
  through it (an unresolvable name is then 91); see `policy.through_next_hop`.
- A destination whose IPv4 mask is zero (``0.0.0.0 0.0.0.0``,
  ``0.0.0.0/0``) matches any destination, as an omitted one does, including
  IPv6 addresses and SOCKS4A names that did not resolve.

SOCKS4A: the rules are evaluated once per resolved address
(``PolicyContext.addresses``); the request is permitted only when every
address's first matching line permits, so a name cannot smuggle a denied
address in beside a permitted one.  The first address's line supplies the
ident mode and the commands.  A name that did not resolve is evaluated once
with no address: only lines with a suffix or an any/omitted destination can
match it.

Run ``python -m socksident.rules FILE --src IP --dst HOST:PORT ...`` to see
which line a request matches (``__main__``).

The package: ``_model`` (rules, rule sets, evaluation), ``_parser`` (the
file format), ``_template`` (command substitutions), ``_policy`` (the
`RulesPolicy`), ``__main__`` (the tester).
"""

from socksident.rules._model import (
    OPERATORS,
    Action,
    AddressMask,
    Destination,
    DomainSuffix,
    Evaluation,
    PortTest,
    Rule,
    RuleSet,
)
from socksident.rules._parser import MAX_LINE_LENGTH, RulesError, load_rules, parse_rules
from socksident.rules._policy import RulesPolicy
from socksident.rules._template import SUBSTITUTIONS, expand_command, sanitize

__all__ = [
    "MAX_LINE_LENGTH",
    "OPERATORS",
    "SUBSTITUTIONS",
    "Action",
    "AddressMask",
    "Destination",
    "DomainSuffix",
    "Evaluation",
    "PortTest",
    "Rule",
    "RuleSet",
    "RulesError",
    "RulesPolicy",
    "expand_command",
    "load_rules",
    "parse_rules",
    "sanitize",
]
