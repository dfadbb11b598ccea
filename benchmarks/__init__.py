"""Benchmarks of kube-oidc-gate against its limits and its peer (``python -m benchmarks.run``)."""
