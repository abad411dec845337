"""The statistics of an observed n-cut against its null networks (Filan et al. 2021, §3).

``z = (ncut - mean) / std`` with the population std, the one-sided ``p = (r + 1) / (n + 1)`` with
``r`` the number of null n-cuts strictly below the observed one (the published code calls this
number the "percentile"), and the percentile rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cluster_tracking.errors import ConfigError
from cluster_tracking.report import Baseline


def null_statistics(ncut: float, null_ncuts: Sequence[float] | np.ndarray, method: str) -> Baseline:
    """Compare an observed n-cut with null n-cuts (see :class:`~cluster_tracking.report.Baseline`).

    ``z = (ncut - mean) / std`` (population std; ``None`` with ``degenerate=True`` when the null has
    zero spread), one-sided ``p = (r + 1) / (n + 1)`` with ``r = #{null < ncut}``, percentile rank
    ``100 * (#{null < ncut} + #{null == ncut} / 2) / n``.
    """
    nulls = np.asarray(null_ncuts, dtype=np.float64)
    n = int(nulls.size)
    if n < 2:
        raise ConfigError(f"a null model needs at least 2 networks, got {n}.")
    mean = float(nulls.mean())
    std = float(nulls.std())
    below = int(np.count_nonzero(nulls < ncut))
    ties = int(np.count_nonzero(nulls == ncut))
    # A spread at the level of floating-point noise is no spread.
    degenerate = std <= 1e-12 * max(1.0, abs(mean))
    z_score = None if degenerate else (ncut - mean) / std
    return Baseline(
        method=method,
        n=n,
        mean=mean,
        std=std,
        z_score=z_score,
        p_value=(below + 1) / (n + 1),
        percentile=100.0 * (below + 0.5 * ties) / n,
        diff=ncut - mean,
        rel_diff=(ncut - mean) / mean if mean != 0 and math.isfinite(mean) else None,
        degenerate=degenerate,
        ncuts=[float(value) for value in nulls],
    )
