"""The result cache: bounded, keyed by a hash, never past a token's exp."""

from __future__ import annotations

import gc
from types import MappingProxyType

import pytest

from proxy import errors
from proxy.cache import ResultCache
from proxy.config import CacheSettings
from proxy.kube import UserInfo

ALICE = UserInfo(username="alice", groups=("dev",))


class Clocks:
    def __init__(self) -> None:
        self.wall = 1_000_000.0
        self.mono = 50.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def make(settings: CacheSettings | None = None) -> tuple[ResultCache, Clocks]:
    clocks = Clocks()
    cache = ResultCache(
        settings or CacheSettings(max_entries=100, success_ttl=300, failure_ttl=10),
        clock=lambda: clocks.wall,
        monotonic=lambda: clocks.mono,
    )
    return cache, clocks


def test_key_is_a_short_keyed_digest_not_the_token() -> None:
    cache, _ = make()
    other, _ = make()
    token = "eyJhbGciOiJSUzI1NiJ9.payload.signature"
    key = cache.key(token)
    assert len(key) == 16
    assert token.encode() not in key
    assert key == cache.key(token)
    assert key != other.key(token), "a per-process secret keys the hash"


@pytest.mark.parametrize(
    ("exp_in", "step", "hit"),
    [
        (120, 119.0, True),
        (120, 120.0, False),
        (120, 121.0, False),
        (10_000, 299.0, True),
        (10_000, 300.5, False),
    ],
    ids=[
        "before-exp",
        "at-exp",
        "after-exp",
        "within-success-ttl",
        "after-success-ttl",
    ],
)
def test_accepted_entry_never_outlives_exp_or_ttl(
    exp_in: float, step: float, hit: bool
) -> None:
    cache, clocks = make()
    key = cache.key("t")
    cache.put_user(key, ALICE, issuer="https://i", exp=clocks.wall + exp_in)
    clocks.advance(step)
    got = cache.get(key)
    assert (got is not None and got.user == ALICE) is hit


def test_wall_clock_jump_cannot_extend_an_expired_token() -> None:
    cache, clocks = make()
    key = cache.key("t")
    cache.put_user(key, ALICE, issuer="https://i", exp=clocks.wall + 100)
    clocks.wall += 200  # wall clock jumps, monotonic does not
    assert cache.get(key) is None


def test_already_expired_token_is_not_stored() -> None:
    cache, clocks = make()
    cache.put_user(cache.key("t"), ALICE, issuer="https://i", exp=clocks.wall - 1)
    assert len(cache) == 0


def test_failures_kept_briefly_and_temporary_ones_not_at_all() -> None:
    cache, clocks = make()
    bad, later = cache.key("bad"), cache.key("later")
    cache.put_error(bad, errors.SignatureInvalid("token: signature does not verify"))
    cache.put_error(later, errors.KeysUnavailable("jwks: not loaded"))
    hit = cache.get(bad)
    assert hit is not None
    assert isinstance(hit.error, errors.SignatureInvalid)
    assert cache.get(later) is None
    clocks.advance(10.5)
    assert cache.get(bad) is None


def test_size_is_bounded() -> None:
    cache, clocks = make(CacheSettings(max_entries=50, success_ttl=300, failure_ttl=10))
    for i in range(500):
        cache.put_user(
            cache.key(f"t{i}"), ALICE, issuer="https://i", exp=clocks.wall + 600
        )
    # Three quarters of the bound for acceptances; a quarter is the refusals'.
    assert len(cache) == 50 - 50 // 4
    assert cache.get(cache.key("t499")) is not None
    assert cache.get(cache.key("t0")) is None


def test_zero_size_disables_caching() -> None:
    cache, clocks = make(CacheSettings(max_entries=0))
    key = cache.key("t")
    cache.put_user(key, ALICE, issuer="https://i", exp=clocks.wall + 600)
    cache.put_error(key, errors.SignatureInvalid("x"))
    assert cache.get(key) is None


def test_a_flood_of_refusals_cannot_evict_accepted_verdicts() -> None:
    """Distinct junk tokens churn the refusal pool only (cache-pollution bound)."""
    cache, clocks = make(
        CacheSettings(max_entries=100, success_ttl=300, failure_ttl=10)
    )
    users = [cache.key(f"user{i}") for i in range(75)]  # the acceptances' share
    for key in users:
        cache.put_user(key, ALICE, issuer="https://i", exp=clocks.wall + 600)
    for i in range(10_000):
        cache.put_error(cache.key(f"junk{i}"), errors.SignatureInvalid("x"))
        assert len(cache) <= 100
    assert all(cache.get(key) is not None for key in users)
    # Refusals kept: at most a quarter of the bound, and the newest ones.
    junk = [cache.key(f"junk{i}") for i in range(10_000)]
    kept = [k for k in junk if cache.get(k) is not None]
    assert 0 < len(kept) <= 25
    assert cache.get(junk[-1]) is not None


def test_a_burst_of_new_users_cannot_crowd_out_the_refusals() -> None:
    """The other direction: replayed bad tokens stay cheap after a cold burst."""
    cache, clocks = make(CacheSettings(max_entries=8, success_ttl=300, failure_ttl=10))
    bad = [cache.key(f"bad{i}") for i in range(2)]
    for key in bad:
        cache.put_error(key, errors.SignatureInvalid("x"))
    for i in range(1000):
        cache.put_user(
            cache.key(f"ok{i}"), ALICE, issuer="https://i", exp=clocks.wall + 600
        )
        assert len(cache) <= 8
    assert all(cache.get(key) is not None for key in bad)
    assert cache.get(cache.key("ok999")) is not None
    cache.put_error(cache.key("bad-late"), errors.SignatureInvalid("x"))
    assert cache.get(cache.key("bad-late")) is not None
    assert len(cache) == 8


def test_an_expired_entry_is_dropped_on_lookup() -> None:
    cache, clocks = make(CacheSettings(max_entries=8, success_ttl=5, failure_ttl=2))
    ok, bad = cache.key("ok"), cache.key("bad")
    cache.put_user(ok, ALICE, issuer="https://i", exp=clocks.wall + 600)
    cache.put_error(bad, errors.SignatureInvalid("x"))
    assert len(cache) == 2
    clocks.advance(3)
    assert cache.get(bad) is None
    assert cache.get(ok) is not None
    clocks.advance(3)
    assert cache.get(ok) is None
    assert len(cache) == 0


def test_cached_acceptances_are_invisible_to_the_garbage_collector() -> None:
    """Verdicts are atoms, so full collections do not scan them (the cold-path tail)."""
    cache, clocks = make(
        CacheSettings(max_entries=1000, success_ttl=300, failure_ttl=10)
    )
    bob = UserInfo(
        username="bob",
        uid="u-1",
        groups=("dev", "ops"),
        extra=MappingProxyType({"scopes": ("openid", "groups")}),
    )
    keys = [cache.key(f"t{i}") for i in range(500)]
    for key in keys:
        cache.put_user(key, bob, issuer="https://i", exp=clocks.wall + 600)
    gc.collect()
    assert not any(gc.is_tracked(cache._accepted[key]) for key in keys)
    # What comes back is the same user, equal field by field, and shared.
    first, last = cache.get(keys[0]), cache.get(keys[-1])
    assert first is not None
    assert last is not None
    assert first.user == bob
    assert first.user is last.user


@pytest.mark.parametrize(
    "user",
    [
        UserInfo(username="a"),
        UserInfo(username="oidc:ü", uid="x", groups=("g",)),
        UserInfo(
            username="b",
            extra=MappingProxyType(
                {
                    "k": ("v1", "v2"),
                    "authentication.kubernetes.io/credential-id": ("JTI=1",),
                }
            ),
        ),
    ],
    ids=["bare", "unicode-uid-groups", "extra"],
)
def test_a_user_evicted_from_the_memo_is_rebuilt_equal(user: UserInfo) -> None:
    cache, clocks = make()
    key = cache.key("t")
    cache.put_user(key, user, issuer="https://i", exp=clocks.wall + 600)
    cache._users.clear()
    hit = cache.get(key)
    assert hit is not None
    assert hit.user == user
    assert hit.user is not user
    # Rebuilt around the stored bytes: its answer is the same, not re-encoded.
    assert hit.user.to_json() is user.to_json()
    assert "_json" not in repr(hit.user)


def test_a_new_token_of_a_known_user_gets_the_known_user_object() -> None:
    """The same person with a new token: the front ends' per-user work is reused."""
    cache, clocks = make()
    first = cache.put_user(
        cache.key("t1"), ALICE, issuer="https://i", exp=clocks.wall + 600
    )
    assert first is ALICE
    again = UserInfo(username="alice", groups=("dev",))
    assert again is not ALICE
    second = cache.put_user(
        cache.key("t2"), again, issuer="https://i", exp=clocks.wall + 600
    )
    assert second is ALICE
    other = UserInfo(username="alice", groups=("dev", "ops"))
    assert (
        cache.put_user(
            cache.key("t3"), other, issuer="https://i", exp=clocks.wall + 600
        )
        is other
    )
    # Not remembered (expired already): the caller's own object comes back.
    late = UserInfo(username="alice", groups=("dev",))
    assert (
        cache.put_user(cache.key("t4"), late, issuer="https://i", exp=clocks.wall - 1)
        is late
    )
