"""Kubernetes wire shapes: the mapped user, TokenReview, impersonation, Status.

Kept free of aiohttp so the pure core (claims, authn) can produce a ``UserInfo``
and the handlers can turn it into JSON without either knowing the other.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Generic, TypeVar

from proxy.jsontext import compact_bytes

__all__ = [
    "STATUS_REASONS",
    "SYSTEM_AUTHENTICATED",
    "PerUser",
    "UserInfo",
    "status_body",
]

SYSTEM_AUTHENTICATED = "system:authenticated"

#: HTTP code → ``metav1.StatusReason``, the word kubectl shows before the message.
STATUS_REASONS: Final[Mapping[int, str]] = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    405: "MethodNotAllowed",
    408: "Timeout",
    413: "RequestEntityTooLarge",
    415: "UnsupportedMediaType",
    431: "BadRequest",
    500: "InternalError",
    502: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def status_body(code: int, message: str) -> bytes:
    """A Kubernetes ``Status`` failure as JSON bytes: what kubectl prints best.

    Every error answer of both front ends has this shape, so a client sees the
    same kind of error whichever mode it talks to.
    """
    return json.dumps(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": STATUS_REASONS.get(code, "InternalError"),
            "code": code,
        }
    ).encode()


def _empty_extra() -> MappingProxyType[str, tuple[str, ...]]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class UserInfo:
    """The identity a verified token maps to (authentication.k8s.io UserInfo).

    ``extra`` values are tuples so the whole value is hashable and immutable: one
    cached ``UserInfo`` is shared by every request that presents the same token.
    """

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: MappingProxyType[str, tuple[str, ...]] = field(default_factory=_empty_extra)
    #: ``to_json``'s bytes once computed: not part of the value.
    _json: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UserInfo:
        """The inverse of ``to_dict`` (for values this program encoded itself)."""
        extra = data.get("extra") or {}
        return cls(
            username=data["username"],
            uid=data.get("uid", ""),
            groups=tuple(data.get("groups", ())),
            extra=MappingProxyType({k: tuple(v) for k, v in extra.items()}),
        )

    @classmethod
    def from_json(cls, encoded: bytes) -> UserInfo:
        """The inverse of ``to_json``, remembering ``encoded`` as the encoding."""
        user = cls.from_dict(json.loads(encoded))
        object.__setattr__(user, "_json", encoded)
        return user

    def to_json(self) -> bytes:
        """``to_dict`` as compact JSON, encoded once per object.

        A newly accepted token needs its user encoded twice: for the result
        cache's entry and for the webhook's answer. Encoding is a few
        microseconds of a cold review's budget, so the first encoding is kept
        on the (otherwise immutable) object and both use it.
        """
        encoded = self._json
        if encoded is None:
            encoded = compact_bytes(self.to_dict())
            object.__setattr__(self, "_json", encoded)
        return encoded

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of ``status.user`` in a TokenReview (empty fields omitted)."""
        out: dict[str, Any] = {"username": self.username}
        if self.uid:
            out["uid"] = self.uid
        if self.groups:
            out["groups"] = list(self.groups)
        if self.extra:
            out["extra"] = {k: list(v) for k, v in self.extra.items()}
        return out


T = TypeVar("T")


class PerUser(Generic[T]):
    """Something derived from a ``UserInfo``, computed once per user object.

    The result cache hands every request that presents the same token the same
    ``UserInfo`` object, so what a front end derives from it (the proxy's
    ``Impersonate-*`` headers) can be derived once. (The webhook's answer needs
    only the user's JSON, which ``UserInfo.to_json`` keeps on the object.)
    Keyed by object identity, since ``extra`` makes the value unhashable; each
    entry holds its user, so the id cannot be reused while it is remembered.
    Bounded: the oldest entry goes first.
    """

    __slots__ = ("_derive", "_limit", "_memo")

    def __init__(self, derive: Callable[[UserInfo], T], *, limit: int) -> None:
        self._derive = derive
        self._limit = limit
        self._memo: dict[int, tuple[UserInfo, T]] = {}

    def __call__(self, user: UserInfo) -> T:
        """The derived value for ``user`` (computed on first sight)."""
        hit = self._memo.get(id(user))
        if hit is not None and hit[0] is user:
            return hit[1]
        value = self._derive(user)
        if len(self._memo) >= self._limit:
            del self._memo[next(iter(self._memo))]
        self._memo[id(user)] = (user, value)
        return value

    def __len__(self) -> int:
        return len(self._memo)
