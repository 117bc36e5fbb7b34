"""Personal data scrubbing: e-mail addresses and public IP addresses replaced by placeholders, as
FineWeb does (datatrove's PIIFormatter). A document is never removed here, only rewritten.

What is replaced, and what is left alone:
- an e-mail address `local@domain.tld` (the domain needs a dot) or `local@[IPv4]`;
- an IPv4 address in dotted-quad form whose address is public (Python's `ipaddress.is_global`):
  private (10/8, 192.168/16, 172.16/12), loopback, link-local, shared (100.64/10), documentation and
  reserved addresses are not personal and stay, as in FineWeb. Unlike datatrove, the four numbers
  must stand alone: "1.2.3.4.5" (an OID, a long version string) and "1234.5.6.7" are not addresses.
  A four-part version number such as "1.2.3.4" is indistinguishable from a public address and is
  replaced: the scrubber errs on the side of privacy;
- an IPv6 address (full or "::"-compressed, at least three groups), if public. FineWeb leaves IPv6
  alone; its placeholders come from the documentation prefix 2001:db8::/32, which is not public, so
  scrubbing twice changes nothing.

Placeholders cycle through a list, restarting for every document, so the output does not depend on
the order in which documents are processed (datatrove's cycle runs across documents).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from lmforge.curate.types import StepResult


@dataclass
class PiiConfig:
    enabled: bool = True
    emails: bool = True  # replace e-mail addresses
    ips: bool = True  # replace IPv4 and IPv6 addresses
    only_public_ips: bool = True  # FineWeb: private, loopback and reserved addresses are not personal
    # FineWeb's placeholders: addresses at example.com/org, which are reserved for examples
    email_placeholders: tuple[str, ...] = ("email@example.com", "firstname.lastname@example.org")
    # FineWeb's placeholders: random public addresses that did not answer pings when chosen
    ipv4_placeholders: tuple[str, ...] = ("22.214.171.124", "126.96.36.199", "188.8.131.52", "184.108.40.206",
                                          "220.127.116.11", "18.104.22.168")
    ipv6_placeholders: tuple[str, ...] = ("2001:db8::1", "2001:db8::2")  # documentation prefix (RFC 3849)

    def __post_init__(self):
        for name in ("email_placeholders", "ipv4_placeholders", "ipv6_placeholders"):
            if not getattr(self, name):
                raise ValueError(f"{name} must list at least one placeholder")


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
# The local part allows the characters RFC 5322 allows unquoted; the domain is dot-separated labels
# (letters, digits, inner hyphens) or a bracketed IPv4 literal.
_EMAIL = re.compile(
    r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    rf"@(?:(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?|\[{_IPV4}\])")
# Not part of a longer dotted number: no digit or dot before, no digit or ".digit" after.
_IPV4_ALONE = re.compile(rf"(?<![\d.]){_IPV4}(?!\.?\d)")
_H = r"[0-9A-Fa-f]{1,4}"
# Eight groups, or fewer around one "::"; ipaddress decides whether a candidate really is an address.
_IPV6_ALONE = re.compile(rf"(?<![\w:.])(?:(?:{_H}:){{7}}{_H}|(?:{_H}:){{0,6}}(?:{_H})?::(?:{_H}:){{0,6}}{_H}?)"
                         rf"(?![\w:]|\.\d)")
# Cheap necessary conditions, searched first: the full patterns start with a look-behind, which keeps
# the regex engine from skipping ahead, and most documents have no candidate at all.
_IPV4_HINT = re.compile(r"\d\.\d{1,3}\.\d{1,3}\.\d")
_IPV6_HINT = re.compile(r"[0-9A-Fa-f]:[0-9A-Fa-f]{0,4}:")  # three groups need two colons in a row of groups


def _replacer(placeholders: tuple[str, ...], counter: list[int], check=None):
    """A re.sub callback: the next placeholder for each match that passes `check`; counter[0] counts."""

    def replace(match: re.Match) -> str:
        found = match.group(0)
        if check is not None and not check(found):
            return found
        out = placeholders[counter[0] % len(placeholders)]
        counter[0] += 1
        return out

    return replace


def _is_personal_ip(only_public: bool):
    def check(text: str) -> bool:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:  # e.g. "1:2::3::4", or an octet with a leading zero
            return False
        if only_public and not address.is_global:
            return False
        # "dead::beef" or "add::1" is more likely code (C++ scopes) than an address: ask for three groups
        return address.version == 4 or sum(1 for group in text.split(":") if group) >= 3

    return check


def scrub_pii(text: str, cfg: PiiConfig) -> StepResult:
    """Replace e-mail and public IP addresses by placeholders. Features: how many of each were replaced."""
    emails, ipv4, ipv6 = [0], [0], [0]
    if cfg.emails and "@" in text:
        text = _EMAIL.sub(_replacer(cfg.email_placeholders, emails), text)
    if cfg.ips:
        check = _is_personal_ip(cfg.only_public_ips)
        if _IPV4_HINT.search(text):
            text = _IPV4_ALONE.sub(_replacer(cfg.ipv4_placeholders, ipv4, check), text)
        if _IPV6_HINT.search(text):
            text = _IPV6_ALONE.sub(_replacer(cfg.ipv6_placeholders, ipv6, check), text)
    return StepResult(text, None, {"emails": emails[0], "ipv4": ipv4[0], "ipv6": ipv6[0]})
