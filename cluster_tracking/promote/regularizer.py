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
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from cluster_tracking.errors import ConfigError, GraphError
from cluster_tracking.graph import EdgeBlock, WeightGraph, layer_weight, weight_graph
from cluster_tracking.graph.weights import unwrap_module
from cluster_tracking.spectral.adjacency import bipartition

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
#: A solve whose residuals stop shrinking (float32 round-off, for eigenvalues near 1) is accepted
#: without a warning while they stay within this many times their tolerance.
_ACCEPTED_STALL = 100.0


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
    optimiser step
    to close that loophole.

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
        # the iterative solvers number the nodes of a layered graph side O first (see _Operator)
        sides = _block_sides(self.graph, min_side=_block_size(self.k, self.graph.n_nodes) + 1)
        position = None
        self._n_odd: int | None = None
        if sides is not None:
            position = np.empty(len(sides), dtype=np.int64)
            position[np.argsort(~sides, kind="stable")] = np.arange(len(sides))
            self._n_odd = int(sides.sum())
        self._blocks = [
            _live_block(self.model, block, position, sides) for block in self.graph.blocks
        ]
        self._side_blocks = None
        if self._n_odd is not None:
            self._side_blocks = [_side_local(block, self._n_odd) for block in self._blocks]
        self._solver: Literal["dense", "iterative", "tracking"]
        if solver == "auto":
            self._solver = "dense" if self.graph.n_nodes <= self.dense_max_nodes else "tracking"
        else:
            self._solver = solver
        self._generator_seed = int(seed)
        # warm start, rows [b, n]: the last call's Ritz vectors (iterative) or the block the
        # next tracking step starts from
        self._state: torch.Tensor | None = None
        self.calls = 0
        self.last_eigenvalues: np.ndarray | None = None
        self.last_penalty: float | None = None
        self.last_solver_applies = 0
        self._residuals: tuple[torch.Tensor, torch.Tensor, bool] | None = None

    @property
    def last_residual(self) -> float | None:
        """The largest eigenvector residual ``||L w_i - lambda_i w_i||`` of the last iterative or
        tracking evaluation (``None`` before one, and for the dense solver)."""
        if self._residuals is None or self._solver == "dense":
            return None
        return float(_eigenvector_residuals(*self._residuals).max())

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
            return torch.zeros((), dtype=_compute_dtype(reference), device=reference.device)
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
            values = self._dense_eigenvalues(
                edges, _degrees(self._blocks, edges, self.graph.n_nodes)
            )
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

    # -- dense ---------------------------------------------------------------------------------

    def _dense_eigenvalues(self, edges: list[torch.Tensor], degrees: torch.Tensor) -> torch.Tensor:
        n = self.graph.n_nodes
        adjacency = degrees.new_zeros((n, n))
        for block, edge in zip(self._blocks, edges, strict=True):
            rows = block.dst[:, None].expand_as(edge)
            cols = block.src[None, :].expand_as(edge)
            adjacency = adjacency.index_put((rows, cols), edge, accumulate=True)
        adjacency = adjacency + adjacency.T  # A[dst, src] = A[src, dst] = w
        active, _ = _active_nodes(degrees, self.k)
        adjacency = adjacency[active][:, active]
        inv_sqrt_degree = degrees[active].rsqrt()
        # L = I - D^-1/2 A D^-1/2
        laplacian = (
            torch.eye(len(inv_sqrt_degree), dtype=adjacency.dtype, device=adjacency.device)
            - inv_sqrt_degree[:, None] * adjacency * inv_sqrt_degree[None, :]
        )
        spectrum = torch.linalg.eigvalsh(laplacian)  # ascending; spectrum[0] = 0
        return spectrum[1 : self.k + 1]

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
            degrees = _degrees(self._blocks, edges, self.graph.n_nodes)
            active, n_active = _active_nodes(degrees, self.k)
            fixed = _Operator(
                edges, self._blocks, self._side_blocks, degrees, active, n_active, self._n_odd
            )
            vectors, top = self._eigenvectors(fixed)  # N w_i = mu_i w_i, rows
            inv_degree = fixed.inv_sqrt_degree.square()  # 1 / d, 0 on inactive nodes
        values = 1.0 - top  # lambda_i = 1 - mu_i
        return _RitzEigenvalues.apply(values, vectors, inv_degree, self._blocks, *inputs)

    def _eigenvectors(self, operator: _Operator) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit eigenvectors ``[k, n]`` (rows) of the k smallest non-trivial eigenvalues of L and
        the matching (largest non-trivial) eigenvalues of N; records the operator applications
        and the residuals."""
        k = self.k
        block_size = _block_size(k, operator.space_size)
        if block_size < k + 1:
            raise GraphError(
                f"The weight graph has only {operator.n_active} nodes with edges, too few for "
                f"k={k} with the {self._solver} solver; use solver='dense' or a smaller k."
            )
        dtype = operator.trivial.dtype
        tol = self._tol(dtype)

        def thresholds_at(tolerance: float) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda theta: operator.residual_thresholds(theta, tolerance)

        state = self._state
        if state is not None and (state.shape[1] != operator.n_space or state.dtype != dtype):
            state = None  # the graph or the dtype changed: start afresh
        found: _Eigenpairs | None = None
        applications = 0
        if self._solver == "tracking" and state is not None:
            found = _tracking_step(operator, state, block_size, k, thresholds_at(tol))
            if not found.converged:  # drifted: widen the subspace by the residuals, once
                found = _extension_step(operator, found, block_size, k, thresholds_at(tol))
            applications = found.applications
            if not found.converged:  # drifted too far: solve from the tracked Ritz vectors
                state, found = found.vectors, None
        if found is None:
            cold = state is None
            if state is None:
                generator = torch.Generator().manual_seed(self._generator_seed)
                state = torch.rand((block_size, operator.n_space), generator=generator, dtype=dtype)
                state = (state - 0.5).to(operator.trivial.device)
            # tracking refines to the iterative tolerance, leaving room to drift before the next
            solve_tol = tol if self._solver == "iterative" else min(tol, DEFAULT_TOL[dtype])
            found = _top_eigenpairs(
                operator.apply,
                operator.restrict(state[:block_size]),
                operator.trivial,
                k,
                thresholds_at(solve_tol),
                max_restarts=300 if cold else 100,
            )
            applications += found.applications
            accepted = found.worst <= _ACCEPTED_STALL  # (within it: stalled at round-off)
            if self._solver == "tracking":
                accepted = bool(
                    (found.residual[:k] <= operator.residual_thresholds(found.theta[:k], tol)).all()
                )
            if not accepted:
                warnings.warn(
                    f"SpectralRegularizer: the {self._solver} eigensolver stopped with "
                    f"eigenvector residuals above tol={tol:g}, so the penalty and its gradient "
                    "are approximate. Pass a larger tol, float64 parameters, or solver='dense' "
                    "for a small network.",
                    RuntimeWarning,
                    stacklevel=5,
                )
        if self._solver == "tracking":
            self._state = _next_tracking_block(found, operator.bipartite)
        else:
            self._state = found.vectors
        self.last_solver_applies = applications
        self._residuals = (found.theta[:k], found.residual[:k], operator.bipartite)
        return operator.eigenpairs(found, k)

    def _tol(self, dtype: torch.dtype) -> float:
        """The residual tolerance in force for the iterative or tracking solver."""
        if self.tol is not None:
            return self.tol
        return (TRACKING_TOL if self._solver == "tracking" else DEFAULT_TOL)[dtype]


# ---------------------------------------------------------------------------------------------
# Live blocks: the edge weights of one EdgeBlock, recomputed from the model's parameters
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LiveBlock:
    """An :class:`~cluster_tracking.graph.EdgeBlock` bound to the model's live tensors."""

    block: EdgeBlock
    weight: torch.Tensor  # the layer's weight parameter, torch layout
    batchnorm: nn.Module | None  # the BatchNorm folded into it
    src: torch.Tensor  # [n_in] node ids (int64)
    dst: torch.Tensor  # [n_out]
    src_range: slice | None  # src as a slice, when its node ids are consecutive (the usual case)
    dst_range: slice | None
    group_rows: torch.Tensor | None  # grouped conv: [out, in / groups] indices into [out, in]
    group_cols: torch.Tensor | None
    keep: torch.Tensor | None  # [out, in] False at self-loops (residual-identified src == dst)
    src_odd: bool = False  # bipartite graphs: whether the input nodes are on side O
    # a Linear layer without BatchNorm or self-loops, in float32/64: its edges are E = |W|
    plain: bool = False

    def edges(self) -> torch.Tensor:
        """Edge weights ``[n_out, n_in]`` between output and input nodes, differentiable."""
        block = self.block
        weight = self.weight.to(_compute_dtype(self.weight))
        if self.batchnorm is not None:
            scale = _batchnorm_scale(self.batchnorm, weight.dtype)
            weight = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        n_out, n_in = len(block.dst), len(block.src)
        if block.kind == "linear":
            edges = weight.abs()  # |W[j, i]|; d|w|/dw = sign(w), 0 at w = 0
        elif block.kind == "flatten":
            # channel c feeds the S flattened inputs c * S .. c * S + S - 1
            edges = weight.abs().reshape(n_out, n_in, -1).sum(dim=2)
        else:
            slices = weight.flatten(start_dim=2)  # [out, in / groups, kernel positions]
            if block.norm == "l2":
                per_slice = torch.linalg.vector_norm(slices, dim=2)
            else:
                per_slice = slices.abs().sum(dim=2)  # sum |W[b, a, ...]|
            if self.group_rows is None or self.group_cols is None:
                edges = per_slice
            else:
                edges = per_slice.new_zeros((n_out, n_in)).index_put(
                    (self.group_rows, self.group_cols), per_slice
                )
        if self.keep is not None:
            edges = edges * self.keep
        return edges

    def at_src(self, nodes: torch.Tensor) -> torch.Tensor:
        """The entries of a ``[..., n_nodes]`` tensor (last axis: nodes) for the input nodes."""
        if self.src_range is not None:
            return nodes[..., self.src_range]
        return nodes.index_select(-1, self.src)

    def at_dst(self, nodes: torch.Tensor) -> torch.Tensor:
        """The entries of a ``[..., n_nodes]`` tensor (last axis: nodes) for the output nodes."""
        if self.dst_range is not None:
            return nodes[..., self.dst_range]
        return nodes.index_select(-1, self.dst)

    def add_at_src(self, nodes: torch.Tensor, values: torch.Tensor) -> None:
        """``nodes[..., src] += values`` in place, summing repeated node ids."""
        if self.src_range is not None:
            nodes[..., self.src_range].add_(values)
        else:
            nodes.index_add_(-1, self.src, values)

    def add_at_dst(self, nodes: torch.Tensor, values: torch.Tensor) -> None:
        """``nodes[..., dst] += values`` in place, summing repeated node ids."""
        if self.dst_range is not None:
            nodes[..., self.dst_range].add_(values)
        else:
            nodes.index_add_(-1, self.dst, values)

    def addmm_at_src(self, rows: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
        """``rows[:, src] += left @ right`` in place (a ``[m, n_nodes]`` block of rows)."""
        if self.src_range is not None:
            rows[:, self.src_range].addmm_(left, right)
        else:
            rows.index_add_(1, self.src, left @ right)

    def addmm_at_dst(self, rows: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
        """``rows[:, dst] += left @ right`` in place (a ``[m, n_nodes]`` block of rows)."""
        if self.dst_range is not None:
            rows[:, self.dst_range].addmm_(left, right)
        else:
            rows.index_add_(1, self.dst, left @ right)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 or float64: half-precision weights are promoted for the eigenproblem."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _batchnorm_scale(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``|gamma| / sqrt(running_var + eps)`` per channel (``|gamma|`` without running stats)."""
    gamma: torch.Tensor | None = module.weight if isinstance(module.weight, torch.Tensor) else None
    running_var = module.running_var
    if gamma is not None:
        scale = gamma.to(dtype).abs()
    else:
        assert isinstance(running_var, torch.Tensor)  # a BatchNorm has gamma or running stats
        scale = torch.ones(running_var.shape, dtype=dtype, device=running_var.device)
    if isinstance(running_var, torch.Tensor):
        scale = scale / torch.sqrt(running_var.to(dtype) + float(module.eps))  # type: ignore[arg-type]
    return scale


def _live_block(
    model: nn.Module, block: EdgeBlock, position: np.ndarray | None, sides: np.ndarray | None
) -> _LiveBlock:
    """``block`` bound to the model's tensors, its nodes renumbered by ``position`` (if given);
    ``sides``: the bipartite sides, True for side O (in the graph's numbering)."""
    weight = layer_weight(model, block)
    device = weight.device
    batchnorm = None
    if block.batchnorm is not None:
        batchnorm = model.get_submodule(block.batchnorm)
    src_nodes = block.src if position is None else position[block.src]
    dst_nodes = block.dst if position is None else position[block.dst]
    src = torch.as_tensor(src_nodes, dtype=torch.int64, device=device)
    dst = torch.as_tensor(dst_nodes, dtype=torch.int64, device=device)
    group_rows = group_cols = None
    if block.kind == "conv" and block.groups > 1:
        rows, cols = block._group_pattern()
        group_rows = torch.as_tensor(np.ascontiguousarray(rows), device=device)
        group_cols = torch.as_tensor(cols, device=device)
    self_loops = block.dst[:, None] == block.src[None, :]
    keep = None
    if self_loops.any():
        keep = torch.as_tensor(~self_loops, device=device)
    return _LiveBlock(
        block,
        weight,
        batchnorm,
        src,
        dst,
        _as_range(src_nodes),
        _as_range(dst_nodes),
        group_rows,
        group_cols,
        keep,
        src_odd=sides is not None and bool(sides[block.src[0]]),
        plain=block.kind == "linear"
        and batchnorm is None
        and keep is None
        and weight.dtype in (torch.float32, torch.float64),
    )


def _side_local(block: _LiveBlock, n_odd: int) -> _LiveBlock:
    """``block`` with its input and output nodes numbered within their own side (side O holds
    nodes ``0 .. n_odd - 1``, side E the rest), for the bipartite operator's vectors."""
    src_shift, dst_shift = (0, n_odd) if block.src_odd else (n_odd, 0)
    return replace(
        block,
        src=block.src - src_shift,
        dst=block.dst - dst_shift,
        src_range=_shifted(block.src_range, src_shift),
        dst_range=_shifted(block.dst_range, dst_shift),
    )


def _shifted(nodes: slice | None, shift: int) -> slice | None:
    return None if nodes is None else slice(nodes.start - shift, nodes.stop - shift)


def _as_range(nodes: np.ndarray) -> slice | None:
    """``slice(a, b)`` when ``nodes`` is ``a, a + 1, ..., b - 1``; else None."""
    if len(nodes) and np.array_equal(nodes, np.arange(nodes[0], nodes[0] + len(nodes))):
        return slice(int(nodes[0]), int(nodes[0]) + len(nodes))
    return None


def _degrees(blocks: Sequence[_LiveBlock], edges: Sequence[torch.Tensor], n: int) -> torch.Tensor:
    """Weighted degree of every node: ``d = A 1``, each edge counted at both of its ends."""
    degrees = edges[0].new_zeros(n)
    for block, edge in zip(blocks, edges, strict=True):
        block.add_at_dst(degrees, edge.sum(dim=1))  # d_j += sum_i E[j, i]
        block.add_at_src(degrees, edge.sum(dim=0))  # d_i += sum_j E[j, i]
    return degrees


def _active_nodes(degrees: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """Nodes with at least one edge of non-zero weight (the others are left out), and how many."""
    active = degrees.detach() > 0
    n_active = int(active.sum())
    if n_active < k + 2:
        raise GraphError(
            f"Only {n_active} nodes of the weight graph have edges of non-zero weight, too few "
            f"for the k={k} smallest non-trivial eigenvalues; use a smaller k (the weights may "
            "have collapsed to zero: lower the regulariser's weight)."
        )
    return active, n_active


def _block_sides(graph: WeightGraph, min_side: int) -> np.ndarray | None:
    """For a bipartite (layered) graph, True for the nodes of side O, on which the iterative
    solvers work: the smaller side, unless it has fewer than ``min_side`` nodes; else None.

    Each block must read all its inputs from one side and write all its outputs to the other,
    as in a chain of layers without residual connections.
    """
    structure = graph.with_weights([np.ones_like(w) for w in graph.weights()]).adjacency
    sides = bipartition(structure)
    if sides is None:
        return None
    for block in graph.blocks:
        src_side = sides[block.src]
        dst_side = sides[block.dst]
        if src_side.min() != src_side.max() or dst_side.min() != dst_side.max():
            return None
        if src_side[0] == dst_side[0]:
            return None
    smaller = sides if 2 * int(sides.sum()) <= len(sides) else ~sides
    return smaller if int(smaller.sum()) >= min_side else ~smaller


def _block_size(k: int, size: int) -> int:
    """Vectors in the solvers' block: k and a few more, which speed convergence."""
    return min(k + max(4, k // 3), size - 1)


# ---------------------------------------------------------------------------------------------
# The iterative eigensolver and the tracking step. Blocks of vectors are rows: ``[m, n_nodes]``
# (a row-major block makes the products with the ``[n_out, n_in]`` edge matrices about 1.5 times
# faster on a CPU than column blocks do).
# ---------------------------------------------------------------------------------------------


class _RitzEigenvalues(torch.autograd.Function):
    """Laplacian eigenvalues ``lambda_i = 1 - mu_i`` from unit eigenvectors ``w_i`` of
    ``N = D^-1/2 A D^-1/2`` (``N w_i = mu_i w_i``) found without autograd, differentiable in the
    blocks' edge matrices by Hellmann-Feynman, ``d lambda = w^T dL w = -w^T dN w``. An edge entry
    ``E[j, a]`` (output node j, input node a) enters ``A[j, a] = A[a, j]`` and the degrees
    ``d_j``, ``d_a``, so with ``y = D^-1/2 w``::

        d lambda_i / d E[j, a] = -2 y_j y_a + h_j + h_a,     h_n = mu_i w_n^2 / d_n.

    Forward returns ``lambda`` (shape ``[k]``; ``vectors`` is ``[k, n]``, one eigenvector per
    row). Backward forms this gradient, weighted by the incoming gradient ``g``, for every block
    as one product of rank ``k + 2``: ``G = L_dst^T R_src`` with the rows
    ``L = [-2 g_i y_i; h; 1]`` and ``R = [y_i; 1; h]`` (``h`` summed over i with weights g_i).
    A block's input is its edge matrix, or for a plain Linear layer (:attr:`_LiveBlock.plain`)
    its weight W itself, ``E = |W|``, whose gradient ``sign(W) * G`` is formed in place.
    """

    @staticmethod
    def forward(
        ctx: Any,
        values: torch.Tensor,
        vectors: torch.Tensor,
        inv_degree: torch.Tensor,
        blocks: Sequence[_LiveBlock],
        *inputs: torch.Tensor,
    ) -> torch.Tensor:
        ctx.blocks = blocks
        plain = [tensor for block, tensor in zip(blocks, inputs, strict=True) if block.plain]
        ctx.save_for_backward(values, vectors, inv_degree, *plain)
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        values, vectors, inv_degree, *plain = ctx.saved_tensors
        scaled = vectors * inv_degree.sqrt()  # y = D^-1/2 w, [k, n]
        # h_n = sum_i g_i mu_i w_in^2 / d_n, mu_i = 1 - lambda_i
        node_terms = ((grad * (1.0 - values)) @ vectors.square()) * inv_degree
        ones = torch.ones_like(node_terms)
        left = torch.cat([scaled * (-2.0 * grad)[:, None], node_terms[None], ones[None]])
        right = torch.cat([scaled, ones[None], node_terms[None]])
        grads: list[torch.Tensor | None] = [None, None, None, None]
        weights = iter(plain)
        for index, block in enumerate(ctx.blocks):
            weight = next(weights) if block.plain else None
            if not ctx.needs_input_grad[4 + index]:
                grads.append(None)
                continue
            # -2 sum_i g_i y_ij y_ia + h_j + h_a, for every entry (j, a) at once
            edge_grad = block.at_dst(left).T @ block.at_src(right)
            if weight is not None:
                edge_grad.mul_(weight.sign())  # d|w|/dw = sign(w), 0 at w = 0
            elif block.keep is not None:
                edge_grad = edge_grad * block.keep
            grads.append(edge_grad)
        return tuple(grads)


class _Operator:
    """``N = D^-1/2 A D^-1/2`` from the blocks' edge matrices, for the Krylov solver.

    General graphs: the solver works on N over all nodes (inactive ones masked), wanting its top
    eigenvalues ``1 - lambda``. Bipartite graphs (sides O and E, numbered O first): on
    ``C = B^T B`` over side O only, with ``B = D_E^-1/2 A_EO D_O^-1/2``; its eigenvalues are
    ``sigma^2`` for the singular values sigma of B, and ``[v; B v / sigma] / sqrt 2`` is an
    eigenvector of N with eigenvalue sigma, so the k + 1 largest sigma give the k + 1 smallest
    Laplacian eigenvalues ``1 - sigma``. Working on ``B^T B`` makes the wanted end of the spectrum
    better separated (gaps in ``sigma^2``), it is positive semi-definite, so a shifted power step
    converges on it (:func:`_next_tracking_block`), and its vectors are only as long as side O
    (the smaller side, when it is large enough for the block). Either operator costs one pass
    over every edge matrix in each direction per application.
    """

    def __init__(
        self,
        edges: list[torch.Tensor],
        blocks: Sequence[_LiveBlock],
        side_blocks: Sequence[_LiveBlock] | None,
        degrees: torch.Tensor,
        active: torch.Tensor,
        n_active: int,
        n_odd: int | None,
    ) -> None:
        self.edges = edges
        self.blocks = blocks
        self.n = len(degrees)
        self.n_active = n_active
        everywhere = n_active == self.n  # (the usual case: saves the masking)
        self.inv_sqrt_degree = degrees.rsqrt()
        if not everywhere:
            self.inv_sqrt_degree.masked_fill_(~active, 0.0)  # 0 on inactive nodes
        self.n_odd = self.n
        self.side_blocks: Sequence[_LiveBlock] | None = None
        if n_odd is not None and side_blocks is not None:
            odd_active = n_odd if everywhere else int(active[:n_odd].sum())
            if odd_active >= 2 and n_active - odd_active >= 2:
                self.n_odd, self.side_blocks = n_odd, side_blocks
        self.bipartite = self.side_blocks is not None
        self.n_space = self.n_odd  # the length of the operator's vectors: side O, or all nodes
        # the operator's active nodes (None: all of them), and their number
        self.space = None if everywhere else active[: self.n_space].to(degrees.dtype)
        trivial = degrees[: self.n_space].sqrt()  # D^1/2 1: N's eigenvector of eigenvalue 1
        if self.space is not None:
            trivial = trivial * self.space
        self.trivial = (trivial / trivial.norm())[None, :]  # [1, n_space]
        self.space_size = self.n_space if self.space is None else int(self.space.sum())

    def restrict(self, vectors: torch.Tensor) -> torch.Tensor:
        """Row vectors restricted to the operator's active nodes."""
        return vectors if self.space is None else vectors * self.space

    def apply(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The operator whose top eigenvectors the solver finds, on row vectors ``[m, n_space]``:
        ``(N X, None)``, or for a bipartite graph ``(B^T B X, B X)`` (``B X``: ``[m, n_E]``)."""
        scale = self.inv_sqrt_degree
        if self.side_blocks is None:
            out = torch.zeros_like(vectors)
            scaled = vectors * scale
            for block, edge in zip(self.blocks, self.edges, strict=True):
                block.addmm_at_dst(out, block.at_src(scaled), edge.T)  # A[dst, src] x[src]
                block.addmm_at_src(out, block.at_dst(scaled), edge)  # A[src, dst] x[dst]
            return out * scale, None
        odd_scale, even_scale = scale[: self.n_odd], scale[self.n_odd :]
        scaled = vectors * odd_scale
        even = vectors.new_zeros((len(vectors), self.n - self.n_odd))
        for block, edge in zip(self.side_blocks, self.edges, strict=True):  # A_EO D_O^-1/2 X
            if block.src_odd:
                block.addmm_at_dst(even, block.at_src(scaled), edge.T)
            else:
                block.addmm_at_src(even, block.at_dst(scaled), edge)
        even *= even_scale  # B X
        scaled = even * even_scale
        odd = torch.zeros_like(vectors)
        for block, edge in zip(self.side_blocks, self.edges, strict=True):  # A_OE D_E^-1 B X
            if block.src_odd:
                block.addmm_at_src(odd, block.at_dst(scaled), edge)
            else:
                block.addmm_at_dst(odd, block.at_src(scaled), edge.T)
        return odd * odd_scale, even

    def residual_thresholds(self, theta: torch.Tensor, tol: float) -> torch.Tensor:
        """Operator residuals that mean ``||N w - (1 - lambda) w|| <= tol`` for the eigenvectors.

        Bipartite: for ``w = [v; B v / sigma] / sqrt 2``, ``||N w - sigma w|| = ||C v - sigma^2
        v|| / (sigma sqrt 2)``. Never below 50 units of round-off, which no
        eigenvector can beat (for a small sigma, the guarantee on ``w`` loosens accordingly).
        """
        floor = 50.0 * torch.finfo(theta.dtype).eps
        if not self.bipartite:
            return torch.full_like(theta, max(tol, floor))
        return (tol * math.sqrt(2.0) * theta.clamp_min(0.0).sqrt()).clamp_min(floor)

    def eigenpairs(self, found: _Eigenpairs, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit eigenvectors ``w`` of N over all nodes, ``[count, n]``, and their eigenvalues
        ``mu``, from the operator's top ``count`` eigenpairs."""
        ritz = found.vectors[:count]
        if found.side is None:
            return ritz, found.theta[:count]
        sigma = found.theta[:count].clamp_min(0.0).sqrt()
        # sigma = 0: v alone is an eigenvector of N (eigenvalue 0)
        inverse = torch.where(sigma > 1e-12, sigma.reciprocal(), 0.0)
        vectors = torch.cat([ritz, found.side[:count] * inverse[:, None]], dim=1)  # [v; B v / s]
        return vectors / vectors.norm(dim=1, keepdim=True), sigma  # (norm >= |v| = 1)


def _eigenvector_residuals(
    theta: torch.Tensor, residual: torch.Tensor, bipartite: bool
) -> torch.Tensor:
    """``||N w - mu w||`` of the eigenvectors of N made from Ritz pairs of the operator
    (``theta``, operator residuals ``residual``; see :meth:`_Operator.residual_thresholds`)."""
    if not bipartite:
        return residual
    sigma = theta.clamp_min(0.0).sqrt()
    return residual / (math.sqrt(2.0) * sigma).clamp_min(torch.finfo(theta.dtype).tiny)


def _orthonormal_extension(
    candidates: torch.Tensor, basis: torch.Tensor, deflate: torch.Tensor
) -> torch.Tensor:
    """Orthonormal rows spanning what the rows of ``candidates`` add to those of ``basis``, kept
    orthogonal to ``deflate``: Gram-Schmidt against both, repeated (CGS2), then QR; directions
    already in the basis (an exhausted Krylov space, on a small graph) are dropped through an
    SVD."""
    scale = float(candidates.norm(dim=1).max()) if candidates.shape[0] else 0.0
    for _ in range(2):
        candidates = candidates - (candidates @ deflate.T) @ deflate
        if basis.shape[0]:
            candidates = candidates - (candidates @ basis.T) @ basis
    if candidates.shape[0] == 0 or scale == 0.0:
        return candidates[:0]
    new, triangle = torch.linalg.qr(candidates.T)
    floor = 1e-10 * scale if candidates.dtype == torch.float64 else 1e-5 * scale
    if bool((triangle.diagonal().abs() > floor).all()):
        return new.T
    left, singular, _ = torch.linalg.svd(candidates.T, full_matrices=False)
    new = left[:, singular > floor].T
    if new.shape[0]:  # directions this small need one more pass to be orthogonal to the basis
        new = new - (new @ deflate.T) @ deflate
        if basis.shape[0]:
            new = new - (new @ basis.T) @ basis
        new = torch.linalg.qr(new.T)[0].T
    return new


@dataclass(frozen=True)
class _Eigenpairs:
    """What :func:`_top_eigenpairs` or :func:`_tracking_step` found (blocks of rows)."""

    theta: torch.Tensor  # Ritz values, descending, [b]
    vectors: torch.Tensor  # Ritz vectors, [b, n]
    images: torch.Tensor  # the operator applied to them, [b, n]
    side: torch.Tensor | None  # the operator's side output for the Ritz vectors (B x), [b, n]
    residual: torch.Tensor  # operator residual norms ||A x - theta x||, [b]
    converged: bool  # every wanted residual under its threshold
    worst: float  # the largest residual / threshold ratio among the wanted pairs
    applications: int  # operator applications used


def _top_eigenpairs(
    apply: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
    start: torch.Tensor,
    deflate: torch.Tensor,
    n_wanted: int,
    thresholds: Callable[[torch.Tensor], torch.Tensor],
    *,
    depth: int = 2,
    max_restarts: int = 100,
) -> _Eigenpairs:
    """Top eigenpairs of a symmetric operator A, orthogonal to ``deflate``, by block Krylov
    subspaces ``span[X, AX, ..., A^depth X]`` with Rayleigh-Ritz, restarted from the top
    ``b = len(start)`` Ritz vectors until the first ``n_wanted`` residuals ``||A x - theta x||``
    are under ``thresholds(theta)``. Vectors are rows. ``apply(X)`` returns ``A X`` and an
    optional linear side output (e.g. ``B X`` when ``A = B^T B``), carried along to the Ritz
    vectors so that nothing needs applying again afterwards.
    """
    block_size = start.shape[0]
    current = _orthonormal_extension(start, start[:0], deflate)
    applications = 0
    worst = math.inf  # the largest residual / threshold ratio among the wanted pairs
    for restart in range(max_restarts):
        bases, images, sides = [current], [], []
        for level in range(depth + 1):
            image, side = apply(bases[level])
            applications += 1
            images.append(image)
            sides.append(side)
            if level == 0 and restart == 0:  # Rayleigh-Ritz in span(X): a warm start may suffice
                found = _ritz_pairs(current, image, side, block_size, n_wanted, thresholds)
                if found.converged:
                    return replace(found, applications=applications)
            if level == depth:
                break
            extension = _orthonormal_extension(image, torch.cat(bases), deflate)
            if extension.shape[0] == 0:
                break
            bases.append(extension)
        side_blocks = [side for side in sides if side is not None]
        found = _ritz_pairs(
            torch.cat(bases[: len(images)]),
            torch.cat(images),
            torch.cat(side_blocks) if side_blocks else None,
            block_size,
            n_wanted,
            thresholds,
        )
        current = found.vectors
        if found.converged or len(current) < n_wanted or found.worst > 0.99 * worst:
            worst = min(worst, found.worst)
            break  # done, or stuck at round-off: more restarts would not help
        worst = found.worst
    return replace(found, worst=worst, applications=applications)


def _tracking_step(
    operator: _Operator,
    block: torch.Tensor,
    block_size: int,
    n_wanted: int,
    thresholds: Callable[[torch.Tensor], torch.Tensor],
) -> _Eigenpairs:
    """One application of the operator to the tracked block, then Rayleigh-Ritz: the top
    ``block_size`` Ritz pairs in ``span(block)`` (rows; deflated and orthonormalised here), with
    their residuals."""
    basis = _orthonormal_rows(operator.restrict(block), operator.trivial)
    image, side = operator.apply(basis)
    found = _ritz_pairs(basis, image, side, block_size, n_wanted, thresholds)
    return replace(found, applications=1)


def _extension_step(
    operator: _Operator,
    found: _Eigenpairs,
    block_size: int,
    n_wanted: int,
    thresholds: Callable[[torch.Tensor], torch.Tensor],
) -> _Eigenpairs:
    """A tracking step whose residuals were too large, continued by one more application: the
    Ritz vectors V and their residuals ``A V - V Theta`` span a block Krylov space of depth one,
    in which Rayleigh-Ritz finds the top ``block_size`` pairs again. ``found``'s images are
    reused, so only the new directions are applied (one application of the block)."""
    residual = torch.addcmul(found.images, found.theta[:, None], found.vectors, value=-1.0)
    extension = _orthonormal_extension(residual, found.vectors, operator.trivial)
    if extension.shape[0] == 0:  # the Ritz vectors span an invariant subspace already
        return found
    image, side = operator.apply(extension)
    sides = None if found.side is None or side is None else torch.cat([found.side, side])
    extended = _ritz_pairs(
        torch.cat([found.vectors, extension]),
        torch.cat([found.images, image]),
        sides,
        block_size,
        n_wanted,
        thresholds,
    )
    return replace(extended, applications=found.applications + 1)


def _orthonormal_rows(block: torch.Tensor, deflate: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning ``block``'s rows, orthogonal to the unit row ``deflate``: one
    Cholesky QR (``Q = L^-1 X``, ``L L^T = X X^T``), exact to round-off times the squared
    condition number of the rows, which :func:`_next_tracking_block` keeps near 1; a block of
    rows further from orthonormal goes through :func:`_orthonormal_extension` (QR) instead."""
    block = torch.addmm(block, block @ deflate.T, deflate, alpha=-1.0)
    factor, info = torch.linalg.cholesky_ex(block @ block.T)
    diagonal = factor.diagonal()
    if int(info) == 0 and float(diagonal.min() / diagonal.max()) > 0.5:  # condition < ~4
        identity = torch.eye(len(factor), dtype=factor.dtype, device=factor.device)
        return torch.linalg.solve_triangular(factor, identity, upper=False) @ block
    return _orthonormal_extension(block, block[:0], deflate)


def _next_tracking_block(found: _Eigenpairs, bipartite: bool) -> torch.Tensor:
    """The block the next tracking step starts from, made from this step's Ritz vectors V and
    their images A V without applying the operator again.

    Bipartite (A = B^T B, positive semi-definite): the shifted power step ``(A - c) V``,
    ``c = theta_b / 2``, which damps the unwanted spectrum ``[0, theta_{b+1}]`` relative to the
    wanted eigenvalues. General graphs (N's spectrum reaches -1, where a power step stalls): the
    Ritz vectors and their residuals ``[V; A V - V Theta]``, a block Krylov space of depth one.
    Rows are scaled to unit length, so that the block is close to orthonormal.
    """
    if bipartite:
        block = torch.add(found.images, found.vectors, alpha=-0.5 * float(found.theta[-1]))
    else:
        residual = torch.addcmul(found.images, found.theta[:, None], found.vectors, value=-1.0)
        block = torch.cat([found.vectors, residual])
    return block / block.norm(dim=1, keepdim=True).clamp_min(torch.finfo(block.dtype).tiny)


def _ritz_pairs(
    basis: torch.Tensor,
    image: torch.Tensor,
    side: torch.Tensor | None,
    count: int,
    n_wanted: int,
    thresholds: Callable[[torch.Tensor], torch.Tensor],
) -> _Eigenpairs:
    """The top ``count`` Ritz pairs of an operator A in the span of ``basis`` (orthonormal rows),
    from ``image = A basis`` (rows): Ritz values theta (descending), Ritz vectors and their
    images, the side output rotated alike, the residual norms ``||A x - theta x||`` and how the
    first ``n_wanted`` compare with ``thresholds(theta)``."""
    values, rotation = torch.linalg.eigh(basis @ image.T)  # ascending; reads the lower triangle
    theta, rotation = values.flip(0)[:count], rotation.T.flip(0)[:count]  # [count], [count, m]
    vectors, images = rotation @ basis, rotation @ image
    residual = torch.addcmul(images, theta[:, None], vectors, value=-1.0).norm(dim=1)
    ratio = float((residual[:n_wanted] / thresholds(theta[:n_wanted])).max())
    return _Eigenpairs(
        theta,
        vectors,
        images,
        None if side is None else rotation @ side,
        residual,
        ratio <= 1.0,
        ratio,
        0,
    )


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
