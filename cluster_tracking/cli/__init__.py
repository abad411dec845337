"""The command line: ``cluster-tracking demo | audit | compare``."""

from cluster_tracking.cli.app import app

__all__ = ["app"]
