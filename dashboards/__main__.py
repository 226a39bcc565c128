"""``python -m dashboards``: regenerate dashboards/json/*.json (``--check``: fail if stale);
``python -m dashboards push|render ...`` as ``ringserve dashboards``."""

from __future__ import annotations

import sys

from dashboards.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0].startswith("-"):
        argv = ["build", *argv]
    sys.exit(main(argv))
