"""Block Krylov (block Lanczos with full reorthogonalisation and Rayleigh-Ritz) for the largest
eigenpairs of a symmetric operator, or the largest singular triplets of a rectangular one.

The operators are given as functions on blocks of vectors, so the same solver serves the
normalised adjacency of a weight graph (:mod:`~cluster_tracking.spectral.eigensolver`) and any
other operator (the regulariser's). The basis is at most :data:`KRYLOV_MAX_BLOCKS` blocks of the
start block's width.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cluster_tracking.resources.chunks import KRYLOV_MAX_BLOCKS


def block_krylov(
    forward: Any,
    backward: Any,
    size: int,
    start: np.ndarray,
    n_wanted: int,
    tol: float,
    *,
    bipartite: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Block Krylov with Rayleigh-Ritz for the ``n_wanted`` largest eigenpairs.

    Bipartite (``forward = B``, ``backward = B^T``, basis V on B's column side): the basis spans
    ``V, B^T B V, (B^T B)^2 V, ...``; the Ritz values of ``B^T B`` come from the Gram matrix of the
    images ``B V`` and are the squared singular values. General (``forward = N``): the basis spans
    ``V, N V, ...`` and the Ritz values come from ``V^T N V``. Returns ``(values descending,
    right vectors, left vectors or None)``; stops when the wanted values move less than ``tol``
    between two steps, or when the basis spans the whole space.
    """
    first = _orthonormal(start, None)
    first_images = forward(first)
    gram = first.T @ first_images if not bipartite else first_images.T @ first_images
    previous: np.ndarray | None = None
    max_basis = min(size, KRYLOV_MAX_BLOCKS * start.shape[1])
    # The basis and its images grow in place in column-major arrays of their largest width:
    # concatenating them at every step would hold two copies at once (on a billion-edge graph
    # the images alone can reach 1 GB), and the pages of columns not yet written are never
    # touched, so they take no memory.
    width = max(max_basis, first.shape[1])
    basis_store = np.empty((first.shape[0], width), order="F")
    images_store = np.empty((first_images.shape[0], width), order="F")
    filled = first.shape[1]
    basis_store[:, :filled] = first
    images_store[:, :filled] = first_images
    del first, first_images
    basis, images = basis_store[:, :filled], images_store[:, :filled]
    while True:
        values, coefficients = np.linalg.eigh((gram + gram.T) / 2.0)
        values, coefficients = values[::-1][:n_wanted], coefficients[:, ::-1][:, :n_wanted]
        theta = np.sqrt(np.maximum(values, 0.0)) if bipartite else values
        converged = previous is not None and float(np.max(np.abs(theta - previous))) <= tol
        if converged or basis.shape[1] >= max_basis:
            break
        previous = theta
        last = images[:, -start.shape[1] :]
        direction = backward(last) if bipartite else last
        block = _orthonormal(direction, basis, limit=max_basis - basis.shape[1])
        if block.shape[1] == 0:  # the basis spans an invariant subspace: the values are exact
            break
        new_images = forward(block)
        if bipartite:
            cross = images.T @ new_images
            corner = new_images.T @ new_images
        else:
            cross = basis.T @ new_images
            corner = block.T @ new_images
        gram = np.block([[gram, cross], [cross.T, corner]])
        grown = filled + block.shape[1]
        basis_store[:, filled:grown] = block
        images_store[:, filled:grown] = new_images
        filled = grown
        basis, images = basis_store[:, :filled], images_store[:, :filled]
    right = basis @ coefficients
    left = None
    if bipartite:
        left = (images @ coefficients) / np.maximum(theta, 1e-300)[None, :]
    return theta, right, left


def _orthonormal(
    block: np.ndarray, basis: np.ndarray | None, limit: int | None = None
) -> np.ndarray:
    """Orthonormal columns spanning ``block`` minus its part in ``basis``; columns that are
    (numerically) in the basis already are dropped."""
    norms = np.linalg.norm(block, axis=0)
    if basis is not None:
        for _ in range(2):  # twice is enough (Kahan, Parlett)
            block = block - basis @ (basis.T @ block)
    q, r = np.linalg.qr(block)
    keep = np.abs(np.diag(r)) > 1e-10 * max(float(norms.max(initial=0.0)), 1e-300)
    q = q[:, keep]
    if limit is not None:
        q = q[:, :limit]
    return q
