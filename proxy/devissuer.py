"""The embedded development issuer behind ``kube-oidc-gate webhook --dev``.

``--dev`` is README's first command: it must work with no identity provider
and no flags. This module is a tiny OpenID issuer on loopback: a discovery
document, a JWKS and a token endpoint that mints an ID token for whatever
``sub`` and ``groups`` the caller asks for. The authenticator is then pointed
at it like at any other issuer (over HTTP, through the normal key set code),
so ``--dev`` exercises the same path a production issuer does.

A token endpoint that signs anything it is asked to is a hole in anything but
a laptop, so enabling it by accident is made impossible:

- only the CLI imports this module, and only when ``--dev`` is given;
- the constructor refuses a bind host that is not a loopback IP address
  (127.0.0.0/8 or ::1; host names are refused too, since what they resolve to
  can change), so nothing off the machine can reach the endpoint;
- ``start()`` logs a loud warning event, once per start;
- the key is RSA-2048, generated at start, kept in memory only: every run has
  a new key, so a dev token never outlives the process that minted it;
- the identities it vouches for are marked: ``dev_auth_config`` maps ``sub``
  to ``dev:<sub>``, so a dev user can never be mistaken for a real one in an
  audit log. Groups keep their names (no prefix), so the demo group
  ``naxslabs-admins`` matches the reference article's ClusterRoleBinding as is.

Tokens are printed to the terminal by ``demo_instructions`` (the user asked
for them; that is the point of dev mode) but never logged: the mint log line
carries a fingerprint only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import secrets
import shlex
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, Self

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from proxy.config import (
    AuthConfig,
    ClaimMappings,
    IssuerConfig,
    JWTAuthenticatorConfig,
    PrefixedClaimOrExpression,
)
from proxy.errors import ConfigError
from proxy.log import fingerprint

__all__ = [
    "DEFAULT_LIFETIME",
    "DEMO_GROUP",
    "DEMO_USER",
    "DEV_CLIENT_ID",
    "DEV_USERNAME_PREFIX",
    "DEV_WARNING",
    "MAX_LIFETIME",
    "MIN_LIFETIME",
    "DevIssuer",
    "demo_instructions",
    "dev_auth_config",
]

logger = logging.getLogger(__name__)

#: The ``aud`` of every dev token and the authenticator's only audience.
DEV_CLIENT_ID: Final = "kube-oidc-gate-dev"
#: Prefix of dev user names: a dev identity is visibly one in every audit log.
DEV_USERNAME_PREFIX: Final = "dev:"
#: The demo user and group of ``--dev``'s printed example (the reference
#: article's group, so its ClusterRoleBinding works unchanged).
DEMO_USER: Final = "alice"
DEMO_GROUP: Final = "naxslabs-admins"
#: Token lifetime bounds in seconds: a dev token is for a session at a desk.
DEFAULT_LIFETIME: Final = 3600
MIN_LIFETIME: Final = 1
MAX_LIFETIME: Final = 86400
#: The event ``start()`` logs at warning level.
DEV_WARNING: Final = (
    "DEVELOPMENT ISSUER ENABLED: tokens are minted on request; "
    "never use --dev in production"
)

_ALG: Final = "RS256"
_DISCOVERY_PATH: Final = "/.well-known/openid-configuration"
_JWKS_PATH: Final = "/keys"
_TOKEN_PATH: Final = "/token"  # noqa: S105 (a URL path, not a secret)
_JWKS_MAX_AGE: Final = 300
_MAX_BODY: Final = 16 * 1024
_MAX_NAME: Final = 256
_MAX_GROUPS: Final = 100

_ISSUER_KEY: web.AppKey[DevIssuer] = web.AppKey("dev_issuer")


def _loopback_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The loopback IP ``host`` names, or ``ConfigError`` (see the module doc)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is None or not ip.is_loopback:
        raise ConfigError(
            f"config: --dev: the development issuer binds only to a loopback IP "
            f"address (127.0.0.1 or ::1), got {json.dumps(host)}: it signs a token "
            "for anyone who can reach it"
        )
    return ip


class _RequestError(ValueError):
    """A bad ``/token`` request; the text goes back to the (local) caller."""


class DevIssuer:
    """A development OpenID issuer on loopback that mints tokens on request.

    ``url`` is ``http://127.0.0.1:<port>`` (plain http, which the configuration
    accepts for a loopback issuer only). ``port=0`` takes a free port.
    ``clock`` gives the ``iat``/``exp`` time (seconds since the epoch).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        client_id: str = DEV_CLIENT_ID,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ip = _loopback_ip(host)
        if (
            type(port) is not int  # bool is an int subclass, and no port
            or not 0 <= port <= 65535
        ):
            raise ConfigError(
                f"config: --dev: port must be an integer from 0 to 65535, got {port!r}"
            )
        if not client_id:
            raise ConfigError("config: --dev: the client id must not be empty")
        self._host = str(self._ip)
        self._port = port
        self._client_id = client_id
        self._clock = clock
        self._key: rsa.RSAPrivateKey | None = None
        self._kid = ""
        self._url: str | None = None
        self._runner: web.AppRunner | None = None

    # -- addresses -------------------------------------------------------------

    @property
    def url(self) -> str:
        """The issuer URL: ``iss`` of every token and the discovery ``issuer``."""
        if self._url is None:
            raise RuntimeError("devissuer: not started")
        return self._url

    @property
    def client_id(self) -> str:
        """The audience of every token this issuer mints."""
        return self._client_id

    @property
    def token_endpoint(self) -> str:
        """Where ``POST`` mints a token (dev mode only)."""
        return self.url + _TOKEN_PATH

    @property
    def jwks_uri(self) -> str:
        """The published key set."""
        return self.url + _JWKS_PATH

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Generate the key, listen on the loopback address and log the warning."""
        if self._runner is not None:
            return
        # Key generation takes tens of milliseconds: keep it off the loop.
        key = await asyncio.to_thread(
            rsa.generate_private_key, public_exponent=65537, key_size=2048
        )
        app = web.Application(client_max_size=_MAX_BODY)
        app[_ISSUER_KEY] = self
        app.router.add_get(_DISCOVERY_PATH, _discovery)
        app.router.add_get(_JWKS_PATH, _jwks)
        app.router.add_post(_TOKEN_PATH, _token)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        port = runner.addresses[0][1]
        host = f"[{self._host}]" if self._ip.version == 6 else self._host
        self._runner = runner
        self._key = key
        self._kid = "dev-" + secrets.token_hex(8)
        self._url = f"http://{host}:{port}"
        logger.warning(
            DEV_WARNING,
            extra={
                "issuer": self._url,
                "client_id": self._client_id,
                "token_endpoint": self.token_endpoint,
                "kid": self._kid,
            },
        )

    async def close(self) -> None:
        """Stop listening and forget the key (idempotent)."""
        runner, self._runner = self._runner, None
        self._key = None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- documents ---------------------------------------------------------------

    def discovery(self) -> dict[str, Any]:
        """The OpenID discovery document."""
        return {
            "issuer": self.url,
            "jwks_uri": self.jwks_uri,
            "token_endpoint": self.token_endpoint,
            "id_token_signing_alg_values_supported": [_ALG],
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "token_endpoint_auth_methods_supported": ["none"],
            "claims_supported": [
                "iss",
                "aud",
                "sub",
                "iat",
                "nbf",
                "exp",
                "jti",
                "groups",
                "email",
                "email_verified",
            ],
        }

    def jwks(self) -> dict[str, Any]:
        """The public half of the signing key as a JWK Set."""
        key = self._signing_key()
        jwk: dict[str, Any] = dict(RSAAlgorithm.to_jwk(key.public_key(), as_dict=True))
        jwk.update({"kid": self._kid, "alg": _ALG, "use": "sig"})
        return {"keys": [jwk]}

    # -- minting -----------------------------------------------------------------

    def mint(
        self,
        *,
        sub: str,
        groups: Sequence[str] = (),
        email: str | None = None,
        lifetime: int = DEFAULT_LIFETIME,
    ) -> str:
        """A signed ID token for ``sub`` in ``groups``; ``ValueError`` if out of bounds.

        ``email``, when given, is sent with ``email_verified: true``.
        """
        token, _ = self._mint(sub=sub, groups=groups, email=email, lifetime=lifetime)
        return token

    def demo_token(self) -> str:
        """The token of ``--dev``'s printed example: the demo user in the demo group."""
        return self.mint(sub=DEMO_USER, groups=(DEMO_GROUP,))

    def _signing_key(self) -> rsa.RSAPrivateKey:
        if self._key is None:
            raise RuntimeError("devissuer: not started")
        return self._key

    def _mint(
        self,
        *,
        sub: str,
        groups: Iterable[str],
        email: str | None,
        lifetime: int,
    ) -> tuple[str, int]:
        key = self._signing_key()
        _check_name("sub", sub)
        group_list = list(groups)
        if len(group_list) > _MAX_GROUPS:
            raise ValueError(f"devissuer: at most {_MAX_GROUPS} groups")
        for group in group_list:
            _check_name("groups", group)
        if email is not None:
            _check_name("email", email)
        if (
            type(lifetime) is not int  # bool is an int subclass, and no lifetime
            or not MIN_LIFETIME <= lifetime <= MAX_LIFETIME
        ):
            raise ValueError(
                f'devissuer: "lifetime" must be whole seconds from {MIN_LIFETIME} '
                f"to {MAX_LIFETIME}, got {lifetime!r}"
            )
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self.url,
            "aud": self._client_id,
            "sub": sub,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "jti": secrets.token_hex(16),
            "groups": group_list,
        }
        if email is not None:
            claims["email"] = email
            claims["email_verified"] = True
        token = jwt.encode(
            claims, key, algorithm=_ALG, headers={"kid": self._kid, "typ": "JWT"}
        )
        logger.info(
            "dev token minted",
            extra={
                "sub": sub,
                "groups": group_list,
                "expires_in": lifetime,
                "token_fingerprint": fingerprint(token),
            },
        )
        return token, lifetime


def _check_name(field: str, value: object) -> None:
    if not isinstance(value, str) or not value or len(value) > _MAX_NAME:
        raise ValueError(
            f"devissuer: {json.dumps(field)} must be a non-empty string of at most "
            f"{_MAX_NAME} characters"
        )


# -- HTTP handlers ---------------------------------------------------------------


def _json(
    body: dict[str, Any], *, status: int = 200, cache: str = "no-store"
) -> web.Response:
    return web.json_response(body, status=status, headers={"Cache-Control": cache})


async def _discovery(request: web.Request) -> web.Response:
    return _json(request.app[_ISSUER_KEY].discovery())


async def _jwks(request: web.Request) -> web.Response:
    return _json(
        request.app[_ISSUER_KEY].jwks(), cache=f"public, max-age={_JWKS_MAX_AGE}"
    )


async def _token(request: web.Request) -> web.Response:
    """``POST /token``: form or JSON ``sub``, ``groups``, ``email``, ``lifetime``."""
    issuer = request.app[_ISSUER_KEY]
    try:
        sub, groups, email, lifetime = await _token_request(request)
        token, expires_in = issuer._mint(
            sub=sub, groups=groups, email=email, lifetime=lifetime
        )
    except ValueError as err:  # _RequestError or a bound _mint refused
        return _json(
            {"error": "invalid_request", "error_description": str(err)},
            status=400,
        )
    return _json({"id_token": token, "token_type": "Bearer", "expires_in": expires_in})


async def _token_request(
    request: web.Request,
) -> tuple[str, list[str], str | None, int]:
    """Read the fields of a token request from a form or a JSON object.

    Form ``groups`` may repeat and may hold comma-separated names; JSON
    ``groups`` is a string or a list of strings. ``lifetime`` defaults to
    ``DEFAULT_LIFETIME``.
    """
    raw_lifetime: object
    if request.content_type == "application/json":
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _RequestError("devissuer: the body is not valid JSON") from err
        if not isinstance(body, dict):
            raise _RequestError("devissuer: the body must be a JSON object")
        sub = body.get("sub")
        raw_groups = body.get("groups", [])
        if isinstance(raw_groups, str):
            raw_groups = [raw_groups]
        if not isinstance(raw_groups, list) or not all(
            isinstance(g, str) for g in raw_groups
        ):
            raise _RequestError(
                'devissuer: "groups" must be a string or a list of strings'
            )
        groups = list(raw_groups)
        email = body.get("email")
        raw_lifetime = body.get("lifetime", DEFAULT_LIFETIME)
    else:
        form = await request.post()
        sub = form.get("sub")
        groups = [
            g.strip()
            for value in form.getall("groups", [])
            if isinstance(value, str)
            for g in value.split(",")
            if g.strip()
        ]
        email = form.get("email") or None
        raw_lifetime = form.get("lifetime", DEFAULT_LIFETIME)
    if not isinstance(sub, str) or not sub:
        raise _RequestError('devissuer: "sub" is required (the user to mint for)')
    if email is not None and not isinstance(email, str):
        raise _RequestError('devissuer: "email" must be a string')
    return sub, groups, email, _lifetime(raw_lifetime)


def _lifetime(raw: object) -> int:
    if isinstance(raw, bool):
        raise _RequestError('devissuer: "lifetime" must be a whole number of seconds')
    if isinstance(raw, float) and math.isfinite(raw) and raw.is_integer():
        return int(raw)
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str) and raw.strip().isdigit():
        return int(raw.strip())
    raise _RequestError('devissuer: "lifetime" must be a whole number of seconds')


# -- configuration and the printed example -----------------------------------------


def dev_auth_config(issuer_url: str, client_id: str = DEV_CLIENT_ID) -> AuthConfig:
    """The authentication configuration ``--dev`` runs with: the dev issuer only.

    User name: the ``sub`` claim with the ``dev:`` prefix (see the module
    docstring for why); groups: the ``groups`` claim, no prefix; RS256 only.
    """
    return AuthConfig(
        authenticators=(
            JWTAuthenticatorConfig(
                issuer=IssuerConfig(
                    url=issuer_url,
                    audiences=(client_id,),
                    audience_match_policy="MatchAny",
                    signing_algs=(_ALG,),
                ),
                claim_mappings=ClaimMappings(
                    username=PrefixedClaimOrExpression(
                        claim="sub", prefix=DEV_USERNAME_PREFIX
                    ),
                    groups=PrefixedClaimOrExpression(claim="groups", prefix=""),
                ),
                source="--dev",
            ),
        ),
        form="flags",
    )


def demo_instructions(
    *, token: str, webhook_url: str, ca_file: str, issuer_url: str
) -> str:
    """The ready-to-run example ``--dev`` prints: a demo token and two curl commands.

    ``webhook_url`` is the serving base URL (``https://127.0.0.1:7443``);
    ``/authenticate`` is appended unless it is already there. Every value put
    on a command line is shell-quoted, so the commands paste as they are.
    """
    base = webhook_url.rstrip("/")
    authenticate = base if base.endswith("/authenticate") else base + "/authenticate"
    review = json.dumps(
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token},
        },
        separators=(",", ":"),
    )
    review_cmd = shlex.join(
        [
            "curl",
            "-s",
            "--cacert",
            ca_file,
            "-X",
            "POST",
            authenticate,
            "-H",
            "Content-Type: application/json",
            "-d",
            review,
        ]
    )
    issuer = issuer_url.rstrip("/")
    mint_cmd = shlex.join(
        [
            "curl",
            "-s",
            "-X",
            "POST",
            issuer + _TOKEN_PATH,
            "-d",
            "sub=bob",
            "-d",
            "groups=team-a,team-b",
            "-d",
            "lifetime=600",
        ]
    )
    username = DEV_USERNAME_PREFIX + DEMO_USER
    lines = [
        "kube-oidc-gate is running in DEVELOPMENT mode (--dev).",
        f"The built-in issuer {issuer} signs a token for anyone who asks;",
        "never use --dev in production.",
        "",
        f'A token for the demo user "{DEMO_USER}" in the group "{DEMO_GROUP}":',
        "",
        f"  {token}",
        "",
        "Ask the webhook about it, as kube-apiserver would:",
        "",
        f"  {review_cmd}",
        "",
        f'The answer says "authenticated": true, user "{username}", '
        f'group "{DEMO_GROUP}".',
        "",
        "Mint another token (form or JSON fields: sub, groups, email, lifetime in",
        f"seconds from {MIN_LIFETIME} to {MAX_LIFETIME}); the answer's id_token is it:",
        "",
        f"  {mint_cmd}",
        "",
    ]
    return "\n".join(lines)
