"""Verified claims → Kubernetes user, exactly as kube-apiserver maps them.

Pure: no I/O, no clock. The rules, in kube-apiserver's order:

- username from a claim (plus prefix) or a CEL expression. An empty value is
  kept, as kube-apiserver keeps it (its own test "user validation rule doesn't
  fail when user info is empty" maps ``""``): in webhook mode the API server
  decides; proxy mode refuses to impersonate an empty name (``impersonate``),
  since an empty ``Impersonate-User`` would mean no impersonation. When the claim is ``email`` and ``email_verified`` is present, it must
  be ``true``: an unverified address would let anyone who can type an address at
  the IdP become that user.
- groups from a claim that may be a string or a list of strings (``""``, ``[]``
  and ``null`` mean none), each with the prefix; or a CEL expression.
- uid from a claim or expression; extra from CEL ``valueExpression``s (empty
  strings dropped, a key with no values omitted). A ``jti`` becomes the
  ``authentication.kubernetes.io/credential-id`` extra ``JTI=<jti>``, as
  kube-apiserver does, so audit logs can tie requests to one token.
- then required claims / ``claimValidationRules`` (string equality, or CEL that
  must return ``true``) and finally ``userValidationRules`` over the mapped user.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from proxy.cel import CompiledExpression, Variables
from proxy.config import (
    ClaimMappings,
    ClaimOrExpression,
    ClaimValidationRule,
    JWTAuthenticatorConfig,
    PrefixedClaimOrExpression,
    UserValidationRule,
)
from proxy.errors import (
    ClaimRuleFailed,
    ExpressionError,
    InvalidClaim,
    MissingClaim,
    UserRuleFailed,
)
from proxy.kube import UserInfo

__all__ = ["CREDENTIAL_ID_EXTRA", "MAX_GROUPS", "map_claims"]

CREDENTIAL_ID_EXTRA: Final = "authentication.kubernetes.io/credential-id"

#: Most groups one token may map to. kube-apiserver sets no limit, but each group
#: becomes an ``Impersonate-Group`` header in proxy mode and API servers and load
#: balancers cap header sizes; IdPs cap far lower (Okta: 100, Azure: 200).
MAX_GROUPS: Final = 1000

_SHOWN: Final = 64


def _show(value: object) -> str:
    """A claim value, shortened, for an error message (claims are not secrets)."""
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _evaluate(expr: CompiledExpression, scope: Variables, issuer: str) -> object:
    try:
        return expr.evaluate(scope)
    except ExpressionError as err:
        raise InvalidClaim(
            f"claims: {err}", claim=expr.field_path, issuer=issuer
        ) from err


def _username(
    m: PrefixedClaimOrExpression,
    claims: Mapping[str, Any],
    scope: Variables,
    issuer: str,
) -> str:
    if m.expression is not None:
        value = _evaluate(m.expression, scope, issuer)
        where = m.expression.field_path
        if not isinstance(value, str):
            raise InvalidClaim(
                f"claims: {where} must return a string, got {type(value).__name__}",
                claim="username",
                issuer=issuer,
            )
        return value
    claim = m.claim or "sub"
    if claim not in claims:
        raise MissingClaim(
            f'claims: username claim "{claim}" is not present in the token',
            claim=claim,
            issuer=issuer,
        )
    value = claims[claim]
    if not isinstance(value, str):
        raise InvalidClaim(
            f'claims: username claim "{claim}" must be a string, got {type(value).__name__}',
            claim=claim,
            issuer=issuer,
        )
    if claim == "email" and "email_verified" in claims:
        verified = claims["email_verified"]
        if not isinstance(verified, bool):
            raise InvalidClaim(
                'claims: "email_verified" must be a boolean, got '
                f"{type(verified).__name__}",
                claim="email_verified",
                issuer=issuer,
            )
        if not verified:
            raise InvalidClaim(
                'claims: "email" is used as the username but "email_verified" is false',
                claim="email_verified",
                issuer=issuer,
            )
    return (m.prefix or "") + value


def _string_list(value: object, what: str, claim: str, issuer: str) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidClaim(
        f"claims: {what} must be a string or a list of strings, got {_show(value)}",
        claim=claim,
        issuer=issuer,
    )


def _groups(
    m: PrefixedClaimOrExpression | None,
    claims: Mapping[str, Any],
    scope: Variables,
    issuer: str,
) -> tuple[str, ...]:
    groups = _mapped_groups(m, claims, scope, issuer)
    if len(groups) > MAX_GROUPS:
        raise InvalidClaim(
            f"claims: {len(groups)} groups is more than the limit of {MAX_GROUPS}",
            claim="groups",
            issuer=issuer,
        )
    return groups


def _mapped_groups(
    m: PrefixedClaimOrExpression | None,
    claims: Mapping[str, Any],
    scope: Variables,
    issuer: str,
) -> tuple[str, ...]:
    if m is None:
        return ()
    if m.expression is not None:
        value = _evaluate(m.expression, scope, issuer)
        where = m.expression.field_path
        return tuple(_string_list(value, where, "groups", issuer))
    assert m.claim is not None
    groups = _string_list(
        claims.get(m.claim), f'groups claim "{m.claim}"', m.claim, issuer
    )
    prefix = m.prefix or ""
    return tuple(prefix + g for g in groups)


def _uid(
    m: ClaimOrExpression | None,
    claims: Mapping[str, Any],
    scope: Variables,
    issuer: str,
) -> str:
    if m is None:
        return ""
    if m.expression is not None:
        value = _evaluate(m.expression, scope, issuer)
        where = m.expression.field_path
    else:
        assert m.claim is not None
        where = f'uid claim "{m.claim}"'
        if m.claim not in claims:
            raise MissingClaim(
                f"claims: {where} is not present in the token",
                claim=m.claim,
                issuer=issuer,
            )
        value = claims[m.claim]
    if not isinstance(value, str):
        raise InvalidClaim(
            f"claims: {where} must be a string, got {type(value).__name__}",
            claim="uid",
            issuer=issuer,
        )
    return value


def _extra(
    mappings: ClaimMappings, claims: Mapping[str, Any], scope: Variables, issuer: str
) -> MappingProxyType[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for entry in mappings.extra:
        value = _evaluate(entry.value_expression, scope, issuer)
        values = [
            v
            for v in _string_list(
                value, entry.value_expression.field_path, entry.key, issuer
            )
            if v
        ]
        if values:
            out[entry.key] = tuple(values)
    jti = claims.get("jti")
    if isinstance(jti, str) and jti and CREDENTIAL_ID_EXTRA not in out:
        out[CREDENTIAL_ID_EXTRA] = (f"JTI={jti}",)
    return MappingProxyType(out)


def _claim_rule(
    rule: ClaimValidationRule,
    claims: Mapping[str, Any],
    scope: Variables,
    issuer: str,
) -> None:
    if rule.expression is not None:
        result = _evaluate(rule.expression, scope, issuer)
        if result is True:
            return
        if not isinstance(result, bool):
            raise InvalidClaim(
                f"claims: {rule.expression.field_path} must return a boolean, got "
                f"{type(result).__name__}",
                claim=rule.expression.field_path,
                issuer=issuer,
            )
        why = rule.message or f"expression {rule.expression.source!r} returned false"
        raise ClaimRuleFailed(
            f"claims: claim validation rule {rule.expression.field_path} failed: {why}",
            issuer=issuer,
        )
    assert rule.claim is not None
    if rule.claim not in claims:
        raise MissingClaim(
            f'claims: required claim "{rule.claim}" is not present in the token',
            claim=rule.claim,
            issuer=issuer,
        )
    value = claims[rule.claim]
    if not isinstance(value, str):
        raise ClaimRuleFailed(
            f'claims: required claim "{rule.claim}" must be a string, '
            f"got {type(value).__name__}",
            issuer=issuer,
        )
    if value != rule.required_value:
        raise ClaimRuleFailed(
            f'claims: required claim "{rule.claim}": expected {rule.required_value!r}, '
            f"got {_show(value)}",
            issuer=issuer,
        )


def _user_scope(user: UserInfo) -> Variables:
    return Variables(
        {
            "user": {
                "username": user.username,
                "uid": user.uid,
                "groups": list(user.groups),
                "extra": {k: list(v) for k, v in user.extra.items()},
            }
        }
    )


def _user_rule(rule: UserValidationRule, scope: Variables, issuer: str) -> None:
    try:
        result = rule.expression.evaluate(scope)
    except ExpressionError as err:
        raise UserRuleFailed(f"claims: {err}", issuer=issuer) from err
    if result is True:
        return
    if not isinstance(result, bool):
        raise UserRuleFailed(
            f"claims: {rule.expression.field_path} must return a boolean, got "
            f"{type(result).__name__}",
            issuer=issuer,
        )
    why = rule.message or f"expression {rule.expression.source!r} returned false"
    raise UserRuleFailed(
        f"claims: user validation rule {rule.expression.field_path} failed: {why}",
        issuer=issuer,
    )


def map_claims(config: JWTAuthenticatorConfig, claims: Mapping[str, Any]) -> UserInfo:
    """Map verified ``claims`` to a ``UserInfo`` or raise a ``TokenError`` naming why."""
    issuer = config.issuer.url
    m = config.claim_mappings
    # One conversion of the claims (and of the user) serves every expression.
    scope = Variables({"claims": claims})
    user = UserInfo(
        username=_username(m.username, claims, scope, issuer),
        groups=_groups(m.groups, claims, scope, issuer),
        uid=_uid(m.uid, claims, scope, issuer),
        extra=_extra(m, claims, scope, issuer),
    )
    for rule in config.claim_validation_rules:
        _claim_rule(rule, claims, scope, issuer)
    if config.user_validation_rules:
        user_scope = _user_scope(user)
        for urule in config.user_validation_rules:
            _user_rule(urule, user_scope, issuer)
    return user
