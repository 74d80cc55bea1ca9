"""Tensor (vocabulary) parallelism: log-probabilities, entropy and the GRPO loss on logits sharded
over the vocabulary (``[T, V / tp]`` per rank, as Megatron's vocab-parallel output layer and FSDP2 +
TP hold them), with no gather of the ``[T, V]`` logits.

    import recap_kernels.tensor_parallel as tp
    logp, entropy = tp.logprobs_from_logits(logits_shard, labels, vocab_start, group=tp_group)
    loss, metrics = tp.grpo_loss_from_logits(logits_shard, labels, vocab_start, old_logp, advantages,
                                             response_mask, group=tp_group, kl_coef=0.0)

Each rank computes its shard's partial statistics per row (the shard's LSE, entropy and the label's
logit, and with ``return_sum_pi_squared`` its own ``sum_j p_j^2``), the ranks exchange them with
one ``all_gather`` of a ``[3 T + 1]`` (or ``[4 T + 1]``) float tensor (the partials and the shard's
``vocab_start``), and every rank combines them in ascending order of
``vocab_start``: every rank gets the same bits of ``logp`` and ``entropy``, whatever the order the
collective delivered the partials in. The backward writes each rank's slice of the
whole-vocabulary gradient over its shard of the logits, with no collective (the convention of
Megatron's vocab-parallel cross entropy). ``labels`` are the whole vocabulary's ids on every rank.

With a vocabulary-sharded LM head (``fused_linear_grpo_loss``: ``logits_r = hidden W_r^T``), the
gradient of ``hidden`` is the sum over the ranks of ``dlogits_r W_r``: its backward does that
``all_reduce`` over the group (as a column-parallel output layer does); the weight gradient is the
rank's own shard's.
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import _args as A
from . import functional as F
from . import ops
from ._native import RecapError

__all__ = ["logprobs_from_logits", "grpo_loss_from_logits", "fused_linear_grpo_loss", "pack", "combine"]


def pack(partials: Tensor, vocab_start: int) -> Tensor:
    """A shard's partials ``[planes, T]`` (3, or 4 with Σπ²) and its ``vocab_start`` as one float32
    tensor ``[planes T + 1]`` (the start's int32 bits in the last element), what the ranks
    all-gather."""
    start = torch.tensor([vocab_start], dtype=torch.int32, device=partials.device).view(torch.float32)
    return torch.cat([partials.reshape(-1), start])


def combine(gathered: Tensor, labels: Tensor, ignore_index: int = -100, planes: int = 3):
    """The gathered packed partials ``[P, planes T + 1]`` (any order) combined, in ascending order of
    their shards' ``vocab_start``, into ``(logp, entropy, lse)`` over the whole vocabulary, and
    ``sum_pi_squared`` fourth with ``planes=4``."""
    p = gathered.shape[0]
    starts = gathered[:, -1].contiguous().view(torch.int32)
    order = torch.argsort(starts, stable=True)
    parts = gathered.index_select(0, order)[:, :-1].reshape(p, planes, -1)
    out = ops.tp_combine(parts, labels, A.integer("ignore_index", ignore_index, A.INT32_MIN, A.INT32_MAX))
    return out if planes == 4 else out[:3]


def _exchange(partials: Tensor, vocab_start: int, labels: Tensor, ignore_index: int, group):
    packed = pack(partials, vocab_start)
    world = dist.get_world_size(group)
    parts = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed, group=group)
    return combine(torch.stack(parts), labels, ignore_index, planes=partials.shape[0])


def _labels(labels: Tensor, rows: int) -> Tensor:
    y = A.device_ints("labels", labels).reshape(-1).contiguous()
    if y.shape[0] != rows:
        raise RecapError(f"invalid argument `labels`: expected {rows} labels (one per row of the logits shard), "
                         f"got shape {tuple(labels.shape)}")
    return y


class _Logprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_start, group, temperature, ignore_index, inplace, want_spp):
        part = ops.tp_partials(logits, labels, vocab_start, temperature, ignore_index, want_spp)
        out = _exchange(part, vocab_start, labels, ignore_index, group)
        logp, ent, lse = out[:3]
        spp = out[3] if want_spp else lse.new_empty(0)
        ctx.save_for_backward(logits, labels, lse, ent, spp)
        ctx.options = (vocab_start, temperature, ignore_index, inplace, want_spp)
        ctx.set_materialize_grads(False)
        return logp, ent, spp

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_spp):
        logits, labels, lse, ent, spp = ctx.saved_tensors
        vocab_start, temperature, ignore_index, inplace, want_spp = ctx.options
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float().contiguous()
        g_ent = None if g_ent is None else g_ent.float().contiguous()
        # Σπ² takes part only when it was computed and something differentiates it
        spp, g_spp = (spp, g_spp.float().contiguous()) if want_spp and g_spp is not None else (None, None)
        z = logits if inplace else logits.clone(memory_format=torch.contiguous_format)
        ops.tp_backward_(z, labels, vocab_start, lse, ent, g_logp, g_ent, temperature, ignore_index, spp, g_spp)
        return z, None, None, None, None, None, None, None


def logprobs_from_logits(logits_shard: Tensor, labels: Tensor, vocab_start: int, group=None,
                         temperature: float = 1.0, ignore_index: int = -100, inplace_backward: bool = True,
                         return_sum_pi_squared: bool = False):
    """Per-token log-probabilities of ``labels`` (whole-vocabulary ids) and the entropy of each row
    over the whole vocabulary, from this rank's shard ``[..., V_r]`` of the logits (the columns from
    ``vocab_start`` on); one collective on ``group`` (default: the world). Differentiable with respect
    to ``logits_shard``: the backward gives this rank's slice of the whole gradient (written over the
    shard with ``inplace_backward``). Returns ``(logp, entropy)`` shaped like ``labels``, and with
    ``return_sum_pi_squared`` verl's ``sum_pi_squared`` (``sum_j p_j^2`` over the whole vocabulary,
    from each shard's own in the same read and the same collective, differentiable) third."""
    logits_shard = A.tensor("logits_shard", logits_shard)
    if logits_shard.dim() == 0 or logits_shard.shape[-1] == 0:
        A.fail("logits_shard", f"expected [..., V_r] with V_r >= 1, got shape {tuple(logits_shard.shape)}")
    shape = logits_shard.shape[:-1]
    z = logits_shard.reshape(-1, logits_shard.shape[-1])
    if z.shape[0] > 1 and z.stride(-1) != 1:
        z = z.contiguous()
    y = _labels(labels, z.shape[0])
    want_spp = bool(return_sum_pi_squared)
    logp, ent, spp = _Logprobs.apply(z, y, A.integer("vocab_start", vocab_start, 0, A.INT32_MAX), group,
                                     A.number("temperature", temperature),
                                     A.integer("ignore_index", ignore_index, A.INT32_MIN, A.INT32_MAX),
                                     bool(inplace_backward), want_spp)
    if want_spp:
        return logp.view(shape), ent.view(shape), spp.view(shape)
    return logp.view(shape), ent.view(shape)


def _entropy_bonus(loss, metrics, entropy, valid, cu_seqlens, entropy_coef, options):
    """``loss - entropy_coef * agg(entropy)`` over the valid tokens (in the loss's aggregation), with
    verl's ``actor/entropy`` (the masked mean)."""
    agg = {k: options[k] for k in ("agg_mode", "norm_constant") if k in options}
    ent_loss, _ = F.weighted_reduce(entropy, valid, cu_seqlens, **agg)
    metrics = dict(metrics)
    metrics["actor/entropy_loss"] = ent_loss.detach()
    metrics["actor/entropy"] = ((entropy * valid).sum() / valid.sum().clamp(min=1)).detach()
    return loss - entropy_coef * ent_loss, metrics


def grpo_loss_from_logits(logits_shard: Tensor, labels: Tensor, vocab_start: int, old_logp: Tensor,
                          advantages: Tensor, mask: Tensor, cu_seqlens=None, *, group=None, temperature: float = 1.0,
                          ignore_index: int = -100, entropy_coef: float = 0.0, inplace_backward: bool = True,
                          **options):
    """The fused GRPO loss (and its KL term, entropy bonus and metrics, as
    ``recap_kernels.grpo_loss_from_logits``) on vocabulary-sharded logits ``[B, L, V_r]`` /
    ``[T, V_r]``: every rank gets the same loss, and its shard's slice of the gradient."""
    logp, entropy = logprobs_from_logits(logits_shard, labels, vocab_start, group, temperature, ignore_index,
                                         inplace_backward)
    valid = F._mask(mask).float() * (labels != ignore_index).reshape(mask.shape).float()
    loss, metrics = F.grpo_loss(logp, old_logp, advantages, valid, cu_seqlens, **options)
    if entropy_coef:
        return _entropy_bonus(loss, metrics, entropy, valid, cu_seqlens, float(entropy_coef), options)
    return loss, metrics


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, group, temperature, ignore_index, chunk, reduce_grad):
        t = hidden.shape[0]
        part = torch.empty(3, t, dtype=torch.float32, device=hidden.device)
        for a in range(0, t, chunk):
            b = min(t, a + chunk)
            z = hidden[a:b] @ weight.T
            part[:, a:b] = ops.tp_partials(z, labels[a:b].contiguous(), vocab_start, temperature, ignore_index)
        logp, ent, lse = _exchange(part, vocab_start, labels, ignore_index, group)
        ctx.save_for_backward(hidden, weight, labels, lse, ent)
        ctx.options = (vocab_start, group, temperature, ignore_index, chunk, reduce_grad)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, labels, lse, ent = ctx.saved_tensors
        vocab_start, group, temperature, ignore_index, chunk, reduce_grad = ctx.options
        t = hidden.shape[0]
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float().contiguous()
        g_ent = None if g_ent is None else g_ent.float().contiguous()
        d_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for a in range(0, t, chunk):
            b = min(t, a + chunk)
            z = (hidden[a:b] @ weight.T).contiguous()
            ops.tp_backward_(z, labels[a:b].contiguous(), vocab_start, lse[a:b].contiguous(),
                             ent[a:b].contiguous(), g_logp[a:b].contiguous(),
                             None if g_ent is None else g_ent[a:b].contiguous(), temperature, ignore_index)
            d_hidden[a:b] = z.float() @ weight.float()
            d_weight += z.float().T @ hidden[a:b].float()
        if reduce_grad:
            # d hidden = sum over the ranks of dlogits_r W_r: the column-parallel input gradient
            dist.all_reduce(d_hidden, op=dist.ReduceOp.SUM, group=group)
        return (d_hidden.to(hidden.dtype), d_weight.to(weight.dtype)) + (None,) * 7


def fused_linear_grpo_loss(hidden: Tensor, weight_shard: Tensor, vocab_start: int, labels: Tensor, old_logp: Tensor,
                           advantages: Tensor, mask: Tensor, cu_seqlens=None, *, group=None,
                           temperature: float = 1.0, ignore_index: int = -100, chunk_tokens: int = 4096,
                           entropy_coef: float = 0.0, reduce_hidden_grad: bool = True, **options):
    """The GRPO loss of a policy whose LM head is sharded over the vocabulary
    (``weight_shard`` ``[V_r, H]``, the rows from ``vocab_start`` on): ``hidden [..., H]`` times the
    shard, chunk by chunk (``chunk_tokens`` rows of ``[chunk, V_r]`` logits at a time, recomputed in the
    backward), one collective for the partials, the fused loss on the log-probabilities. The
    backward all-reduces ``d hidden`` over ``group`` (``reduce_hidden_grad=False`` leaves it to the
    caller, e.g. a sequence-parallel reduce-scatter); the weight gradient is this rank's shard's."""
    hidden, weight_shard = A.tensor("hidden", hidden), A.tensor("weight_shard", weight_shard)
    if hidden.dim() == 0:
        A.fail("hidden", "expected [..., H], got a 0-dim tensor")
    lead = hidden.shape[:-1]
    x = hidden.reshape(-1, hidden.shape[-1])
    if weight_shard.dim() != 2 or weight_shard.shape[1] != x.shape[1]:
        raise RecapError(f"invalid argument `weight_shard`: expected [V_r, H = {x.shape[1]}], got shape "
                         f"{tuple(weight_shard.shape)}")
    y = _labels(labels, x.shape[0])
    logp, entropy = _LinearLogprobs.apply(x, weight_shard, y, A.integer("vocab_start", vocab_start, 0, A.INT32_MAX),
                                          group, A.number("temperature", temperature),
                                          A.integer("ignore_index", ignore_index, A.INT32_MIN, A.INT32_MAX),
                                          A.integer("chunk_tokens", chunk_tokens, 1, A.INT32_MAX),
                                          bool(reduce_hidden_grad))
    logp, entropy = logp.view(lead), entropy.view(lead)
    valid = F._mask(mask).float() * (labels != ignore_index).reshape(mask.shape).float()
    loss, metrics = F.grpo_loss(logp, old_logp, advantages, valid, cu_seqlens, **options)
    if entropy_coef:
        return _entropy_bonus(loss, metrics, entropy, valid, cu_seqlens, float(entropy_coef), options)
    return loss, metrics
