"""What every part of a benchmark run shares: its sizes, its paths and keys, its tokens.

``Settings`` are the sizes (``--quick`` shrinks them), ``Ctx`` the run's work
directory, certificate, signing keys, token files and the scenarios recorded so
far. ``prepare`` mints every token file before any service starts, so minting
never competes with a measurement for the cores.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import mint
from benchmarks.procs import Proc, free_port

__all__ = [
    "AUDIENCE",
    "GATE",
    "REPO",
    "REVIEW",
    "SMALL_PATH",
    "UPSTREAM_CREDENTIAL",
    "USERNAME_PREFIX",
    "WATCH_PATH",
    "Ctx",
    "Settings",
    "make_ctx",
    "prepare",
    "prepare_checks",
]

REPO = Path(__file__).resolve().parent.parent
GATE = str(Path(sys.executable).with_name("kube-oidc-gate"))
AUDIENCE = mint.AUDIENCE
SMALL_PATH = "/api/v1/namespaces/default/configmaps/small"
WATCH_PATH = "/api/v1/namespaces/default/pods?watch=true"
#: What every front end sends upstream instead of the client's token.
UPSTREAM_CREDENTIAL = "bench-upstream-service-account-token"
USERNAME_PREFIX = "oidc:"
#: The webhook's TokenReview path.
REVIEW = "/authenticate"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Sizes of one run (``--quick`` shrinks every one of them)."""

    quick: bool
    duration: float
    latency_duration: float
    warmup: float
    connections: int
    threads: int
    #: Runs of each headline scenario; the median by throughput is reported.
    rounds: int
    #: Distinct tokens per cold-path round (0: sized from the duration).
    cold_pool: int
    cache_entries: int
    stream_bytes: int
    watches: int
    cooldown: float

    @classmethod
    def make(cls, quick: bool, duration: float | None, rounds: int | None) -> Settings:
        if quick:
            return cls(
                quick=True,
                duration=duration or 1.0,
                latency_duration=1.0,
                warmup=0.0,
                connections=16,
                threads=2,
                rounds=rounds or 1,
                cold_pool=3000,
                cache_entries=20_000,
                stream_bytes=32 << 20,
                watches=50,
                cooldown=30.0,
            )
        return cls(
            quick=False,
            duration=duration or 6.0,
            latency_duration=5.0,
            warmup=1.0,
            connections=64,
            threads=2,
            rounds=rounds or 3,
            cold_pool=0,
            cache_entries=1_000_000,
            stream_bytes=1 << 30,
            watches=1000,
            cooldown=30.0,
        )


@dataclass
class Ctx:
    """What every scenario shares: paths, keys, the issuer and the results."""

    settings: Settings
    work: Path
    out: Path
    cert: str
    key: str
    issuer_url: str
    issuer_tls: int
    key_a: mint.Key
    key_b: mint.Key
    issuer: Proc | None = None
    scenarios: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    cold_files: list[Path] = field(default_factory=list)
    #: Which upstream served what, for the report (filled by the proxy group).
    upstream: dict[str, Any] = field(default_factory=dict)
    #: Tokens every checking front end must refuse (cause -> token), and the
    #: ``sub`` of the valid token in ``files["one"]``: a peer is checked with
    #: them before it is measured (``check_front``).
    refusable: dict[str, str] = field(default_factory=dict)
    valid_sub: str = ""

    def tokens_file(self, name: str, tokens: list[str]) -> Path:
        path = self.work / f"tokens-{name}.txt"
        path.write_text("\n".join(tokens) + "\n")
        self.files[name] = path
        return path

    def issuer_call(self, path: str, *, method: str = "GET") -> dict[str, Any]:
        req = urllib.request.Request(f"{self.issuer_url}{path}", method=method)
        with urllib.request.urlopen(req, timeout=5) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data


def make_ctx(settings: Settings, out: Path) -> Ctx:
    """A work directory with a certificate and two signing keys (nothing started)."""
    from proxy.certs import ensure_self_signed

    work = Path(tempfile.mkdtemp(prefix="kube-oidc-gate-bench-"))
    # Apache's children (www-data) read nothing here but traverse it.
    os.chmod(work, 0o755)
    pair = ensure_self_signed(str(work / "certs"), ["127.0.0.1"])
    return Ctx(
        settings=settings,
        work=work,
        out=out,
        cert=pair.cert_file,
        key=pair.key_file,
        issuer_url=f"http://127.0.0.1:{free_port()}",
        issuer_tls=free_port(),
        key_a=mint.new_key("bench-a"),
        key_b=mint.new_key("bench-b"),
    )


def prepare_checks(ctx: Ctx) -> None:
    """The valid token of ``files["one"]`` and the tokens ``check_front`` must see refused."""
    iss = ctx.issuer_url
    a, b = ctx.key_a, ctx.key_b
    key_a = a.private
    first = mint.claims(iss, 1)
    ctx.tokens_file("one", [mint.mint(key_a, a.kid, first)])
    ctx.valid_sub = first["sub"]
    # What a checking front end must refuse (``check_front``).
    valid = mint.mint(key_a, a.kid, mint.claims(iss, 5))
    _, payload, signature = valid.split(".")
    ctx.refusable = {
        "bad signature": mint.bad_signature(a.kid, mint.claims(iss, 5)),
        "signed by another key": mint.mint(b.private, a.kid, mint.claims(iss, 5)),
        "expired": mint.mint(key_a, a.kid, mint.claims(iss, 5, lifetime=-60)),
        "wrong audience": mint.mint(
            key_a, a.kid, {**mint.claims(iss, 5), "aud": "not-kubernetes"}
        ),
        "wrong issuer": mint.mint(
            key_a, a.kid, mint.claims("https://issuer.invalid", 5)
        ),
        "alg HS256": mint.b64_json({"alg": "HS256", "typ": "JWT"})
        + f".{payload}.{signature}",
        "alg none": mint.b64_json({"alg": "none", "typ": "JWT"}) + f".{payload}.",
    }


def prepare(ctx: Ctx) -> None:
    """Write the key sets and every token file the scenarios use."""
    s = ctx.settings
    iss = ctx.issuer_url
    a, b = ctx.key_a, ctx.key_b
    key_a = a.private
    keys_dir = ctx.work / "keys"
    keys_dir.mkdir()
    (keys_dir / "a.json").write_bytes(mint.jwks(a))
    (keys_dir / "ab.json").write_bytes(mint.jwks(a, b))
    (keys_dir / "b.json").write_bytes(mint.jwks(b))
    prepare_checks(ctx)
    # Enough for a whole cold round at 15,000 req/s, half again the best cold
    # rate seen here (~10,000): a pool that wraps turns new tokens into cache
    # hits (9,000/s once let 14 % through). The report's ``cold_fraction``
    # checks it, and T2 is not judged on a round that wrapped.
    pool = s.cold_pool or int(s.duration * 15000)
    started = time.perf_counter()
    for r in range(s.rounds):
        tokens = mint.mint_many(a, iss, pool, start=1000 + r * pool)
        ctx.cold_files.append(ctx.tokens_file(f"cold-{r}", tokens))
    print(
        f"  minted {pool * s.rounds:,} cold-path tokens in "
        f"{time.perf_counter() - started:.1f}s",
        flush=True,
    )
    ctx.tokens_file("badsig-one", [mint.bad_signature(a.kid, mint.claims(iss, 2))])
    ctx.tokens_file(
        "expired-one", [mint.mint(key_a, a.kid, mint.claims(iss, 3, lifetime=-3600))]
    )
    ctx.tokens_file(
        "badsig-many",
        [
            mint.bad_signature(a.kid, mint.claims(iss, 10_000_000 + i))
            for i in range(pool)
        ],
    )
    ctx.tokens_file(
        "random-kid",
        [
            mint.random_kid(mint.claims(iss, 20_000_000 + i))
            for i in range(min(pool, 50_000))
        ],
    )
    ctx.tokens_file("rot-a", mint.mint_many(a, iss, 64, start=30_000_000))
    ctx.tokens_file("rot-b", mint.mint_many(b, iss, 64, start=40_000_000))
