"""Live blocks: the edge weights of a traced weight graph, recomputed from the model's parameters.

:class:`~cluster_tracking.promote.regularizer.SpectralRegularizer` traces the model once
(:func:`~cluster_tracking.graph.weight_graph`) and binds every
:class:`~cluster_tracking.graph.EdgeBlock` to the parameters it reads (:func:`live_blocks`), so
that each evaluation computes the edge matrices ``[n_out, n_in]`` from the live tensors with torch
operations (:meth:`LiveBlock.edges`) and ``loss.backward()`` reaches every weight, and BatchNorm
``gamma``, that the graph reads. A layered (bipartite) graph is renumbered side O first, the
layout the bipartite operator of :mod:`cluster_tracking.promote.operators` works in.

The BatchNorm fold ``|gamma| / sqrt(running_var + eps)`` is the one
:func:`cluster_tracking.graph.weights.batchnorm_scale` computes for measurement, written here in
torch: the graph's returns a detached float64 numpy copy, which would cut ``gamma``'s gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from cluster_tracking.errors import GraphError
from cluster_tracking.graph import EdgeBlock, WeightGraph, layer_weight
from cluster_tracking.spectral.adjacency import bipartition


@dataclass(frozen=True)
class LiveBlock:
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
        weight = self.weight.to(compute_dtype(self.weight))
        if self.batchnorm is not None:
            scale = _batchnorm_scale(self.batchnorm, weight)
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


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 or float64: half-precision weights are promoted for the eigenproblem."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _batchnorm_scale(module: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """The fold of :func:`cluster_tracking.graph.weights.batchnorm_scale`, in torch and
    differentiable in ``gamma``, in ``like``'s dtype and on its device:
    ``|gamma| / sqrt(running_var + eps)`` per channel, ``|gamma|`` without running statistics,
    and ``gamma = 1`` without affine parameters (as the graph folds it)."""
    gamma = module.weight if isinstance(module.weight, torch.Tensor) else None
    running_var = module.running_var
    if gamma is not None:
        scale = gamma.to(like.dtype).abs()
    else:
        scale = torch.ones(int(module.num_features), dtype=like.dtype, device=like.device)  # type: ignore[arg-type]
    if isinstance(running_var, torch.Tensor):
        scale = scale / torch.sqrt(running_var.to(like.dtype) + float(module.eps))  # type: ignore[arg-type]
    return scale


def live_block(
    model: nn.Module, block: EdgeBlock, position: np.ndarray | None, sides: np.ndarray | None
) -> LiveBlock:
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
        rows, cols = block.group_pattern()
        group_rows = torch.as_tensor(np.ascontiguousarray(rows), device=device)
        group_cols = torch.as_tensor(cols, device=device)
    self_loops = block.dst[:, None] == block.src[None, :]
    keep = None
    if self_loops.any():
        keep = torch.as_tensor(~self_loops, device=device)
    return LiveBlock(
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


def side_local(block: LiveBlock, n_odd: int) -> LiveBlock:
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


def node_degrees(
    blocks: Sequence[LiveBlock], edges: Sequence[torch.Tensor], n: int
) -> torch.Tensor:
    """Weighted degree of every node: ``d = A 1``, each edge counted at both of its ends."""
    degrees = edges[0].new_zeros(n)
    for block, edge in zip(blocks, edges, strict=True):
        block.add_at_dst(degrees, edge.sum(dim=1))  # d_j += sum_i E[j, i]
        block.add_at_src(degrees, edge.sum(dim=0))  # d_i += sum_j E[j, i]
    return degrees


def active_nodes(degrees: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
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


def bipartite_sides(graph: WeightGraph, min_side: int) -> np.ndarray | None:
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


def solver_block_size(k: int, size: int) -> int:
    """Vectors in the solvers' block: k and a few more, which speed convergence."""
    return min(k + max(4, k // 3), size - 1)


@dataclass(frozen=True)
class LiveGraph:
    """A traced weight graph bound to the model's parameters, in the solvers' node numbering."""

    blocks: list[LiveBlock]  # every block, node ids of the whole graph (side O first if layered)
    side_blocks: list[LiveBlock] | None  # layered graphs: node ids within each block's own side
    n_odd: int | None  # layered graphs: the number of nodes of side O; None otherwise


def live_blocks(model: nn.Module, graph: WeightGraph, k: int) -> LiveGraph:
    """Every block of ``graph`` bound to ``model``'s tensors. A layered graph whose side O can
    hold the solvers' block for ``k`` eigenvalues (:func:`bipartite_sides`) is renumbered side O
    first, the layout of the bipartite operator
    (:class:`~cluster_tracking.promote.operators.NormalizedAdjacency`)."""
    sides = bipartite_sides(graph, min_side=solver_block_size(k, graph.n_nodes) + 1)
    position = None
    n_odd: int | None = None
    if sides is not None:
        position = np.empty(len(sides), dtype=np.int64)
        position[np.argsort(~sides, kind="stable")] = np.arange(len(sides))
        n_odd = int(sides.sum())
    blocks = [live_block(model, block, position, sides) for block in graph.blocks]
    side_blocks = None
    if n_odd is not None:
        side_blocks = [side_local(block, n_odd) for block in blocks]
    return LiveGraph(blocks, side_blocks, n_odd)
