"""Where an HTTP/1.1 message ends, and which fields a hop may touch: one policy
for every path that forwards a request or relays an answer.

Why one module: request smuggling lives wherever two pieces of code disagree
about where a message ends. Until 0.1.x the proxy dropped every header a
client's ``Connection`` named (RFC 9110 §7.6.1) and then still passed the
client's ``Content-Length`` on as "the caller already framed it": a request
with ``Connection: content-length`` left the proxy with no length at all, and
its body reached the API server as a second request, on the proxy's own
credential and without ``Impersonate-*``. The rules below are what every
sender and listener in ``proxy/`` now applies, through these functions only.

1. **Framing is computed, never copied.** A client's ``Content-Length`` and
   ``Transfer-Encoding`` are read (by the listener, to find the body) and then
   dropped; the request head we send carries exactly one framing field that we
   compute from the bytes we actually send (``request_framing``). The same for
   an answer we relay: its framing comes from the body as we received it.
2. **``Connection`` cannot reach protected fields.** It names hop-by-hop
   fields to drop, but never one that defines framing, routing or identity
   (``PROTECTED``, and every ``Impersonate-*``/``X-Remote-*`` name): those
   follow fixed rules whatever a peer says (``hop_by_hop``).
3. **Ambiguity is refused, not resolved.** More than one ``Content-Length``
   (even equal), a list or a non-digit length, ``Content-Length`` with
   ``Transfer-Encoding``, any ``Transfer-Encoding`` but exactly one
   ``chunked``, and a method the Kubernetes API does not serve are refused
   with 400 and the connection is closed (``check_request``); nothing is
   forwarded. RFC 9112 §6.3 allows a recipient to repair some of these (equal
   lengths); a proxy that repairs is one more party with its own reading, so
   we do not. kube-apiserver (Go's net/http) refuses them too.
4. **No body where none may be** (RFC 9110 §6.4.1, §9.3.2): answers to
   ``HEAD``, ``1xx``, ``204`` and ``304`` carry none (``bodyless``).

Methods: the verbs kube-apiserver serves (``GET``, ``HEAD``, ``POST``,
``PUT``, ``PATCH``, ``DELETE``, ``OPTIONS``), case-sensitive as RFC 9110
§9.1 says. A token of another shape (``get``, ``FOO``, ``TRACE``,
``CONNECT``) is refused rather than forwarded as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, Final

__all__ = [
    "FRAMING",
    "HOP_BY_HOP",
    "METHODS",
    "PROTECTED",
    "AmbiguousRequest",
    "RequestFraming",
    "bodyless",
    "check_request",
    "connection_tokens",
    "hop_by_hop",
    "protected",
    "request_framing",
]

#: The methods the Kubernetes API serves; any other request line is refused.
METHODS: Final[frozenset[str]] = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
)
#: The fields that say where a message's body ends.
FRAMING: Final[frozenset[str]] = frozenset({"content-length", "transfer-encoding"})
#: Hop-by-hop fields (RFC 9110 §7.6.1, plus the legacy ``Keep-Alive`` and
#: ``Proxy-Connection``): never forwarded by name, whatever ``Connection`` says.
HOP_BY_HOP: Final[frozenset[str]] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: Fields whose fate no ``Connection`` header decides: framing, routing and
#: identity. Each has a fixed rule in the forwarding code instead.
PROTECTED: Final = FRAMING | frozenset(
    {"host", "authorization", "connection", "upgrade", "x-forwarded-for"}
)
#: Name prefixes of identity fields, protected in the same way.
_PROTECTED_PREFIXES: Final = ("impersonate-", "x-remote-")
_MAX_LENGTH_DIGITS: Final = 18


class AmbiguousRequest(ValueError):
    """A request whose framing or method we refuse to guess at (400, close).

    The message names the rule, never the client's value.
    """

    status: ClassVar[int] = 400


@dataclass(frozen=True, slots=True)
class RequestFraming:
    """How a client's request body is delimited, once ``check_request`` passed."""

    #: The declared ``Content-Length``; ``None`` when there is none.
    length: int | None
    #: ``Transfer-Encoding: chunked`` (then ``length`` is ``None``).
    chunked: bool


def protected(lower: str) -> bool:
    """Whether a (lower-case) field name is beyond a ``Connection`` header's reach."""
    return lower in PROTECTED or lower.startswith(_PROTECTED_PREFIXES)


def connection_tokens(values: Iterable[str]) -> frozenset[str]:
    """The field names the ``Connection`` values name, lower-case, that a hop
    may drop: protected names are left out (rule 2 of the module docstring).
    """
    names: set[str] = set()
    for value in values:
        for token in value.split(","):
            name = token.strip(" \t").lower()
            if name and not protected(name):
                names.add(name)
    return frozenset(names)


def hop_by_hop(connection: Iterable[str]) -> frozenset[str]:
    """Every field name a forwarded message must not carry on: the standard
    hop-by-hop set, the framing fields (the sender writes its own) and what
    ``connection`` (the message's ``Connection`` values) may name.
    """
    return HOP_BY_HOP | FRAMING | connection_tokens(connection)


def check_request(method: str, fields: Iterable[tuple[str, str]]) -> RequestFraming:
    """Refuse an ambiguous request (``AmbiguousRequest``); else say how its
    body is framed. ``fields`` are the request's header fields as received.
    """
    if method not in METHODS:
        raise AmbiguousRequest("http: method not served")
    lengths: list[str] = []
    encodings: list[str] = []
    for name, value in fields:
        lower = name.lower()
        if lower == "content-length":
            lengths.append(value.strip(" \t"))
        elif lower == "transfer-encoding":
            encodings.append(value.strip(" \t"))
    if len(lengths) > 1:
        raise AmbiguousRequest("http: more than one Content-Length")
    if lengths and encodings:
        raise AmbiguousRequest("http: both Content-Length and Transfer-Encoding")
    if encodings:
        if len(encodings) > 1 or encodings[0].lower() != "chunked":
            raise AmbiguousRequest("http: unsupported Transfer-Encoding")
        return RequestFraming(None, chunked=True)
    if lengths:
        text = lengths[0]
        if not (text.isascii() and text.isdigit()) or len(text) > _MAX_LENGTH_DIGITS:
            raise AmbiguousRequest("http: malformed Content-Length")
        return RequestFraming(int(text), chunked=False)
    return RequestFraming(None, chunked=False)


def request_framing(
    method: str, *, body_length: int | None, streamed: bool
) -> tuple[str, str] | None:
    """The one framing field of a request we send, from what we will send.

    ``body_length``: the exact number of body bytes that will follow, when
    known (a whole body, or a streamed one cut at its declared length);
    ``streamed`` with no length: the body goes chunked. A request without a
    body gets ``Content-Length: 0`` unless its method never has one (as Go's
    and aiohttp's clients do), so no server waits for a body that is not
    coming.
    """
    if body_length is not None:
        if body_length == 0 and method in ("GET", "HEAD", "OPTIONS", "TRACE"):
            return None
        return ("Content-Length", str(body_length))
    if streamed:
        return ("Transfer-Encoding", "chunked")
    if method in ("GET", "HEAD", "OPTIONS", "TRACE"):
        return None
    return ("Content-Length", "0")


def bodyless(method: str, status: int) -> bool:
    """Whether an answer to ``method`` with ``status`` must carry no body."""
    return method == "HEAD" or 100 <= status < 200 or status in (204, 304)
