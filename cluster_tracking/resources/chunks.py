"""Sizes of the pieces the linear algebra works in: row chunks of large weight blocks and the
block-Krylov basis.

They live here, below the graph and the eigensolver that use them, because the memory estimates
(:mod:`~cluster_tracking.resources.estimate`) are computed from them too.
"""

from __future__ import annotations

#: A dense weight block larger than this many entries is read in row chunks of at most this many
#: entries wherever a product needs it in another dtype than it is held in (the float64 products
#: of a bounded-memory graph's float32 magnitudes), so no whole copy is made; degrees are summed
#: in float64 over row chunks of this size, whatever the dtype, so that a float32 and a float64
#: copy of the same weights give the same degrees to the last bit.
CHUNK_ENTRIES = 1 << 22


#: Block Krylov: block size is the number of wanted vectors plus this; at most this many blocks.
KRYLOV_OVERSAMPLE = 8
KRYLOV_MAX_BLOCKS = 40
