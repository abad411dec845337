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
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from cluster_tracking.errors import ConfigError, GraphError
from cluster_tracking.graph import EdgeBlock, WeightGraph, _unwrap_module, weight_graph
from cluster_tracking.spectral import _bipartition

Solver = Literal["auto", "dense", "iterative"]

#: Graphs with at most this many nodes use the dense eigensolver under ``solver="auto"``; above
#: it the warm-started iterative solver is faster (dense is O(n^3) per call).
DENSE_MAX_NODES = 150
#: Default residual tolerance ``||L w - lambda w|| <= tol`` of the iterative eigensolver, by the
#: parameters' dtype (the solver works in it; float32 round-off allows little below 1e-4).
DEFAULT_TOL = {torch.float32: 1e-4, torch.float64: 1e-7}
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
    weigh 0 are left out, as :func:`~cluster_tracking.spectral.spectral_partition` leaves them out.

    **Gradients.** ``d|w|/dw = sign(w)``, taken as 0 at ``w = 0`` (a subgradient). The sum of the
    k smallest non-trivial eigenvalues is differentiable wherever ``lambda_{k+1} < lambda_{k+2}``,
    even where some of the summed eigenvalues coincide: the sum is the trace of ``L`` on the
    invariant subspace they span, which depends smoothly on ``W`` while that subspace stays
    separated from the rest of the spectrum. Two solvers compute it:

    * ``"dense"``: the dense normalised Laplacian is assembled in torch and
      ``torch.linalg.eigvalsh`` differentiates it (O(n^3) time; small graphs).
    * ``"iterative"``: the eigenvectors ``w_1..w_k`` are found without autograd by a warm-started
      block Krylov method with Rayleigh-Ritz restarts (for a layered, i.e. bipartite, graph on
      ``B^T B``, ``B = D_E^-1/2 A_EO D_O^-1/2`` the normalised cross block between even and odd
      layers, whose top singular values ``sigma`` give the eigenvalues ``1 - sigma``); the
      eigenvalues are their Rayleigh quotients ``w_i^T L w_i`` and the gradient is
      Hellmann-Feynman's ``d lambda_i = w_i^T dL(W) w_i`` with the eigenvectors held fixed, which
      is the exact gradient at exact eigenvectors (and basis-independent inside the summed
      subspace). Time per call is O(edges * k * iterations), and the previous call's
      eigenvectors start the next search, so a training run that changes the weights a little
      per step needs few iterations. ``tol`` bounds each eigenvector's residual
      ``||L w - lambda w||``; the eigenvalues are then exact to about ``tol**2 / gap`` and the
      gradient to about ``tol / gap``, ``gap = lambda_{k+2} - lambda_{k+1}``.

    ``"auto"`` takes ``"dense"`` up to ``dense_max_nodes`` nodes and ``"iterative"`` above.

    **Rescaling loophole.** For a ReLU unit, multiplying its incoming weights and bias by ``c > 0``
    and its outgoing weights by ``1 / c`` leaves the network's function unchanged but changes the
    weight graph, so a regularised run can lower the penalty without becoming any more modular.
    Call a :class:`~cluster_tracking.normalization.ReLUWeightNormalizer` after each optimiser step
    to close that loophole.

    Args:
        model: the network (``nn.Module``; ``DataParallel``/``torch.compile`` wrappers are
            unwrapped). Its graph is traced as :func:`~cluster_tracking.graph.weight_graph` traces
            it.
        k: number of non-trivial eigenvalues summed (the paper uses 12).
        weight: the regularisation strength ``lambda`` (the penalty is ``lambda / k`` times the
            sum). Non-negative; 0 makes the penalty 0 but still computes it.
        every_n_steps: evaluate the penalty on every n-th call only (the first call included) and
            return a zero tensor, with no gradient, on the calls in between, to amortise its cost.
        rescale: with ``every_n_steps > 1``, multiply the evaluated penalty by ``every_n_steps``
            so that its average over calls, and the total push its gradient gives an SGD run,
            stay those of evaluating it every call (``True``, the default), or leave it as is so
            that its strength is divided by ``every_n_steps`` (``False``).
        solver: ``"auto"``, ``"dense"`` or ``"iterative"`` (see above).
        dense_max_nodes: the largest graph ``"auto"`` solves densely.
        tol: residual tolerance of the iterative solver; default ``1e-4`` for float32 parameters
            and ``1e-7`` for float64 ones (the solver works in the parameters' precision; where
            round-off stops the residuals from shrinking below tol, which float32 does for
            eigenvalues close to 1, the solver stops there, and warns only above 100 x tol).
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
        last_solver_applies: operator applications (each about two passes over all weights, with
            ``k + max(4, k // 2)`` vectors) the iterative solver used at the last evaluation.

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
        if solver not in ("auto", "dense", "iterative"):
            raise ConfigError(f"solver must be 'auto', 'dense' or 'iterative', got {solver!r}.")
        self.dense_max_nodes = _check_int(dense_max_nodes, "dense_max_nodes", minimum=0)
        if tol is not None and not (
            isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0
        ):
            raise ConfigError(f"tol must be a positive number or None, got {tol!r}; e.g. 1e-6.")
        self.tol = None if tol is None else float(tol)
        self.model = _unwrap_module(model)
        self.graph: WeightGraph = weight_graph(self.model, norm=norm, layers=layers)
        if self.k + 2 > self.graph.n_nodes:
            raise ConfigError(
                f"k={self.k} needs a graph of at least k + 2 = {self.k + 2} nodes (the trivial "
                f"eigenvalue, k summed ones and one beyond them), but the model's weight graph "
                f"has {self.graph.n_nodes}; use k <= {max(self.graph.n_nodes - 2, 0)}."
            )
        self._blocks = [_live_block(self.model, block) for block in self.graph.blocks]
        self._solver: Literal["dense", "iterative"]
        if solver == "auto":
            self._solver = "dense" if self.graph.n_nodes <= self.dense_max_nodes else "iterative"
        else:
            self._solver = solver
        self._sides = _block_sides(self.graph, self._blocks)
        if self._sides is not None:
            sides = self._sides.cpu().numpy()
            self._blocks = [
                replace(block, src_odd=bool(sides[block.block.src[0]])) for block in self._blocks
            ]
        self._generator_seed = int(seed)
        self._start: torch.Tensor | None = None  # warm start: last call's Ritz vectors
        self.calls = 0
        self.last_eigenvalues: np.ndarray | None = None
        self.last_penalty: float | None = None
        self.last_solver_applies = 0  # operator applications of the last iterative solve

    @property
    def solver(self) -> Literal["dense", "iterative"]:
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
        edges = [block.edges() for block in self._blocks]
        degrees = _degrees(self._blocks, edges, self.graph.n_nodes)
        if self._solver == "dense":
            values = self._dense_eigenvalues(edges, degrees)
        else:
            values = self._iterative_eigenvalues(edges, degrees)
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
        active = _active_nodes(degrees, self.k)
        adjacency = adjacency[active][:, active]
        inv_sqrt_degree = degrees[active].rsqrt()
        # L = I - D^-1/2 A D^-1/2
        laplacian = (
            torch.eye(len(inv_sqrt_degree), dtype=adjacency.dtype, device=adjacency.device)
            - inv_sqrt_degree[:, None] * adjacency * inv_sqrt_degree[None, :]
        )
        spectrum = torch.linalg.eigvalsh(laplacian)  # ascending; spectrum[0] = 0
        return spectrum[1 : self.k + 1]

    # -- iterative -----------------------------------------------------------------------------

    def _iterative_eigenvalues(
        self, edges: list[torch.Tensor], degrees: torch.Tensor
    ) -> torch.Tensor:
        active = _active_nodes(degrees, self.k)
        with torch.no_grad():
            fixed = _Operator(
                [edge.detach() for edge in edges],
                self._blocks,
                degrees.detach(),
                active,
                self._sides,
            )
            vectors, top, applies = self._eigenvectors(fixed)  # N w_i = mu_i w_i
            safe_degrees = torch.where(active, degrees.detach(), 1.0)
            inv_degree = torch.where(active, 1.0 / safe_degrees, 0.0)
        self.last_solver_applies = applies
        values = (1.0 - top).to(degrees.dtype)  # lambda_i = 1 - mu_i
        return _RitzEigenvalues.apply(
            values, vectors.to(degrees.dtype), inv_degree, self._blocks, *edges
        )

    def _eigenvectors(self, operator: _Operator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Unit eigenvectors ``[n, k]`` of the k smallest non-trivial eigenvalues of L, the
        matching (largest non-trivial) eigenvalues of N, and the operator applications used."""
        k = self.k
        size = operator.space_size
        block_size = min(k + max(4, k // 2), size - 1)  # a few extra vectors speed convergence
        if block_size < k + 1:
            raise GraphError(
                f"The weight graph has only {operator.n_active} nodes with edges, too few for "
                f"k={k} with the iterative solver; use solver='dense' or a smaller k."
            )
        start = self._start
        dtype = operator.trivial.dtype
        cold = start is None or start.shape != (operator.n, block_size) or start.dtype != dtype
        if cold:
            generator = torch.Generator().manual_seed(self._generator_seed)
            start = torch.rand((operator.n, block_size), generator=generator, dtype=dtype)
            start = (start - 0.5).to(operator.device)
        assert start is not None
        tol = self.tol if self.tol is not None else DEFAULT_TOL[dtype]
        thresholds = operator.residual_thresholds
        found = _top_eigenpairs(
            operator.apply,
            operator.restrict(start),
            operator.trivial[:, None],
            k,
            lambda theta: thresholds(theta, tol),
            max_restarts=300 if cold else 100,
        )
        if found.worst > _ACCEPTED_STALL:  # (within it: stalled at the dtype's round-off)
            warnings.warn(
                f"SpectralRegularizer: the iterative eigensolver stopped with eigenvector "
                f"residuals up to {_ACCEPTED_STALL:g} x tol={tol:g}, so the penalty's gradient "
                "is approximate. Pass a larger tol, float64 parameters, or solver='dense' for a "
                "small network.",
                RuntimeWarning,
                stacklevel=4,
            )
        self._start = found.vectors
        vectors, top = operator.eigenpairs(found, k)
        return vectors, top, found.applications


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
    src_odd: bool = False  # bipartite graphs: whether the input nodes are on the odd side

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
        """The rows of a ``[n_nodes, ...]`` tensor for this block's input nodes."""
        return nodes[self.src_range] if self.src_range is not None else nodes[self.src]

    def at_dst(self, nodes: torch.Tensor) -> torch.Tensor:
        """The rows of a ``[n_nodes, ...]`` tensor for this block's output nodes."""
        return nodes[self.dst_range] if self.dst_range is not None else nodes[self.dst]

    def add_at_src(self, nodes: torch.Tensor, values: torch.Tensor) -> None:
        """``nodes[src] += values`` in place, summing repeated node ids."""
        if self.src_range is not None:
            nodes[self.src_range] += values
        else:
            nodes.index_add_(0, self.src, values)

    def add_at_dst(self, nodes: torch.Tensor, values: torch.Tensor) -> None:
        """``nodes[dst] += values`` in place, summing repeated node ids."""
        if self.dst_range is not None:
            nodes[self.dst_range] += values
        else:
            nodes.index_add_(0, self.dst, values)


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


def _layer_weight(model: nn.Module, block: EdgeBlock) -> torch.Tensor:
    """The parameter holding ``block``'s weight (a module called twice shares it)."""
    name = re.sub(r"#\d+$", "", block.name)
    found: object = None
    try:
        found = getattr(model.get_submodule(name), "weight", None)
    except AttributeError:
        pass
    if not isinstance(found, torch.Tensor):
        try:
            found = model.get_parameter(name)
        except AttributeError:
            found = None
    if not isinstance(found, torch.Tensor):
        raise GraphError(
            f"Layer {block.name!r} of the weight graph has no weight tensor at "
            f"model.get_submodule({name!r}).weight or model.get_parameter({name!r}); the "
            "regulariser and the clusterable initialisation need each layer's weight to be a "
            "parameter of the model (use nn.Linear/nn.Conv modules, or pass layers=[...])."
        )
    if tuple(found.shape) != block.weight.shape:
        raise GraphError(
            f"Layer {block.name!r} has a weight of shape {tuple(found.shape)} but the weight graph "
            f"read {block.weight.shape}; build the regulariser after the model's final shapes are "
            "set (e.g. after lazy modules have run once)."
        )
    return found


def _live_block(model: nn.Module, block: EdgeBlock) -> _LiveBlock:
    weight = _layer_weight(model, block)
    device = weight.device
    batchnorm = None
    if block.batchnorm is not None:
        batchnorm = model.get_submodule(block.batchnorm)
    src = torch.as_tensor(block.src, dtype=torch.int64, device=device)
    dst = torch.as_tensor(block.dst, dtype=torch.int64, device=device)
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
        _as_range(block.src),
        _as_range(block.dst),
        group_rows,
        group_cols,
        keep,
    )


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


def _active_nodes(degrees: torch.Tensor, k: int) -> torch.Tensor:
    """Nodes with at least one edge of non-zero weight (the others are left out)."""
    active = degrees.detach() > 0
    n_active = int(active.sum())
    if n_active < k + 2:
        raise GraphError(
            f"Only {n_active} nodes of the weight graph have edges of non-zero weight, too few "
            f"for the k={k} smallest non-trivial eigenvalues; use a smaller k (the weights may "
            "have collapsed to zero: lower the regulariser's weight)."
        )
    return active


def _block_sides(graph: WeightGraph, blocks: Sequence[_LiveBlock]) -> torch.Tensor | None:
    """For a bipartite (layered) graph, True for the nodes of the odd side; else None.

    Each block must read all its inputs from one side and write all its outputs to the other,
    as in a chain of layers without residual connections.
    """
    structure = graph.with_weights([np.ones_like(w) for w in graph.weights()]).adjacency
    sides = _bipartition(structure)
    if sides is None:
        return None
    for block in blocks:
        src_side = sides[block.block.src]
        dst_side = sides[block.block.dst]
        if src_side.min() != src_side.max() or dst_side.min() != dst_side.max():
            return None
        if src_side[0] == dst_side[0]:
            return None
    return torch.as_tensor(sides, device=blocks[0].weight.device)


# ---------------------------------------------------------------------------------------------
# The iterative eigensolver
# ---------------------------------------------------------------------------------------------


class _RitzEigenvalues(torch.autograd.Function):
    """Laplacian eigenvalues ``lambda_i = 1 - mu_i`` from unit eigenvectors ``w_i`` of
    ``N = D^-1/2 A D^-1/2`` (``N w_i = mu_i w_i``) found without autograd, differentiable in the
    blocks' edge matrices by Hellmann-Feynman, ``d lambda = w^T dL w = -w^T dN w``. An edge entry
    ``E[j, a]`` (output node j, input node a) enters ``A[j, a] = A[a, j]`` and the degrees
    ``d_j``, ``d_a``, so with ``y = D^-1/2 w``::

        d lambda_i / d E[j, a] = -2 y_j y_a + h_j + h_a,     h_n = mu_i w_n^2 / d_n.

    Forward returns ``lambda`` (shape ``[k]``); backward forms this gradient for every block in one
    ``addmm`` (``-2 Y_dst Y_src^T`` plus the two degree terms, weighted by the incoming gradient).
    """

    @staticmethod
    def forward(
        ctx: Any,
        values: torch.Tensor,
        vectors: torch.Tensor,
        inv_degree: torch.Tensor,
        blocks: Sequence[_LiveBlock],
        *edges: torch.Tensor,
    ) -> torch.Tensor:
        ctx.blocks = blocks
        ctx.save_for_backward(values, vectors, inv_degree)
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        values, vectors, inv_degree = ctx.saved_tensors
        scaled = inv_degree.sqrt()[:, None] * vectors  # y = D^-1/2 w, [n, k]
        # h_n = sum_i grad_i mu_i w_in^2 / d_n, mu_i = 1 - lambda_i
        node_terms = (vectors**2 * (grad * (1.0 - values))[None, :]).sum(dim=1) * inv_degree
        weighted = scaled * grad[None, :]
        grads: list[torch.Tensor | None] = [None, None, None, None]
        for block in ctx.blocks:
            # -2 sum_i grad_i y_ij y_ia + h_j + h_a, for every entry (j, a) at once
            edge_grad = torch.addmm(
                block.at_dst(node_terms)[:, None] + block.at_src(node_terms)[None, :],
                block.at_dst(weighted),
                block.at_src(scaled).T,
                alpha=-2.0,
            )
            if block.keep is not None:
                edge_grad = edge_grad * block.keep
            grads.append(edge_grad)
        return tuple(grads)


class _Operator:
    """``N = D^-1/2 A D^-1/2`` from the blocks' edge matrices, for the Krylov solver.

    General graphs: the solver works on N over all active nodes, wanting its top eigenvalues
    ``1 - lambda``. Bipartite graphs (sides E and O): on ``C = B^T B`` over the odd side, with
    ``B = D_E^-1/2 A_EO D_O^-1/2``; its eigenvalues are ``sigma^2`` for the singular values sigma
    of B, and ``[B v / sigma; v] / sqrt 2`` is an eigenvector of N with eigenvalue sigma, so the
    k + 1 largest sigma give the k + 1 smallest Laplacian eigenvalues ``1 - sigma``. Working on
    ``B^T B`` makes the wanted end of the spectrum better separated (gaps in ``sigma^2``) and
    halves the vectors' length.
    """

    def __init__(
        self,
        edges: list[torch.Tensor],
        blocks: Sequence[_LiveBlock],
        degrees: torch.Tensor,
        active: torch.Tensor,
        sides: torch.Tensor | None,
    ) -> None:
        self.edges = edges
        self.blocks = blocks
        self.n = len(degrees)
        self.device = degrees.device
        self.n_active = int(active.sum())
        self.mask = active.to(degrees.dtype)
        self.inv_sqrt_degree = torch.where(active, torch.where(active, degrees, 1.0).rsqrt(), 0.0)
        sqrt_degree = degrees.clamp_min(0.0).sqrt() * self.mask
        self.sides = sides
        if sides is not None:
            odd = sides.to(degrees.dtype) * self.mask
            if int(odd.sum()) < 2 or int((self.mask - odd).sum()) < 2:
                self.sides = None
        if self.sides is None:
            self.space = self.mask
        else:
            self.space = self.sides.to(degrees.dtype) * self.mask
            # each block reads one side: True when its src nodes are on the odd side
            self.src_odd = [block.src_odd for block in blocks]
        trivial = sqrt_degree * self.space  # D^1/2 1: N's eigenvector of eigenvalue 1
        self.trivial = trivial / trivial.norm()
        self.space_size = int(self.space.sum())

    def restrict(self, vectors: torch.Tensor) -> torch.Tensor:
        """Vectors restricted to the operator's space (active nodes, odd side if bipartite)."""
        return vectors * self.space[:, None]

    def _normalised_adjacency(self, vectors: torch.Tensor, from_odd: bool | None) -> torch.Tensor:
        """``N @ vectors``; with ``from_odd`` set, for vectors supported on that side only."""
        scaled = self.inv_sqrt_degree[:, None] * vectors
        out = torch.zeros_like(vectors)
        for index, (block, edge) in enumerate(zip(self.blocks, self.edges, strict=True)):
            reads_src = from_odd is None or self.src_odd[index] == from_odd
            reads_dst = from_odd is None or self.src_odd[index] != from_odd
            if reads_src:
                block.add_at_dst(out, edge @ block.at_src(scaled))  # A[dst, src] x[src]
            if reads_dst:
                block.add_at_src(out, edge.T @ block.at_dst(scaled))  # A[src, dst] x[dst]
        return self.inv_sqrt_degree[:, None] * out

    def apply(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The operator whose top eigenvectors the solver finds: ``(N X, None)``, or for a
        bipartite graph ``(B^T B X, B X)``."""
        if self.sides is None:
            return self._normalised_adjacency(vectors, None), None
        even_part = self._normalised_adjacency(vectors, True)  # B v
        return self._normalised_adjacency(even_part, False), even_part  # B^T B v

    def residual_thresholds(self, theta: torch.Tensor, tol: float) -> torch.Tensor:
        """Operator residuals that mean ``||N w - (1 - lambda) w|| <= tol`` for the eigenvectors.

        Bipartite: for ``w = [B v / sigma; v] / sqrt 2``, ``||N w - sigma w|| = ||C v - sigma^2
        v|| / (sigma sqrt 2)``. Never below 50 units of round-off, which no
        eigenvector can beat (for a small sigma, the guarantee on ``w`` loosens accordingly).
        """
        floor = 50.0 * torch.finfo(theta.dtype).eps
        if self.sides is None:
            return torch.full_like(theta, max(tol, floor))
        return (tol * math.sqrt(2.0) * theta.clamp_min(0.0).sqrt()).clamp_min(floor)

    def eigenpairs(self, found: _Eigenpairs, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit eigenvectors ``w`` of N, ``[n, count]``, and their eigenvalues ``mu``, from the
        operator's top ``count`` eigenpairs."""
        ritz = found.vectors[:, :count]
        if self.sides is None or found.side is None:
            return ritz, found.theta[:count]
        sigma = found.theta[:count].clamp_min(0.0).sqrt()
        alive = sigma > 1e-12  # sigma = 0: v alone is an eigenvector of N (eigenvalue 0)
        u = torch.where(alive, 1.0, 0.0) * found.side[:, :count] / torch.where(alive, sigma, 1.0)
        vectors = u + ritz  # [B v / sigma; v], normalised below (the sqrt 2)
        return vectors / vectors.norm(dim=0).clamp_min(1e-300), sigma


def _orthonormal_extension(
    candidates: torch.Tensor, basis: torch.Tensor, deflate: torch.Tensor
) -> torch.Tensor:
    """Orthonormal columns spanning what ``candidates`` add to ``basis``, kept orthogonal to
    ``deflate``: Gram-Schmidt against both, repeated (CGS2), then QR; directions already in the
    basis (an exhausted Krylov space, on a small graph) are dropped through an SVD."""
    scale = float(candidates.norm(dim=0).max()) if candidates.shape[1] else 0.0
    for _ in range(2):
        candidates = candidates - deflate @ (deflate.T @ candidates)
        if basis.shape[1]:
            candidates = candidates - basis @ (basis.T @ candidates)
    if candidates.shape[1] == 0 or scale == 0.0:
        return candidates[:, :0]
    new, triangle = torch.linalg.qr(candidates)
    floor = 1e-10 * scale if candidates.dtype == torch.float64 else 1e-5 * scale
    if bool((triangle.diagonal().abs() > floor).all()):
        return new
    left, singular, _ = torch.linalg.svd(candidates, full_matrices=False)
    new = left[:, singular > floor]
    if new.shape[1]:  # directions this small need one more pass to be orthogonal to the basis
        new = new - deflate @ (deflate.T @ new)
        if basis.shape[1]:
            new = new - basis @ (basis.T @ new)
        new, _ = torch.linalg.qr(new)
    return new


@dataclass(frozen=True)
class _Eigenpairs:
    """What :func:`_top_eigenpairs` found."""

    theta: torch.Tensor  # Ritz values, descending, [b]
    vectors: torch.Tensor  # Ritz vectors, [n, b]
    side: torch.Tensor | None  # the operator's side output for the Ritz vectors (B x), [n, b]
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
    ``b = start.shape[1]`` Ritz vectors until the first ``n_wanted`` residuals
    ``||A x - theta x||`` are under ``thresholds(theta)``. ``apply(X)`` returns ``A X`` and an
    optional linear side output (e.g. ``B X`` when ``A = B^T B``), carried along to the Ritz
    vectors so that nothing needs applying again afterwards.
    """
    block_size = start.shape[1]
    current = _orthonormal_extension(start, start[:, :0], deflate)
    applications = 0
    converged = False
    worst = math.inf  # the largest residual / threshold ratio among the wanted pairs
    for restart in range(max_restarts):
        bases, images, sides = [current], [], []
        for level in range(depth + 1):
            image, side = apply(bases[level])
            applications += 1
            images.append(image)
            sides.append(side)
            if level == 0 and restart == 0:  # Rayleigh-Ritz in span(X): a warm start may suffice
                theta, rotation, residual = _rayleigh_ritz(current, image, block_size)
                ratio = float((residual[:n_wanted] / thresholds(theta[:n_wanted])).max())
                if ratio <= 1.0:
                    return _Eigenpairs(
                        theta,
                        current @ rotation,
                        None if side is None else side @ rotation,
                        True,
                        ratio,
                        applications,
                    )
            if level == depth:
                break
            extension = _orthonormal_extension(image, torch.cat(bases, dim=1), deflate)
            if extension.shape[1] == 0:
                break
            bases.append(extension)
        basis = torch.cat(bases[: len(images)], dim=1)
        theta, rotation, residual = _rayleigh_ritz(basis, torch.cat(images, dim=1), block_size)
        current = basis @ rotation
        side_blocks = [side for side in sides if side is not None]
        side_output = torch.cat(side_blocks, dim=1) @ rotation if side_blocks else None
        ratio = float((residual[:n_wanted] / thresholds(theta[:n_wanted])).max())
        converged = ratio <= 1.0
        if converged or current.shape[1] < n_wanted or ratio > 0.99 * worst:
            worst = min(worst, ratio)
            break  # done, or stuck at round-off: more restarts would not help
        worst = ratio
    return _Eigenpairs(theta, current, side_output, converged, worst, applications)


def _rayleigh_ritz(
    basis: torch.Tensor, image: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``count`` Ritz pairs of an operator A in ``span(basis)`` (orthonormal columns),
    from ``image = A @ basis``: Ritz values theta (descending), the rotation S (Ritz vectors
    ``basis @ S``) and the residual norms ``||A x - theta x||``."""
    projected = basis.T @ image
    values, rotation = torch.linalg.eigh((projected + projected.T) / 2)  # ascending
    top = torch.arange(len(values) - 1, max(len(values) - 1 - count, -1), -1, device=values.device)
    theta, rotation = values[top], rotation[:, top]
    residual = (image @ rotation - (basis @ rotation) * theta).norm(dim=0)
    return theta, rotation, residual


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
