"""Promoting clusterability in training: the spectral regulariser (Filan et al. 2021).

Filan et al. (2021), section "Promoting clusterability", add to the training loss a multiple of

    sum_{i=2}^{k+1} lambda_i(L),        L = I - D^-1/2 A D^-1/2,

the sum of the k smallest *non-trivial* eigenvalues of the normalised Laplacian of the network's
weight graph (``A``: the adjacency of :func:`~cluster_tracking.graph.weight_graph`, ``D``: the
diagonal of its weighted degrees). By the Shi-Malik relaxation the n-cut of any partition
into ``k + 1`` clusters is at least ``sum_{i=1}^{k+1} lambda_i`` (``lambda_1 = 0``), and a graph
of ``k + 1`` disconnected clusters has ``lambda_1 = ... = lambda_{k+1} = 0``; pushing the sum down
pushes the network towards weights that spectral clustering can cut cheaply.

The penalty is a differentiable function of the live parameters: :class:`SpectralRegularizer`
traces the topology once (node ids of every weight tensor, the BatchNorm folded into it, residual
identifications) and at every call recomputes the edge weights from the parameters with torch
operations, so ``loss.backward()`` reaches every weight, and BatchNorm ``gamma``, that the graph
reads.

The pieces: :mod:`~cluster_tracking.promote.live_blocks` (edge matrices from the live
parameters), :mod:`~cluster_tracking.promote.operators` (the normalised adjacency, the dense
eigenvalues and the Hellmann-Feynman gradient), :mod:`~cluster_tracking.promote.krylov` (block
Krylov eigenpairs in torch) and :mod:`~cluster_tracking.promote.eigenpairs` (following them from
one evaluation to the next).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from cluster_tracking.errors import ConfigError, GraphError
from cluster_tracking.graph import WeightGraph, weight_graph
from cluster_tracking.graph.weights import unwrap_module
from cluster_tracking.promote.eigenpairs import TrackedEigenpairs
from cluster_tracking.promote.live_blocks import (
    active_nodes,
    compute_dtype,
    live_blocks,
    node_degrees,
)
from cluster_tracking.promote.operators import (
    NormalizedAdjacency,
    RitzEigenvalues,
    dense_eigenvalues,
    eigenvector_residuals,
)

Solver = Literal["auto", "dense", "iterative", "tracking"]

#: Graphs with at most this many nodes use the dense eigensolver under ``solver="auto"``; above
#: it the tracking solver is faster (dense is O(n^3) per call).
DENSE_MAX_NODES = 150
#: Default residual tolerance ``||L w - lambda w|| <= tol`` of the iterative eigensolver, by the
#: parameters' dtype (the solver works in it; float32 round-off allows little below 1e-4).
DEFAULT_TOL = {torch.float32: 1e-4, torch.float64: 1e-7}
#: Default residual tolerance of the tracking solver: a training step moves the eigenvectors
#: (Adam at lr 1e-3 on the paper's MLP: residuals of about 8e-4 at the previous step's exact
#: eigenvectors), and one operator application per step keeps them within this.
TRACKING_TOL = {torch.float32: 2e-3, torch.float64: 2e-3}


class SpectralRegularizer:
    """The spectral clusterability penalty of Filan et al. (2021), "Promoting clusterability".

    Calling the regulariser returns ::

        (weight / k) * sum_{i=2}^{k+1} lambda_i(L(W)),     L(W) = I - D^-1/2 A(W) D^-1/2,

    a scalar tensor differentiable in the model's parameters, to add to the training loss::

        reg = SpectralRegularizer(model, k=12, weight=0.1)
        loss = criterion(model(x), y) + reg()
        loss.backward()

    ``A(W)`` is the weight graph of :func:`~cluster_tracking.graph.weight_graph` (same nodes, same
    edges) computed from the live parameters: ``|W[j, i]|`` for a Linear layer, the L1 norm of the
    kernel slice ``W[b, a]`` for a convolution, the sum over a channel's flattened positions where a
    feature map is flattened into a Linear layer, a folded BatchNorm's
    ``|gamma_b| / sqrt(running_var_b + eps)`` on output unit b, and residual additions identifying
    the units they add. The topology is traced once, in ``__init__``; parameters may change freely
    afterwards (but not be replaced by tensors of another shape): build the regulariser after the
    model is on its final device.

    **Non-trivial eigenvalues.** ``lambda_1 = 0`` always, with eigenvector ``D^1/2 1`` (the constant
    direction); the sum skips exactly this first eigenvalue. A graph with ``c`` connected
    components has ``c`` zero eigenvalues; the other ``c - 1`` are counted (they are 0 and stay
    0 under small changes, so they add nothing to the value or the gradient). Nodes whose edges all
    weigh 0 are left out, as :func:`~cluster_tracking.spectral.partition.spectral_partition` leaves
    them out.

    **Gradients.** ``d|w|/dw = sign(w)``, taken as 0 at ``w = 0`` (a subgradient). The sum of the
    k smallest non-trivial eigenvalues is differentiable wherever ``lambda_{k+1} < lambda_{k+2}``,
    even where some of the summed eigenvalues coincide: the sum is the trace of ``L`` on the
    invariant subspace they span, which depends smoothly on ``W`` while that subspace stays
    separated from the rest of the spectrum. Three solvers compute it:

    * ``"dense"``: the dense normalised Laplacian is assembled in torch and
      ``torch.linalg.eigvalsh`` differentiates it (O(n^3) time; small graphs). Exact.
    * ``"iterative"``: the eigenvectors ``w_1..w_k`` are found without autograd by a warm-started
      block Krylov method with Rayleigh-Ritz restarts (for a layered, i.e. bipartite, graph on
      ``B^T B``, ``B = D_E^-1/2 A_EO D_O^-1/2`` the normalised cross block between the two sides
      of the graph, whose top singular values ``sigma`` give the eigenvalues ``1 - sigma``); the
      eigenvalues are their Rayleigh quotients ``w_i^T L w_i`` and the gradient is
      Hellmann-Feynman's ``d lambda_i = w_i^T dL(W) w_i`` with the eigenvectors held fixed, which
      is the exact gradient at exact eigenvectors (and basis-independent inside the summed
      subspace). One operator application costs one pass over every weight in each direction,
      with a block of ``k + max(4, k // 3)`` vectors; the previous call's eigenvectors start the
      next search, and every call iterates until each eigenvector's residual
      ``r_i = ||L w_i - lambda_i w_i||`` is at most ``tol`` (default 1e-4 in float32, 1e-7 in
      float64): about 3 applications per call when Adam moves the weights.
    * ``"tracking"``: the same eigenvectors, followed from call to call with one operator
      application per call. The previous call's Ritz vectors, advanced by one shifted power step
      (on a bipartite graph; on other graphs, the Ritz vectors and their residuals, a block Krylov
      step), span the subspace in which this call's Rayleigh-Ritz finds its vectors; the same
      application gives their residuals ``r_i``, and the result is accepted only if every
      ``r_i <= tol`` (default 2e-3). Otherwise (the weights moved further than one step
      follows: evaluations far apart under ``every_n_steps``, a large learning rate) a second
      application widens the subspace by the Ritz vectors' residuals (a block Krylov step, the
      first application's images reused), accepted on the same check. When that fails too (the
      first call, a large change of the weights) the call falls back to the iterative solve,
      from the tracked vectors to the iterative solver's default tolerance (or ``tol`` if
      smaller), so the fallback's result is as exact as ``"iterative"``'s.

    **Accuracy of the iterative and tracking solvers.** Their ``w_i`` are orthonormal and
    orthogonal to ``D^1/2 1``, and ``W^T L W`` is diagonal, so by Cauchy interlacing each returned
    eigenvalue is at least the exact one: the penalty is an upper bound of the exact penalty,
    above it by at most about ``sum_i r_i**2 / gap``, ``gap = lambda_{k+2} - lambda_{k+1}``. The
    subspace of the ``w_i`` is within an angle of about ``max_i r_i / gap`` of the exact
    eigenspace (Davis-Kahan), which bounds the gradient's relative error to that order. Measured
    on the paper's MLP (784-256-256-256-256-10) trained with Adam at lr 1e-3, against the dense
    solver in float64: ``"tracking"`` had residuals of 6e-4 to 1e-3 with one application per
    call, its eigenvalue sum was 5e-5 to 1.5e-4 above the exact one (1e-5 relative) and its
    gradient within 1 to 3 % (relative L2 norm) of the exact gradient; ``"iterative"`` (3
    applications per call) was within 3e-7 and 0.1 %. :attr:`last_residual` reports
    ``max_i r_i`` of every evaluation.

    ``"auto"`` takes ``"dense"`` up to ``dense_max_nodes`` nodes and ``"tracking"`` above.

    **Rescaling loophole.** For a ReLU unit, multiplying its incoming weights and bias by ``c > 0``
    and its outgoing weights by ``1 / c`` leaves the network's function unchanged but changes the
    weight graph, so a regularised run can lower the penalty without becoming any more modular.
    Call a :class:`~cluster_tracking.promote.normalization.ReLUWeightNormalizer` after each
    optimiser step to close that loophole.

    Args:
        model: the network (``nn.Module``; ``DataParallel``/``torch.compile`` wrappers are
            unwrapped). Its graph is traced as :func:`~cluster_tracking.graph.weight_graph` traces
            it.
        k: number of non-trivial eigenvalues summed (the paper uses 12).
        weight: the regularisation strength ``lambda`` (the penalty is ``lambda / k`` times the
            sum). Non-negative; 0 makes the penalty 0 but still computes it.
        every_n_steps: evaluate the penalty on every n-th call only (the first call included) and
            return a zero tensor, with no gradient, on the calls in between, to amortise its cost
            ("lazy regularisation"). An evaluation of an MLP costs a third to a half of a
            batch-128 training step on a CPU; 4 brings that to 0.07-0.23x on average (README,
            "Cost").
        rescale: with ``every_n_steps > 1``, multiply the evaluated penalty by ``every_n_steps``
            so that its average over calls, and the total push its gradient gives an SGD run,
            stay those of evaluating it every call (``True``, the default), or leave it as is so
            that its strength is divided by ``every_n_steps`` (``False``).
        solver: ``"auto"``, ``"dense"``, ``"iterative"`` or ``"tracking"`` (see above).
        dense_max_nodes: the largest graph ``"auto"`` solves densely.
        tol: residual tolerance ``max_i ||L w_i - lambda_i w_i||`` of the iterative or tracking
            solver. Iterative: default ``1e-4`` for float32 parameters and ``1e-7`` for float64
            ones (the solver works in the parameters' precision; where round-off stops the
            residuals from shrinking below tol, which float32 does for eigenvalues close to 1,
            the solver stops there, and warns only above 100 x tol). Tracking: default ``2e-3``
            (a warning when even the fallback solve ends above it); lower it for a more exact
            gradient at the price of more fallbacks.
        norm: kernel-slice norm for convolutions, ``"l1"`` (as the paper) or ``"l2"``.
        layers: as for :func:`~cluster_tracking.graph.weight_graph`: the Linear/Conv modules to
            use as a chain, for models that ``torch.fx`` cannot trace.
        seed: seed of the iterative solver's first start block.

    Attributes:
        graph: the :class:`~cluster_tracking.graph.WeightGraph` traced at construction.
        calls: number of calls so far.
        last_eigenvalues: the k non-trivial eigenvalues at the last evaluation (ascending, numpy),
            or ``None`` before the first.
        last_penalty: the penalty returned by the last evaluation, as a float.
        last_solver_applies: operator applications (each one pass over every weight in each
            direction, with ``k + max(4, k // 3)`` vectors, twice as many on a non-bipartite
            graph under ``"tracking"``) that the last evaluation used: 1 for a tracking step that
            was accepted, 2 when it needed the widening step, more for a fallback or an iterative
            solve.
        last_residual: the largest eigenvector residual ``||L w_i - lambda_i w_i||`` of the last
            evaluation (iterative and tracking solvers; ``None`` for the dense one).

    Raises:
        GraphError: the model cannot become a weight graph, or a layer of the graph is not a
            parameter of the model.
        ConfigError: an argument is out of range (``k`` must leave at least one eigenvalue above
            the k+1 smallest).
    """

    def __init__(
        self,
        model: nn.Module,
        k: int = 12,
        weight: float = 0.1,
        *,
        every_n_steps: int = 1,
        rescale: bool = True,
        solver: Solver = "auto",
        dense_max_nodes: int = DENSE_MAX_NODES,
        tol: float | None = None,
        norm: Literal["l1", "l2"] = "l1",
        layers: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise GraphError(
                f"SpectralRegularizer needs the nn.Module being trained, got "
                f"{type(model).__name__}; pass the model itself (not its state_dict)."
            )
        self.k = _check_int(k, "k", minimum=1)
        self.weight = _check_weight(weight)
        self.every_n_steps = _check_int(every_n_steps, "every_n_steps", minimum=1)
        self.rescale = bool(rescale)
        if solver not in ("auto", "dense", "iterative", "tracking"):
            raise ConfigError(
                f"solver must be 'auto', 'dense', 'iterative' or 'tracking', got {solver!r}."
            )
        self.dense_max_nodes = _check_int(dense_max_nodes, "dense_max_nodes", minimum=0)
        if tol is not None and not (
            isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0
        ):
            raise ConfigError(f"tol must be a positive number or None, got {tol!r}; e.g. 1e-6.")
        self.tol = None if tol is None else float(tol)
        self.model = unwrap_module(model)
        self.graph: WeightGraph = weight_graph(self.model, norm=norm, layers=layers)
        if self.k + 2 > self.graph.n_nodes:
            raise ConfigError(
                f"k={self.k} needs a graph of at least k + 2 = {self.k + 2} nodes (the trivial "
                f"eigenvalue, k summed ones and one beyond them), but the model's weight graph "
                f"has {self.graph.n_nodes}; use k <= {max(self.graph.n_nodes - 2, 0)}."
            )
        # the iterative solvers number the nodes of a layered graph side O first
        live = live_blocks(self.model, self.graph, self.k)
        self._blocks, self._side_blocks, self._n_odd = live.blocks, live.side_blocks, live.n_odd
        self._solver: Literal["dense", "iterative", "tracking"]
        if solver == "auto":
            self._solver = "dense" if self.graph.n_nodes <= self.dense_max_nodes else "tracking"
        else:
            self._solver = solver
        self._eigenpairs = TrackedEigenpairs(
            "iterative" if self._solver == "iterative" else "tracking", int(seed)
        )
        self.calls = 0
        self.last_eigenvalues: np.ndarray | None = None
        self.last_penalty: float | None = None
        self.last_solver_applies = 0

    @property
    def last_residual(self) -> float | None:
        """The largest eigenvector residual ``||L w_i - lambda_i w_i||`` of the last iterative or
        tracking evaluation (``None`` before one, and for the dense solver)."""
        residuals = self._eigenpairs.residuals
        if residuals is None or self._solver == "dense":
            return None
        return float(eigenvector_residuals(*residuals).max())

    @property
    def solver(self) -> Literal["dense", "iterative", "tracking"]:
        """The solver in use (``"auto"`` resolved)."""
        return self._solver

    def __call__(self) -> torch.Tensor:
        """The penalty ``(weight / k) * sum_{i=2}^{k+1} lambda_i``, a differentiable scalar.

        On the calls that ``every_n_steps`` skips, a zero scalar without gradient.
        """
        step = self.calls
        self.calls += 1
        if step % self.every_n_steps:
            reference = self._blocks[0].weight
            return torch.zeros((), dtype=compute_dtype(reference), device=reference.device)
        factor = self.weight / self.k
        if self.rescale:
            factor *= self.every_n_steps
        penalty = factor * self.eigenvalue_sum()
        self.last_penalty = float(penalty.detach())
        return penalty

    def eigenvalue_sum(self) -> torch.Tensor:
        """``sum_{i=2}^{k+1} lambda_i(L(W))`` at the current parameters, differentiable.

        Also stores the k eigenvalues in :attr:`last_eigenvalues`.
        """
        if self._solver == "dense":
            edges = [block.edges() for block in self._blocks]
            degrees = node_degrees(self._blocks, edges, self.graph.n_nodes)
            values = dense_eigenvalues(self._blocks, edges, degrees, self.k)
        else:
            values = self._iterative_eigenvalues()
        self.last_eigenvalues = values.detach().cpu().numpy().astype(np.float64)
        return values.sum()

    def eigenvalues(self) -> np.ndarray:
        """The k smallest non-trivial eigenvalues at the current parameters (ascending, no grad)."""
        with torch.no_grad():
            self.eigenvalue_sum()
        assert self.last_eigenvalues is not None
        return self.last_eigenvalues

    # -- iterative and tracking ----------------------------------------------------------------

    def _iterative_eigenvalues(self) -> torch.Tensor:
        # A plain Linear layer's weight enters the autograd function itself, which forms |W| and
        # the gradient's sign(W) factor in place (autograd's abs would cost two more passes over
        # every weight); the other blocks enter as their differentiable edge matrices.
        inputs = [block.weight if block.plain else block.edges() for block in self._blocks]
        with torch.no_grad():
            edges = [
                tensor.detach().abs() if block.plain else tensor.detach()
                for block, tensor in zip(self._blocks, inputs, strict=True)
            ]
            degrees = node_degrees(self._blocks, edges, self.graph.n_nodes)
            active, n_active = active_nodes(degrees, self.k)
            fixed = NormalizedAdjacency(
                edges, self._blocks, self._side_blocks, degrees, active, n_active, self._n_odd
            )
            tol = self._tol(fixed.trivial.dtype)
            # tracking refines to the iterative tolerance, leaving room to drift before the next
            solve_tol = (
                tol if self._solver == "iterative" else min(tol, DEFAULT_TOL[fixed.trivial.dtype])
            )
            vectors, top = self._eigenpairs.solve(fixed, self.k, tol, solve_tol)  # N w_i = mu_i w_i
            self.last_solver_applies = self._eigenpairs.applications
            inv_degree = fixed.inv_sqrt_degree.square()  # 1 / d, 0 on inactive nodes
        values = 1.0 - top  # lambda_i = 1 - mu_i
        return RitzEigenvalues.apply(values, vectors, inv_degree, self._blocks, *inputs)

    def _tol(self, dtype: torch.dtype) -> float:
        """The residual tolerance in force for the iterative or tracking solver."""
        if self.tol is not None:
            return self.tol
        return (TRACKING_TOL if self._solver == "tracking" else DEFAULT_TOL)[dtype]


def _check_int(value: object, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_weight(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ConfigError(f"weight must be a number, got {value!r}; e.g. weight=0.1.")
    if not math.isfinite(float(value)) or float(value) < 0:
        raise ConfigError(
            f"weight must be finite and >= 0, got {value!r}; a negative weight would make the "
            "network less clusterable."
        )
    return float(value)
