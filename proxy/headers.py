"""Header hygiene of the proxy: what of a client's request may go to the API
server, and what of the API server's answer goes back.

Pure (no I/O, no aiohttp): ``forward_headers`` and ``response_headers`` take
fields and return fields. What they drop, and why, is listed in
``proxy.impersonate``'s module docstring; framing and hop-by-hop names come
from ``proxy.framing`` (framing is computed by whoever sends a body, never
copied). ``trusted`` decides whose ``X-Forwarded-For`` is kept.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Final

from multidict import CIMultiDict

from proxy import framing

__all__ = [
    "FORWARD_DROP",
    "FORWARD_DROP_PASSTHROUGH",
    "REQUEST_DROP",
    "IPNetwork",
    "forward_headers",
    "response_headers",
    "trusted",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Dropped from every forwarded request, whatever the mode.
REQUEST_DROP: Final = frozenset(
    {
        "host",
        "expect",
        # Ours is sent when the request is audited (it names our event and
        # the API server's); a client's would let it pick the id of records.
        "audit-id",
        "x-forwarded-for",
        "x-remote-user",
        "x-remote-group",
        "x-remote-uid",
    }
)
#: What ``forward_headers`` never forwards, by mode (names, name prefixes).
FORWARD_DROP_PASSTHROUGH: Final = framing.HOP_BY_HOP | framing.FRAMING | REQUEST_DROP
FORWARD_DROP: Final = FORWARD_DROP_PASSTHROUGH | {"authorization"}
_FORWARD_DROP_PREFIXES_PASSTHROUGH: Final = ("x-remote-extra-",)
_FORWARD_DROP_PREFIXES: Final = ("x-remote-extra-", "impersonate-")

_Headers = CIMultiDict[str]


def trusted(peer: str | None, networks: Sequence[IPNetwork]) -> bool:
    """Whether ``peer`` (an address, maybe with a zone) is in ``networks``."""
    if peer is None or not networks:
        return False
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in net for net in networks)


def forward_headers(
    src: _Headers,
    peer: str | None,
    trusted_proxies: Sequence[IPNetwork],
    *,
    passthrough: bool,
    protocols: list[str] | None,
) -> list[tuple[str, str]]:
    """The client's headers as they may go upstream (see ``proxy.impersonate``),
    in their order; every header added here is one the loop dropped, so
    appending puts it where replacing would.
    """
    drop = FORWARD_DROP_PASSTHROUGH if passthrough else FORWARD_DROP
    prefixes = (
        _FORWARD_DROP_PREFIXES_PASSTHROUGH if passthrough else _FORWARD_DROP_PREFIXES
    )
    # What the client's Connection names, never a framing, routing or
    # identity field (proxy.framing): those follow the fixed rules above.
    extra = set(framing.connection_tokens(src.getall("Connection", ())))
    if protocols is not None:
        extra.add("sec-websocket-protocol")
    out: list[tuple[str, str]] = []
    for name, value in src.items():
        lower = name.lower()
        if lower in drop or lower in extra or lower.startswith(prefixes):
            continue
        out.append((name, value))
    if protocols:
        out.append(("Sec-WebSocket-Protocol", ", ".join(protocols)))
    if peer is not None:
        chain = src.getall("X-Forwarded-For", [])
        if chain and trusted(peer, trusted_proxies):
            out.append(("X-Forwarded-For", ", ".join([*chain, peer])))
        else:
            out.append(("X-Forwarded-For", peer))
    return out


def response_headers(
    headers: _Headers,
    *,
    upgrade: bool = False,
    length: int | None = None,
    audit_id: str | None = None,
) -> CIMultiDict[str]:
    """The API server's response headers as we relay them: minus hop-by-hop
    ones and every framing field (``proxy.framing``); ``length`` is the one
    ``Content-Length`` we declare, when we know the body we relay has exactly
    that many bytes (else the client's writer frames it). ``audit_id``: the
    request's audit id, echoed as ``Audit-Id`` as kube-apiserver does (the API
    server echoes the one we sent; a kubelet's exec answer has none).
    """
    drop = framing.hop_by_hop(headers.getall("Connection", ()))
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() in drop:
            continue
        out.add(name, value)
    if length is not None:
        out["Content-Length"] = str(length)
    if audit_id is not None:
        out["Audit-Id"] = audit_id
    if upgrade:
        out["Connection"] = "Upgrade"
        out["Upgrade"] = headers.get("Upgrade", "")
    return out
