"""Small test doubles shared by the engine tests (no network)."""

from __future__ import annotations

from collections.abc import Sequence

from proxy.config import (
    AuthConfig,
    ClaimMappings,
    IssuerConfig,
    JWTAuthenticatorConfig,
    PrefixedClaimOrExpression,
)
from proxy.jwk import VerificationKey, parse_jwks
from tests.keygen import SigningKey, jwks

ISSUER = "https://issuer.example.test/oauth2/default"
CLIENT_ID = "kubernetes"


class DictResolver:
    """A ``KeyResolver`` over fixed keys that counts refetch requests."""

    def __init__(self, *keys: SigningKey, ready: bool = True) -> None:
        self.keys: tuple[VerificationKey, ...] = ()
        self.ready = ready
        self.refreshes = 0
        self.lookups = 0
        self.later: tuple[VerificationKey, ...] | None = None
        if keys:
            self.keys = parse_jwks(jwks(*keys), issuer=ISSUER)[0]

    def publish_on_refresh(self, *keys: SigningKey) -> None:
        self.later = parse_jwks(jwks(*keys), issuer=ISSUER)[0]

    def lookup(self, kid: str | None) -> Sequence[VerificationKey]:
        self.lookups += 1
        if kid is None:
            return self.keys
        return [k for k in self.keys if k.kid == kid]

    async def refresh_unknown(self, kid: str | None) -> Sequence[VerificationKey]:
        self.refreshes += 1
        if self.later is not None:
            self.keys, self.later = self.later, None
            self.ready = True
        if not self.ready:
            from proxy.errors import KeysUnavailable

            raise KeysUnavailable("jwks: keys not loaded yet", issuer=ISSUER)
        return self.lookup(kid)


def issuer_config(
    url: str = ISSUER,
    *,
    audiences: tuple[str, ...] = (CLIENT_ID,),
    algs: tuple[str, ...] = ("RS256",),
) -> IssuerConfig:
    return IssuerConfig(url=url, audiences=audiences, signing_algs=algs)


def authenticator_config(
    url: str = ISSUER,
    *,
    algs: tuple[str, ...] = ("RS256",),
    mappings: ClaimMappings | None = None,
    **kw: object,
) -> JWTAuthenticatorConfig:
    return JWTAuthenticatorConfig(
        issuer=issuer_config(url, algs=algs),
        claim_mappings=mappings
        or ClaimMappings(
            username=PrefixedClaimOrExpression(claim="sub", prefix=f"{url}#"),
            groups=PrefixedClaimOrExpression(claim="groups", prefix=""),
        ),
        **kw,  # type: ignore[arg-type]
    )


def auth_config(*authenticators: JWTAuthenticatorConfig, **kw: object) -> AuthConfig:
    return AuthConfig(authenticators=authenticators or (authenticator_config(),), **kw)  # type: ignore[arg-type]
