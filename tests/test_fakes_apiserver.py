"""The fake API server is as strict as kube-apiserver on what the proxy relies on.

Its impersonation filter (``tests/fakes/apiserver_impersonation.py``): each
user, group, extra and uid checked against RBAC rules read from ``deploy/``,
403 in kube-apiserver's words, 400 to a malformed set, the groups a service
account gets; and its pods watch: bookmarks and ``410 Gone``. Over real TLS on
127.0.0.1, with the proxy's credential, as the proxy calls it.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml

from proxy.impersonate import ProxySettings
from tests.fakes.apiserver import PROXY_USERNAME, FakeAPIServer, serve_apiserver
from tests.fakes.apiserver_harness import PODS, PROXY_TOKEN, WHOAMI, run_proxy
from tests.fakes.apiserver_impersonation import (
    DEPLOY,
    DEPLOY_RULES,
    PROXY_OVERLAY_RULES,
    Rule,
)

PROXY = {"Authorization": f"Bearer {PROXY_TOKEN}"}
SA = "system:serviceaccount:kube-oidc-gate:kube-oidc-gate"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def fake(ca: trustme.CA) -> AsyncIterator[FakeAPIServer]:
    async with serve_apiserver(ca) as server:
        yield server


@pytest.fixture
async def client(ca: trustme.CA) -> AsyncIterator[aiohttp.ClientSession]:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx)
    ) as session:
        yield session


async def whoami(
    client: aiohttp.ClientSession,
    fake: FakeAPIServer,
    headers: list[tuple[str, str]],
    bearer: str = PROXY_TOKEN,
) -> tuple[int, dict[str, Any]]:
    sent = [("Authorization", f"Bearer {bearer}"), *headers]
    async with client.post(fake.url + WHOAMI, headers=sent, json={}) as r:
        return r.status, await r.json(content_type=None)


# --------------------------------------------------------------------------
# The rule table comes from deploy/


def _granted_extras(path: Path) -> set[str]:
    keys = set()
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "ClusterRole":
            for rule in doc["rules"]:
                if "impersonate" in rule["verbs"]:
                    keys |= {
                        r.removeprefix("userextras/")
                        for r in rule["resources"]
                        if r.startswith("userextras/")
                    }
    return keys


def _may(rules: tuple[Rule, ...], resource: str, group: str, name: str) -> bool:
    return any(
        r.allows(verb="impersonate", api_group=group, resource=resource, name=name)
        for r in rules
    )


def test_the_proxy_overlay_grants_each_extra_key_it_names_and_no_other() -> None:
    keys = _granted_extras(DEPLOY / "overlays" / "proxy" / "rbac.yaml")
    assert "authentication.kubernetes.io/credential-id" in keys
    for key in keys:
        assert _may(
            PROXY_OVERLAY_RULES, f"userextras/{key}", "authentication.k8s.io", "v"
        )
    assert not _may(
        PROXY_OVERLAY_RULES,
        "userextras/example.com/other",
        "authentication.k8s.io",
        "v",
    )
    assert not _may(PROXY_OVERLAY_RULES, "serviceaccounts", "", "builder")
    for resource in ("users", "groups"):
        assert _may(PROXY_OVERLAY_RULES, resource, "", "anyone")
    assert _may(PROXY_OVERLAY_RULES, "uids", "authentication.k8s.io", "u1")


def test_the_default_is_everything_deploy_grants_the_gate() -> None:
    # With the client-impersonation component: service accounts, any extra.
    assert set(PROXY_OVERLAY_RULES) < set(DEPLOY_RULES)
    assert _may(DEPLOY_RULES, "serviceaccounts", "", "builder")
    assert _may(DEPLOY_RULES, "userextras/any/key", "authentication.k8s.io", "v")
    assert not _may(DEPLOY_RULES, "users", "other.group", "x")


def test_rbac_matching_of_names_and_subresources() -> None:
    rules = (
        Rule(
            api_groups=("",),
            resources=("users",),
            verbs=("impersonate",),
            resource_names=("alice",),
        ),
        Rule(
            api_groups=("authentication.k8s.io",),
            resources=("*/scopes",),
            verbs=("impersonate",),
        ),
    )
    assert _may(rules, "users", "", "alice")
    assert not _may(rules, "users", "", "bob")
    assert not _may(rules, "groups", "", "alice")
    assert _may(rules, "userextras/scopes", "authentication.k8s.io", "read")
    assert not _may(rules, "userextras/team", "authentication.k8s.io", "read")
    assert not _may(rules, "userextras", "authentication.k8s.io", "read")


# --------------------------------------------------------------------------
# Allowed: the user as kube-apiserver builds it


async def test_an_allowed_user_gets_system_authenticated(
    fake: FakeAPIServer, client: aiohttp.ClientSession
) -> None:
    fake.impersonation_rules = PROXY_OVERLAY_RULES
    code, body = await whoami(
        client,
        fake,
        [
            ("Impersonate-User", "oidc:alice"),
            ("Impersonate-Group", "dev"),
            ("Impersonate-Uid", "u-1"),
            ("Impersonate-Extra-Authentication.kubernetes.io%2fcredential-id", "j1"),
        ],
    )
    assert code == 201, body
    assert body["status"]["userInfo"] == {
        "username": "oidc:alice",
        "groups": ["dev", "system:authenticated"],
        "uid": "u-1",
        "extra": {"authentication.kubernetes.io/credential-id": ["j1"]},
    }


@pytest.mark.parametrize(
    ("groups", "expected"),
    [
        ([], ["system:serviceaccounts", "system:serviceaccounts:team"]),
        (["ops"], ["ops"]),
    ],
    ids=["no-groups", "groups-given"],
)
async def test_a_service_account_gets_its_groups_unless_groups_are_given(
    fake: FakeAPIServer,
    client: aiohttp.ClientSession,
    groups: list[str],
    expected: list[str],
) -> None:
    headers = [("Impersonate-User", "system:serviceaccount:team:builder")]
    headers += [("Impersonate-Group", g) for g in groups]
    code, body = await whoami(client, fake, headers)
    assert code == 201, body
    assert body["status"]["userInfo"]["groups"] == [*expected, "system:authenticated"]


async def test_anonymous_is_unauthenticated(
    fake: FakeAPIServer, client: aiohttp.ClientSession
) -> None:
    code, body = await whoami(client, fake, [("Impersonate-User", "system:anonymous")])
    assert code == 201, body
    assert body["status"]["userInfo"]["groups"] == ["system:unauthenticated"]


async def test_the_proxys_own_account_is_the_deployed_service_account(
    fake: FakeAPIServer, client: aiohttp.ClientSession
) -> None:
    fake.require_impersonation = False
    code, body = await whoami(client, fake, [])
    assert code == 201, body
    assert body["status"]["userInfo"]["username"] == PROXY_USERNAME == SA


# --------------------------------------------------------------------------
# Refused: 403 in kube-apiserver's words


FORBIDDEN: list[tuple[str, tuple[Rule, ...], list[tuple[str, str]], str, str]] = [
    (
        "user",
        (),
        [("Impersonate-User", "x")],
        f'users "x" is forbidden: User "{SA}" cannot impersonate resource "users" '
        'in API group "" at the cluster scope',
        "users",
    ),
    (
        "group",
        (Rule(api_groups=("",), resources=("users",), verbs=("impersonate",)),),
        [("Impersonate-User", "x"), ("Impersonate-Group", "admins")],
        f'groups "admins" is forbidden: User "{SA}" cannot impersonate resource '
        '"groups" in API group "" at the cluster scope',
        "groups",
    ),
    (
        "extra-not-in-the-overlay",
        PROXY_OVERLAY_RULES,
        [("Impersonate-User", "x"), ("Impersonate-Extra-Example.com%2fTeam", "a")],
        f'userextras.authentication.k8s.io "a" is forbidden: User "{SA}" cannot '
        'impersonate resource "userextras/example.com/team" in API group '
        '"authentication.k8s.io" at the cluster scope',
        "userextras",
    ),
    (
        "uid",
        (Rule(api_groups=("",), resources=("users",), verbs=("impersonate",)),),
        [("Impersonate-User", "x"), ("Impersonate-Uid", "u-1")],
        f'uids.authentication.k8s.io "u-1" is forbidden: User "{SA}" cannot '
        'impersonate resource "uids" in API group "authentication.k8s.io" at the '
        "cluster scope",
        "uids",
    ),
    (
        "service-account-without-the-component",
        PROXY_OVERLAY_RULES,
        [("Impersonate-User", "system:serviceaccount:team:builder")],
        f'serviceaccounts "builder" is forbidden: User "{SA}" cannot impersonate '
        'resource "serviceaccounts" in API group "" in the namespace "team"',
        "serviceaccounts",
    ),
    (
        "name-not-granted",
        (
            Rule(
                api_groups=("",),
                resources=("users",),
                verbs=("impersonate",),
                resource_names=("alice",),
            ),
        ),
        [("Impersonate-User", "bob")],
        f'users "bob" is forbidden: User "{SA}" cannot impersonate resource "users" '
        'in API group "" at the cluster scope',
        "users",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rules", "headers", "message", "kind"),
    [f[1:] for f in FORBIDDEN],
    ids=[f[0] for f in FORBIDDEN],
)
async def test_what_rbac_does_not_grant_is_403_in_kube_apiservers_words(
    fake: FakeAPIServer,
    client: aiohttp.ClientSession,
    rules: tuple[Rule, ...],
    headers: list[tuple[str, str]],
    message: str,
    kind: str,
) -> None:
    fake.impersonation_rules = rules
    code, body = await whoami(client, fake, headers)
    assert code == 403, body
    assert body["kind"] == "Status"
    assert body["reason"] == "Forbidden"
    assert body["message"] == message
    assert body["details"]["kind"] == kind
    assert fake.requests[-1].user is None


async def test_a_user_token_may_impersonate_no_one(
    fake: FakeAPIServer, client: aiohttp.ClientSession
) -> None:
    fake.user_tokens["u-token"] = {"username": "bob", "groups": []}
    code, _ = await whoami(client, fake, [], bearer="u-token")
    assert code == 201
    code, body = await whoami(
        client, fake, [("Impersonate-User", "admin")], bearer="u-token"
    )
    assert code == 403, body
    assert body["message"].startswith('users "admin" is forbidden: User "bob"')
    fake.user_impersonation_rules["bob"] = (
        Rule(api_groups=("",), resources=("users",), verbs=("impersonate",)),
    )
    code, body = await whoami(
        client, fake, [("Impersonate-User", "admin")], bearer="u-token"
    )
    assert code == 201, body
    assert body["status"]["userInfo"]["username"] == "admin"


# --------------------------------------------------------------------------
# Malformed sets: 400


MALFORMED: list[tuple[str, list[tuple[str, str]]]] = [
    ("group-without-user", [("Impersonate-Group", "g")]),
    ("extra-without-user", [("Impersonate-Extra-Scopes", "s")]),
    ("uid-without-user", [("Impersonate-Uid", "u")]),
    ("empty-user-with-group", [("Impersonate-User", ""), ("Impersonate-Group", "g")]),
    ("two-users", [("Impersonate-User", "a"), ("Impersonate-User", "b")]),
    (
        "two-uids",
        [("Impersonate-User", "a"), ("Impersonate-Uid", "1"), ("Impersonate-Uid", "2")],
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "headers", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
async def test_a_malformed_impersonation_set_is_400(
    fake: FakeAPIServer,
    client: aiohttp.ClientSession,
    headers: list[tuple[str, str]],
) -> None:
    code, body = await whoami(client, fake, headers)
    assert code == 400, body
    assert body["reason"] == "BadRequest"
    assert fake.requests[-1].user is None


# --------------------------------------------------------------------------
# Through the proxy: a refusal of the API server reaches the client as it is


@pytest.mark.slow
async def test_the_proxy_relays_the_api_servers_impersonation_refusal(
    tmp_path: Path, ca: trustme.CA
) -> None:
    async with run_proxy(tmp_path, ca) as stack:
        assert stack.fake.impersonation_rules == PROXY_OVERLAY_RULES
        async with stack.client.get(stack.url + PODS, headers=stack.bearer()) as r:
            assert r.status == 200
        stack.fake.impersonation_rules = ()
        async with stack.client.get(stack.url + PODS, headers=stack.bearer()) as r:
            assert r.status == 403
            body = await r.json()
        assert body["message"].startswith('users "oidc:')
        assert "cannot impersonate resource" in body["message"]


@pytest.mark.slow
async def test_client_impersonation_through_the_proxy_is_checked_by_both(
    tmp_path: Path, ca: trustme.CA
) -> None:
    settings = ProxySettings(allow_client_impersonation=True)
    async with run_proxy(tmp_path, ca, settings=settings) as stack:
        assert stack.fake.impersonation_rules == DEPLOY_RULES
        stack.fake.sar_rules |= {("oidc:alice", "serviceaccounts", "builder")}
        headers = {
            **stack.bearer(),
            "Impersonate-User": "system:serviceaccount:team:builder",
        }
        async with stack.client.post(stack.url + WHOAMI, headers=headers, json={}) as r:
            body = await r.json()
            assert r.status == 201, body
        assert body["status"]["userInfo"]["groups"] == [
            "system:serviceaccounts",
            "system:serviceaccounts:team",
            "system:authenticated",
        ]


# --------------------------------------------------------------------------
# Pods watch: bookmarks and 410 Gone


async def _watch_lines(
    client: aiohttp.ClientSession, fake: FakeAPIServer, query: str, lines: int
) -> tuple[int, list[dict[str, Any]]]:
    out: list[dict[str, Any]] = []
    headers = {**PROXY, "Impersonate-User": "oidc:alice"}
    async with client.get(
        fake.url + PODS + "?watch=1&" + query,
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=5),
    ) as r:
        if r.status != 200:
            return r.status, [await r.json()]
        while len(out) < lines:
            line = await r.content.readline()
            if not line:
                break
            out.append(json.loads(line))
            if len(out) == 1 and out[0]["type"] == "ADDED":
                fake.emit("MODIFIED", "p")
                fake.bookmark()
                fake.emit("MODIFIED", "p")
        return r.status, out


async def test_bookmarks_go_only_to_watches_that_ask(
    fake: FakeAPIServer, client: aiohttp.ClientSession
) -> None:
    code, events = await _watch_lines(client, fake, "allowWatchBookmarks=true", 4)
    assert code == 200
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "BOOKMARK", "MODIFIED"]
    assert events[2]["object"]["kind"] == "Pod"
    assert int(events[2]["object"]["metadata"]["resourceVersion"]) == fake.rv - 1
    code, events = await _watch_lines(client, fake, "", 3)
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "MODIFIED"]


@pytest.mark.parametrize("how", ["status", "event", "compacted"])
async def test_a_watch_from_a_compacted_version_is_410_gone(
    fake: FakeAPIServer, client: aiohttp.ClientSession, how: str
) -> None:
    if how == "compacted":
        fake.compacted_rv = 5
    else:
        fake.gone_next_watch = how
    code, events = await _watch_lines(client, fake, "resourceVersion=3", 5)
    if how == "status":
        assert code == 410
        assert events[0]["code"] == 410
        assert events[0]["reason"] == "Expired"
    else:
        assert code == 200
        assert [e["type"] for e in events] == ["ERROR"]
        assert events[0]["object"]["code"] == 410
        assert events[0]["object"]["reason"] == "Expired"
    fake.gone_next_watch = None
    fake.compacted_rv = 0
    code, events = await _watch_lines(client, fake, "", 1)
    assert code == 200
    assert events[0]["type"] == "ADDED"
