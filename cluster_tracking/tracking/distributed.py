"""Distributed training: only rank 0 measures and logs."""

from __future__ import annotations


def is_rank_zero(rank: int | None = None) -> bool:
    """Whether this process is rank 0: ``rank == 0`` when a rank is given, else
    ``torch.distributed``'s rank (rank 0 when it is not initialised, or not available).

    ``torch.distributed`` is imported only when no rank is given, at the call, so that importing
    a sink loads no torch.
    """
    if rank is not None:
        return rank == 0
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)
