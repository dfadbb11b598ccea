"""``python -m proxy``: the same as the ``kube-oidc-gate`` command."""

import sys

from proxy.cli import main

sys.exit(main())
