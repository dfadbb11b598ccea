"""Request smuggling: what reaches the API server is exactly what llhttp sees.

Each vector is raw bytes a client with a valid token sends over TLS. The
oracle is llhttp (``httptools``, the parser Node.js ships, strict mode): the
requests it finds in those bytes, in order, and where it stops with an error.
The proxy runs in front of a recording upstream that parses strictly with
llhttp too (``tests/fakes/recording_upstream.py``), with both kinds of upstream
credential (a bearer token, a client certificate) and both lanes (the
``proxy.http1`` fast lane in front of aiohttp, and aiohttp alone). For every
vector:

- every request the upstream received is one llhttp sees in the client's
  bytes (same method, target and body), in the same order: the proxy may
  refuse some, never add, join or split one;
- every request the upstream received carries our ``Impersonate-User`` for
  this client's token, our credential, only our ``Impersonate-*`` and no
  ``X-Remote-*``, and llhttp found nothing wrong with its framing;
- every answer the client got is well framed (nothing left over, no body
  after ``HEAD``), there are no more answers than requests, and an answer
  relayed from the upstream names this client's identity.

The webhook's listener gets the same vectors: its answers must be framed the
same way and never outnumber llhttp's requests.

Vectors: the issue-17 report (``Connection: content-length`` and its
variants, ``HEAD`` answers, duplicate lengths, method shapes), the classic
CL.TE / TE.CL / TE obfuscation / obs-fold / bare CR / bare LF / chunk-size /
trailer set, and the request cases of llhttp's own test suite
(``tests/corpus/llhttp_requests.json``, ported as data from nodejs/llhttp
``test/request/*.md``). Into each request of a vector the test puts the
client's ``Authorization`` (and a ``Host`` where it has none), right after
the request line, then asks llhttp about the bytes actually sent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httptools
import pytest
import trustme
import yaml

from proxy.authn import Authenticator
from proxy.upstream import Upstream, UpstreamSettings
from proxy.webhook import WebhookSettings, webhook_server
from tests.fakes.apiserver_harness import client_ssl, mappings, run_proxy
from tests.fakes.recording_upstream import (
    Recorded,
    RecordingUpstream,
    recording_upstream,
)
from tests.helpers import ISSUER, DictResolver, auth_config, authenticator_config
from tests.keygen import SigningKey, claims_for, new_key, sign

CORPUS = Path(__file__).parent / "corpus" / "llhttp_requests.json"

PROXY_TOKEN = "proxy-sa-token-smuggling"
#: Stands for the client's ``Authorization`` line in a hand-written vector.
AUTH = b"Authorization: Bearer @TOKEN@\r\n"
CM = b"/api/v1/namespaces/default/configmaps"
SMUGGLED = b"GET /api/v1/secrets?smuggled=1 HTTP/1.1\r\nHost: x\r\n\r\n"


def _post(extra: bytes, body: bytes, target: bytes = CM) -> bytes:
    return (
        b"POST "
        + target
        + b" HTTP/1.1\r\nHost: gate\r\n"
        + AUTH
        + extra
        + b"\r\n"
        + body
    )


def _cl(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n" % len(body)


#: (id, raw bytes): the vectors of the issue-17 report.
ISSUE_17: list[tuple[str, bytes]] = [
    (
        "connection-content-length",
        _post(b"Connection: content-length\r\n" + _cl(SMUGGLED), SMUGGLED),
    ),
    (
        "connection-content-length-upper",
        _post(b"CONNECTION: CONTENT-LENGTH\r\n" + _cl(SMUGGLED), SMUGGLED),
    ),
    (
        "connection-mixed-case",
        _post(b"Connection: Content-Length\r\n" + _cl(SMUGGLED), SMUGGLED),
    ),
    (
        "connection-close-content-length",
        _post(b"Connection: close, content-length\r\n" + _cl(SMUGGLED), SMUGGLED),
    ),
    (
        "connection-keep-alive-content-length",
        _post(b"Connection: keep-alive,content-length\r\n" + _cl(SMUGGLED), SMUGGLED),
    ),
    (
        "connection-content-length-before-length",
        _post(_cl(SMUGGLED) + b"Connection: content-length\r\n", SMUGGLED),
    ),
    (
        "connection-transfer-encoding",
        _post(
            b"Connection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n",
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED),
        ),
    ),
    (
        "connection-names-identity-and-routing",
        _post(
            b"Connection: host, authorization, impersonate-user, x-forwarded-for, "
            b"upgrade, content-length\r\n" + _cl(SMUGGLED),
            SMUGGLED,
        ),
    ),
    (
        "connection-content-length-then-a-victim",
        _post(b"Connection: content-length\r\n" + _cl(SMUGGLED), SMUGGLED)
        + b"GET /api/v1/namespaces/default/pods HTTP/1.1\r\nHost: gate\r\n"
        + AUTH
        + b"\r\n",
    ),
    (
        "smuggled-impersonation",
        _post(
            b"Connection: content-length\r\n"
            + _cl(
                b"GET /api/v1/secrets HTTP/1.1\r\nHost: x\r\n"
                b"Impersonate-User: system:admin\r\nImpersonate-Group: system:masters\r\n\r\n"
            ),
            b"GET /api/v1/secrets HTTP/1.1\r\nHost: x\r\n"
            b"Impersonate-User: system:admin\r\nImpersonate-Group: system:masters\r\n\r\n",
        ),
    ),
    (
        "equal-content-lengths",
        _post(_cl(b"{}") + _cl(b"{}"), b"{}"),
    ),
    (
        "equal-content-lengths-other-case",
        _post(_cl(b"{}") + b"content-length: 2\r\n", b"{}"),
    ),
    ("content-length-list", _post(b"Content-Length: 2, 2\r\n", b"{}")),
    (
        "conflicting-content-lengths",
        _post(b"Content-Length: 2\r\nContent-Length: 3\r\n", b"{}x"),
    ),
    ("signed-content-length", _post(b"Content-Length: +2\r\n", b"{}")),
    (
        "lower-case-method",
        b"get " + CM + b" HTTP/1.1\r\nHost: gate\r\n" + AUTH + b"\r\n",
    ),
    ("unknown-method", b"FOO " + CM + b" HTTP/1.1\r\nHost: gate\r\n" + AUTH + b"\r\n"),
    ("trace", b"TRACE " + CM + b" HTTP/1.1\r\nHost: gate\r\n" + AUTH + b"\r\n"),
    ("connect", b"CONNECT gate:443 HTTP/1.1\r\nHost: gate\r\n" + AUTH + b"\r\n"),
    ("head", b"HEAD " + CM + b" HTTP/1.1\r\nHost: gate\r\n" + AUTH + b"\r\n"),
    (
        "head-then-get",
        b"HEAD /authenticate HTTP/1.1\r\nHost: gate\r\n" + AUTH + b"\r\n"
        b"GET " + CM + b" HTTP/1.1\r\nHost: gate\r\n" + AUTH + b"\r\n",
    ),
    ("head-without-host", b"HEAD /authenticate HTTP/1.1\r\n" + AUTH + b"\r\n"),
    (
        "client-impersonation",
        b"GET "
        + CM
        + b" HTTP/1.1\r\nHost: gate\r\n"
        + AUTH
        + b"Impersonate-User: system:admin\r\n\r\n",
    ),
    (
        "x-remote-user",
        b"GET "
        + CM
        + b" HTTP/1.1\r\nHost: gate\r\n"
        + AUTH
        + b"X-Remote-User: root\r\n\r\n",
    ),
]

_CHUNKED_SMUGGLE = b"0\r\n\r\n" + SMUGGLED
#: The classic smuggling set (PortSwigger's and RFC 9112 §11.2's families).
CLASSICS: list[tuple[str, bytes]] = [
    (
        "cl-te",
        _post(
            _cl(_CHUNKED_SMUGGLE) + b"Transfer-Encoding: chunked\r\n", _CHUNKED_SMUGGLE
        ),
    ),
    (
        "te-cl",
        _post(
            b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
            b"8\r\nSMUGGLED\r\n0\r\n\r\n",
        ),
    ),
    ("te-xchunked", _post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n")),
    (
        "te-chunked-identity",
        _post(b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n"),
    ),
    (
        "te-identity-chunked",
        _post(b"Transfer-Encoding: identity, chunked\r\n", b"0\r\n\r\n"),
    ),
    (
        "te-twice",
        _post(
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
            b"0\r\n\r\n",
        ),
    ),
    ("te-space-before-colon", _post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n")),
    (
        "te-tab-value",
        _post(b"Transfer-Encoding:\tchunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
    ),
    (
        "te-upper-case",
        _post(b"Transfer-Encoding: CHUNKED\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
    ),
    ("te-vertical-tab", _post(b"Transfer-Encoding:\x0bchunked\r\n", b"0\r\n\r\n")),
    (
        "te-obs-folded",
        _post(b"X-A: b\r\n Transfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
    ),
    (
        "te-in-a-folded-value",
        _post(b"Transfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n"),
    ),
    ("obs-fold", _post(b"X-A: 1\r\n 2\r\n" + _cl(b"{}"), b"{}")),
    ("bare-cr-in-value", _post(b"X-A: 1\r2\r\n" + _cl(b"{}"), b"{}")),
    ("bare-cr-line-end", _post(b"X-A: 1\r" + _cl(b"{}"), b"{}")),
    ("bare-lf-line-end", _post(b"X-A: 1\n" + _cl(b"{}"), b"{}")),
    (
        "bare-lf-request-line",
        b"POST " + CM + b" HTTP/1.1\nHost: gate\r\n" + AUTH + _cl(b"{}") + b"\r\n{}",
    ),
    (
        "bare-lf-head-end",
        _post(_cl(b"{}"), b"").replace(b"\r\n\r\n", b"\r\n\n") + b"{}",
    ),
    ("nul-in-value", _post(b"X-A: 1\x002\r\n" + _cl(b"{}"), b"{}")),
    ("space-in-name", _post(b"X A: 1\r\n" + _cl(b"{}"), b"{}")),
    (
        "chunk-size-overflow",
        _post(
            b"Transfer-Encoding: chunked\r\n", b"FFFFFFFFFFFFFFFFF1\r\nx\r\n0\r\n\r\n"
        ),
    ),
    (
        "chunk-size-negative",
        _post(b"Transfer-Encoding: chunked\r\n", b"-1\r\nx\r\n0\r\n\r\n"),
    ),
    (
        "chunk-size-0x",
        _post(b"Transfer-Encoding: chunked\r\n", b"0x5\r\nhello\r\n0\r\n\r\n"),
    ),
    (
        "chunk-size-trailing-space",
        _post(b"Transfer-Encoding: chunked\r\n", b"5 \r\nhello\r\n0\r\n\r\n"),
    ),
    (
        "chunk-extension",
        _post(b"Transfer-Encoding: chunked\r\n", b"5;a=b\r\nhello\r\n0\r\n\r\n"),
    ),
    (
        "chunk-longer-than-size",
        _post(b"Transfer-Encoding: chunked\r\n", b"3\r\nhello\r\n0\r\n\r\n"),
    ),
    (
        "chunk-without-crlf",
        _post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello0\r\n\r\n"),
    ),
    ("chunk-bare-lf", _post(b"Transfer-Encoding: chunked\r\n", b"5\nhello\n0\n\n")),
    (
        "trailer",
        _post(
            b"Transfer-Encoding: chunked\r\n",
            b"5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n",
        ),
    ),
    (
        "trailer-with-framing",
        _post(
            b"Transfer-Encoding: chunked\r\n",
            b"5\r\nhello\r\n0\r\nContent-Length: 50\r\nImpersonate-User: root\r\n\r\n"
            + SMUGGLED,
        ),
    ),
    (
        "trailer-folded",
        _post(
            b"Transfer-Encoding: chunked\r\n",
            b"5\r\nhello\r\n0\r\nX-T: a\r\n b\r\n\r\n",
        ),
    ),
    ("length-shorter-than-body", _post(b"Content-Length: 2\r\n", b"{}" + SMUGGLED)),
    (
        "pipelined",
        b"GET "
        + CM
        + b" HTTP/1.1\r\nHost: gate\r\n"
        + AUTH
        + b"\r\n"
        + _post(_cl(b"{}"), b"{}")
        + b"DELETE "
        + CM
        + b"/x HTTP/1.1\r\nHost: gate\r\n"
        + AUTH
        + b"\r\n",
    ),
    ("expect-continue", _post(b"Expect: 100-continue\r\n" + _cl(b"{}"), b"{}")),
    (
        "expect-continue-connection-content-length",
        _post(
            b"Expect: 100-continue\r\nConnection: content-length\r\n" + _cl(SMUGGLED),
            SMUGGLED,
        ),
    ),
    (
        "http10-keep-alive",
        b"GET " + CM + b" HTTP/1.0\r\nConnection: keep-alive\r\n" + AUTH + b"\r\n",
    ),
    (
        "absolute-form",
        b"GET https://gate" + CM + b" HTTP/1.1\r\nHost: gate\r\n" + AUTH + b"\r\n",
    ),
    ("asterisk-form", b"OPTIONS * HTTP/1.1\r\nHost: gate\r\n" + AUTH + b"\r\n"),
    ("http-0.9", b"GET " + CM + b"\r\n"),
    (
        "two-hosts",
        b"GET " + CM + b" HTTP/1.1\r\nHost: a\r\nHost: b\r\n" + AUTH + b"\r\n",
    ),
    (
        "upgrade-with-body",
        b"POST /api/v1/namespaces/default/pods/p/exec?command=ls HTTP/1.1\r\nHost: gate\r\n"
        + AUTH
        + b"Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
        + _cl(SMUGGLED)
        + b"\r\n"
        + SMUGGLED,
    ),
]


# --------------------------------------------------------------------------
# The oracle: llhttp


@dataclass(frozen=True, slots=True)
class Seen:
    method: str
    target: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Oracle:
    """What llhttp sees in a client's bytes."""

    requests: tuple[Seen, ...]
    #: Where each message llhttp began starts (complete or not).
    starts: tuple[int, ...]
    #: llhttp stopped with an error (or an upgrade) before the end.
    stopped: bool

    def method_of(self, index: int, raw: bytes) -> str:
        """The method of the ``index``-th message, complete or not."""
        if index < len(self.starts):
            return raw[self.starts[index] :].split(b" ", 1)[0].decode("latin-1")
        return ""


class _Reader:
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.requests: list[Seen] = []
        self.starts: list[int] = []
        self.offset = 0
        self._url = b""
        self._body = bytearray()

    def on_message_begin(self) -> None:
        self.starts.append(self.offset)
        self._url = b""
        self._body = bytearray()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.requests.append(
            Seen(
                self.parser.get_method().decode("latin-1"),
                self._url.decode("latin-1"),
                bytes(self._body),
            )
        )


def llhttp(raw: bytes) -> Oracle:
    """Feed ``raw`` to llhttp a byte at a time (so each message's start is known)."""
    reader = _Reader()
    stopped = False
    for i in range(len(raw)):
        reader.offset = i
        try:
            reader.parser.feed_data(raw[i : i + 1])
        except httptools.HttpParserUpgrade:
            # The upgraded stream is not HTTP: nothing after it is a request.
            stopped = True
            break
        except httptools.HttpParserError:
            stopped = True
            break
    return Oracle(tuple(reader.requests), tuple(reader.starts), stopped)


def with_credentials(raw: bytes, token: str) -> bytes:
    """``raw`` with the client's token after each request line llhttp finds
    (a hand-written vector's ``AUTH`` placeholders are filled instead), and a
    ``Host`` where that request has none.
    """
    if AUTH in raw:
        return raw.replace(b"@TOKEN@", token.encode())
    oracle = llhttp(raw)
    out = bytearray()
    last = 0
    for index, start in enumerate(oracle.starts):
        line_end = raw.find(b"\n", start)
        if line_end < 0:
            break
        end = oracle.starts[index + 1] if index + 1 < len(oracle.starts) else len(raw)
        head = raw[line_end:end].split(b"\r\n\r\n", 1)[0].lower()
        out += raw[last : line_end + 1]
        out += b"Authorization: Bearer " + token.encode() + b"\r\n"
        if b"\nhost:" not in head:
            out += b"Host: gate\r\n"
        last = line_end + 1
    out += raw[last:]
    return bytes(out)


def _corpus() -> list[tuple[str, str, bytes]]:
    doc = json.loads(CORPUS.read_text())
    return [
        (
            "llhttp/" + case["id"].split("/", 1)[0],
            case["id"],
            case["raw"].encode("latin-1"),
        )
        for case in doc["cases"]
    ]


def _groups() -> dict[str, list[tuple[str, bytes]]]:
    groups: dict[str, list[tuple[str, bytes]]] = {
        "issue-17": ISSUE_17,
        "classics": CLASSICS,
    }
    for group, name, raw in _corpus() if CORPUS.exists() else []:
        groups.setdefault(group, []).append((name, raw))
    return groups


GROUPS = _groups()


# --------------------------------------------------------------------------
# The client's side: send, then read every answer


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def split_answers(
    data: bytes, methods: Callable[[int], str]
) -> tuple[list[Answer], bytes]:
    """The final answers in ``data`` (1xx skipped) and what is left over.

    ``methods(i)`` is the method of the request the ``i``-th answer is for
    (``HEAD`` answers have no body). Framing as RFC 9112 §6.3 reads it.
    """
    answers: list[Answer] = []
    rest = data
    while rest:
        end = rest.find(b"\r\n\r\n")
        if end < 0:
            break
        lines = rest[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            key = name.lower()
            assert key not in headers or key not in (
                "content-length",
                "transfer-encoding",
            ), "an answer with two framing fields"
            headers[key] = value.strip()
        after = rest[end + 4 :]
        if 100 <= status < 200:
            rest = after
            continue
        assert not ("content-length" in headers and "transfer-encoding" in headers)
        if methods(len(answers)) == "HEAD" or status in (204, 304):
            body, rest = b"", after
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body_parts = bytearray()
            while True:
                line_end = after.find(b"\r\n")
                if line_end < 0:
                    return answers, rest
                size = int(after[:line_end].split(b";")[0], 16)
                if len(after) < line_end + 2 + size + 2:
                    return answers, rest
                body_parts += after[line_end + 2 : line_end + 2 + size]
                after = after[line_end + 2 + size + 2 :]
                if size == 0:
                    break
            body, rest = bytes(body_parts), after
        elif "content-length" in headers:
            size = int(headers["content-length"])
            if len(after) < size:
                break
            body, rest = after[:size], after[size:]
        else:
            body, rest = after, b""
        answers.append(Answer(status, headers, body))
    return answers, rest


async def exchange(port: int, ctx: ssl.SSLContext, raw: bytes, expected: int) -> bytes:
    """Send ``raw`` and read until the connection ends, or nothing more came
    for a moment once ``expected`` answers' worth may have arrived.
    """
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"
    )
    data = bytearray()
    try:
        writer.write(raw)
        async with asyncio.timeout(10):
            while True:
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), 0.4)
                except TimeoutError:
                    if data.count(b"HTTP/1.") >= expected:
                        break
                    continue
                except (ConnectionError, ssl.SSLError):
                    break
                if not chunk:
                    break
                data += chunk
    except TimeoutError:
        pass
    finally:
        writer.transport.abort()
    return bytes(data)


# --------------------------------------------------------------------------
# Judging one vector


def judge_proxy(
    name: str,
    raw: bytes,
    received: bytes,
    upstream_requests: list[Recorded],
    user: str,
    credential: str,
) -> list[str]:
    """Every way this vector's outcome breaks the rules of the module docstring."""
    oracle = llhttp(raw)
    problems: list[str] = []
    # Upstream: an in-order subsequence of llhttp's requests, each ours.
    position = 0
    for got in upstream_requests:
        while position < len(oracle.requests) and not _same(
            oracle.requests[position], got
        ):
            position += 1
        if position == len(oracle.requests):
            problems.append(
                f"{name}: upstream got {got.method} {got.target} body={got.body[:60]!r}, "
                f"which llhttp does not see in order among {oracle.requests!r}"
            )
            break
        position += 1
    for got in upstream_requests:
        problems.extend(
            f"{name}: {p}" for p in _identity_problems(got, user, credential)
        )
    # Client: well-framed answers, no more than requests, each its own.
    answers, left = split_answers(received, lambda i: oracle.method_of(i, raw))
    if left:
        problems.append(
            f"{name}: {len(left)} bytes left after the answers: {left[:80]!r}"
        )
    limit = len(oracle.requests) + (
        1 if oracle.stopped or len(oracle.starts) > len(oracle.requests) else 0
    )
    if len(answers) > limit:
        problems.append(f"{name}: {len(answers)} answers to {limit} requests")
    for answer in answers:
        if answer.status == 200 and answer.body:
            said = json.loads(answer.body)
            if said.get("user") != user:
                problems.append(
                    f"{name}: an answer for {said.get('user')!r} reached {user!r}"
                )
    return problems


def _same(seen: Seen, got: Recorded) -> bool:
    return (
        seen.method == got.method
        and seen.target.split("#", 1)[0] == got.target.split("#", 1)[0]
        and seen.body == got.body
    )


def _identity_problems(got: Recorded, user: str, credential: str) -> list[str]:
    problems = []
    if got.values("impersonate-user") != [user]:
        problems.append(
            f"Impersonate-User {got.values('impersonate-user')!r}, not [{user!r}]"
        )
    if got.values("impersonate-group") != ["oidc:devs"]:
        problems.append(f"Impersonate-Group {got.values('impersonate-group')!r}")
    others = {
        k.lower()
        for k, _ in got.headers
        if k.lower().startswith(("impersonate-", "x-remote-"))
        and k.lower() not in ("impersonate-user", "impersonate-group")
    }
    if others:
        problems.append(f"client identity headers reached upstream: {sorted(others)}")
    expected = [f"Bearer {PROXY_TOKEN}"] if credential == "token" else []
    if got.values("authorization") != expected:
        problems.append("the upstream saw an Authorization other than the proxy's")
    framing = [
        k.lower()
        for k, _ in got.headers
        if k.lower() in ("content-length", "transfer-encoding")
    ]
    if len(framing) > 1:
        problems.append(f"upstream request with framing fields {framing}")
    return problems


# --------------------------------------------------------------------------
# The stacks


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def client_ca() -> trustme.CA:
    return trustme.CA()


def _kubeconfig(
    path: Path, server: str, ca: trustme.CA, credential: str, client_ca: trustme.CA
) -> Path:
    user: dict[str, str] = {}
    if credential == "token":
        user["token"] = PROXY_TOKEN
    else:
        leaf = client_ca.issue_cert("kube-oidc-gate")
        user["client-certificate-data"] = base64.b64encode(
            leaf.cert_chain_pems[0].bytes()
        ).decode()
        user["client-key-data"] = base64.b64encode(
            leaf.private_key_pem.bytes()
        ).decode()
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "up",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(
                        ca.cert_pem.bytes()
                    ).decode(),
                },
            }
        ],
        "users": [{"name": "gate", "user": user}],
        "contexts": [{"name": "up", "context": {"cluster": "up", "user": "gate"}}],
        "current-context": "up",
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@dataclass
class ProxyUnderTest:
    port: int
    ctx: ssl.SSLContext
    upstream: RecordingUpstream
    token: Callable[[str], str]


@asynccontextmanager
async def proxy_stack(
    tmp_path: Path,
    ca: trustme.CA,
    client_ca: trustme.CA,
    *,
    credential: str,
) -> AsyncIterator[ProxyUnderTest]:
    async with recording_upstream(
        ca,
        token=PROXY_TOKEN if credential == "token" else None,
        client_ca=client_ca if credential == "client-cert" else None,
    ) as upstream:
        config = _kubeconfig(
            tmp_path / "kubeconfig", upstream.url, ca, credential, client_ca
        )
        async with run_proxy(
            tmp_path,
            ca,
            upstream=Upstream(UpstreamSettings(kubeconfig=str(config))),
        ) as stack:
            port = int(stack.url.rsplit(":", 1)[1])
            yield ProxyUnderTest(
                port=port,
                ctx=client_ssl(ca),
                upstream=upstream,
                token=lambda sub: stack.token(sub=sub),
            )


async def run_proxy_vectors(
    proxy: ProxyUnderTest, vectors: list[tuple[str, bytes]], credential: str
) -> list[str]:
    """Every vector on its own connection, a few at a time (they share the
    proxy's pool, as real users do); the problems found.
    """
    gate = asyncio.Semaphore(8)
    sent: dict[str, bytes] = {}
    received: dict[str, bytes] = {}

    async def one(index: int, name: str, raw: bytes) -> None:
        wire = with_credentials(raw, proxy.token(f"v{index}"))
        sent[name] = wire
        oracle = llhttp(wire)
        async with gate:
            received[name] = await exchange(
                proxy.port, proxy.ctx, wire, len(oracle.requests)
            )

    await asyncio.gather(*(one(i, n, r) for i, (n, r) in enumerate(vectors)))
    problems = [f"llhttp: {e}" for e in proxy.upstream.errors]
    users = {f"oidc:v{i}": name for i, (name, _) in enumerate(vectors)}
    for got in proxy.upstream.requests:
        owner = got.values("impersonate-user")
        if len(owner) != 1 or owner[0] not in users:
            problems.append(
                f"a request without our impersonation reached upstream: {got.method} {got.target} "
                f"impersonating {owner!r}"
            )
    for i, (name, _) in enumerate(vectors):
        user = f"oidc:v{i}"
        mine = [
            r for r in proxy.upstream.requests if r.values("impersonate-user") == [user]
        ]
        problems.extend(
            judge_proxy(name, sent[name], received[name], mine, user, credential)
        )
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("credential", ["token", "client-cert"])
@pytest.mark.parametrize("group", sorted(GROUPS))
async def test_the_proxy_forwards_exactly_what_llhttp_sees(
    tmp_path: Path,
    ca: trustme.CA,
    client_ca: trustme.CA,
    group: str,
    credential: str,
) -> None:
    async with proxy_stack(tmp_path, ca, client_ca, credential=credential) as proxy:
        problems = await run_proxy_vectors(proxy, GROUPS[group], credential)
    assert problems == []


@pytest.mark.slow
@pytest.mark.parametrize("group", sorted(GROUPS))
async def test_the_webhook_answers_no_more_than_llhttp_sees(
    ca: trustme.CA, group: str
) -> None:
    key = new_key("RS256")
    authenticator = Authenticator(
        auth_config(authenticator_config(mappings=mappings())),
        {ISSUER: DictResolver(key)},
    )
    server = webhook_server(authenticator, WebhookSettings(), metrics=None)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    port = await server.start("127.0.0.1", 0, ssl_context=ctx)
    problems: list[str] = []
    try:
        for name, raw in GROUPS[group]:
            wire = with_credentials(raw, _token(key, "webhook"))
            oracle = llhttp(wire)
            received = await exchange(port, client_ssl(ca), wire, len(oracle.requests))
            answers, left = split_answers(
                received, functools.partial(_method_of, oracle, wire)
            )
            if left:
                problems.append(
                    f"{name}: {len(left)} bytes left after the answers: {left[:80]!r}"
                )
            incomplete = oracle.stopped or len(oracle.starts) > len(oracle.requests)
            limit = len(oracle.requests) + (1 if incomplete else 0)
            if len(answers) > limit:
                problems.append(f"{name}: {len(answers)} answers to {limit} requests")
    finally:
        await server.drain(1.0)
    assert problems == []


def _method_of(oracle: Oracle, raw: bytes, index: int) -> str:
    return oracle.method_of(index, raw)


def _token(key: SigningKey, sub: str) -> str:
    return sign(key, claims_for(ISSUER, sub=sub, groups=["devs"]))


# --------------------------------------------------------------------------
# Targeted proofs


@pytest.mark.slow
@pytest.mark.parametrize("credential", ["token", "client-cert"])
async def test_two_users_on_one_pooled_connection_never_get_each_others_answers(
    tmp_path: Path, ca: trustme.CA, client_ca: trustme.CA, credential: str
) -> None:
    """An attacker's smuggling attempts and a victim's reads, interleaved over
    the proxy's pool: each answer names the identity of the client it reached.
    """
    async with proxy_stack(tmp_path, ca, client_ca, credential=credential) as proxy:
        attacker, victim = proxy.token("mallory"), proxy.token("victim")
        attack = dict(ISSUE_17)["connection-content-length"].replace(
            b"@TOKEN@", attacker.encode()
        )
        read = (
            b"GET /api/v1/namespaces/default/secrets HTTP/1.1\r\nHost: gate\r\n"
            b"Authorization: Bearer " + victim.encode() + b"\r\n\r\n"
        )
        results = await asyncio.gather(
            *(
                exchange(proxy.port, proxy.ctx, attack if i % 2 == 0 else read, 1)
                for i in range(16)
            )
        )
    for i, data in enumerate(results):
        answers, left = split_answers(data, lambda _: "GET")
        assert left == b""
        for answer in answers:
            if answer.status == 200:
                assert json.loads(answer.body)["user"] == (
                    "oidc:mallory" if i % 2 == 0 else "oidc:victim"
                )
    assert proxy.upstream.errors == []
    assert proxy.upstream.requests, "the victim's reads went through"
    for got in proxy.upstream.requests:
        assert got.values("impersonate-user") in (["oidc:mallory"], ["oidc:victim"])
        assert not got.target.startswith("/api/v1/secrets")


@pytest.mark.slow
async def test_connection_content_length_reaches_upstream_as_one_request_with_its_length(
    tmp_path: Path, ca: trustme.CA, client_ca: trustme.CA
) -> None:
    """The issue's exact report: the body stays a body, under our own length."""
    async with proxy_stack(tmp_path, ca, client_ca, credential="token") as proxy:
        raw = dict(ISSUE_17)["connection-content-length"].replace(
            b"@TOKEN@", proxy.token("alice").encode()
        )
        data = await exchange(proxy.port, proxy.ctx, raw, 1)
    (answer,), _ = split_answers(data, lambda _: "POST")
    assert answer.status == 200
    (got,) = proxy.upstream.requests
    assert (got.method, got.target, got.body) == ("POST", CM.decode(), SMUGGLED)
    assert got.values("content-length") == [str(len(SMUGGLED))]
    assert got.values("impersonate-user") == ["oidc:alice"]


async def test_llhttp_corpus_verdicts_are_what_the_port_recorded() -> None:
    """The ported corpus is read as llhttp reads it: each case's recorded
    verdict is the installed parser's (a drift in ``httptools`` shows here).
    """
    doc = json.loads(CORPUS.read_text())
    drift = []
    for case in doc["cases"]:
        raw = case["raw"].encode("latin-1")
        oracle = llhttp(raw)
        verdict = "error" if oracle.stopped and not _upgraded(raw) else "ok"
        if verdict != case["httptools"]:
            drift.append(case["id"])
    assert drift == []
    assert len(doc["cases"]) >= 50


def _upgraded(raw: bytes) -> bool:
    reader = _Reader()
    try:
        reader.parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        return True
    except httptools.HttpParserError:
        return False
    return False


@pytest.mark.slow
@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: content-length, x-drop\r\nX-Drop: 1\r\n"
        b"Content-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\nX-Keep: 1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ],
    ids=["length", "chunked"],
)
async def test_an_answers_connection_header_cannot_unframe_what_we_relay(
    tmp_path: Path, ca: trustme.CA, answer: bytes
) -> None:
    """The API server's ``Connection`` may drop its hop-by-hop fields, never
    the framing: the client gets exactly the body, framed by us, then the
    next answer on the same connection.
    """

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            for _ in range(10):
                await reader.readuntil(b"\r\n\r\n")
                writer.write(answer)
                await writer.drain()
        writer.close()

    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    config = _kubeconfig(tmp_path / "kc", f"https://127.0.0.1:{port}", ca, "token", ca)
    try:
        async with run_proxy(
            tmp_path,
            ca,
            upstream=Upstream(UpstreamSettings(kubeconfig=str(config))),
        ) as stack:
            get = (
                b"GET "
                + CM
                + b" HTTP/1.1\r\nHost: gate\r\nAuthorization: Bearer "
                + stack.token().encode()
                + b"\r\n\r\n"
            )
            data = await exchange(
                int(stack.url.rsplit(":", 1)[1]), client_ssl(ca), get + get, 2
            )
    finally:
        server.close()
        await server.wait_closed()
    answers, left = split_answers(data, lambda _: "GET")
    assert left == b""
    assert [a.body for a in answers] == [b"hello", b"hello"]
    for relayed in answers:
        assert "x-drop" not in relayed.headers
        assert relayed.headers.get("connection", "") != "content-length"
