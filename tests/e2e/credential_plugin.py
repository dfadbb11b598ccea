"""A test stand-in for kubelogin: a kubectl exec credential plugin.

The kubeconfig that ``kube-oidc-gate kubeconfig user`` prints runs
``kubectl-oidc_login get-token --oidc-issuer-url=URL --oidc-client-id=ID
--listen-address=localhost:8000``; kubelogin itself cannot be installed here,
so the e2e tests point the exec ``command`` at this script and keep the
arguments. It accepts the same arguments, performs the same authorization
code + PKCE login (``tests.e2e.login``; the user and password a person would
type come from ``E2E_LOGIN_USER`` / ``E2E_LOGIN_PASSWORD``) and prints an
``ExecCredential`` whose token is the ID token, as kubelogin does.

Each run appends one line to ``E2E_PLUGIN_LOG`` (when set), so a test can tell
that kubectl really ran the plugin. The token is never written anywhere else.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.e2e.login import LoginRefused, login, unverified_claims

__all__ = ["exec_credential", "main"]

EXEC_API_VERSION = "client.authentication.k8s.io/v1"


def exec_credential(
    token: str, api_version: str = EXEC_API_VERSION
) -> dict[str, object]:
    """The ``ExecCredential`` kubectl reads: the token and when it expires."""
    exp = dt.datetime.fromtimestamp(int(unverified_claims(token)["exp"]), dt.UTC)
    return {
        "apiVersion": api_version,
        "kind": "ExecCredential",
        "status": {
            "token": token,
            "expirationTimestamp": exp.strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="credential_plugin.py")
    p.add_argument("command", choices=["get-token"])
    p.add_argument("--oidc-issuer-url", required=True)
    p.add_argument("--oidc-client-id", required=True)
    p.add_argument("--listen-address", default="localhost:8000")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    info = json.loads(os.environ.get("KUBERNETES_EXEC_INFO") or "{}")
    api_version = info.get("apiVersion", EXEC_API_VERSION)
    username = os.environ.get("E2E_LOGIN_USER", "")
    log = os.environ.get("E2E_PLUGIN_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"user": username, "api_version": api_version}) + "\n")
    try:
        tokens = asyncio.run(
            login(
                ns.oidc_issuer_url,
                client_id=ns.oidc_client_id,
                username=username,
                password=os.environ.get("E2E_LOGIN_PASSWORD", ""),
                redirect_uri=f"http://{ns.listen_address}",
            )
        )
    except LoginRefused as err:
        sys.stderr.write(f"credential plugin: {err}\n")
        return 1
    sys.stdout.write(json.dumps(exec_credential(tokens.id_token, api_version)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
