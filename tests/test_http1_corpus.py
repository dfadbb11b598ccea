"""llhttp's own request corpus, sent to the listener itself.

``tests/corpus/llhttp_requests.json`` holds the request cases of llhttp's test
suite (``test/request/*.md``, see the file's ``source``), each with the
verdict of llhttp in strict mode as ``httptools`` runs it (``httptools``:
``ok`` or ``error``; ``tests/test_smuggling.py`` checks that verdict against
the installed parser). The corpus records bytes and verdicts, not parsed
values: what each case parses to is taken from llhttp itself, fed the same
bytes one at a time (the oracle below): its method, target, header fields,
body, and where it stops.

Each case is sent, whole and then half-closed, to a ``Server`` whose one
route records what it was given, under the webhook's kind of limits (bodies
read whole, no chunked bodies) and the proxy's (``stream_bodies=True``).
Before sending, a ``Host`` is put after each request line whose head has none
(as ``tests/test_smuggling.py`` does), since HTTP/1.1 without ``Host`` is
refused by policy and would hide everything else. Then, for every case:

- every request the route saw is the oracle's next one, exactly: method,
  target, header fields (in order, as sent, values without the optional
  whitespace around them), body, in order; none is added, joined or split;
- every request llhttp completes is served, unless our policy refuses it on
  purpose (``POLICY``, with the reason); a refusal is a 4xx ``Status`` and
  the last answer: the connection closes after it;
- where llhttp stops with an error, the listener answers what came before
  it, then a 4xx, and closes;
- where llhttp stops at an upgrade, the upgrade request is answered (the
  route does not take the connection over) and nothing after it is read.

Deliberate differences from llhttp (strict), each listed in ``POLICY`` or
``CHUNKED`` where the corpus has a case of it:

- methods: only the seven the Kubernetes API serves (``proxy.framing``):
  ``CONNECT``, WebDAV (``REPORT``, ``SEARCH``, ``LINK``, ...), ``PURGE``,
  ``M-SEARCH``, ``SOURCE``, RTSP are refused (400);
- request targets: origin-form only; absolute-form is refused (400);
- versions: ``HTTP/1.0`` and ``HTTP/1.1`` only (no HTTP/0.9 request line);
- ``Host``: exactly one on HTTP/1.1 (none, or two, are refused);
- ``Expect``: only ``100-continue`` (417 otherwise);
- framing llhttp tolerates but a second parser might not: equal repeated
  ``Content-Length`` fields, a length list, and a transfer coding other
  than ``chunked`` alone (``deflate, chunked``): 400;
- chunked bodies (and bodies over ``max_body_bytes``) are refused (411,
  413) under the webhook's limits; the proxy's stream them;
- a body on an upgrade request is refused (400); an upgrade the handler
  answers normally ends the connection (llhttp stops there too);
- trailers are read (and bounded) but dropped: never header fields.

With the proxy's limits, 37 of the 120 cases have requests served and
compared; the others are llhttp's errors or our refusals, each checked for
its answer and the closed connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import pytest

from proxy.http1 import Answer, BodyError, Limits, Request, Route, Server
from proxy.kube import status_body

CORPUS = Path(__file__).parent / "corpus" / "llhttp_requests.json"

#: The webhook's kind: bodies with a length, read whole.
WHOLE = Limits(max_body_bytes=64 * 1024, head_timeout=5, body_timeout=5)
#: The proxy's kind: chunked bodies and long ones streamed to the handler.
STREAMED = Limits(
    max_body_bytes=64 * 1024, stream_bodies=True, head_timeout=5, body_timeout=5
)

_METHOD = "a method the Kubernetes API does not serve"
#: Cases llhttp (strict) completes and our policy refuses on purpose: the
#: id, and why. The refusal may come after the requests before it are served.
_ABSOLUTE = "an absolute-form target (origin-form only: we are no forward proxy)"
_UPGRADE_BODY = "a body on an upgrade request"
_CODING = "a transfer coding other than chunked alone (Go's net/http takes no other)"
POLICY: dict[str, str] = {
    "sample/no-http-version": "no version (HTTP/0.9): HTTP/1.0 and 1.1 only",
    "method/report-request": _METHOD,
    "method/connect-request": _METHOD,
    "method/connect-request-with-caps": _METHOD,
    "method/connect-with-body": _METHOD,
    "method/m-search-request": _METHOD,
    "method/purge-request": _METHOD,
    "method/search-request": _METHOD,
    "method/link-request": _METHOD,
    "method/link-request-2": _METHOD,
    "method/source-request": _METHOD,
    "method/source-request-with-ice": _METHOD,
    "method/announce-request-with-rtsp": _METHOD,
    "uri/host-terminated-by-a-query-string": _ABSOLUTE,
    "uri/host-port-terminated-by-a-query-string": _ABSOLUTE,
    "uri/host-port-terminated-by-a-space": _ABSOLUTE,
    "uri/underscore-in-hostname": _ABSOLUTE,
    "uri/host-port-and-basic-auth": _ABSOLUTE,
    "connection/emitting-part-of-body-and-pausing": _UPGRADE_BODY,
    "connection/upgrade-post-request": _UPGRADE_BODY,
    "transfer-encoding/post-with-chunked-as-last-transfer-encoding": _CODING,
    "transfer-encoding/post-with-chunked-as-last-transfer-encoding-multiple-headers": (
        _CODING
    ),
}
_CHUNKED = "a chunked body: 411 without streaming (the webhook's limits)"
#: Refused only where chunked bodies are (the webhook's limits).
CHUNKED: dict[str, str] = {
    f"transfer-encoding/{name}": _CHUNKED
    for name in (
        "parsing-and-setting-flag",
        "parse-chunks-with-lowercase-size",
        "parse-chunks-with-uppercase-size",
        "post-with-transfer-encoding-chunked",
        "two-chunks-and-triple-zero-prefixed-end-chunk",
        "trailing-headers",
        "chunk-extensions",
        "chunk-extensions-quoting",
    )
}


# -- the oracle: llhttp a byte at a time ----------------------------------------


@dataclass(slots=True)
class Seen:
    method: str
    target: str
    version: str
    fields: list[tuple[str, str]]
    body: bytes
    upgrade: bool = False


@dataclass(slots=True)
class _Oracle:
    requests: list[Seen] = field(default_factory=list)
    #: Where each message llhttp began starts (complete or not).
    starts: list[int] = field(default_factory=list)
    #: ``"error"``, ``"upgrade"`` or ``""`` (it read everything).
    stopped: str = ""


class _Reader:
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.oracle = _Oracle()
        self.offset = 0
        self._url = b""
        self._fields: list[tuple[str, str]] = []
        self._in_head = True
        self._body = bytearray()

    def on_message_begin(self) -> None:
        self.oracle.starts.append(self.offset)
        self._url = b""
        self._fields = []
        self._in_head = True
        self._body = bytearray()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # trailers are not header fields
            self._fields.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._in_head = False

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        parser = self.parser
        self.oracle.requests.append(
            Seen(
                parser.get_method().decode("latin-1"),
                self._url.decode("latin-1"),
                parser.get_http_version(),
                self._fields,
                bytes(self._body),
                parser.should_upgrade(),
            )
        )


def llhttp(raw: bytes) -> _Oracle:
    reader = _Reader()
    for i in range(len(raw)):
        reader.offset = i
        try:
            reader.parser.feed_data(raw[i : i + 1])
        except httptools.HttpParserUpgrade:
            reader.oracle.stopped = "upgrade"
            break
        except httptools.HttpParserError:
            reader.oracle.stopped = "error"
            break
    return reader.oracle


def with_host(raw: bytes) -> bytes:
    """``raw`` with ``Host: gate`` after each request line whose head has none."""
    oracle = llhttp(raw)
    out = bytearray()
    last = 0
    for index, start in enumerate(oracle.starts):
        line_end = raw.find(b"\n", start)
        if line_end < 0:
            break
        end = oracle.starts[index + 1] if index + 1 < len(oracle.starts) else len(raw)
        head = raw[line_end:end].split(b"\r\n\r\n", 1)[0].lower()
        if b"\nhost:" in head:
            continue
        out += raw[last : line_end + 1] + b"Host: gate\r\n"
        last = line_end + 1
    out += raw[last:]
    return bytes(out)


def _cases() -> list[tuple[str, bytes, str]]:
    doc = json.loads(CORPUS.read_text())
    return [
        (case["id"], case["raw"].encode("latin-1"), case["httptools"])
        for case in doc["cases"]
    ]


CASES = _cases()


# -- the listener ------------------------------------------------------------------


class _Recording:
    """Records each request whole (a streamed body read to its end)."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []

    async def __call__(self, request: Request) -> Answer | None:
        body = request.body
        if request.streamed:
            got = bytearray()
            try:
                for _ in range(100_000):
                    piece = await request.readany()
                    if not piece:
                        break
                    got += piece
            except BodyError:
                request.abort()
                return None
            body = bytes(got)
        self.seen.append(
            Seen(
                request.method,
                request.target,
                "1.1" if request.http11 else "1.0",
                list(request.fields),
                body,
                request.upgrade,
            )
        )
        return Answer(200, b'{"seen":%d}' % len(self.seen))


@asynccontextmanager
async def serving(limits: Limits) -> AsyncIterator[tuple[_Recording, int]]:
    recording = _Recording()
    server = Server(
        {},
        default=Route(recording, methods=None),
        limits=limits,
        error_body=status_body,
    )
    port = await server.start("127.0.0.1", 0, ssl_context=None)
    try:
        yield recording, port
    finally:
        await server.drain(1.0)


async def _exchange(port: int, raw: bytes, oracle: _Oracle) -> bytes:
    """Send ``raw``; read until the server closes, or until every request
    llhttp completes is answered (where llhttp found no error: then nothing
    more is due). No half-close: that ends the connection (a client gone)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port), 5
    )
    methods = _methods(raw, oracle)
    try:
        writer.write(raw)
        data = bytearray()
        due = len(oracle.requests) if oracle.stopped != "error" else None
        with suppress(ConnectionError, TimeoutError):
            for _ in range(10_000):
                # Nothing due: a moment to show that nothing comes.
                wait = 0.3 if due == 0 else 5
                chunk = await asyncio.wait_for(reader.read(65536), wait)
                if not chunk:
                    break
                data += chunk
                answered = len(_answers(bytes(data), methods, whole=False))
                if due is not None and answered >= due:
                    break
        return bytes(data)
    finally:
        writer.close()
        with suppress(ConnectionError):
            await asyncio.wait_for(writer.wait_closed(), 5)


def _methods(raw: bytes, oracle: _Oracle) -> list[str]:
    """The method of each message llhttp began, complete or not."""
    return [raw[start:].split(b" ", 1)[0].decode("latin-1") for start in oracle.starts]


def _answers(
    data: bytes, methods: list[str], *, whole: bool = True
) -> list[tuple[int, dict[str, str]]]:
    """Split what came back into answers (status, lower-case headers); no
    bytes may be left over (``whole``), or a torn last one is left out.
    ``methods``: the requests' in order (no body after ``HEAD``)."""
    answers: list[tuple[int, dict[str, str]]] = []
    rest = data
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep and not whole:
            break
        assert sep, f"a torn answer: {head!r}"
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 "), lines[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        method = methods[len(answers)] if len(answers) < len(methods) else ""
        size = 0 if method == "HEAD" else int(headers.get("content-length", "0"))
        if len(rest) < size and not whole:
            break
        assert len(rest) >= size, "a short body"
        rest = rest[size:]
        answers.append((int(lines[0].split(" ")[1]), headers))
    return answers


def _stripped(fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(name, value.strip(" \t")) for name, value in fields]


@pytest.mark.slow
@pytest.mark.parametrize("limits", [WHOLE, STREAMED], ids=["whole", "streamed"])
@pytest.mark.parametrize(
    ("raw", "verdict"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_the_listener_reads_the_llhttp_corpus_as_llhttp_does(
    request: Any, raw: bytes, verdict: str, limits: Limits
) -> None:
    case = request.node.callspec.id.rsplit("-", 1)[0]
    sent = with_host(raw)
    oracle = llhttp(sent)
    assert (oracle.stopped == "error") == (verdict == "error"), "the corpus's verdict"
    async with serving(limits) as (recording, port):
        data = await _exchange(port, sent, oracle)
    served = recording.seen
    # Exactly llhttp's requests, in order: a prefix of them.
    expected = oracle.requests[: len(served)]
    assert [(s.method, s.target, s.body) for s in served] == [
        (s.method, s.target, s.body) for s in expected
    ]
    assert [s.fields for s in served] == [_stripped(s.fields) for s in expected]
    assert [s.version for s in served] == [s.version for s in expected]
    answers = _answers(data, _methods(sent, oracle))
    codes = [status for status, _ in answers]
    assert codes[: len(served)] == [200] * len(served), "each served request answered"
    refused = codes[len(served) :]
    assert len(refused) <= 1, "one refusal at most, and nothing after it"
    if refused:
        assert 400 <= refused[0] < 500
        assert answers[-1][1]["connection"] == "close"
    complete = len(oracle.requests)
    listed = POLICY.get(case) or (None if limits.stream_bodies else CHUNKED.get(case))
    closed = bool(answers) and answers[-1][1].get("connection") == "close"
    if refused:
        # Refused: llhttp's own error, where it stops, or our policy, listed.
        at_error = oracle.stopped == "error" and len(served) >= complete
        assert at_error or listed is not None, (
            f"refused message {len(served)}, which llhttp accepts"
        )
    else:
        assert listed is None, f"a policy refusal that did not happen: {listed}"
        if len(served) < complete or oracle.stopped == "error":
            # Only when the connection ended with an answer that said so
            # (HTTP/1.0, ``Connection: close``): llhttp reads nothing after
            # that either.
            assert closed, "requests llhttp accepts, neither served nor refused"
    if oracle.stopped == "upgrade" and not refused:
        assert served[-1].upgrade
        assert closed, "nothing after an upgrade is HTTP"
