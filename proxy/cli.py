"""The ``kube-oidc-gate`` command: parse flags, build the config, run a mode.

Modes: ``webhook`` (TokenReview server), ``proxy`` (impersonating reverse
proxy), ``check-token`` (explain one token), ``kubeconfig`` (generate the API
server's webhook kubeconfig or a user's kubeconfig), ``apiserver-flags`` (the
equivalent kube-apiserver configuration), ``revoke`` (store a Revocation
object that every replica watching its namespace enforces).

Exit codes: 0 success, 1 a checked token was refused, 2 a usage or
configuration error (printed as ``error: ...`` with every problem listed).

Nothing imports this module. Heavy modules (the servers, ``kubernetes``) are
imported inside the functions that need them, so ``check-token`` and
``kubeconfig`` start quickly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from proxy import COMPILED, __version__, commands
from proxy.errors import ConfigError, ProxyError
from proxy.log import configure_logging, flush_logs
from proxy.options.auth import (
    add_auth_arguments,
    apply_tuning_args,
    auth_config_from_args,
)
from proxy.options.eventhook import (
    add_okta_event_hook_arguments,
    okta_event_hook_from_args,
)
from proxy.options.kubeconfig import add_kubeconfig_arguments
from proxy.options.logs import add_logging_arguments
from proxy.options.revocation import (
    add_revocation_arguments,
    add_revoke_arguments,
    revocation_settings_from_args,
)
from proxy.options.serving import (
    DEFAULT_CERT_DIR,
    add_serving_arguments,
    serve_settings_from_args,
    tls_problems,
)
from proxy.options.values import (
    DEFAULT_PROXY_PORT,
    DEFAULT_WEBHOOK_PORT,
    AuthConfig,
    OktaEventHookConfig,
    RevocationSettings,
)
from proxy.supervisor import run_processes

if TYPE_CHECKING:
    from proxy.app import Engine, ServeSettings
    from proxy.certs import SelfSigned, ServingTLS
    from proxy.devissuer import DevIssuer
    from proxy.http1 import Server
    from proxy.oktahook import Revoker
    from proxy.watch import FileWatcher

__all__ = ["build_parser", "main"]

log = logging.getLogger("proxy.cli")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (also used by tests that compare manifests to flags)."""
    parser = argparse.ArgumentParser(
        prog="kube-oidc-gate",
        description="Log in to Kubernetes with your OIDC identity provider.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {__version__} (compiled: {'yes' if COMPILED else 'no'})",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_webhook_command(sub)
    _add_proxy_command(sub)
    _add_revoke_command(sub)
    _add_check_token_command(sub)
    kc = sub.add_parser(
        "kubeconfig",
        help="Print a kubeconfig for the API server's webhook, for users, or for "
        "the proxy itself.",
    )
    add_kubeconfig_arguments(kc)
    af = sub.add_parser(
        "apiserver-flags", help="Print the kube-apiserver configuration equal to ours."
    )
    add_auth_arguments(af)
    af.add_argument(
        "--format",
        choices=("flags", "config"),
        default="flags",
        help="--oidc-* flags (when expressible) or an AuthenticationConfiguration file.",
    )
    return parser


_Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _add_webhook_command(sub: _Subparsers) -> None:
    wh = sub.add_parser("webhook", help="Serve kube-apiserver's TokenReview webhook.")
    add_auth_arguments(wh)
    add_serving_arguments(wh, default_port=DEFAULT_WEBHOOK_PORT)
    add_revocation_arguments(wh, kubeconfig=True)
    add_okta_event_hook_arguments(wh)
    g = wh.add_argument_group("webhook")
    g.add_argument(
        "--webhook-audiences",
        default="",
        help="Comma-separated API audiences this webhook vouches for; empty (default) "
        "answers audience-agnostically, like kube-apiserver's own JWT authenticator.",
    )
    g.add_argument(
        "--dev",
        action="store_true",
        help="Start a built-in DEVELOPMENT issuer on loopback and authenticate its "
        "tokens; prints a demo token and a curl command. Never in production.",
    )
    add_logging_arguments(wh, serving=True)


def _add_proxy_command(sub: _Subparsers) -> None:
    from proxy.options.audit import add_audit_arguments
    from proxy.options.proxy import add_proxy_arguments

    px = sub.add_parser(
        "proxy", help="Serve an impersonating reverse proxy in front of the API server."
    )
    add_auth_arguments(px)
    add_serving_arguments(px, default_port=DEFAULT_PROXY_PORT)
    add_okta_event_hook_arguments(px)
    add_proxy_arguments(px)
    add_audit_arguments(px)
    add_revocation_arguments(px, kubeconfig=False)
    add_logging_arguments(px, serving=True)


def _add_revoke_command(sub: _Subparsers) -> None:
    rv = sub.add_parser(
        "revoke",
        help="Revoke a subject's tokens on every replica (a Revocation object).",
        description="Create one Revocation object (CRD revocations.kube-oidc-gate.io) "
        "in the namespace the gate watches (--revocation-namespace); every replica "
        "refuses the subject's tokens issued before --before within seconds. Print "
        "its name. kubectl get revocations -n NS lists them; kubectl delete lifts one.",
    )
    add_revoke_arguments(rv)
    add_logging_arguments(rv, log_format="text", log_level="warning")


def _add_check_token_command(sub: _Subparsers) -> None:
    ct = sub.add_parser(
        "check-token", help="Explain why a token is accepted or refused."
    )
    add_auth_arguments(ct)
    ct.add_argument("token", nargs="?", help="The token, or - to read it from stdin.")
    ct.add_argument("--token-file", help="Read the token from this file.")
    ct.add_argument(
        "--offline",
        action="store_true",
        help="Make no network request; needs --jwks-file.",
    )
    ct.add_argument(
        "--jwks-file", help="A JWK Set file to verify against (with --offline)."
    )
    # The replicas' revocation list, read once: which Revocation refuses it.
    add_revocation_arguments(ct, kubeconfig=True)
    # A person at a terminal reads the verdict on stdout: only what went wrong
    # on the way (a failed fetch) belongs on stderr, and as text.
    add_logging_arguments(ct, log_format="text", log_level="warning")


def _clear_metrics_dir(directory: str) -> None:
    """Start a user-given ``PROMETHEUS_MULTIPROC_DIR`` empty of earlier runs' samples."""
    from proxy.metrics import clear_multiprocess_dir

    try:
        removed = clear_multiprocess_dir(directory)
    except OSError as err:
        raise ConfigError(
            f"config: PROMETHEUS_MULTIPROC_DIR={directory!r} cannot be used for "
            f"metrics: {err.strerror or err}"
        ) from err
    if removed:
        log.info(
            "metrics: removed an earlier run's sample files",
            extra={"directory": directory, "files": removed},
        )


def _tls(
    ns: argparse.Namespace, bind_address: str
) -> tuple[str, str, SelfSigned | None]:
    """Return (cert, key, the generated pair or None); ``_tls_problems`` has
    checked the flags."""
    from proxy.certs import self_signed

    if ns.tls_cert_file:
        return ns.tls_cert_file, ns.tls_private_key_file, None
    cert_dir = ns.cert_dir or (
        tempfile.mkdtemp(prefix="kube-oidc-gate-dev-")
        if getattr(ns, "dev", False)
        else DEFAULT_CERT_DIR
    )
    generated = self_signed(
        cert_dir, [bind_address], validity=dt.timedelta(seconds=ns.cert_dir_validity)
    )
    return generated.pair.cert_file, generated.pair.key_file, generated


def _proxy_problems(ns: argparse.Namespace) -> list[str]:
    """The proxy's own flags and its upstream credential source, checked early.

    A worker would find the same problems only after the engine started, one
    at a time, and (with ``--workers N``) once per worker.
    """
    from proxy.options.audit import audit_options_from_args
    from proxy.options.proxy import (
        proxy_settings_from_args,
        upstream_settings_from_args,
    )
    from proxy.upstream import upstream_problems

    problems: list[str] = []
    _collect(problems, lambda: proxy_settings_from_args(ns))
    _collect(problems, lambda: audit_options_from_args(ns))
    upstream = _collect(problems, lambda: upstream_settings_from_args(ns))
    if upstream is not None:
        problems += upstream_problems(upstream)
    return problems


_T = TypeVar("_T")


def _collect(problems: list[str], make: Callable[[], _T]) -> _T | None:
    """``make()``, or None with its ``ConfigError``'s problems added to ``problems``."""
    try:
        return make()
    except ConfigError as err:
        problems.extend(err.problems)
        return None


def _serve_mode(ns: argparse.Namespace, metrics_dir: str | None) -> int:
    """Check every flag, then serve in one process or ``--workers`` processes;
    ``metrics_dir`` is the shared metrics directory ``main`` made, if any."""
    from proxy.app import listen_problems
    from proxy.certs import CertPair, ServingTLS

    dev = getattr(ns, "dev", False)
    # Every problem of every flag at once, as for the configuration file: an
    # operator fixes them in one pass, not one per restart.
    problems: list[str] = []
    if ns.workers < 1 or ns.workers > 64:
        problems.append("config: --workers must be between 1 and 64")
    if dev and ns.workers > 1:
        problems.append("config: --dev runs one process; drop --workers")
    config = _collect(problems, lambda: auth_config_from_args(ns, allow_empty=dev))
    if dev and config is not None:
        problems.insert(
            0,
            "config: --dev brings its own issuer and is mutually exclusive with "
            "--authentication-config and the --oidc-* flags",
        )
    workers = min(max(ns.workers, 1), 64)
    settings = _collect(
        problems, lambda: serve_settings_from_args(ns, reuse_port=workers > 1)
    )
    problems += tls_problems(ns)
    hook = _collect(problems, lambda: okta_event_hook_from_args(ns))
    if ns.command == "proxy":
        problems += _proxy_problems(ns)
    revocation = _collect(problems, lambda: revocation_settings_from_args(ns))
    if revocation is not None and ns.command == "webhook":
        from proxy.upstream import UpstreamSettings, upstream_problems

        problems += upstream_problems(
            UpstreamSettings(kubeconfig=ns.kubeconfig, context=ns.context)
        )
    if settings is not None:
        problems += listen_problems(settings)
    if problems:
        raise ConfigError(problems)
    assert settings is not None
    given_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given_dir and given_dir != metrics_dir:
        _clear_metrics_dir(given_dir)
    cert, key, generated = _tls(ns, settings.bind_address)
    if generated is not None:
        log.warning(
            "serving with a self-signed certificate",
            extra={
                "ca_file": cert,
                "hint": "give clients this file as their CA, or pass --tls-cert-file",
            },
        )
    # Loaded once, here: a file that does not load stops the start before
    # any worker exists.
    tls = ServingTLS(CertPair(cert, key), client_ca_file=ns.client_ca_file)
    # Okta presents no client certificate: with --client-ca-file the hook
    # gets a context of its own, of the same pair.
    hook_tls = (
        ServingTLS(CertPair(cert, key))
        if hook is not None and ns.client_ca_file
        else tls
    )

    def run_one() -> int:
        _install_uvloop()
        return asyncio.run(
            _serve_async(
                ns,
                config,
                settings,
                tls,
                cert,
                generated=generated,
                hook=None if hook is None else (hook, hook_tls),
            )
        )

    return run_processes(ns.workers, run_one)


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve_async(
    ns: argparse.Namespace,
    config: AuthConfig | None,
    settings: ServeSettings,
    tls: ServingTLS,
    cert: str,
    *,
    generated: SelfSigned | None = None,
    hook: tuple[OktaEventHookConfig, ServingTLS] | None = None,
) -> int:
    """One process's life: the engine, the file watcher, the front end, the
    hook and the listeners, then everything closed in reverse order."""
    from proxy.app import probe_app, serve, start_engine
    from proxy.metrics import Metrics
    from proxy.revocation import RevocationList

    metrics = Metrics()
    dev_issuer, config = await _dev_issuer(ns, config)
    revocation = revocation_settings_from_args(ns)
    engine = await start_engine(
        config,
        metrics=metrics,
        revocations=None if revocation is None else RevocationList(),
    )
    if dev_issuer is not None:
        # Print the demo only once it works: the dev issuer is local and fast.
        await engine.keysets.get(dev_issuer.url).refresh(force=True)
    closers: list[Callable[[], object]] = []
    watcher = await _file_watcher(ns, engine, tls, generated, hook)
    closers.append(_start_watching(watcher))
    try:
        if revocation is not None:
            await _start_revocations(engine, revocation, watcher)
        main_app, on_ready, extra_checks = await _front_end(
            ns, engine, cert, dev_issuer, closers, watcher=watcher
        )
        if hook is not None:
            await _start_okta_hook(*hook, engine, settings, closers)
        # Everything built so far lives until exit: move it out of the garbage
        # collector's generations so full collections (which run while a busy
        # result cache grows) stop re-scanning every imported module.
        gc.freeze()
        await serve(
            main_app,
            probe_app(engine, extra_checks=extra_checks),
            settings,
            tls.context,
            on_ready=on_ready,
        )
    finally:
        for close in reversed(closers):
            result = close()
            if asyncio.iscoroutine(result):
                await result
        await engine.close()
        if dev_issuer is not None:
            await dev_issuer.close()
        # The counts of refusals not logged yet, before the final line.
        flush_logs()
    log.info("stopped")
    return 0


async def _dev_issuer(
    ns: argparse.Namespace, config: AuthConfig | None
) -> tuple[DevIssuer | None, AuthConfig]:
    """With ``--dev``, the started development issuer and its configuration
    (with the tunables given); otherwise None and ``config``."""
    if not getattr(ns, "dev", False):
        assert config is not None
        return None, config
    from proxy.devissuer import DevIssuer, dev_auth_config

    dev_issuer = DevIssuer()
    await dev_issuer.start()
    config = apply_tuning_args(
        dev_auth_config(dev_issuer.url, dev_issuer.client_id), ns
    )
    return dev_issuer, config


async def _file_watcher(
    ns: argparse.Namespace,
    engine: Engine,
    tls: ServingTLS,
    generated: SelfSigned | None,
    hook: tuple[OktaEventHookConfig, ServingTLS] | None,
) -> FileWatcher:
    """The files this worker reloads when they change (issue 21).

    Every worker watches on its own: each has its own listener context,
    engine and upstream client to bring up to date.
    """
    from proxy.watch import FileWatcher

    watcher = FileWatcher()
    # Reading and parsing the pair happens in a thread; the swap is one
    # attribute assignment, seen whole by the next handshake.
    watcher.add("serving certificate", tls.files, lambda: asyncio.to_thread(tls.reload))
    if generated is not None:
        from proxy.certs import SelfSignedRenewal

        # Every worker asks; the directory's lock lets one write, and every
        # worker loads the new pair through the watch above.
        renewal = await asyncio.to_thread(SelfSignedRenewal, generated)
        watcher.add_periodic("self-signed certificate", renewal.check)
    if hook is not None and hook[1] is not tls:
        hook_tls = hook[1]
        watcher.add(
            "okta event hook certificate",
            hook_tls.files,
            lambda: asyncio.to_thread(hook_tls.reload),
        )
    if not getattr(ns, "dev", False):
        from proxy.app import ConfigReloader

        reloader = ConfigReloader(engine, lambda: _reload_config(ns))
        watcher.add(
            "authentication config",
            [ns.authentication_config or "", ns.oidc_ca_file or ""],
            reloader.reload,
        )
    return watcher


def _start_watching(watcher: FileWatcher) -> Callable[[], object]:
    """Run ``watcher`` (and on SIGHUP at once); return what stops it."""
    watching = asyncio.create_task(watcher.run(), name="file watcher")
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, watcher.poke)

    async def stop_watching() -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGHUP)
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching

    return stop_watching


async def _start_revocations(
    engine: Engine, revocation: RevocationSettings, watcher: FileWatcher
) -> None:
    """Start the revocation watch; its kubeconfig is reloaded when it changes."""
    from proxy.app import start_revocation_watch

    rw = await start_revocation_watch(engine, revocation)
    if revocation.kubeconfig and engine.revocation_client is not None:
        watcher.add(
            "revocation kubeconfig",
            [p for p in revocation.kubeconfig.split(os.pathsep) if p],
            engine.revocation_client.reload_kubeconfig,
        )
    log.info("revocation watch started", extra={"namespace": rw.namespace})


async def _start_okta_hook(
    hook: OktaEventHookConfig,
    tls: ServingTLS,
    engine: Engine,
    settings: ServeSettings,
    closers: list[Callable[[], object]],
) -> None:
    """Serve Okta's event hook beside the front end, with the serving pair
    (reloaded with it); ``closers`` drains it.
    """
    from proxy.oktahook import HOOK_PATH, OktaHook

    receiver = OktaHook(
        _okta_revoker(hook, engine), hook.secret, metrics=engine.metrics
    )
    closers.append(lambda: receiver.close(settings.shutdown_grace_period))
    try:
        port = await receiver.start(
            hook.host,
            hook.port,
            ssl_context=tls.context,
            reuse_port=settings.reuse_port,
        )
    except OSError as err:
        raise ConfigError(
            f"listen: {hook.host}:{hook.port} (--okta-event-hook-address): "
            f"{(err.strerror or str(err)).lower()}"
        ) from err
    log.info(
        "okta event hook listening",
        extra={"bind": hook.host, "port": port, "path": HOOK_PATH},
    )


def _okta_revoker(hook: OktaEventHookConfig, engine: Engine) -> Revoker:
    """Where the event hook's decisions go: Revocation objects in
    ``hook.revocation_namespace`` (the list every replica watches), written
    with the revocation watch's own client; cached verdicts of a user whose
    groups changed are dropped in this worker.
    """
    from proxy.oktahook import CallbackRevoker
    from proxy.revocation_api import create_revocation

    client = engine.revocation_client
    if client is None:  # pragma: no cover - the hook requires the namespace
        raise ConfigError(
            "config: --okta-event-hook-address requires --revocation-namespace"
        )
    namespace = hook.revocation_namespace
    authenticator = engine.authenticator

    async def create(**fields: Any) -> None:
        await create_revocation(client, namespace, **fields)

    def forget(subject: str) -> None:
        authenticator.forget_subject(None, subject)

    return CallbackRevoker(create, forget)


def _reload_config(ns: argparse.Namespace) -> AuthConfig:
    """The authentication configuration from the same flags, files read again."""
    config = auth_config_from_args(ns)
    assert config is not None  # not --dev: a form was given
    return config


async def _front_end(
    ns: argparse.Namespace,
    engine: Engine,
    cert: str,
    dev_issuer: object,
    closers: list[Callable[[], object]],
    *,
    watcher: FileWatcher,
) -> tuple[
    Server,
    Callable[[int, int], None] | None,
    Callable[[], list[str]] | None,
]:
    from proxy.app import webhook_app
    from proxy.webhook import WebhookSettings

    if ns.command == "webhook":
        audiences = tuple(
            a.strip() for a in ns.webhook_audiences.split(",") if a.strip()
        )
        app = webhook_app(
            engine,
            WebhookSettings(
                audiences=audiences, refusal_log_limit=ns.refusal_log_limit
            ),
        )
        on_ready = None
        if dev_issuer is not None:
            on_ready = _dev_banner(dev_issuer, cert)
        return app, on_ready, None
    return await _build_proxy_app(ns, engine, closers, watcher)


async def _build_proxy_app(
    ns: argparse.Namespace,
    engine: Engine,
    closers: list[Callable[[], object]],
    watcher: FileWatcher | None = None,
) -> tuple[Server, Callable[[int, int], None] | None, Callable[[], list[str]] | None]:
    """Start the upstream client and build the proxy app; ``closers`` gets its
    close, ``watcher`` the kubeconfig to reload when it changes (issue 21).
    """
    from proxy.app import proxy_app
    from proxy.audit.auditor import Auditor
    from proxy.options.audit import audit_options_from_args
    from proxy.options.proxy import (
        proxy_settings_from_args,
        upstream_settings_from_args,
    )
    from proxy.upstream import Upstream

    settings = proxy_settings_from_args(ns)
    # Refuses a client-certificate credential under --token-passthrough, at
    # start and on every reload of --kubeconfig.
    upstream = Upstream(upstream_settings_from_args(ns), metrics=engine.metrics)
    await upstream.start()
    closers.append(upstream.close)
    if watcher is not None and ns.kubeconfig:
        watcher.add(
            "upstream kubeconfig",
            [p for p in ns.kubeconfig.split(os.pathsep) if p],
            upstream.reload_kubeconfig,
        )
    options = audit_options_from_args(ns)
    auditor = None
    if options is not None:
        # Closed after the listener has drained: the last requests' events
        # are in the backends' buffers by then, and close() flushes them.
        auditor = await Auditor.from_options(options, metrics=engine.metrics)
        closers.append(auditor.close)
    return proxy_app(engine, upstream, settings, auditor=auditor), None, None


def _dev_banner(dev_issuer: object, cert: str) -> Callable[[int, int], None]:
    from proxy.devissuer import DevIssuer, demo_instructions

    assert isinstance(dev_issuer, DevIssuer)

    def banner(port: int, probe_port: int) -> None:
        token = dev_issuer.mint(sub="alice", groups=["naxslabs-admins"])
        text = demo_instructions(
            token=token,
            webhook_url=f"https://127.0.0.1:{port}",
            ca_file=cert,
            issuer_url=dev_issuer.url,
        )
        sys.stdout.write(text + f"\nprobes: http://127.0.0.1:{probe_port}/readyz\n")
        sys.stdout.flush()

    return banner


def _shared_metrics_dir(argv: Sequence[str] | None) -> str | None:
    """With ``--workers N`` (N > 1), make the directory the workers share their
    metrics through and name it in ``PROMETHEUS_MULTIPROC_DIR``; ``None``
    otherwise, or when the variable is already set (the operator's own).

    Why here, before anything else: prometheus_client reads the variable once,
    when it is first imported (its documented way to share samples between
    processes), and building the parser imports modules that import it. So
    ``--workers`` alone is read first; the full parser checks it again.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("command", nargs="?")
    early.add_argument("--workers", type=int, default=1)
    try:
        known, _ = early.parse_known_args(argv)
    except SystemExit:  # a malformed --workers: the full parser says so
        return None
    if known.command not in ("webhook", "proxy") or not 1 < known.workers <= 64:
        return None
    if "prometheus_client" in sys.modules:  # pragma: no cover - embedding, or a bug
        raise ProxyError(
            "metrics: prometheus_client was imported before --workers could set "
            "PROMETHEUS_MULTIPROC_DIR: set it yourself before starting"
        )
    directory = tempfile.mkdtemp(prefix="kube-oidc-gate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    return directory


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and ``python -m proxy``."""
    try:
        metrics_dir = _shared_metrics_dir(argv)
    except ProxyError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    try:
        return _main(argv, metrics_dir)
    finally:
        # Only the parent gets here (a worker leaves with os._exit): the
        # samples die with the pod's processes, so their files go too.
        if metrics_dir is not None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _main(argv: Sequence[str] | None, metrics_dir: str | None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    configure_logging(
        level=getattr(ns, "log_level", "info"), fmt=getattr(ns, "log_format", "text")
    )
    try:
        if ns.command == "check-token":
            return commands.check_token(ns)
        if ns.command == "kubeconfig":
            return commands.kubeconfig(ns)
        if ns.command == "apiserver-flags":
            return commands.apiserver_flags(ns)
        if ns.command == "revoke":
            return commands.revoke(ns)
        return _serve_mode(ns, metrics_dir)
    except ConfigError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    except ProxyError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    except KeyboardInterrupt:
        return 130
