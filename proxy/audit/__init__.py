"""Kubernetes audit (``audit.k8s.io/v1``) for the proxy (issue 24).

Modules, each one concern, pure except the backends:

- ``requestinfo``: verb, group, namespace, resource, subresource and name of
  a request, as kube-apiserver's ``RequestInfoFactory`` reads them;
- ``policy``: the ``Policy`` file, validated at load and evaluated
  first-match as kube-apiserver's checker does;
- ``event``: ``Event`` dicts, timestamps, ``objectRef``, ``sourceIPs``,
  recorded bodies, which stages a request gets;
- ``backend``: the log (file with rotation, or stdout) and webhook backends,
  which never make a request wait;
- ``auditor``: ``Auditor``/``AuditContext``, the API the proxy's handler
  calls (its module docstring is the contract).

Nothing is imported here, so that importing a pure module (``policy``,
``requestinfo``, ``event``) does not load the backends' HTTP client: import
``proxy.audit.auditor`` for the API.
"""

__all__: list[str] = []
