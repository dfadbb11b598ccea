"""``POST /authenticate``: kube-apiserver's token webhook, v1 and v1beta1.

kube-apiserver posts a ``TokenReview`` (its ``--authentication-token-webhook-
version`` still defaults to v1beta1) and reads back the same kind in the same
version. The answers follow its webhook authenticator:

- a valid token: ``authenticated: true`` and the user;
- a token of no configured issuer: ``authenticated: false`` and no ``error``, a
  plain "no" another authenticator may overrule, which the API server caches;
- a token of ours that fails: ``authenticated: false`` with a short ``error``
  (the reason code and the check that failed; never the token);
- keys not loaded yet: HTTP 503 with ``Retry-After``. The API server treats any
  non-2xx answer as an error, retries with backoff and does not cache it, so a
  cold start never turns into cached refusals.

Audiences. The API server sends ``spec.audiences`` (its API audiences) and, if
our ``status.audiences`` is non-empty, intersects the two; an empty result is a
refusal. By default we are audience-agnostic, like kube-apiserver's own JWT
authenticator: we return no audiences and the API server applies its implicit
ones. With ``--webhook-audiences`` we are audience-aware: we answer with the
intersection of what was asked and what we serve, and refuse when it is empty.

Every check on the request (method, content type, size, JSON shape,
``apiVersion``, ``kind``) happens before any token work, so a malformed review
costs no cryptography.

Served by ``proxy.http1`` (see there why not aiohttp): ``ReviewHandler``
answers a token with a remembered verdict at once, so the common review (kubectl
reuses its token for an hour) costs no task and no waiting.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final

from proxy.authn import Authenticator
from proxy.errors import TokenError
from proxy.http1 import Answer, Limits, Request, Route, Server
from proxy.kube import UserInfo, status_body
from proxy.log import RefusalLimiter, RequestLog, fingerprint
from proxy.metrics import Metrics

__all__ = ["TOKENREVIEW_VERSIONS", "ReviewHandler", "WebhookSettings", "webhook_server"]

log = logging.getLogger(__name__)
#: The line per review, rendered directly (see ``RequestLog``).
_REVIEW_LOG: Final = RequestLog(__name__)

TOKENREVIEW_VERSIONS: Final = frozenset(
    {"authentication.k8s.io/v1", "authentication.k8s.io/v1beta1"}
)
_JSON: Final = "application/json"


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookSettings:
    """How the webhook answers (defaults: audience-agnostic, 1 MiB bodies)."""

    #: Audiences this webhook vouches for; empty = audience-agnostic.
    audiences: tuple[str, ...] = ()
    #: Largest TokenReview body read; kube-apiserver sends a few KiB.
    max_body_bytes: int = 1024 * 1024
    #: ``Retry-After`` seconds on a 503 while keys are not loaded.
    retry_after: int = 5
    #: The whole body must arrive within this long (slow-body bound).
    body_timeout: float = 10.0
    #: Reviews not accepted that are logged in full per cause and second; the
    #: rest are counted in one line (``proxy.log.RefusalLimiter``); 0 logs all.
    refusal_log_limit: int = 10


#: What the API server's log shows for a 503 (the detail goes to ours).
_TEMPORARY: Final = {
    "keys_unavailable": "webhook: issuer keys are not loaded yet; retry",
    "overloaded": "webhook: too many new tokens are waiting for their turn; retry",
    "revocations_unavailable": "webhook: the revocation list is not read yet; retry",
}


class _BadReview(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _parse_review(body: bytes) -> tuple[str, str, list[str]]:
    try:
        review = json.loads(body)
    except (ValueError, RecursionError) as err:
        raise _BadReview(400, "webhook: body is not valid JSON") from err
    if not isinstance(review, dict):
        raise _BadReview(400, "webhook: body must be a JSON object (a TokenReview)")
    api_version = review.get("apiVersion")
    if api_version not in TOKENREVIEW_VERSIONS:
        raise _BadReview(
            400,
            f"webhook: apiVersion must be one of {sorted(TOKENREVIEW_VERSIONS)}, "
            f"got {json.dumps(api_version)[:80]}",
        )
    if review.get("kind") != "TokenReview":
        raise _BadReview(
            400,
            f'webhook: kind must be "TokenReview", got {json.dumps(review.get("kind"))[:80]}',
        )
    spec = review.get("spec")
    if not isinstance(spec, dict):
        raise _BadReview(400, "webhook: spec must be an object")
    token = spec.get("token")
    if not isinstance(token, str) or not token:
        raise _BadReview(400, "webhook: spec.token must be a non-empty string")
    if not token.isascii():
        try:
            token.encode()
        except UnicodeEncodeError as unencodable:
            # A lone surrogate escape (``\ud800``): valid JSON, not valid text;
            # kube-apiserver never sends one, and no token can be hashed with it.
            raise _BadReview(
                400, "webhook: spec.token is not valid unicode"
            ) from unencodable
    audiences = spec.get("audiences") or []
    if not isinstance(audiences, list) or not all(
        isinstance(a, str) for a in audiences
    ):
        raise _BadReview(400, "webhook: spec.audiences must be a list of strings")
    return str(api_version), token, audiences


def _envelope(api_version: str) -> bytes:
    head = json.dumps(
        {
            "apiVersion": api_version,
            "kind": "TokenReview",
            "metadata": {"creationTimestamp": None},
            # The request's token is never echoed. An empty token is what Go's
            # omitempty means anyway, and strict clients (the kubernetes Python
            # models) insist on the member.
            "spec": {"token": ""},
            "status": None,
        },
        separators=(",", ":"),
    )
    assert head.endswith("null}")
    return head[: -len("null}")].encode()


#: Everything of an answer but its status, serialised once per version (the
#: hot path then encodes only the status).
_ENVELOPES: Final = {v: _envelope(v) for v in TOKENREVIEW_VERSIONS}
_ENCODE: Final = json.JSONEncoder(separators=(",", ":")).encode


def _answer(api_version: str, status: dict[str, Any]) -> Answer:
    return _answer_raw(api_version, _ENCODE(status).encode())


def _answer_raw(api_version: str, status: bytes) -> Answer:
    return Answer(200, _ENVELOPES[api_version] + status + b"}")


#: The accepted status around the user's JSON, which ``UserInfo.to_json``
#: encodes once per user object (the result cache hands out the same object
#: for every request with the same token, and the cache's entry needed the
#: same encoding), so an answer is concatenated, never encoded.
_ACCEPTED_HEAD: Final = b'{"authenticated":true,"user":'


def _accepted_status(user: UserInfo) -> bytes:
    """``{"authenticated":true,"user":...}`` from the user's remembered encoding."""
    return _ACCEPTED_HEAD + user.to_json() + b"}"


def _failure(
    code: int, message: str, *, headers: tuple[tuple[str, str], ...] = ()
) -> Answer:
    # 408 and 413: the rest of the body is not worth waiting for.
    return Answer(code, status_body(code, message), headers, code in (408, 413))


class ReviewHandler:
    """``POST /authenticate``: the checks, the engine, the answer and its log line.

    Called by ``proxy.http1`` for each request. A review whose token has a
    remembered verdict (the common case) is answered at once, without a task;
    any other returns a coroutine that waits for the engine.
    """

    def __init__(self, authenticator: Authenticator, settings: WebhookSettings) -> None:
        self._auth = authenticator
        self._settings = settings
        self._limiter = RefusalLimiter(_REVIEW_LOG, limit=settings.refusal_log_limit)

    def _audiences(self, asked: Sequence[str]) -> tuple[list[str] | None, bool]:
        served = self._settings.audiences
        if not served:
            return None, True
        if not asked:
            return list(served), True
        both = [a for a in asked if a in served]
        return both, bool(both)

    def __call__(self, request: Request) -> Answer | Coroutine[Any, Any, Answer]:
        """Answer now when the verdict is remembered; otherwise a coroutine."""
        started = time.perf_counter()
        try:
            api_version, token, asked = self._check(request)
        except _BadReview as bad:
            if self._limiter.admit((("result", "bad_review"), ("status", bad.status))):
                log.info(
                    "review refused", extra={"status": bad.status, "detail": str(bad)}
                )
            return _failure(bad.status, str(bad))
        try:
            key, user = self._auth.lookup(token)
        except TokenError as err:
            return self._refused(api_version, token, err, started)
        if user is not None:
            return self._verdict(api_version, token, user, asked, started)
        return self._review(api_version, token, key, asked, started)

    def _check(self, request: Request) -> tuple[str, str, list[str]]:
        content_type = request.content_type or "application/octet-stream"
        if content_type != _JSON:
            raise _BadReview(
                415,
                f'webhook: Content-Type must be "{_JSON}", got "{content_type[:64]}"',
            )
        limit = self._settings.max_body_bytes
        if len(request.body) > limit:
            raise _BadReview(413, f"webhook: body larger than {limit} bytes")
        return _parse_review(request.body)

    async def _review(
        self,
        api_version: str,
        token: str,
        key: bytes,
        asked: list[str],
        started: float,
    ) -> Answer:
        try:
            user = await self._auth.validate(token, key)
        except TokenError as err:
            return self._refused(api_version, token, err, started)
        return self._verdict(api_version, token, user, asked, started)

    def _refused(
        self, api_version: str, token: str, err: TokenError, started: float
    ) -> Answer:
        if err.temporary:
            self._log(
                token,
                "unavailable",
                reason=err.reason,
                issuer=err.issuer,
                started=started,
                detail=str(err),
            )
            return _failure(
                503,
                _TEMPORARY.get(err.reason, "webhook: temporarily unavailable; retry"),
                headers=(("Retry-After", str(self._settings.retry_after)),),
            )
        self._log(
            token,
            "rejected",
            reason=err.reason,
            issuer=err.issuer,
            started=started,
            detail=str(err),
        )
        return _answer(
            api_version,
            {"authenticated": False, "error": f"{err.reason}: {err}"[:1024]},
        )

    def _verdict(
        self,
        api_version: str,
        token: str,
        user: UserInfo | None,
        asked: list[str],
        started: float,
    ) -> Answer:
        if user is None:
            # kube-apiserver logs only "invalid bearer token": say which
            # issuer the token claims (a claim value, never the token).
            claimed = self._auth.claimed_issuer(token)
            self._log(
                token,
                "not_mine",
                reason="not_mine",
                started=started,
                detail=(
                    f'token: iss "{claimed}" is not a configured issuer'
                    if claimed is not None
                    else "token: no string iss claim"
                ),
            )
            return _answer(api_version, {"authenticated": False})
        audiences, ok = self._audiences(asked)
        if not ok:
            self._log(
                token,
                "rejected",
                reason="audience_mismatch",
                user=user,
                started=started,
            )
            return _answer(
                api_version,
                {
                    "authenticated": False,
                    "error": "audience_mismatch: the API server asked for audiences "
                    f"{asked[:8]}, this webhook serves {list(self._settings.audiences)}",
                },
            )
        self._log(token, "ok", reason="ok", user=user, started=started)
        if audiences is None:
            return _answer_raw(api_version, _accepted_status(user))
        status = {"authenticated": True, "user": user.to_dict(), "audiences": audiences}
        return _answer(api_version, status)

    def _log(
        self,
        token: str,
        result: str,
        *,
        reason: str,
        started: float,
        user: UserInfo | None = None,
        issuer: str | None = None,
        detail: str = "",
    ) -> None:
        # Every accepted review is logged; the others are limited per cause.
        if result != "ok" and not self._limiter.admit(
            (("result", result), ("reason", reason), ("issuer", issuer))
        ):
            return
        fields: dict[str, Any] = {
            "result": result,
            "reason": reason,
            "token": fingerprint(token),
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        if user is not None:
            fields["username"] = user.username
            fields["groups"] = len(user.groups)
        if issuer:
            fields["issuer"] = issuer
        if detail:
            fields["detail"] = detail
        _REVIEW_LOG.info("token review", fields)


def webhook_server(
    authenticator: Authenticator,
    settings: WebhookSettings,
    *,
    metrics: Metrics | None,
    head_timeout: float = 75.0,
) -> Server:
    """The webhook's listener: ``POST /authenticate`` on ``proxy.http1``."""

    def count(handler: str, code: int, seconds: float) -> None:
        if metrics is not None:
            metrics.tally(metrics.http_requests, handler, str(code)).count += 1
            metrics.histogram_tally(metrics.http_duration, handler).observe(seconds)

    limits = Limits(
        max_body_bytes=settings.max_body_bytes,
        head_timeout=head_timeout,
        body_timeout=settings.body_timeout,
    )
    return Server(
        {"/authenticate": Route(ReviewHandler(authenticator, settings))},
        limits=limits,
        error_body=status_body,
        on_answer=count,
    )
