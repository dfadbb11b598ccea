"""The engine's tunables: key set fetching, the result cache, admission, skew.

They apply to both configuration forms (the ``--oidc-*`` flags and the file),
and to ``--dev``'s own issuer. Their defaults are the values' defaults
(``proxy.options.values``), so the help text shows what the engine uses.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from proxy.options.common import FlagGroup, read_count, read_number
from proxy.options.values import (
    AdmissionSettings,
    AuthConfig,
    CacheSettings,
    KeySetSettings,
)

__all__ = ["add_tuning_arguments", "tuning_from_args"]


_DEFAULT_KEYSET = KeySetSettings()
_DEFAULT_CACHE = CacheSettings()
_DEFAULT_ADMISSION = AdmissionSettings()
_DEFAULT_LEEWAY = AuthConfig(authenticators=()).leeway


def add_tuning_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the "token validation tuning" group: the engine's bounds."""
    tuning = parser.add_argument_group(
        "token validation tuning",
        "Bounds of the authentication engine; they apply to both forms above.",
    )
    _add_keyset_flags(tuning)
    _add_cache_flags(tuning)
    _add_admission_flags(tuning)
    tuning.add_argument(
        "--clock-skew",
        metavar="SECONDS",
        type=float,
        default=_DEFAULT_LEEWAY,
        help=(
            "How far in the future a token's 'nbf' may be, for an issuer whose "
            "clock runs ahead of ours (default %(default)s, kube-apiserver's "
            "fixed 5 minutes). As in kube-apiserver, 'exp' has no leeway and "
            "'iat' is not compared with the clock."
        ),
    )


def _add_keyset_flags(tuning: FlagGroup) -> None:
    tuning.add_argument(
        "--jwks-unknown-kid-cooldown",
        metavar="SECONDS",
        type=float,
        default=_DEFAULT_KEYSET.unknown_kid_cooldown,
        help=(
            "Least time between two key set refetches forced by a token whose 'kid' "
            "is unknown, per issuer (default %(default)s). Lowering it lets anyone "
            "who can send a token make us call the issuer more often."
        ),
    )
    tuning.add_argument(
        "--jwks-fetch-timeout",
        metavar="SECONDS",
        type=float,
        default=_DEFAULT_KEYSET.fetch_timeout,
        help="Timeout of one discovery or key set request (default %(default)s).",
    )


def _add_cache_flags(tuning: FlagGroup) -> None:
    tuning.add_argument(
        "--token-cache-size",
        metavar="N",
        type=int,
        default=_DEFAULT_CACHE.max_entries,
        help=(
            "Most authentication results kept, keyed by a hash of the token "
            "(default %(default)s)."
        ),
    )
    tuning.add_argument(
        "--token-cache-success-ttl",
        metavar="SECONDS",
        type=float,
        default=_DEFAULT_CACHE.success_ttl,
        help=(
            "Longest time an accepted token's result is reused (never beyond the "
            "token's 'exp'); 0 disables (default %(default)s). A token's claims, "
            "and so the user's groups, are not re-read during this time."
        ),
    )
    tuning.add_argument(
        "--token-cache-failure-ttl",
        metavar="SECONDS",
        type=float,
        default=_DEFAULT_CACHE.failure_ttl,
        help=(
            "How long a refused token is remembered as refused, so replaying it "
            "is cheap; 0 disables (default %(default)s)."
        ),
    )


def _add_admission_flags(tuning: FlagGroup) -> None:
    tuning.add_argument(
        "--new-tokens-per-turn",
        metavar="N",
        type=int,
        default=_DEFAULT_ADMISSION.per_turn,
        help=(
            "While accepted tokens are answered from the cache, tokens never seen "
            "before start at most N validations per turn of a worker's event "
            "loop, where each client of a remembered token gets one answer; the "
            "others wait their turn in order. Keeps a flood of new (junk) tokens "
            "from slowing down the users already logged in. 0 turns it off "
            "(default %(default)s)."
        ),
    )
    tuning.add_argument(
        "--new-token-queue",
        metavar="N",
        type=int,
        default=_DEFAULT_ADMISSION.max_waiting,
        help=(
            "Most new tokens waiting for a turn per worker; one more is answered "
            "503 with Retry-After, which kube-apiserver and kubectl retry "
            "(default %(default)s)."
        ),
    )


def tuning_from_args(
    ns: argparse.Namespace, problems: list[str]
) -> tuple[KeySetSettings, CacheSettings, AdmissionSettings, float]:
    """The key set, cache and admission settings and the ``nbf`` leeway the
    flags give (defaults for the ones not given); problems are appended."""
    cooldown = read_number(
        ns,
        "jwks_unknown_kid_cooldown",
        _DEFAULT_KEYSET.unknown_kid_cooldown,
        problems,
        allow_zero=False,
    )
    timeout = read_number(
        ns,
        "jwks_fetch_timeout",
        _DEFAULT_KEYSET.fetch_timeout,
        problems,
        allow_zero=False,
    )
    success = read_number(
        ns,
        "token_cache_success_ttl",
        _DEFAULT_CACHE.success_ttl,
        problems,
        allow_zero=True,
    )
    failure = read_number(
        ns,
        "token_cache_failure_ttl",
        _DEFAULT_CACHE.failure_ttl,
        problems,
        allow_zero=True,
    )
    leeway = read_number(ns, "clock_skew", _DEFAULT_LEEWAY, problems, allow_zero=True)
    size = read_count(ns, "token_cache_size", _DEFAULT_CACHE.max_entries, 1, problems)
    per_turn = read_count(
        ns, "new_tokens_per_turn", _DEFAULT_ADMISSION.per_turn, 0, problems
    )
    queue = read_count(
        ns, "new_token_queue", _DEFAULT_ADMISSION.max_waiting, 1, problems
    )
    keyset = replace(
        _DEFAULT_KEYSET, unknown_kid_cooldown=cooldown, fetch_timeout=timeout
    )
    cache = replace(
        _DEFAULT_CACHE, max_entries=size, success_ttl=success, failure_ttl=failure
    )
    admission = replace(_DEFAULT_ADMISSION, per_turn=per_turn, max_waiting=queue)
    return keyset, cache, admission, leeway
