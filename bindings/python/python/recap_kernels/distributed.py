"""Data parallelism: the whole batch's normalizers from every rank's part, with one collective.

    norms = recap_kernels.distributed.global_normalizers(mask, cu_seqlens, group=dp_group)
    loss, metrics = recap_kernels.grpo_loss(logp, old_logp, adv, mask, cu_seqlens, normalizers=norms)

Each rank's loss is then its part of the whole batch's loss (the ranks' losses sum to it) and its
gradient its slice of the whole batch's gradient. DDP and FSDP average the ranks' gradients; pass
``mean_reduced=True`` (verl's ``dp_size`` factor) so that their average is the whole batch's gradient.

Rollout IS weights normalized over the whole batch (verl's ``rollout_is_batch_normalize`` under
``torch.distributed``): ``rollout_is_weights(log_ratio, mask, group=dp_group, ...)``.
"""
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .functional import count_normalizers, rollout_is_normalize
from .functional import rollout_is_weights as _rollout_is_weights

__all__ = ["global_normalizers", "rollout_is_weights", "rollout_is_sums"]


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


def rollout_is_weights(log_ratio: Tensor, mask: Tensor, cu_seqlens=None, *, rollout_is: str = "token",
                       rollout_is_threshold=2.0, rollout_is_batch_normalize: bool = True, group=None):
    """``functional.rollout_is_weights`` with the batch mean taken over ``group`` (verl's
    ``distributed_masked_mean``): this rank's weights and stats, unnormalized, then one ``all_reduce``
    of the ``[2]`` float64 (weight sum, units) and the weights divided by the whole batch's factor
    (``stats["factor"]``; ``stats["mean"]``, ``weight_sum`` and ``units`` are the whole batch's).
    Sequences must not be split across ranks. The sums are read back to the host (verl's
    ``weights_mean > 1e-8`` does too)."""
    weights, stats = _rollout_is_weights(log_ratio, mask, cu_seqlens, rollout_is=rollout_is,
                                         rollout_is_threshold=rollout_is_threshold, rollout_is_batch_normalize=False)
    if not rollout_is_batch_normalize:
        return weights, stats
    return rollout_is_normalize(weights, rollout_is_sums(stats, group), rollout_is)


def rollout_is_sums(stats, group=None):
    """``stats`` with ``weight_sum`` and ``units`` summed over ``group`` (one ``all_reduce``)."""
    parts = torch.stack([stats["weight_sum"], stats["units"]])
    dist.all_reduce(parts, op=dist.ReduceOp.SUM, group=group)
    return dict(stats, weight_sum=parts[0], units=parts[1])
