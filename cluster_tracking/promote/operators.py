"""The normalised adjacency ``N = D^-1/2 A D^-1/2`` of a live weight graph, as the regulariser's
eigensolvers use it, and the differentiable eigenvalues they return.

* :func:`dense_eigenvalues`: the k smallest non-trivial eigenvalues of ``L = I - N``, assembled
  densely in torch and differentiated by ``torch.linalg.eigvalsh`` (small graphs).
* :class:`NormalizedAdjacency`: ``N`` (or, on a layered graph, ``B^T B`` with ``B`` its cross
  block) applied to blocks of row vectors, one pass over every edge matrix in each direction,
  for the block Krylov solvers of :mod:`cluster_tracking.promote.krylov`.
* :class:`RitzEigenvalues`: eigenvalues ``lambda_i = 1 - mu_i`` from eigenvectors found without
  autograd, differentiable in the edge matrices by Hellmann-Feynman.

Blocks of vectors are rows, ``[m, n_nodes]``: a row-major block makes the products with the
``[n_out, n_in]`` edge matrices about 1.5 times faster on a CPU than column blocks do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from cluster_tracking.promote.krylov import Eigenpairs
from cluster_tracking.promote.live_blocks import LiveBlock, active_nodes


def dense_eigenvalues(
    blocks: Sequence[LiveBlock], edges: Sequence[torch.Tensor], degrees: torch.Tensor, k: int
) -> torch.Tensor:
    """The k smallest non-trivial eigenvalues of ``L = I - D^-1/2 A D^-1/2`` (ascending),
    differentiable in ``edges`` (the blocks' edge matrices) and ``degrees`` (``A 1``); nodes
    without edges are left out. O(n^3): small graphs."""
    n = len(degrees)
    adjacency = degrees.new_zeros((n, n))
    for block, edge in zip(blocks, edges, strict=True):
        rows = block.dst[:, None].expand_as(edge)
        cols = block.src[None, :].expand_as(edge)
        adjacency = adjacency.index_put((rows, cols), edge, accumulate=True)
    adjacency = adjacency + adjacency.T  # A[dst, src] = A[src, dst] = w
    active, _ = active_nodes(degrees, k)
    adjacency = adjacency[active][:, active]
    inv_sqrt_degree = degrees[active].rsqrt()
    # L = I - D^-1/2 A D^-1/2
    laplacian = (
        torch.eye(len(inv_sqrt_degree), dtype=adjacency.dtype, device=adjacency.device)
        - inv_sqrt_degree[:, None] * adjacency * inv_sqrt_degree[None, :]
    )
    spectrum = torch.linalg.eigvalsh(laplacian)  # ascending; spectrum[0] = 0
    return spectrum[1 : k + 1]


class RitzEigenvalues(torch.autograd.Function):
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
    A block's input is its edge matrix, or for a plain Linear layer (:attr:`LiveBlock.plain`)
    its weight W itself, ``E = |W|``, whose gradient ``sign(W) * G`` is formed in place.
    """

    @staticmethod
    def forward(
        ctx: Any,
        values: torch.Tensor,
        vectors: torch.Tensor,
        inv_degree: torch.Tensor,
        blocks: Sequence[LiveBlock],
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


class NormalizedAdjacency:
    """``N = D^-1/2 A D^-1/2`` from the blocks' edge matrices, for the Krylov solver.

    General graphs: the solver works on N over all nodes (inactive ones masked), wanting its top
    eigenvalues ``1 - lambda``. Bipartite graphs (sides O and E, numbered O first): on
    ``C = B^T B`` over side O only, with ``B = D_E^-1/2 A_EO D_O^-1/2``; its eigenvalues are
    ``sigma^2`` for the singular values sigma of B, and ``[v; B v / sigma] / sqrt 2`` is an
    eigenvector of N with eigenvalue sigma, so the k + 1 largest sigma give the k + 1 smallest
    Laplacian eigenvalues ``1 - sigma``. Working on ``B^T B`` makes the wanted end of the spectrum
    better separated (gaps in ``sigma^2``), it is positive semi-definite, so a shifted power step
    converges on it (:func:`~cluster_tracking.promote.krylov.next_tracking_block`), and its
    vectors are only as long as side O (the smaller side, when it is large enough for the
    block). Either operator costs one pass over every edge matrix in each direction per
    application.
    """

    def __init__(
        self,
        edges: list[torch.Tensor],
        blocks: Sequence[LiveBlock],
        side_blocks: Sequence[LiveBlock] | None,
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
        self.side_blocks: Sequence[LiveBlock] | None = None
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

    def eigenpairs(self, found: Eigenpairs, count: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def eigenvector_residuals(
    theta: torch.Tensor, residual: torch.Tensor, bipartite: bool
) -> torch.Tensor:
    """``||N w - mu w||`` of the eigenvectors of N made from Ritz pairs of the operator
    (``theta``, operator residuals ``residual``; see
    :meth:`NormalizedAdjacency.residual_thresholds`)."""
    if not bipartite:
        return residual
    sigma = theta.clamp_min(0.0).sqrt()
    return residual / (math.sqrt(2.0) * sigma).clamp_min(torch.finfo(theta.dtype).tiny)
