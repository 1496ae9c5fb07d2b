"""Which bind addresses only this machine can reach."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """True for ``127.x.x.x``, ``::1`` and ``localhost``; false for wildcards (``0.0.0.0``, ``::``, empty)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or empty (all interfaces)
        return False
