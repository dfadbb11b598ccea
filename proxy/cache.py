"""The result cache: a token's verdict, keyed by a keyed hash, never by the token.

kubectl reuses one token for up to an hour, and a controller's watch re-presents
it on every reconnect, so nearly every request repeats a verdict we already
reached. The key is BLAKE2b keyed with a random per-process secret: it cannot be
reversed to a token and cannot be precomputed from a stolen token list.

Bounds: at most ``max_entries`` entries in all; an accepted token's entry never
outlives its ``exp`` nor ``success_ttl``; a refusal is kept ``failure_ttl`` so a
replayed bad token costs one hash. Refusals marked ``temporary`` (keys not
loaded yet) are not kept: the next try may pass.

Acceptances and refusals live in two least-recently-used pools: refusals get a
quarter of the bound, acceptances the rest, and neither can evict the other.
A flood of distinct junk tokens (random ``kid``s, bad signatures) churns only
the refusal pool, so it cannot evict the verdicts of the cluster's real users
and make every one of their requests pay for a signature check again; and a
burst of new users cannot crowd out the refusals, so a replayed bad token
stays a hash and a lookup. (One shared pool allowed the first; letting
acceptances take the refusals' room, the second.)

Expiry runs on the monotonic clock (immune to wall-clock jumps) and is checked
on every hit; ``exp`` is converted once, when the entry is stored, and
re-checked against the wall clock on every hit so a token is never accepted
after its ``exp``. An expired entry is dropped when it is next looked up or
when the pool needs its room: the bound holds either way. (cachetools'
``TLRUCache`` expired entries eagerly with a heap, at several microseconds per
lookup and insert on the webhook's hot path; a plain ``LRUCache`` with the
check on the hit costs a dictionary lookup.)

An acceptance is kept as a plain tuple of a float, a float, the issuer, the
user encoded as JSON bytes, the token's ``sub`` and ``iat`` (or ``None``; for
the revocation list, ``proxy.revocation``, checked on every hit): a tuple of such atoms is untracked by the garbage
collector, so 75,000 cached verdicts add nothing to a full collection (as
objects they were four tracked objects each, and a full collection over them
paused the process for ~50-100 ms every few seconds while new tokens kept
arriving). The ``UserInfo`` handed out is rebuilt from the bytes once and then
shared through a small bounded memo, so a hit costs a dictionary lookup.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from cachetools import LRUCache

from proxy.config import CacheSettings
from proxy.errors import TokenError
from proxy.kube import UserInfo

__all__ = ["CachedResult", "ResultCache", "detached"]


@dataclass(frozen=True, slots=True)
class CachedResult:
    """A remembered verdict: a user (with its issuer and ``exp``) or a refusal."""

    expires_mono: float
    user: UserInfo | None = None
    issuer: str = ""
    exp: float = 0.0
    error: TokenError | None = None


def detached(error: TokenError) -> TokenError:
    """A copy of ``error`` that was never raised: no traceback, cause or context.

    A remembered refusal must cost a few hundred bytes. The refusal as raised
    does not: its traceback, and its cause's (a ``JSONDecodeError`` holding the
    decoded payload), reach the frames of the request that raised it, with its
    headers and body; and each time one exception object is raised again it
    collects the frames of the new caller. Kept for ``failure_ttl`` under up to
    ``max_entries`` distinct tokens, that let any client pin gigabytes. So the
    cache keeps a detached copy, and every hit raises a fresh copy of that.
    """
    cls = type(error)
    copy = cls.__new__(cls)
    copy.args = error.args
    copy.__dict__.update(vars(error))
    return copy


#: An acceptance: (expires_mono, exp, issuer, user JSON, sub, iat).
_Accepted = tuple[float, float, str, bytes, str | None, float | None]

#: How many distinct users' ``UserInfo`` objects are kept for sharing.
_USER_MEMO: Final = 4096


class ResultCache:
    """Bounded, expiring map from token hash to ``CachedResult``."""

    def __init__(
        self,
        settings: CacheSettings,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._monotonic = monotonic
        self._secret = os.urandom(32)
        self._max = max(settings.max_entries, 0)
        self._max_refused = self._max // 4
        #: key -> (expires_mono, exp, issuer, user JSON, sub, iat): atoms only.
        self._accepted: LRUCache[bytes, _Accepted] = LRUCache(
            maxsize=max(self._max - self._max_refused, 1)
        )
        #: key -> (expires_mono, the refusal as a detached copy).
        self._refused: LRUCache[bytes, tuple[float, TokenError]] = LRUCache(
            maxsize=max(self._max_refused, 1)
        )
        #: user JSON -> the UserInfo handed out for it (bounded).
        self._users: dict[bytes, UserInfo] = {}

    def key(self, token: str | bytes) -> bytes:
        """The cache key of a token: a keyed 16-byte BLAKE2b digest."""
        data = token.encode() if isinstance(token, str) else token
        return hashlib.blake2b(data, digest_size=16, key=self._secret).digest()

    def verdict(self, key: bytes) -> UserInfo | TokenError | None:
        """The remembered user or refusal for ``key``; ``None`` if none is valid.

        The refusal returned is the stored copy: raise a ``detached`` copy of it.
        """
        accepted = self._accepted.get(key)
        if accepted is not None:
            expires_mono, exp, _, user_json, _, _ = accepted
            if self._monotonic() >= expires_mono or self._clock() >= exp:
                self._accepted.pop(key, None)
                return None
            return self._user(user_json)
        refused = self._refused.get(key)
        if refused is None:
            return None
        if self._monotonic() >= refused[0]:
            self._refused.pop(key, None)
            return None
        return refused[1]

    def get(self, key: bytes) -> CachedResult | None:
        """The verdict for ``key`` as a record (for inspection; ``verdict`` is cheaper)."""
        found = self.verdict(key)
        if found is None:
            return None
        if isinstance(found, TokenError):
            return CachedResult(expires_mono=self._refused[key][0], error=found)
        expires_mono, exp, issuer, _, _, _ = self._accepted[key]
        return CachedResult(
            expires_mono=expires_mono, user=found, issuer=issuer, exp=exp
        )

    def _user(self, user_json: bytes) -> UserInfo:
        user = self._users.get(user_json)
        if user is None:
            user = UserInfo.from_json(user_json)
            self._remember_user(user_json, user)
        return user

    def _remember_user(self, user_json: bytes, user: UserInfo) -> None:
        if len(self._users) >= _USER_MEMO:
            self._users.clear()
        self._users[user_json] = user

    def put_user(
        self,
        key: bytes,
        user: UserInfo,
        *,
        issuer: str,
        exp: float,
        max_ttl: float | None = None,
        subject: str | None = None,
        iat: float | None = None,
    ) -> UserInfo:
        """Remember an accepted token until ``min(exp, now + success_ttl)``.

        ``max_ttl`` shortens that further: an acceptance that rests on an
        introspection answer lives no longer than the answer is fresh, so a
        revocation is seen within ``--introspection-cache-ttl`` (0: not kept).

        Returns the user object to use from now on: an equal one already
        remembered (the same person with a new token) if there is one, so
        that what the front ends derive per user object (the JSON that
        ``UserInfo.to_json`` keeps for the webhook's answer, the proxy's
        headers through ``kube.PerUser``) is reused.
        """
        if self._max <= 0:
            return user
        remaining = min(exp - self._clock(), self._settings.success_ttl)
        if max_ttl is not None:
            remaining = min(remaining, max_ttl)
        if remaining <= 0:
            return user
        user_json = user.to_json()
        self._refused.pop(key, None)
        self._accepted[key] = (
            self._monotonic() + remaining,
            float(exp),
            issuer,
            user_json,
            subject,
            iat,
        )
        known = self._users.get(user_json)
        if known is not None:
            return known
        self._remember_user(user_json, user)
        return user

    def put_error(self, key: bytes, error: TokenError) -> None:
        """Remember a refusal briefly; temporary refusals are not remembered."""
        if self._max_refused <= 0 or error.temporary:
            return
        if self._settings.failure_ttl <= 0:
            return
        self._accepted.pop(key, None)
        self._refused[key] = (
            self._monotonic() + self._settings.failure_ttl,
            detached(error),
        )

    def __len__(self) -> int:
        return len(self._accepted) + len(self._refused)

    def forget_issuer(self, issuer: str) -> int:
        """Drop the accepted results of ``issuer`` (its keys changed); return how many."""
        doomed = [k for k, v in list(self._accepted.items()) if v[2] == issuer]
        for key in doomed:
            self._accepted.pop(key, None)
        return len(doomed)

    def subject(self, key: bytes) -> tuple[str, str | None, float | None] | None:
        """(issuer, sub, iat) of the accepted token under ``key``, for the
        revocation check after a hit; ``None`` if none is remembered."""
        found = self._accepted.get(key)
        if found is None:
            return None
        return found[2], found[4], found[5]

    def forget(self, key: bytes) -> None:
        """Drop the verdict under ``key`` (its token was just revoked)."""
        self._accepted.pop(key, None)
        self._refused.pop(key, None)

    def forget_subject(self, issuer: str | None, subject: str) -> int:
        """Drop the accepted results of ``subject`` (of ``issuer``; ``None``:
        of any issuer): it was revoked. Return how many."""
        doomed = [
            k
            for k, v in list(self._accepted.items())
            if v[4] == subject and (issuer is None or v[2] == issuer)
        ]
        for key in doomed:
            self._accepted.pop(key, None)
        return len(doomed)

    def forget_refusals(self) -> None:
        """Drop every cached refusal (the configuration changed)."""
        self._refused.clear()

    def clear(self) -> None:
        """Forget every verdict (used when the configuration changes)."""
        self._accepted.clear()
        self._refused.clear()
        self._users.clear()
