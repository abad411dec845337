"""The regulariser's eigenvectors, followed from one evaluation to the next.

:class:`TrackedEigenpairs` holds the block that the next evaluation starts from and decides, at
each evaluation, how much solving it takes: under ``"tracking"`` one application of the operator
(:func:`~cluster_tracking.promote.krylov.tracking_step`), a second one that widens the subspace by
the Ritz vectors' residuals (:func:`~cluster_tracking.promote.krylov.extension_step`), and, when
the weights moved further than that follows, a full warm-started solve
(:func:`~cluster_tracking.promote.krylov.top_eigenpairs`); under ``"iterative"`` always the full
solve, from the last call's Ritz vectors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import torch

from cluster_tracking.errors import GraphError
from cluster_tracking.promote.krylov import (
    Eigenpairs,
    extension_step,
    next_tracking_block,
    top_eigenpairs,
    tracking_step,
)
from cluster_tracking.promote.live_blocks import solver_block_size
from cluster_tracking.promote.operators import NormalizedAdjacency

#: A solve whose residuals stop shrinking (float32 round-off, for eigenvalues near 1) is accepted
#: without a warning while they stay within this many times their tolerance.
ACCEPTED_STALL = 100.0


class TrackedEigenpairs:
    """The k top non-trivial eigenpairs of ``N = D^-1/2 A D^-1/2`` across evaluations.

    Args:
        solver: ``"iterative"`` (a full solve at every call, warm-started) or ``"tracking"``
            (one or two operator applications per call, a full solve as the fallback).
        seed: seed of the first start block.

    Attributes:
        applications: operator applications that the last :meth:`solve` used.
        residuals: ``(theta, residual, bipartite)`` of the last solve's k wanted Ritz pairs (see
            :func:`~cluster_tracking.promote.operators.eigenvector_residuals`), or ``None``
            before the first.
    """

    def __init__(self, solver: Literal["iterative", "tracking"], seed: int) -> None:
        self.solver = solver
        self.seed = seed
        # warm start, rows [b, n]: the last call's Ritz vectors (iterative) or the block the
        # next tracking step starts from
        self.state: torch.Tensor | None = None
        self.applications = 0
        self.residuals: tuple[torch.Tensor, torch.Tensor, bool] | None = None

    def solve(
        self, operator: NormalizedAdjacency, k: int, tol: float, solve_tol: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit eigenvectors ``[k, n]`` (rows) of the k smallest non-trivial eigenvalues of L and
        the matching (largest non-trivial) eigenvalues of N. ``tol``: the residual tolerance a
        tracking step must meet; ``solve_tol``: the one a full solve iterates to. Warns (from
        the regulariser's caller) when a full solve stops above its tolerance."""
        block_size = solver_block_size(k, operator.space_size)
        if block_size < k + 1:
            raise GraphError(
                f"The weight graph has only {operator.n_active} nodes with edges, too few for "
                f"k={k} with the {self.solver} solver; use solver='dense' or a smaller k."
            )
        dtype = operator.trivial.dtype

        def thresholds_at(tolerance: float) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda theta: operator.residual_thresholds(theta, tolerance)

        state = self.state
        if state is not None and (state.shape[1] != operator.n_space or state.dtype != dtype):
            state = None  # the graph or the dtype changed: start afresh
        found: Eigenpairs | None = None
        applications = 0
        if self.solver == "tracking" and state is not None:
            found = tracking_step(operator, state, block_size, k, thresholds_at(tol))
            if not found.converged:  # drifted: widen the subspace by the residuals, once
                found = extension_step(operator, found, block_size, k, thresholds_at(tol))
            applications = found.applications
            if not found.converged:  # drifted too far: solve from the tracked Ritz vectors
                state, found = found.vectors, None
        if found is None:
            cold = state is None
            if state is None:
                generator = torch.Generator().manual_seed(self.seed)
                state = torch.rand((block_size, operator.n_space), generator=generator, dtype=dtype)
                state = (state - 0.5).to(operator.trivial.device)
            found = top_eigenpairs(
                operator.apply,
                operator.restrict(state[:block_size]),
                operator.trivial,
                k,
                thresholds_at(solve_tol),
                max_restarts=300 if cold else 100,
            )
            applications += found.applications
            self._warn_unless_accepted(found, operator, k, tol)
        if self.solver == "tracking":
            self.state = next_tracking_block(found, operator.bipartite)
        else:
            self.state = found.vectors
        self.applications = applications
        self.residuals = (found.theta[:k], found.residual[:k], operator.bipartite)
        return operator.eigenpairs(found, k)

    def _warn_unless_accepted(
        self, found: Eigenpairs, operator: NormalizedAdjacency, k: int, tol: float
    ) -> None:
        accepted = found.worst <= ACCEPTED_STALL  # (within it: stalled at round-off)
        if self.solver == "tracking":
            accepted = bool(
                (found.residual[:k] <= operator.residual_thresholds(found.theta[:k], tol)).all()
            )
        if not accepted:
            warnings.warn(
                f"SpectralRegularizer: the {self.solver} eigensolver stopped with "
                f"eigenvector residuals above tol={tol:g}, so the penalty and its gradient "
                "are approximate. Pass a larger tol, float64 parameters, or solver='dense' "
                "for a small network.",
                RuntimeWarning,
                stacklevel=6,
            )
