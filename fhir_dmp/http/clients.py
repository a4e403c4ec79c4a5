"""Who is at the other end of a request: the client's network address and user agent, as the
journal records them (CONTRACT.md "Privacy operations": what the misuse scan compares).

Behind reverse proxies (``FHIR_DMP_TRUSTED_PROXIES``, addresses or CIDRs), the client is the
last address of ``X-Forwarded-For`` that is not a trusted proxy, read from the right (each proxy
appends the peer it saw; what a client wrote itself is further left and never believed past an
untrusted hop). With no trusted proxies, or from a peer that is not one, the TCP peer is the
client. werkzeug's ``ProxyFix`` trusts a fixed number of hops, not a list of addresses, so the
list is checked here with :mod:`ipaddress`.
"""
from __future__ import annotations

import ipaddress

from flask import g, request

from ..guard.journal import RequestInfo


def _trusted(address: str, proxies) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return False
    return any(ip.version == net.version and ip in net for net in proxies)


def client_address(peer: str | None, forwarded_for: str | None, proxies) -> str | None:
    """The client's address: ``peer`` unless it is a trusted proxy, then the rightmost
    ``X-Forwarded-For`` entry that is not one (a malformed entry stops the walk: it is the client)."""
    if not peer or not proxies or not _trusted(peer, proxies) or not forwarded_for:
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    client = peer
    for hop in reversed(hops):
        client = hop
        if not _trusted(hop, proxies):
            break
    return client


def request_info(config, **extra) -> RequestInfo:
    """The journal's view of the current request: client address, request id, user agent."""
    return RequestInfo(client_ip=client_address(request.remote_addr, request.headers.get("X-Forwarded-For"),
                                                config.trusted_proxies),
                       request_id=g.get("request_id"), user_agent=request.headers.get("User-Agent"), **extra)
