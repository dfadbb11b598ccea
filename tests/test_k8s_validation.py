"""Kubernetes' configuration-validation table (its JWT tests), run through our loader.

The cases live in ``tests/corpus/k8s_validation_jwt.json`` (see its ``notes``):
each is a whole ``AuthenticationConfiguration`` file and Kubernetes' verdict on
it, valid or the errors with their field paths. Each file is loaded by
``parse_authentication_config``, the loader ``--authentication-config`` uses,
once as written (``v1beta1``, JSON) and once as ``v1`` in YAML, since the two
versions share every field and both decoders must agree. A valid case must load;
an invalid one must be refused with a problem at each expected field path,
carrying Kubernetes' wording where ours is the same, and no problem elsewhere.

A case may be ``skipped`` (it needs an input we do not have; the reason says
which), ``deliberate`` (we differ on purpose: the reason, also in
docs/configuration.md, and ``ours``, what is asserted instead), or ``pending``
on the CEL runtime (strict xfail: it must start passing when the new runtime
lands, and then the mark must go).
"""

from __future__ import annotations

import datetime
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.config import parse_authentication_config
from proxy.errors import ConfigError

CORPUS = Path(__file__).parent / "corpus" / "k8s_validation_jwt.json"
TABLE: dict[str, Any] = json.loads(CORPUS.read_text())
PENDING = "cel runtime (issue 20a)"
SOURCE = "k8s-case"
#: apiVersion and encoding of each run of a case.
RUNS = (("v1beta1", "json"), ("v1", "yaml"))


@pytest.fixture(scope="module")
def generated_ca() -> str:
    """A fresh CA certificate, as the Go test makes one (ECDSA P-256, CN test-ca)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _fill(value: Any, ca: str) -> Any:
    if value == "$generatedCA":
        return ca
    if isinstance(value, list):
        return [_fill(v, ca) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, ca) for k, v in value.items()}
    return value


def file_text(case: dict[str, Any], version: str, encoding: str, ca: str) -> str:
    document = _fill(case["config"], ca)
    document["apiVersion"] = f"apiserver.config.k8s.io/{version}"
    if encoding == "yaml":
        return yaml.safe_dump(document, sort_keys=False)
    return json.dumps(document)


def expected(case: dict[str, Any]) -> dict[str, Any]:
    """Kubernetes' verdict, or ours where we differ on purpose."""
    if "deliberate" in case:
        assert case["deliberate"], case["id"]
        return dict(case["ours"])
    return dict(case["want"])


def _params() -> Iterator[Any]:
    for case in TABLE["cases"]:
        for version, encoding in RUNS:
            marks: list[Any] = []
            if "skipped" in case:
                marks.append(pytest.mark.skip(reason=case["skipped"]))
            if "pending" in case:
                marks.append(pytest.mark.xfail(reason=case["pending"], strict=True))
            yield pytest.param(
                case,
                version,
                encoding,
                id=f"{case['id']}[{version}-{encoding}]",
                marks=marks,
            )


@pytest.mark.parametrize(("case", "version", "encoding"), list(_params()))
def test_kubernetes_validation_case(
    case: dict[str, Any], version: str, encoding: str, generated_ca: str
) -> None:
    text = file_text(case, version, encoding, generated_ca)
    want = expected(case)

    if want.get("valid"):
        config = parse_authentication_config(text, source=SOURCE)
        assert len(config.authenticators) == len(case["config"]["jwt"])
        return

    with pytest.raises(ConfigError) as excinfo:
        parse_authentication_config(text, source=SOURCE)
    prefix = f"config: {SOURCE}: "
    problems = [p.removeprefix(prefix) for p in excinfo.value.problems]
    shown = "\n".join(problems)
    paths = {e["path"] for e in want["errors"]}
    for error in want["errors"]:
        at_path = [p for p in problems if p.startswith(f"{error['path']}: ")]
        assert at_path, f"nothing at {error['path']}:\n{shown}"
        for fragment in [*error["fragments"], *error.get("ourFragments", [])]:
            assert any(fragment in p for p in at_path), f"{fragment!r}:\n{shown}"
    stray = [p for p in problems if not any(p.startswith(f"{q}: ") for q in paths)]
    assert not stray, shown


def _kind(case: dict[str, Any]) -> str:
    for kind in ("skipped", "deliberate", "pending"):
        if kind in case:
            return kind
    return "agree"


def test_every_case_is_accounted_for() -> None:
    """Counts for the closing note; and nothing silently dropped."""
    cases = TABLE["cases"]
    ids = [c["id"] for c in cases]
    assert len(ids) == len(set(ids)) == 103
    assert Counter(i.split("/", 1)[0] for i in ids) == {
        "TestValidateAuthenticationConfiguration": 21,
        "TestValidateIssuerURL": 8,
        "TestValidateIssuerDiscoveryURL": 12,
        "TestValidateAudiences": 8,
        "TestValidateCertificateAuthority": 3,
        "TestValidateClaimValidationRules": 13,
        "TestValidateClaimMappings": 32,
        "TestValidateUserValidationRules": 6,
    }
    assert Counter(_kind(c) for c in cases) == {
        "agree": 92,
        "skipped": 9,
        "deliberate": 2,
    }
    for case in cases:
        assert ("valid" in case["want"]) != ("errors" in case["want"]), case["id"]
        assert sum(k in case for k in ("skipped", "deliberate", "pending")) <= 1
        assert ("ours" in case) == ("deliberate" in case), case["id"]
        if "pending" in case:
            assert case["pending"] == PENDING
            assert case["pendingWhy"]


def test_no_key_material_is_committed() -> None:
    text = CORPUS.read_text()
    assert "PRIVATE KEY" not in text
    assert "BEGIN CERTIFICATE" not in text
