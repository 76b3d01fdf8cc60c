"""``python -m deploy.pki COMMAND``: the network's keys and certificates.

The implementation lives in :mod:`coordinator.pki` (the demo network uses it too); this
is the deployment entry point. See deploy/README.md.
"""

from __future__ import annotations

import sys

from coordinator.pki import main

if __name__ == "__main__":
    sys.exit(main())
