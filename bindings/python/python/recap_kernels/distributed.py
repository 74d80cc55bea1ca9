"""Data parallelism: the whole batch's normalizers from every rank's part, with one collective.

    norms = recap_kernels.distributed.global_normalizers(mask, cu_seqlens, group=dp_group)
    loss, metrics = recap_kernels.grpo_loss(logp, old_logp, adv, mask, cu_seqlens, normalizers=norms)

Each rank's loss is then its part of the whole batch's loss (the ranks' losses sum to it) and its
gradient its slice of the whole batch's gradient. DDP and FSDP average the ranks' gradients; pass
``mean_reduced=True`` (verl's ``dp_size`` factor) so that their average is the whole batch's gradient.
"""
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .functional import count_normalizers

__all__ = ["global_normalizers"]


def global_normalizers(mask: Tensor, cu_seqlens=None, membership=None, num_objectives: int = 1, group=None,
                       mean_reduced: bool = False) -> Tensor:
    """This rank's normalizers (``count_normalizers``) summed over ``group`` (default: the world)
    with one ``all_reduce`` of a ``[2, K + 1]`` float64 tensor on the mask's device (NCCL for CUDA
    tensors, gloo for CPU ones). With ``mean_reduced`` they are divided by the group's size, for
    frameworks that average gradients over the ranks. Sequences must not be split across ranks."""
    normalizers, _ = count_normalizers(mask, cu_seqlens, membership, num_objectives)
    dist.all_reduce(normalizers, op=dist.ReduceOp.SUM, group=group)
    if mean_reduced:
        normalizers = normalizers / dist.get_world_size(group)
    return normalizers
