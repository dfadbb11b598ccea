"""Kubernetes wire shapes: the mapped user, TokenReview, impersonation, Status.

Kept free of aiohttp so the pure core (claims, authn) can produce a ``UserInfo``
and the handlers can turn it into JSON without either knowing the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "SYSTEM_AUTHENTICATED",
    "UserInfo",
]

SYSTEM_AUTHENTICATED = "system:authenticated"


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
