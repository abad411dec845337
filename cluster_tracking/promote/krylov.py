"""Block Krylov eigenpairs in torch, for the regulariser: a restarted solve and the tracking steps
that follow eigenvectors from one optimiser step to the next.

:func:`top_eigenpairs` finds the top eigenpairs of a symmetric operator by block Krylov subspaces
``span[X, AX, A^2 X]`` with Rayleigh-Ritz (:func:`ritz_pairs`), restarted from the top Ritz
vectors until every wanted residual ``||A x - theta x||`` is under its threshold.
:func:`tracking_step` and :func:`extension_step` are the one-application steps that the
``"tracking"`` solver takes from the previous call's vectors (:func:`next_tracking_block`).
Blocks of vectors are rows, ``[m, n]``.

**Why not spectral's block Krylov solver.** :mod:`cluster_tracking.spectral` also runs block
Krylov with Rayleigh-Ritz (for the partition's embedding), and the core step is the same math:
project the operator on an orthonormal basis, ``eigh`` the small matrix, rotate. The two differ
in what each is for:

* spectral measures one graph, once, in numpy (float32 products, float64 refinement, pieces that
  may live on Dask workers), with column vectors and one growing basis of up to 40 blocks, and it
  stops when the wanted Ritz *values* move less than a tolerance between two steps;
* the regulariser runs inside every training step, in torch on the parameters' device and dtype,
  with a basis of bounded size (depth 2, restarted), the trivial eigenvector ``D^1/2 1`` deflated
  explicitly, and it stops on the eigenvector *residuals*: the Hellmann-Feynman gradient is off
  by about ``max_i r_i / gap`` and the penalty by ``sum_i r_i^2 / gap``, bounds a value-change
  test does not give. Its vectors are warm-started across optimiser steps (one application per
  call when tracking), and the side output ``B X`` of a layered graph is carried through the
  restarts so nothing is applied twice.

What could be shared is the Rayleigh-Ritz step and the orthonormal extension (two Gram-Schmidt
passes, then QR dropping dependent directions), written once against the array API so that
spectral (which must stay torch-free) and this module (torch tensors) both call it; the drop
tolerances differ today (spectral: ``1e-10``; here ``1e-10`` in float64, ``1e-5`` in float32, and
an SVD where QR is rank-deficient), so sharing them would move both solvers' numbers by
round-off, and the stopping rules and restart strategy would stay separate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch


class KrylovOperator(Protocol):
    """What the tracking steps need of an operator (e.g.
    :class:`~cluster_tracking.promote.operators.NormalizedAdjacency`)."""

    #: ``[1, n]``: the unit row every vector is kept orthogonal to (deflated).
    trivial: torch.Tensor

    def restrict(self, vectors: torch.Tensor) -> torch.Tensor:
        """Row vectors restricted to the operator's active nodes."""
        ...

    def apply(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(A X, side output or None)`` for row vectors ``X``."""
        ...


def orthonormal_extension(
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
class Eigenpairs:
    """What :func:`top_eigenpairs` or :func:`tracking_step` found (blocks of rows)."""

    theta: torch.Tensor  # Ritz values, descending, [b]
    vectors: torch.Tensor  # Ritz vectors, [b, n]
    images: torch.Tensor  # the operator applied to them, [b, n]
    side: torch.Tensor | None  # the operator's side output for the Ritz vectors (B x), [b, n]
    residual: torch.Tensor  # operator residual norms ||A x - theta x||, [b]
    converged: bool  # every wanted residual under its threshold
    worst: float  # the largest residual / threshold ratio among the wanted pairs
    applications: int  # operator applications used


def top_eigenpairs(
    apply: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
    start: torch.Tensor,
    deflate: torch.Tensor,
    n_wanted: int,
    thresholds: Callable[[torch.Tensor], torch.Tensor],
    *,
    depth: int = 2,
    max_restarts: int = 100,
) -> Eigenpairs:
    """Top eigenpairs of a symmetric operator A, orthogonal to ``deflate``, by block Krylov
    subspaces ``span[X, AX, ..., A^depth X]`` with Rayleigh-Ritz, restarted from the top
    ``b = len(start)`` Ritz vectors until the first ``n_wanted`` residuals ``||A x - theta x||``
    are under ``thresholds(theta)``. Vectors are rows. ``apply(X)`` returns ``A X`` and an
    optional linear side output (e.g. ``B X`` when ``A = B^T B``), carried along to the Ritz
    vectors so that nothing needs applying again afterwards.
    """
    block_size = start.shape[0]
    current = orthonormal_extension(start, start[:0], deflate)
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
                found = ritz_pairs(current, image, side, block_size, n_wanted, thresholds)
                if found.converged:
                    return replace(found, applications=applications)
            if level == depth:
                break
            extension = orthonormal_extension(image, torch.cat(bases), deflate)
            if extension.shape[0] == 0:
                break
            bases.append(extension)
        side_blocks = [side for side in sides if side is not None]
        found = ritz_pairs(
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


def tracking_step(
    operator: KrylovOperator,
    block: torch.Tensor,
    block_size: int,
    n_wanted: int,
    thresholds: Callable[[torch.Tensor], torch.Tensor],
) -> Eigenpairs:
    """One application of the operator to the tracked block, then Rayleigh-Ritz: the top
    ``block_size`` Ritz pairs in ``span(block)`` (rows; deflated and orthonormalised here), with
    their residuals."""
    basis = orthonormal_rows(operator.restrict(block), operator.trivial)
    image, side = operator.apply(basis)
    found = ritz_pairs(basis, image, side, block_size, n_wanted, thresholds)
    return replace(found, applications=1)


def extension_step(
    operator: KrylovOperator,
    found: Eigenpairs,
    block_size: int,
    n_wanted: int,
    thresholds: Callable[[torch.Tensor], torch.Tensor],
) -> Eigenpairs:
    """A tracking step whose residuals were too large, continued by one more application: the
    Ritz vectors V and their residuals ``A V - V Theta`` span a block Krylov space of depth one,
    in which Rayleigh-Ritz finds the top ``block_size`` pairs again. ``found``'s images are
    reused, so only the new directions are applied (one application of the block)."""
    residual = torch.addcmul(found.images, found.theta[:, None], found.vectors, value=-1.0)
    extension = orthonormal_extension(residual, found.vectors, operator.trivial)
    if extension.shape[0] == 0:  # the Ritz vectors span an invariant subspace already
        return found
    image, side = operator.apply(extension)
    sides = None if found.side is None or side is None else torch.cat([found.side, side])
    extended = ritz_pairs(
        torch.cat([found.vectors, extension]),
        torch.cat([found.images, image]),
        sides,
        block_size,
        n_wanted,
        thresholds,
    )
    return replace(extended, applications=found.applications + 1)


def orthonormal_rows(block: torch.Tensor, deflate: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning ``block``'s rows, orthogonal to the unit row ``deflate``: one
    Cholesky QR (``Q = L^-1 X``, ``L L^T = X X^T``), exact to round-off times the squared
    condition number of the rows, which :func:`next_tracking_block` keeps near 1; a block of
    rows further from orthonormal goes through :func:`orthonormal_extension` (QR) instead."""
    block = torch.addmm(block, block @ deflate.T, deflate, alpha=-1.0)
    factor, info = torch.linalg.cholesky_ex(block @ block.T)
    diagonal = factor.diagonal()
    if int(info) == 0 and float(diagonal.min() / diagonal.max()) > 0.5:  # condition < ~4
        identity = torch.eye(len(factor), dtype=factor.dtype, device=factor.device)
        return torch.linalg.solve_triangular(factor, identity, upper=False) @ block
    return orthonormal_extension(block, block[:0], deflate)


def next_tracking_block(found: Eigenpairs, bipartite: bool) -> torch.Tensor:
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


def ritz_pairs(
    basis: torch.Tensor,
    image: torch.Tensor,
    side: torch.Tensor | None,
    count: int,
    n_wanted: int,
    thresholds: Callable[[torch.Tensor], torch.Tensor],
) -> Eigenpairs:
    """The top ``count`` Ritz pairs of an operator A in the span of ``basis`` (orthonormal rows),
    from ``image = A basis`` (rows): Ritz values theta (descending), Ritz vectors and their
    images, the side output rotated alike, the residual norms ``||A x - theta x||`` and how the
    first ``n_wanted`` compare with ``thresholds(theta)``."""
    values, rotation = torch.linalg.eigh(basis @ image.T)  # ascending; reads the lower triangle
    theta, rotation = values.flip(0)[:count], rotation.T.flip(0)[:count]  # [count], [count, m]
    vectors, images = rotation @ basis, rotation @ image
    residual = torch.addcmul(images, theta[:, None], vectors, value=-1.0).norm(dim=1)
    ratio = float((residual[:n_wanted] / thresholds(theta[:n_wanted])).max())
    return Eigenpairs(
        theta,
        vectors,
        images,
        None if side is None else rotation @ side,
        residual,
        ratio <= 1.0,
        ratio,
        0,
    )
