"""The ``AuthenticationConfiguration`` file: read, decode strictly, validate.

``--authentication-config`` names the file kube-apiserver's flag of the same
name reads, with the same meaning. It is decoded strictly (an unknown or
duplicated field is an error, as in kube-apiserver, which decodes this file
with its strict codec) and validated with kube-apiserver's rules and wording,
so an error message can be searched for in Kubernetes' documentation. Every
problem is collected and reported at once, each as
``config: <source>: <field path>: <kind>: <detail>``.

Deliberate differences from kube-apiserver, all of them refusals or
relaxations that cannot change what a valid configuration means:

- plain ``http`` issuer and discovery URLs are accepted when the host is a
  loopback address (127.0.0.0/8, ::1, ``localhost``): tests and ``--dev`` run
  an issuer on the same machine, and a loopback connection cannot be
  intercepted by the network;
- an issuer URL must have a host;
- ``anonymous.enabled: true`` is refused: this service only ever answers with
  an identity proven by a token, so there is no anonymous user to hand out;
- ``issuer.egressSelectorType`` is accepted and ignored: it picks one of
  kube-apiserver's konnectivity tunnels, which do not exist here; this process
  reaches the issuer over its own network, like any other pod;
- ``apiserver.config.k8s.io/v1alpha1`` is accepted beside ``v1beta1`` and
  ``v1``, as kube-apiserver 1.34 still accepts it: the three share every field
  read here, and refusing it would only break files copied from older clusters;
- the file must name at least one ``jwt`` authenticator (kube-apiserver allows
  none, for anonymous-only setups, which we refuse anyway).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from proxy.cel import CompiledExpression, Returns, compile_expression
from proxy.errors import ConfigError
from proxy.options.common import pem_problem, url_problems
from proxy.options.decode import decode_document
from proxy.options.values import (
    FILE_SIGNING_ALGS,
    MAX_AUTHENTICATORS,
    SUPPORTED_API_VERSIONS,
    AuthConfig,
    ClaimMappings,
    ClaimOrExpression,
    ClaimValidationRule,
    ExtraMapping,
    IssuerConfig,
    JWTAuthenticatorConfig,
    PrefixedClaimOrExpression,
    UserValidationRule,
)

__all__ = ["load_authentication_config", "parse_authentication_config"]


_KIND = "AuthenticationConfiguration"

# The fields each object of the file may have (strict decoding).
_TOP_FIELDS = ("apiVersion", "kind", "jwt", "anonymous")
_ANONYMOUS_FIELDS = ("enabled", "conditions")
_CONDITION_FIELDS = ("path",)
_JWT_FIELDS = ("issuer", "claimValidationRules", "claimMappings", "userValidationRules")
_ISSUER_FIELDS = (
    "url",
    "discoveryURL",
    "certificateAuthority",
    "audiences",
    "audienceMatchPolicy",
    "egressSelectorType",
)
_CLAIM_RULE_FIELDS = ("claim", "requiredValue", "expression", "message")
_MAPPINGS_FIELDS = ("username", "groups", "uid", "extra")
_PREFIXED_FIELDS = ("claim", "prefix", "expression")
_CLAIM_OR_EXPR_FIELDS = ("claim", "expression")
_EXTRA_FIELDS = ("key", "valueExpression")
_USER_RULE_FIELDS = ("expression", "message")

_EGRESS_SELECTOR_TYPES = ("controlplane", "cluster")
_RESERVED_EXTRA_DOMAINS = ("kubernetes.io", "k8s.io")
_DNS1123_SUBDOMAIN = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)
_HTTP_PATH = re.compile(r"[A-Za-z0-9/\-._~%!$&'()*+,;=:]+")
_EMAIL_RULE = (
    "claims.email_verified must be used in claimMappings.username.expression or "
    "claimMappings.extra[*].valueExpression or claimValidationRules[*].expression "
    "when claims.email is used in claimMappings.username.expression"
)


def load_authentication_config(path: str) -> AuthConfig:
    """Read, decode strictly and validate an ``AuthenticationConfiguration`` file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ConfigError(
            f"config: --authentication-config {json.dumps(path)}: cannot read: "
            f"{err.strerror or err}"
        ) from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config: --authentication-config {json.dumps(path)}: not UTF-8 text"
        ) from err
    return parse_authentication_config(text, source=path)


def parse_authentication_config(text: str, *, source: str) -> AuthConfig:
    """Decode and validate the text of an ``AuthenticationConfiguration``.

    ``source`` (the file name) starts every problem. Raises ``ConfigError``
    listing every problem found, each at its field path.
    """
    document = decode_document(text, source)
    reader = _FileReader(source)
    authenticators = reader.document(document)
    if reader.problems:
        raise ConfigError(reader.problems)
    return AuthConfig(authenticators=authenticators, form="file")


def _child(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _show(value: object) -> str:
    """A value in a problem, quoted the way kube's field errors quote it."""
    return json.dumps(value, ensure_ascii=False, default=str)


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class _FileReader:
    """Walks the decoded document once: checks types, fields and rules, and builds.

    Problems are collected, never raised, so the operator sees all of them.
    Builders return None when the part they build has a problem; the values
    are only returned to the caller when no problem was found.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    # -- problem wording (kube's field.Error kinds) -------------------------

    def _add(self, path: str, text: str) -> None:
        self.problems.append(f"config: {self.source}: {path}: {text}")

    def required(self, path: str, detail: str = "") -> None:
        self._add(path, f"Required value: {detail}" if detail else "Required value")

    def invalid(self, path: str, value: object, detail: str) -> None:
        self._add(path, f"Invalid value: {_show(value)}: {detail}")

    def duplicate(self, path: str, value: object) -> None:
        self._add(path, f"Duplicate value: {_show(value)}")

    def unsupported(self, path: str, value: object, supported: Sequence[str]) -> None:
        allowed = ", ".join(_show(s) for s in supported)
        self._add(
            path, f"Unsupported value: {_show(value)}: supported values: {allowed}"
        )

    def forbidden(self, path: str, detail: str) -> None:
        self._add(path, f"Forbidden: {detail}")

    # -- typed access --------------------------------------------------------

    def obj(self, value: object, path: str, fields: Sequence[str]) -> Mapping[str, Any]:
        """A mapping with only known fields; null and absent read as empty."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self._add(path, f"Invalid type: expected object, got {_type_name(value)}")
            return {}
        for key in value:
            if key not in fields:
                name = str(key)
                close = difflib.get_close_matches(name, fields, n=1)
                hint = f" (did you mean {json.dumps(close[0])}?)" if close else ""
                self._add(_child(path, name), f"Unknown field{hint}")
        return {k: v for k, v in value.items() if k in fields}

    def string(self, m: Mapping[str, Any], key: str, path: str) -> str | None:
        """A string field; None when absent or null (Go would read "")."""
        value = m.get(key)
        if value is None or isinstance(value, str):
            return value
        self._add(
            _child(path, key), f"Invalid type: expected string, got {_type_name(value)}"
        )
        return None

    def items(self, m: Mapping[str, Any], key: str, path: str) -> list[Any]:
        value = m.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self._add(
                _child(path, key),
                f"Invalid type: expected array, got {_type_name(value)}",
            )
            return []
        return value

    def compile(
        self,
        source: str,
        *,
        variables: tuple[str, ...],
        field_path: str,
        returns: Returns,
    ) -> CompiledExpression | None:
        """Compile with ``proxy.cel``, type included; its problems join ours."""
        try:
            return compile_expression(
                source, variables=variables, field_path=field_path, returns=returns
            )
        except ConfigError as err:
            for problem in err.problems:
                self.problems.append(
                    f"config: {self.source}: {problem.removeprefix('config: ')}"
                )
            return None

    # -- the document --------------------------------------------------------

    def document(self, document: object) -> tuple[JWTAuthenticatorConfig, ...]:
        if not isinstance(document, dict):
            got = "an empty document" if document is None else _type_name(document)
            self.problems.append(
                f"config: {self.source}: expected an {_KIND} object, got {got}"
            )
            return ()
        api_version, kind = document.get("apiVersion"), document.get("kind")
        if api_version is None:
            self.required("apiVersion", f"one of {', '.join(SUPPORTED_API_VERSIONS)}")
        elif api_version not in SUPPORTED_API_VERSIONS:
            self.unsupported("apiVersion", api_version, SUPPORTED_API_VERSIONS)
        if kind is None:
            self.required("kind", _KIND)
        elif kind != _KIND:
            self.unsupported("kind", kind, (_KIND,))
        if self.problems:
            return ()  # another kind of document: its fields would only add noise

        top = self.obj(document, "", _TOP_FIELDS)
        self.anonymous(top.get("anonymous"))
        entries = self.items(top, "jwt", "")
        if not entries:
            if "jwt" not in top or isinstance(top.get("jwt"), list | type(None)):
                self.required(
                    "jwt",
                    "at least one jwt authenticator is required: kube-oidc-gate "
                    "authenticates nothing else",
                )
            return ()
        if len(entries) > MAX_AUTHENTICATORS:
            self._add(
                "jwt",
                f"Too many: {len(entries)}: must have at most "
                f"{MAX_AUTHENTICATORS} items",
            )
            return ()

        built: list[JWTAuthenticatorConfig | None] = []
        seen_urls: set[str] = set()
        seen_discovery: set[str] = set()
        for i, entry in enumerate(entries):
            path = f"jwt[{i}]"
            built.append(self.jwt(entry, path))
            issuer = entry.get("issuer") if isinstance(entry, dict) else None
            if not isinstance(issuer, dict):
                continue
            url, discovery = issuer.get("url"), issuer.get("discoveryURL")
            if isinstance(url, str) and url:
                if url in seen_urls:
                    self.duplicate(f"{path}.issuer.url", url)
                seen_urls.add(url)
            if isinstance(discovery, str) and discovery:
                if discovery in seen_discovery:
                    self.duplicate(f"{path}.issuer.discoveryURL", discovery)
                seen_discovery.add(discovery)
        if self.problems:
            return ()
        out = tuple(a for a in built if a is not None)
        assert len(out) == len(built)
        return out

    def anonymous(self, raw: object) -> None:
        m = self.obj(raw, "anonymous", _ANONYMOUS_FIELDS)
        enabled = m.get("enabled")
        if enabled is not None and not isinstance(enabled, bool):
            self._add(
                "anonymous.enabled",
                f"Invalid type: expected boolean, got {_type_name(enabled)}",
            )
        elif enabled:
            self.forbidden(
                "anonymous.enabled",
                "kube-oidc-gate never authenticates anonymous requests: a request "
                "without a valid token is refused; remove this or set it to false",
            )
        conditions = self.items(m, "conditions", "anonymous")
        for j, condition in enumerate(conditions):
            c = self.obj(condition, f"anonymous.conditions[{j}]", _CONDITION_FIELDS)
            self.string(c, "path", f"anonymous.conditions[{j}]")
        if conditions and not enabled:
            self.invalid(
                "anonymous.conditions",
                conditions,
                "enabled should be set to true when conditions are defined",
            )

    def jwt(self, raw: object, path: str) -> JWTAuthenticatorConfig | None:
        m = self.obj(raw, path, _JWT_FIELDS)
        start = len(self.problems)
        issuer = self.issuer(m.get("issuer"), f"{path}.issuer")
        rules = self.claim_rules(m, path)
        mappings = self.claim_mappings(
            m.get("claimMappings"), f"{path}.claimMappings", rules
        )
        user_rules = self.user_rules(m, path)
        if len(self.problems) > start or issuer is None or mappings is None:
            return None
        return JWTAuthenticatorConfig(
            issuer=issuer,
            claim_mappings=mappings,
            claim_validation_rules=rules,
            user_validation_rules=user_rules,
            source=path,
        )

    def issuer(self, raw: object, path: str) -> IssuerConfig | None:
        m = self.obj(raw, path, _ISSUER_FIELDS)
        start = len(self.problems)

        url = self.string(m, "url", path) or ""
        if not url:
            if "url" not in m or m.get("url") in (None, ""):
                self.required(f"{path}.url", "URL is required")
        else:
            for detail in url_problems(url):
                self.invalid(f"{path}.url", url, detail)

        discovery = self.string(m, "discoveryURL", path) or ""
        if discovery:
            if url and url.rstrip("/") == discovery.rstrip("/"):
                self.invalid(
                    f"{path}.discoveryURL",
                    discovery,
                    "discoveryURL must be different from URL",
                )
            for detail in url_problems(discovery):
                self.invalid(f"{path}.discoveryURL", discovery, detail)

        audiences, policy = self.audiences(m, path)

        ca = self.string(m, "certificateAuthority", path) or ""
        if ca:
            problem = pem_problem(ca)
            if problem is not None:
                self.invalid(f"{path}.certificateAuthority", "<omitted>", problem)

        egress = self.string(m, "egressSelectorType", path) or ""
        if egress and egress not in _EGRESS_SELECTOR_TYPES:
            self.unsupported(
                f"{path}.egressSelectorType", egress, _EGRESS_SELECTOR_TYPES
            )

        if len(self.problems) > start:
            return None
        return IssuerConfig(
            url=url,
            discovery_url=discovery or None,
            certificate_authority=ca or None,
            audiences=audiences,
            audience_match_policy="MatchAny" if policy else "",
            signing_algs=FILE_SIGNING_ALGS,
        )

    def audiences(self, m: Mapping[str, Any], path: str) -> tuple[tuple[str, ...], str]:
        """``issuer.audiences`` and ``audienceMatchPolicy``, checked together."""
        audiences: list[str] = []
        raw_audiences = self.items(m, "audiences", path)
        if not raw_audiences and not (
            "audiences" in m and not isinstance(m["audiences"], list | type(None))
        ):
            self.required(
                f"{path}.audiences", f"at least one {path}.audiences is required"
            )
        for j, audience in enumerate(raw_audiences):
            apath = f"{path}.audiences[{j}]"
            if audience is not None and not isinstance(audience, str):
                self._add(
                    apath, f"Invalid type: expected string, got {_type_name(audience)}"
                )
                continue
            text = audience or ""
            if not text:
                self.required(apath, "audience can't be empty")
            if text in audiences:
                self.duplicate(apath, text)
            audiences.append(text)

        policy = self.string(m, "audienceMatchPolicy", path) or ""
        if len(raw_audiences) > 1 and policy != "MatchAny":
            self.invalid(
                f"{path}.audienceMatchPolicy",
                policy,
                "audienceMatchPolicy must be MatchAny for multiple audiences",
            )
        elif len(raw_audiences) == 1 and policy not in ("", "MatchAny"):
            self.invalid(
                f"{path}.audienceMatchPolicy",
                policy,
                "audienceMatchPolicy must be empty or MatchAny for single audience",
            )
        return tuple(audiences), policy

    def claim_rules(
        self, m: Mapping[str, Any], path: str
    ) -> tuple[ClaimValidationRule, ...]:
        rules: list[ClaimValidationRule] = []
        seen_claims: set[str] = set()
        seen_expressions: set[str] = set()
        for j, raw in enumerate(self.items(m, "claimValidationRules", path)):
            rpath = f"{path}.claimValidationRules[{j}]"
            r = self.obj(raw, rpath, _CLAIM_RULE_FIELDS)
            claim = self.string(r, "claim", rpath) or ""
            required_value = self.string(r, "requiredValue", rpath) or ""
            expression = self.string(r, "expression", rpath) or ""
            message = self.string(r, "message", rpath) or ""
            if claim and expression:
                self.invalid(rpath, claim, "claim and expression can't both be set")
            elif not claim and not expression:
                self.required(rpath, "claim or expression is required")
            elif claim:
                if message:
                    self.invalid(
                        f"{rpath}.message",
                        message,
                        "message can't be set when claim is set",
                    )
                if claim in seen_claims:
                    self.duplicate(f"{rpath}.claim", claim)
                seen_claims.add(claim)
                rules.append(
                    ClaimValidationRule(claim=claim, required_value=required_value)
                )
            else:
                if required_value:
                    self.invalid(
                        f"{rpath}.requiredValue",
                        required_value,
                        "requiredValue can't be set when expression is set",
                    )
                if expression in seen_expressions:
                    self.duplicate(f"{rpath}.expression", expression)
                    continue
                seen_expressions.add(expression)
                compiled = self.compile(
                    expression,
                    variables=("claims",),
                    field_path=f"{rpath}.expression",
                    returns=Returns.BOOL,
                )
                if compiled is not None:
                    rules.append(
                        ClaimValidationRule(expression=compiled, message=message)
                    )
        return tuple(rules)

    def prefixed(
        self, raw: object, path: str, *, required: bool, returns: Returns
    ) -> PrefixedClaimOrExpression | None:
        m = self.obj(raw, path, _PREFIXED_FIELDS)
        claim = self.string(m, "claim", path) or ""
        prefix = self.string(m, "prefix", path)
        expression = self.string(m, "expression", path) or ""
        if claim and expression:
            self.invalid(path, "", "claim and expression can't both be set")
        elif expression:
            if prefix is not None:
                self.invalid(
                    f"{path}.prefix",
                    prefix,
                    "prefix can't be set when expression is set",
                )
            compiled = self.compile(
                expression,
                variables=("claims",),
                field_path=f"{path}.expression",
                returns=returns,
            )
            if compiled is not None and prefix is None:
                return PrefixedClaimOrExpression(expression=compiled)
        elif claim:
            if prefix is None:
                self.required(
                    f"{path}.prefix",
                    "prefix is required when claim is set. It can be set to an empty "
                    "string to disable prefixing",
                )
            else:
                return PrefixedClaimOrExpression(claim=claim, prefix=prefix)
        elif required:
            self.required(path, "claim or expression is required")
        return None

    def claim_mappings(
        self, raw: object, path: str, rules: Sequence[ClaimValidationRule]
    ) -> ClaimMappings | None:
        m = self.obj(raw, path, _MAPPINGS_FIELDS)
        start = len(self.problems)
        username = self.prefixed(
            m.get("username"),
            f"{path}.username",
            required=True,
            returns=Returns.STRING,
        )
        groups = self.prefixed(
            m.get("groups"), f"{path}.groups", required=False, returns=Returns.STRINGS
        )

        uid: ClaimOrExpression | None = None
        u = self.obj(m.get("uid"), f"{path}.uid", _CLAIM_OR_EXPR_FIELDS)
        uid_claim = self.string(u, "claim", f"{path}.uid") or ""
        uid_expression = self.string(u, "expression", f"{path}.uid") or ""
        if uid_claim and uid_expression:
            self.invalid(f"{path}.uid", "", "claim and expression can't both be set")
        elif uid_expression:
            compiled = self.compile(
                uid_expression,
                variables=("claims",),
                field_path=f"{path}.uid.expression",
                returns=Returns.STRING,
            )
            if compiled is not None:
                uid = ClaimOrExpression(expression=compiled)
        elif uid_claim:
            uid = ClaimOrExpression(claim=uid_claim)

        extra = self.extra_mappings(m, path)
        self.email_rule(path, username, extra, rules)

        if len(self.problems) > start or username is None:
            return None
        return ClaimMappings(username=username, groups=groups, uid=uid, extra=extra)

    def extra_mappings(
        self, m: Mapping[str, Any], path: str
    ) -> tuple[ExtraMapping, ...]:
        out: list[ExtraMapping] = []
        seen: set[str] = set()
        for j, raw in enumerate(self.items(m, "extra", path)):
            epath = f"{path}.extra[{j}]"
            e = self.obj(raw, epath, _EXTRA_FIELDS)
            key = self.string(e, "key", epath) or ""
            self.extra_key(key, f"{epath}.key")
            if key in seen:
                self.duplicate(f"{epath}.key", key)
                continue
            seen.add(key)
            value_expression = self.string(e, "valueExpression", epath) or ""
            if not value_expression:
                self.required(f"{epath}.valueExpression", "valueExpression is required")
                continue
            compiled = self.compile(
                value_expression,
                variables=("claims",),
                field_path=f"{epath}.valueExpression",
                returns=Returns.STRINGS,
            )
            if compiled is not None:
                out.append(ExtraMapping(key=key, value_expression=compiled))
        return tuple(out)

    def extra_key(self, key: str, path: str) -> None:
        """A domain-prefixed path, lowercase, outside Kubernetes' own domains."""
        if not key:
            self.required(path)
            return
        domain, sep, rest = key.partition("/")
        if not sep or not domain or not rest:
            self.invalid(
                path, key, 'must be a domain-prefixed path (such as "acme.io/foo")'
            )
        else:
            if len(domain) > 253:
                self.invalid(path, domain, "must be no more than 253 characters")
            if not _DNS1123_SUBDOMAIN.fullmatch(domain):
                self.invalid(
                    path,
                    domain,
                    "a lowercase RFC 1123 subdomain must consist of lower case "
                    "alphanumeric characters, '-' or '.', and must start and end "
                    "with an alphanumeric character",
                )
            if not _HTTP_PATH.fullmatch(rest):
                self.invalid(path, rest, "Invalid path: must be an RFC 3986 path")
        if key != key.lower():
            self.invalid(path, key, "key must be lowercase")
        if any(
            domain == d or domain.endswith("." + d) for d in _RESERVED_EXTRA_DOMAINS
        ):
            self.invalid(
                path,
                key,
                "k8s.io, kubernetes.io and their subdomains are reserved for "
                "Kubernetes use",
            )

    def email_rule(
        self,
        path: str,
        username: PrefixedClaimOrExpression | None,
        extra: Sequence[ExtraMapping],
        rules: Sequence[ClaimValidationRule],
    ) -> None:
        """An e-mail is only an identity once verified (kube-apiserver's rule).

        With ``username.claim: email`` the claims mapping checks
        ``email_verified`` at run time; with an expression that cannot be
        done, so the file must show it checks ``email_verified`` itself.
        """
        if username is None or username.expression is None:
            return
        email, verified = ("claims", "email"), ("claims", "email_verified")
        if email not in username.expression.selected_fields:
            return
        others = [x.value_expression for x in extra] + [
            r.expression for r in rules if r.expression is not None
        ]
        if any(verified in e.selected_fields for e in [username.expression, *others]):
            return
        self.invalid(
            f"{path}.username.expression", username.expression.source, _EMAIL_RULE
        )

    def user_rules(
        self, m: Mapping[str, Any], path: str
    ) -> tuple[UserValidationRule, ...]:
        rules: list[UserValidationRule] = []
        seen: set[str] = set()
        for j, raw in enumerate(self.items(m, "userValidationRules", path)):
            rpath = f"{path}.userValidationRules[{j}]"
            r = self.obj(raw, rpath, _USER_RULE_FIELDS)
            expression = self.string(r, "expression", rpath) or ""
            message = self.string(r, "message", rpath) or ""
            if not expression:
                self.required(f"{rpath}.expression", "expression is required")
                continue
            if expression in seen:
                self.duplicate(f"{rpath}.expression", expression)
                continue
            seen.add(expression)
            compiled = self.compile(
                expression,
                variables=("user",),
                field_path=f"{rpath}.expression",
                returns=Returns.BOOL,
            )
            if compiled is not None:
                rules.append(UserValidationRule(expression=compiled, message=message))
        return tuple(rules)
