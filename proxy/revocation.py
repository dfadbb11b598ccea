"""The revocation list: Revocation objects stored in Kubernetes, as values and an index.

A token stays valid until its ``exp``; kube-apiserver cannot take it back.
This gate can: an operator (``kube-oidc-gate revoke``), or the Okta event
hook, stores a ``Revocation`` object (CRD ``revocations.kube-oidc-gate.io``,
shipped in ``deploy/components/revocation``) in the namespace given by
``--revocation-namespace``, and every process of every replica of both front
ends watches that collection (``proxy.revocation_api``) and refuses matching
tokens as ``revoked``.

What one object means::

    spec:
      subject: 00u1alice          # the token's ``sub`` (required)
      issuer: https://...         # optional: absent means any issuer
      issuedBefore: 2026-...Z     # tokens whose ``iat`` is before this are refused
      reason: left the company    # free text, shown in logs and ``kubectl get``
      expiresAt: 2026-...Z        # after this the gate deletes the object

Matching rules (fail closed where the token cannot show it is newer):

- ``iat < issuedBefore`` is refused; ``iat == issuedBefore`` and later pass,
  so a user whose account is re-enabled logs in again and is let in;
- a token without a numeric ``iat`` that matches subject and issuer is
  refused: nothing proves it was issued after the revocation;
- an object past ``expiresAt`` still applies until it is deleted (the
  watcher deletes it; the DELETED event lifts it): ``expiresAt`` should be
  ``issuedBefore`` plus the longest token lifetime accepted, after which no
  matching token can still be unexpired anyway.

Cost: ``RevocationList.revoked`` is two dictionary look-ups (subject with the
token's issuer, subject with any issuer), and one length test when the list
is empty, so the authenticator runs it on every request, cached verdicts
included. Changes are pushed to subscribers (``proxy.authn`` drops the
cached verdicts of a newly revoked subject, and its cached refusals when a
revocation is lifted).

Pure: no I/O, no aiohttp. A malformed object raises ``RevocationError`` from
``parse_revocation``; the watcher logs it by name and ignores it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from proxy.errors import RevocationError

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "Revocation",
    "RevocationList",
    "format_time",
    "parse_revocation",
    "parse_time",
    "revocation_object",
]

GROUP: Final = "kube-oidc-gate.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "Revocation"
PLURAL: Final = "revocations"

#: Longest ``spec.reason`` kept (the CRD schema says the same).
MAX_REASON: Final = 1024
#: Longest subject or issuer (the CRD schema says the same).
MAX_NAME: Final = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Revocation:
    """One Revocation object, validated: what the authenticator matches on."""

    #: ``metadata.name`` (unique in the namespace).
    name: str
    namespace: str = ""
    #: ``metadata.uid`` and ``resourceVersion``: preconditions of a delete,
    #: so an expired object is never confused with a recreated one.
    uid: str = ""
    resource_version: str = ""
    subject: str
    #: ``None``: any issuer.
    issuer: str | None = None
    #: Unix time; a matching token with ``iat`` before it is refused.
    issued_before: float
    reason: str = ""
    #: Unix time after which the gate deletes the object; ``None``: never.
    expires_at: float | None = None

    @property
    def key(self) -> tuple[str | None, str]:
        """The index key: (issuer or None for any, subject)."""
        return (self.issuer, self.subject)

    def matches(self, issuer: str, subject: str | None, iat: float | None) -> bool:
        """Whether a token of ``issuer``/``subject`` issued at ``iat`` is refused."""
        if subject != self.subject:
            return False
        if self.issuer is not None and issuer != self.issuer:
            return False
        return iat is None or iat < self.issued_before

    def expired(self, now: float) -> bool:
        """Whether the gate should delete this object now."""
        return self.expires_at is not None and now >= self.expires_at


def parse_time(value: object, field: str) -> float:
    """An RFC 3339 date-time (``Z`` or an offset) as Unix time."""
    if not isinstance(value, str) or not value:
        raise RevocationError(f"revocation: {field!r} must be an RFC 3339 date-time")
    text = value.strip()
    if text[-1:] in ("z", "Z"):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as err:
        raise RevocationError(
            f"revocation: {field!r} must be an RFC 3339 date-time, got {value[:64]!r}"
        ) from err
    if parsed.tzinfo is None or "T" not in text.upper():
        raise RevocationError(
            f"revocation: {field!r} must be an RFC 3339 date-time with a time "
            f"zone (2026-01-02T15:04:05Z), got {value[:64]!r}"
        )
    return parsed.timestamp()


def format_time(when: float | datetime) -> str:
    """RFC 3339 in UTC, whole seconds, rounded up (``now`` covers this second)."""
    seconds = when.timestamp() if isinstance(when, datetime) else when
    stamp = datetime.fromtimestamp(math.ceil(seconds), tz=UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def _text(spec: Mapping[str, Any], field: str, *, required: bool) -> str | None:
    value = spec.get(field)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise RevocationError(f"revocation: 'spec.{field}' must be a non-empty string")
    if len(value) > MAX_NAME:
        raise RevocationError(
            f"revocation: 'spec.{field}' is longer than {MAX_NAME} characters"
        )
    return value


def parse_revocation(obj: object) -> Revocation:
    """A ``Revocation`` from an object the API server sent; ``RevocationError``
    when it does not mean anything we can apply (the message names the field).
    """
    if not isinstance(obj, Mapping):
        raise RevocationError("revocation: the object is not a JSON object")
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
        raise RevocationError("revocation: 'metadata.name' is missing")
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise RevocationError("revocation: 'spec' is missing")
    subject = _text(spec, "subject", required=True)
    assert subject is not None
    issuer = _text(spec, "issuer", required=False)
    issued_before = parse_time(spec.get("issuedBefore"), "spec.issuedBefore")
    expires = spec.get("expiresAt")
    expires_at = None if expires is None else parse_time(expires, "spec.expiresAt")
    reason = spec.get("reason", "")
    if not isinstance(reason, str):
        raise RevocationError("revocation: 'spec.reason' must be a string")
    return Revocation(
        name=meta["name"],
        namespace=str(meta.get("namespace") or ""),
        uid=str(meta.get("uid") or ""),
        resource_version=str(meta.get("resourceVersion") or ""),
        subject=subject,
        issuer=issuer,
        issued_before=issued_before,
        reason=reason[:MAX_REASON],
        expires_at=expires_at,
    )


def revocation_object(
    *,
    subject: str,
    issuer: str | None,
    issued_before: float | datetime,
    reason: str,
    expires_at: float | datetime | None,
    name: str | None = None,
    generate_name: str = "revoked-",
) -> dict[str, Any]:
    """The JSON body that creates a Revocation (``name`` or ``generateName``)."""
    meta: dict[str, Any] = (
        {"name": name} if name is not None else {"generateName": generate_name}
    )
    spec: dict[str, Any] = {
        "subject": subject,
        "issuedBefore": format_time(issued_before),
        "reason": reason[:MAX_REASON],
    }
    if issuer is not None:
        spec["issuer"] = issuer
    if expires_at is not None:
        spec["expiresAt"] = format_time(expires_at)
    obj = {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta, "spec": spec}
    parse_revocation({**obj, "metadata": {"name": name or generate_name}})
    return obj


Listener = Callable[[Revocation], None]


class RevocationList:
    """Every Revocation in force, indexed by (issuer or any, subject).

    ``synced`` turns true after the first complete list and stays true: a
    broken watch leaves the last known list in force (see
    ``proxy.revocation_api`` for readiness).
    """

    __slots__ = (
        "_by_name",
        "_groups",
        "_on_added",
        "_on_lifted",
        "_strongest",
        "synced",
    )

    def __init__(self) -> None:
        self._by_name: dict[str, Revocation] = {}
        self._groups: dict[tuple[str | None, str], dict[str, Revocation]] = {}
        #: Per key, the revocation with the latest ``issued_before``: the
        #: one that refuses the most tokens, so one look-up decides.
        self._strongest: dict[tuple[str | None, str], Revocation] = {}
        self._on_added: list[Listener] = []
        self._on_lifted: list[Listener] = []
        self.synced = False

    def __len__(self) -> int:
        return len(self._by_name)

    def __iter__(self) -> Iterator[Revocation]:
        return iter(list(self._by_name.values()))

    def get(self, name: str) -> Revocation | None:
        """The revocation named ``name``, if in force."""
        return self._by_name.get(name)

    def subscribe(self, *, added: Listener, lifted: Listener) -> None:
        """Call ``added`` for every new or changed revocation, ``lifted`` for
        every one removed (or changed: the old one is lifted first)."""
        self._on_added.append(added)
        self._on_lifted.append(lifted)

    def revoked(
        self, issuer: str, subject: str | None, iat: float | None
    ) -> Revocation | None:
        """The revocation refusing this token, or ``None``. Two look-ups."""
        if not self._strongest or subject is None:
            return None
        strongest = self._strongest
        for key in ((issuer, subject), (None, subject)):
            found = strongest.get(key)
            if found is not None and (iat is None or iat < found.issued_before):
                return found
        return None

    def put(self, revocation: Revocation) -> None:
        """Add or replace (by name) one revocation."""
        old = self._by_name.get(revocation.name)
        if old == revocation:
            return
        if old is not None:
            self._drop(old)
        self._by_name[revocation.name] = revocation
        group = self._groups.setdefault(revocation.key, {})
        group[revocation.name] = revocation
        self._reindex(revocation.key)
        if old is not None and _weaker(revocation, old):
            for lifted in self._on_lifted:
                lifted(old)
        for added in self._on_added:
            added(revocation)

    def remove(self, name: str) -> Revocation | None:
        """Remove the revocation named ``name``; return it (``None``: unknown)."""
        old = self._by_name.get(name)
        if old is None:
            return None
        self._drop(old)
        for lifted in self._on_lifted:
            lifted(old)
        return old

    def replace(self, revocations: Iterable[Revocation]) -> None:
        """Make the list exactly ``revocations`` (after a complete list)."""
        new = {r.name: r for r in revocations}
        for name in [n for n in self._by_name if n not in new]:
            self.remove(name)
        for revocation in new.values():
            self.put(revocation)
        self.synced = True

    def expired(self, now: float) -> list[Revocation]:
        """The revocations past their ``expiresAt`` (to be deleted)."""
        return [r for r in self._by_name.values() if r.expired(now)]

    def _drop(self, old: Revocation) -> None:
        del self._by_name[old.name]
        group = self._groups.get(old.key)
        if group is not None:
            group.pop(old.name, None)
            if not group:
                del self._groups[old.key]
        self._reindex(old.key)

    def _reindex(self, key: tuple[str | None, str]) -> None:
        group = self._groups.get(key)
        if not group:
            self._strongest.pop(key, None)
            return
        self._strongest[key] = max(group.values(), key=lambda r: r.issued_before)


def _weaker(new: Revocation, old: Revocation) -> bool:
    """Whether ``new`` refuses fewer tokens than ``old`` did (so remembered
    refusals of ``old`` must go)."""
    return new.key != old.key or new.issued_before < old.issued_before
