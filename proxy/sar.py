"""The SubjectAccessReview client: may this user impersonate what it asks for?

When ``allow_client_impersonation`` lets a client send ``Impersonate-*``
(``kubectl --as``), every requested value is reviewed *as the authenticated
user* before the request goes anywhere, as kube-apiserver's impersonation
filter does; the attributes come from ``proxy.identity.impersonation_checks``.
A "no" is a ``Refusal`` (403 naming what was refused); an API server that
cannot answer is an ``UpstreamError`` (502, or 504 past ``sar_timeout``).
The reviews go through the proxy's one upstream client with its own
credential.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Final

from proxy.errors import UpstreamError
from proxy.identity import Identity, Refusal, impersonation_checks
from proxy.kube import SYSTEM_AUTHENTICATED, UserInfo
from proxy.upstream import Upstream

__all__ = ["SAR_PATH", "ImpersonationReviewer"]

#: Where SubjectAccessReviews are posted.
SAR_PATH: Final = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
_MAX_SAR_BODY: Final = 256 * 1024


class ImpersonationReviewer:
    """Reviews a requested identity value by value, as the user who asked."""

    def __init__(
        self, upstream: Upstream, *, connect_timeout: float, sar_timeout: float
    ) -> None:
        self._upstream = upstream
        self._connect_timeout = connect_timeout
        self._sar_timeout = sar_timeout

    async def authorize(self, user: UserInfo, identity: Identity) -> None:
        """SubjectAccessReviews for each requested value, as ``user``; 403 on a no."""
        groups = list(user.groups)
        if SYSTEM_AUTHENTICATED not in groups:
            groups.append(SYSTEM_AUTHENTICATED)
        spec: dict[str, Any] = {"user": user.username, "groups": groups}
        if user.uid:
            spec["uid"] = user.uid
        if user.extra:
            spec["extra"] = {k: list(v) for k, v in user.extra.items()}
        for attributes in impersonation_checks(identity):
            review = {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {**spec, "resourceAttributes": attributes},
            }
            if not await self.review(review):
                what = attributes["resource"]
                if "subresource" in attributes:
                    what += "/" + attributes["subresource"]
                raise Refusal(
                    403,
                    f'forbidden: cannot impersonate {what} "{attributes["name"]}"',
                    "subjectaccessreview denied",
                )

    async def review(self, review: dict[str, Any]) -> bool:
        """Post one review; whether it is allowed (exactly ``true``)."""
        upstream = self._upstream
        headers = [
            ("Content-Type", "application/json"),
            ("Accept", "application/json"),
            *upstream.auth_items,
        ]
        try:
            async with asyncio.timeout(self._sar_timeout):
                response = await upstream.fetch(
                    "POST",
                    SAR_PATH,
                    headers=headers,
                    body=json.dumps(review).encode(),
                    connect_timeout=self._connect_timeout,
                )
                async with response:
                    body = await response.read(_MAX_SAR_BODY)
                    status = response.status
        except TimeoutError as timed_out:
            raise UpstreamError(
                "proxy: subjectaccessreview timed out", status=504
            ) from timed_out
        if status not in (200, 201):
            raise UpstreamError(f"proxy: subjectaccessreview answered {status}")
        try:
            allowed = json.loads(body)["status"]["allowed"]
        except (ValueError, KeyError, TypeError) as unreadable:
            raise UpstreamError(
                "proxy: subjectaccessreview answer unreadable"
            ) from unreadable
        return allowed is True
