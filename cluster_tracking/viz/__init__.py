"""Pictures and pages of a measurement: adjacency and cluster plots, the HTML report."""
