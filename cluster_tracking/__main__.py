"""``python -m cluster_tracking``: the ``cluster-tracking`` command line, for environments whose
scripts folder is not on ``PATH``."""

from cluster_tracking.cli import app

if __name__ == "__main__":
    app(prog_name="cluster-tracking")
