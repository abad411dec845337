"""Benchmarks of cluster-tracking against the scikit-learn reference.

Run them with ``python -m benchmarks.run`` (``--quick`` for a shorter pass).

Kept free of imports so that reference workers (``benchmarks.reference``) load scikit-learn only.
"""
