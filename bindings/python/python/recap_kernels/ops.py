"""The raw ops as ``torch.library`` custom ops in namespace ``recap`` (``torch.ops.recap.*``).

Each op has one implementation for CPU and CUDA tensors (the Rust extension dispatches on the
tensors' device: the f64 CPU reference, or the kernels on ``torch.cuda.current_stream()``), a fake
implementation (output shapes and dtypes, for FakeTensor and ``torch.compile``) and, where the op is
differentiable, a registered autograd formula. Outputs are allocated here, by the same function for
the real and the fake implementation, so the two cannot disagree.

Conventions: per-token arrays are float32 (masks float32, uint8 or bool); ``cu_seqlens``
``[B + 1]``, ``lambda_`` ``[K]`` and ``membership`` ``[B]`` are CPU tensors (read on the host before
any launch, so no device synchronization); ``objectives`` is a list of codes (0 policy, 1 nll);
``config`` is the JSON form of the crate's ``GrpoConfig`` (see ``functional.grpo_config``). The
CUDA path of ``grpo_loss`` reads the loss and statistics back (a synchronization; the result is then
written into the output tensors on the device); ``grpo_loss_async`` does not: it returns the
device-resident output, and ``cu_seqlens``, ``lambda_`` and ``membership`` may be CUDA tensors.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _native

__all__ = ["grpo_stats_len", "logits_stats_len", "grpo_output_len", "logits_output_len"]


def _affine(layout):
    """``(scalars, per_objective)``: a layout of K objectives holds ``scalars + per_objective * K``
    values (so the fake implementations also take a symbolic K)."""
    fields = layout(1)
    return sum(1 for f in fields if not f[3]), sum(1 for f in fields if f[3])


_GRPO_LEN = _affine(_native.grpo_stat_layout)
_LOGITS_LEN = _affine(_native.logits_stat_layout)


def grpo_stats_len(k):
    """Length of the fused loss's statistics vector for ``k`` objectives."""
    return _GRPO_LEN[0] + _GRPO_LEN[1] * k


def logits_stats_len(k):
    """Length of the loss-from-logits statistics vector for ``k`` objectives."""
    return _LOGITS_LEN[0] + _LOGITS_LEN[1] * k


def _empty(like: Tensor, shape, dtype) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=like.device)


def _contig(*xs):
    return [x.contiguous() if x is not None else None for x in xs]


def _batch(advantages, mask, cu_seqlens, lambda_, objectives, membership, ref_logp, rollout_logp, normalizers,
           seq_tokens, adv_per_token, config):
    """The batch arguments every loss passes to the extension (its `Batch`), contiguous."""
    advantages, mask, ref_logp, rollout_logp = _contig(advantages, mask, ref_logp, rollout_logp)
    return dict(advantages=advantages, mask=mask, cu_seqlens=cu_seqlens, lambda_=lambda_, objectives=objectives,
                membership=membership, ref_logp=ref_logp, rollout_logp=rollout_logp, normalizers=normalizers,
                seq_tokens=seq_tokens, adv_per_token=adv_per_token, config=config)


# --- the fused GRPO loss ------------------------------------------------------------------------
def _grpo_outputs(logp: Tensor, lambda_: Tensor):
    return (_empty(logp, (), torch.float32), _empty(logp, logp.shape, torch.float32),
            _empty(logp, (grpo_stats_len(lambda_.shape[0]),), torch.float64))


@torch.library.custom_op("recap::grpo_loss", mutates_args=())
def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, cu_seqlens: Tensor,
              lambda_: Tensor, objectives: List[int], membership: Optional[Tensor], ref_logp: Optional[Tensor],
              rollout_logp: Optional[Tensor], policy_weight: Optional[Tensor], normalizers: Optional[Tensor],
              seq_tokens: Optional[Tensor], adv_per_token: bool, config: str) -> Tuple[Tensor, Tensor, Tensor]:
    """The fused GRPO loss of K objectives: ``(loss, dloss/dlogp, stats)``."""
    loss, grad, stats = _grpo_outputs(logp, lambda_)
    logp, old_logp, policy_weight = _contig(logp, old_logp, policy_weight)
    batch = _batch(advantages, mask, cu_seqlens, lambda_, objectives, membership, ref_logp, rollout_logp, normalizers,
                   seq_tokens, adv_per_token, config)
    _native.grpo_loss(logp, old_logp, policy_weight, batch, grad, loss, stats)
    return loss, grad, stats


@grpo_loss.register_fake
def _(logp, old_logp, advantages, mask, cu_seqlens, lambda_, objectives, membership, ref_logp, rollout_logp,
      policy_weight, normalizers, seq_tokens, adv_per_token, config):
    return _grpo_outputs(logp, lambda_)


def _save_grad(index):
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[index])
    return setup_context


def _grpo_backward(ctx, g_loss, g_grad, g_stats):
    (grad,) = ctx.saved_tensors
    return (grad * g_loss,) + (None,) * 14


grpo_loss.register_autograd(_grpo_backward, setup_context=_save_grad(1))


# --- the fused GRPO loss, asynchronous ----------------------------------------------------------
def grpo_output_len(k):
    """Length (float64 values) of the asynchronous fused loss's output for ``k`` objectives."""
    return _OUT_LEN[0] + _OUT_LEN[1] * k


_OUT_LEN = (_native.grpo_output_len(1) - (_native.grpo_output_len(2) - _native.grpo_output_len(1)),
            _native.grpo_output_len(2) - _native.grpo_output_len(1))


def logits_output_len(k):
    """Length (float64 values) of the asynchronous losses' from logits output for ``k`` objectives."""
    return _native.logits_output_len(k)


def _grpo_async_outputs(logp: Tensor, objectives: List[int]):
    return (_empty(logp, (), torch.float32), _empty(logp, logp.shape, torch.float32),
            _empty(logp, (grpo_output_len(len(objectives)),), torch.float64))


@torch.library.custom_op("recap::grpo_loss_async", mutates_args=())
def grpo_loss_async(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, cu_seqlens: Tensor,
                    lambda_: Tensor, objectives: List[int], membership: Optional[Tensor], ref_logp: Optional[Tensor],
                    rollout_logp: Optional[Tensor], policy_weight: Optional[Tensor], normalizers: Optional[Tensor],
                    seq_tokens: Optional[Tensor], adv_per_token: bool, config: str) -> Tuple[Tensor, Tensor, Tensor]:
    """The fused GRPO loss without a host synchronization: ``(loss, dloss/dlogp, out)``, ``out`` the
    device-resident output (``grpo_output_len(K)`` float64: the loss, the device-side check flags,
    the normalizers, the statistics), read back by ``_native.grpo_output_read``. ``cu_seqlens``,
    ``lambda_`` and ``membership`` are CPU tensors, or all three on the device (checked there)."""
    _, grad, out = _grpo_async_outputs(logp, objectives)
    logp, old_logp, policy_weight = _contig(logp, old_logp, policy_weight)
    batch = _batch(advantages, mask, cu_seqlens, lambda_, objectives, membership, ref_logp, rollout_logp, normalizers,
                   seq_tokens, adv_per_token, config)
    _native.grpo_loss_async(logp, old_logp, policy_weight, batch, grad, out)
    return out[0].to(torch.float32), grad, out


@grpo_loss_async.register_fake
def _(logp, old_logp, advantages, mask, cu_seqlens, lambda_, objectives, membership, ref_logp, rollout_logp,
      policy_weight, normalizers, seq_tokens, adv_per_token, config):
    return _grpo_async_outputs(logp, objectives)


grpo_loss_async.register_autograd(_grpo_backward, setup_context=_save_grad(1))


# --- KL -----------------------------------------------------------------------------------------
@torch.library.custom_op("recap::kl", mutates_args=())
def kl(logp: Tensor, ref_logp: Tensor, mask: Optional[Tensor], estimator: str) -> Tuple[Tensor, Tensor]:
    """Per-token KL estimator and its gradient with respect to ``logp`` (masked tokens: 0)."""
    out, grad = _empty(logp, logp.shape, torch.float32), _empty(logp, logp.shape, torch.float32)
    logp, ref_logp, mask = _contig(logp, ref_logp, mask)
    _native.kl(logp, ref_logp, mask, estimator, out, grad)
    return out, grad


@kl.register_fake
def _(logp, ref_logp, mask, estimator):
    return _empty(logp, logp.shape, torch.float32), _empty(logp, logp.shape, torch.float32)


def _kl_backward(ctx, g_kl, g_grad):
    (grad,) = ctx.saved_tensors
    return grad * g_kl, None, None, None


kl.register_autograd(_kl_backward, setup_context=_save_grad(1))


# --- rollout rejection --------------------------------------------------------------------------
@torch.library.custom_op("recap::rollout_rejection", mutates_args=())
def rollout_rejection(log_ratio: Tensor, mask: Tensor, cu_seqlens: Tensor, rollout_rs: str,
                      rollout_rs_threshold: str, veto_threshold: Optional[float] = None) -> Tensor:
    """verl's rollout rejection criteria: ``[T]`` int32 flags, bit i where option i rejects the
    token (0 at masked tokens), the veto (if given) last. Not differentiable (a selection)."""
    flags = _empty(log_ratio, log_ratio.shape, torch.int32)
    log_ratio, mask = _contig(log_ratio, mask)
    _native.rollout_rejection(log_ratio, mask, cu_seqlens, rollout_rs, rollout_rs_threshold, veto_threshold,
                              flags)
    return flags


@rollout_rejection.register_fake
def _(log_ratio, mask, cu_seqlens, rollout_rs, rollout_rs_threshold, veto_threshold=None):
    return _empty(log_ratio, log_ratio.shape, torch.int32)


# --- rollout IS weights -------------------------------------------------------------------------
ROLLOUT_IS_STATS = _native.ROLLOUT_IS_STATS  # weight sum, units, ratio min, ratio max, corrected, mean, factor


@torch.library.custom_op("recap::rollout_is_weights", mutates_args=())
def rollout_is_weights(log_ratio: Tensor, mask: Tensor, cu_seqlens: Tensor, rollout_is: str,
                       rollout_is_threshold: str, batch_normalize: bool) -> Tuple[Tensor, Tensor]:
    """verl's rollout IS weights: ``[T]`` float32 (0 at masked tokens) and the ``[7]`` float64 stats
    (weight sum, units, smallest and largest raw ratio, corrected units, batch mean, the factor the
    weights were divided by). Not differentiable (verl detaches them)."""
    weights = _empty(log_ratio, log_ratio.shape, torch.float32)
    stats = _empty(log_ratio, (ROLLOUT_IS_STATS,), torch.float64)
    log_ratio, mask = _contig(log_ratio, mask)
    _native.rollout_is_weights(log_ratio, mask, cu_seqlens, rollout_is, rollout_is_threshold, batch_normalize,
                               weights, stats)
    return weights, stats


@rollout_is_weights.register_fake
def _(log_ratio, mask, cu_seqlens, rollout_is, rollout_is_threshold, batch_normalize):
    return (_empty(log_ratio, log_ratio.shape, torch.float32),
            _empty(log_ratio, (ROLLOUT_IS_STATS,), torch.float64))


# --- weighted reduction -------------------------------------------------------------------------
def _reduce_outputs(losses: Tensor, lambda_: Tensor):
    return (_empty(losses, (), torch.float32), _empty(losses, losses.shape, torch.float32),
            _empty(losses, (3 * lambda_.shape[0],), torch.float64))


@torch.library.custom_op("recap::weighted_reduce", mutates_args=())
def weighted_reduce(losses: Tensor, mask: Tensor, cu_seqlens: Tensor, lambda_: Tensor, membership: Optional[Tensor],
                    normalizers: Optional[Tensor], seq_tokens: Optional[Tensor],
                    config: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-objective aggregation of ``losses`` [T, K]: ``(total, dtotal/dlosses, stats [3K])``."""
    total, grad, stats = _reduce_outputs(losses, lambda_)
    losses, mask = _contig(losses, mask)
    _native.weighted_reduce(losses, mask, cu_seqlens, lambda_, membership, normalizers, seq_tokens, config, grad,
                            total, stats)
    return total, grad, stats


@weighted_reduce.register_fake
def _(losses, mask, cu_seqlens, lambda_, membership, normalizers, seq_tokens, config):
    return _reduce_outputs(losses, lambda_)


def _reduce_backward(ctx, g_total, g_grad, g_stats):
    (grad,) = ctx.saved_tensors
    return (grad * g_total,) + (None,) * 7


weighted_reduce.register_autograd(_reduce_backward, setup_context=_save_grad(1))


# --- normalizers --------------------------------------------------------------------------------
def _norm_outputs(mask: Tensor, cu_seqlens: Tensor, k: int):
    return (_empty(mask, (2, k + 1), torch.float64), _empty(mask, (cu_seqlens.shape[0] - 1,), torch.float64))


@torch.library.custom_op("recap::count_normalizers", mutates_args=())
def count_normalizers(mask: Tensor, cu_seqlens: Tensor, membership: Optional[Tensor], k: int) -> Tuple[Tensor, Tensor]:
    """This batch's normalizers ``[2, K + 1]`` (token weights, then sequence counts; the KL slot last)
    and per-sequence token weights ``[B]``, float64 on the mask's device."""
    normalizers, seq_tokens = _norm_outputs(mask, cu_seqlens, k)
    (mask,) = _contig(mask)
    _native.count_normalizers(mask, cu_seqlens, membership, k, normalizers, seq_tokens)
    return normalizers, seq_tokens


@count_normalizers.register_fake
def _(mask, cu_seqlens, membership, k):
    return _norm_outputs(mask, cu_seqlens, k)


# --- log-probabilities and entropy from logits --------------------------------------------------
def _rows(logits: Tensor):
    return logits.shape[0]


@torch.library.custom_op("recap::logprob_forward", mutates_args=())
def logprob_forward(logits: Tensor, labels: Tensor, temperature: float, ignore_index: int,
                    inplace_backward: bool, sum_pi_squared: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(logp, entropy, lse, sum_pi_squared)`` float32 of ``logits`` [T, V] (rows may be strided)
    at ``temperature``: ``[T]`` each, the last ``sum_j p_j^2`` (verl's ``sum_pi_squared``) when
    asked for and ``[0]`` otherwise; the backward writes the gradient over the logits when
    ``inplace_backward``."""
    t = _rows(logits)
    logp, ent, lse = (_empty(logits, (t,), torch.float32) for _ in range(3))
    spp = _empty(logits, (t if sum_pi_squared else 0,), torch.float32)
    (labels,) = _contig(labels)
    _native.logprob_forward(logits, labels, temperature, ignore_index, logp, ent, lse,
                            spp if sum_pi_squared else None)
    return logp, ent, lse, spp


@logprob_forward.register_fake
def _(logits, labels, temperature, ignore_index, inplace_backward, sum_pi_squared=False):
    t = _rows(logits)
    return tuple(_empty(logits, (t,), torch.float32) for _ in range(3)) + (
        _empty(logits, (t if sum_pi_squared else 0,), torch.float32),)


@torch.library.custom_op("recap::logprob_backward_", mutates_args=("logits",))
def logprob_backward_(logits: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor, g_logp: Tensor,
                      g_entropy: Optional[Tensor], temperature: float, ignore_index: int,
                      sum_pi_squared: Optional[Tensor] = None, g_sum_pi_squared: Optional[Tensor] = None) -> None:
    """The gradient of ``g_logp . logp + g_entropy . entropy (+ g_sum_pi_squared . sum_pi_squared)``
    with respect to ``logits``, written over ``logits`` (same dtype and layout)."""
    labels, lse, entropy, g_logp, g_entropy, sum_pi_squared, g_sum_pi_squared = _contig(
        labels, lse, entropy, g_logp, g_entropy, sum_pi_squared, g_sum_pi_squared)
    _native.logprob_backward_(logits, labels, lse, entropy, g_logp, g_entropy, temperature, ignore_index,
                              sum_pi_squared, g_sum_pi_squared)


@logprob_backward_.register_fake
def _(logits, labels, lse, entropy, g_logp, g_entropy, temperature, ignore_index, sum_pi_squared=None,
      g_sum_pi_squared=None):
    return None


@torch.library.custom_op("recap::logprob_backward", mutates_args=())
def logprob_backward(logits: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor, g_logp: Tensor,
                     g_entropy: Optional[Tensor], temperature: float, ignore_index: int,
                     sum_pi_squared: Optional[Tensor] = None, g_sum_pi_squared: Optional[Tensor] = None) -> Tensor:
    """Out of place: the same gradient as a new tensor (a contiguous copy of the logits' shape)."""
    out = logits.clone(memory_format=torch.contiguous_format)
    logprob_backward_(out, labels, lse, entropy, g_logp, g_entropy, temperature, ignore_index, sum_pi_squared,
                      g_sum_pi_squared)
    return out


@logprob_backward.register_fake
def _(logits, labels, lse, entropy, g_logp, g_entropy, temperature, ignore_index, sum_pi_squared=None,
      g_sum_pi_squared=None):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _logprob_setup(ctx, inputs, output):
    logits, labels, temperature, ignore_index, inplace, *rest = inputs
    _, ent, lse, spp = output
    ctx.save_for_backward(logits, labels, lse, ent, spp)
    ctx.options = (float(temperature), int(ignore_index), bool(inplace), bool(rest and rest[0]))


def _logprob_autograd(ctx, g_logp, g_ent, g_lse, g_spp):
    logits, labels, lse, ent, spp = ctx.saved_tensors
    temperature, ignore_index, inplace, with_spp = ctx.options
    g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float()
    g_ent = None if g_ent is None else g_ent.float()
    # Σπ² takes part only when it was computed and something differentiates it
    spp, g_spp = (spp, g_spp.float()) if with_spp and g_spp is not None else (None, None)
    args = (labels, lse, ent, g_logp, g_ent, temperature, ignore_index, spp, g_spp)
    if inplace:
        # the gradient overwrites the saved logits: a later use of them by autograd fails its
        # version check instead of reading the gradient
        logprob_backward_(logits, *args)
        return logits, None, None, None, None, None
    return logprob_backward(logits, *args), None, None, None, None, None


logprob_forward.register_autograd(_logprob_autograd, setup_context=_logprob_setup)


# --- the loss from logits -----------------------------------------------------------------------
@torch.library.custom_op("recap::grpo_loss_from_logits", mutates_args=())
def grpo_loss_from_logits(logits: Tensor, labels: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                          cu_seqlens: Tensor, lambda_: Tensor, objectives: List[int], membership: Optional[Tensor],
                          ref_logp: Optional[Tensor], rollout_logp: Optional[Tensor], normalizers: Optional[Tensor],
                          seq_tokens: Optional[Tensor], adv_per_token: bool, config: str, temperature: float,
                          ignore_index: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Log-probs, the fused loss (with KL) and the entropy bonus in one call:
    ``(loss, stats, dloss/dlogits)``."""
    loss = _empty(logits, (), torch.float32)
    stats = _empty(logits, (logits_stats_len(lambda_.shape[0]),), torch.float64)
    dlogits = logits.clone(memory_format=torch.contiguous_format)
    labels, old_logp = _contig(labels, old_logp)
    batch = _batch(advantages, mask, cu_seqlens, lambda_, objectives, membership, ref_logp, rollout_logp, normalizers,
                   seq_tokens, adv_per_token, config)
    _native.grpo_loss_from_logits_(dlogits, labels, old_logp, batch, temperature, ignore_index, loss, stats)
    return loss, stats, dlogits


@grpo_loss_from_logits.register_fake
def _(logits, labels, old_logp, advantages, mask, cu_seqlens, lambda_, objectives, membership, ref_logp,
      rollout_logp, normalizers, seq_tokens, adv_per_token, config, temperature, ignore_index):
    return (_empty(logits, (), torch.float32), _empty(logits, (logits_stats_len(lambda_.shape[0]),), torch.float64),
            torch.empty_like(logits, memory_format=torch.contiguous_format))


def _from_logits_backward(ctx, g_loss, g_stats, g_dlogits):
    (dlogits,) = ctx.saved_tensors
    return (dlogits * g_loss.to(dlogits.dtype),) + (None,) * 16


grpo_loss_from_logits.register_autograd(_from_logits_backward, setup_context=_save_grad(2))


def _from_logits_async_outputs(logits: Tensor, objectives: List[int]):
    return (_empty(logits, (), torch.float32), torch.empty_like(logits, memory_format=torch.contiguous_format),
            _empty(logits, (_native.logits_output_len(len(objectives)),), torch.float64))


@torch.library.custom_op("recap::grpo_loss_from_logits_async", mutates_args=())
def grpo_loss_from_logits_async(logits: Tensor, labels: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                                cu_seqlens: Tensor, lambda_: Tensor, objectives: List[int],
                                membership: Optional[Tensor], ref_logp: Optional[Tensor],
                                rollout_logp: Optional[Tensor], normalizers: Optional[Tensor],
                                seq_tokens: Optional[Tensor], adv_per_token: bool, config: str, temperature: float,
                                ignore_index: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The loss from logits without a host synchronization: ``(loss, dloss/dlogits, out)``, ``out``
    the device-resident output (``logits_output_len(K)`` float64, read by
    ``_native.logits_output_read``); the workspace comes from PyTorch's allocator."""
    dlogits = logits.clone(memory_format=torch.contiguous_format)
    out = _empty(logits, (_native.logits_output_len(len(objectives)),), torch.float64)
    ws = _empty(logits, (_native.logits_workspace_len(logits.shape[0]),), torch.uint8)
    labels, old_logp = _contig(labels, old_logp)
    batch = _batch(advantages, mask, cu_seqlens, lambda_, objectives, membership, ref_logp, rollout_logp, normalizers,
                   seq_tokens, adv_per_token, config)
    _native.grpo_loss_from_logits_async_(dlogits, labels, old_logp, batch, temperature, ignore_index, ws, out)
    return out[0].to(torch.float32), dlogits, out


@grpo_loss_from_logits_async.register_fake
def _(logits, labels, old_logp, advantages, mask, cu_seqlens, lambda_, objectives, membership, ref_logp,
      rollout_logp, normalizers, seq_tokens, adv_per_token, config, temperature, ignore_index):
    return _from_logits_async_outputs(logits, objectives)


def _from_logits_async_backward(ctx, g_loss, g_dlogits, g_out):
    (dlogits,) = ctx.saved_tensors
    return (dlogits * g_loss.to(dlogits.dtype),) + (None,) * 16


grpo_loss_from_logits_async.register_autograd(_from_logits_async_backward, setup_context=_save_grad(1))


# --- the fused-linear loss ----------------------------------------------------------------------
def _linear_outputs(hidden: Tensor, weight: Tensor, lambda_: Tensor):
    return (_empty(hidden, (), torch.float32), _empty(hidden, (logits_stats_len(lambda_.shape[0]),), torch.float64),
            _empty(hidden, hidden.shape, hidden.dtype), _empty(hidden, weight.shape, torch.float32))


@torch.library.custom_op("recap::fused_linear_grpo_loss", mutates_args=())
def fused_linear_grpo_loss(hidden: Tensor, weight: Tensor, labels: Tensor, old_logp: Tensor, advantages: Tensor,
                           mask: Tensor, cu_seqlens: Tensor, lambda_: Tensor, objectives: List[int],
                           membership: Optional[Tensor], ref_logp: Optional[Tensor], normalizers: Optional[Tensor],
                           adv_per_token: bool, config: str, temperature: float, chunk_tokens: int,
                           memory_budget: int, fp32_logits: bool,
                           batch_invariant: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The GRPO loss of ``hidden [T, H] @ weight[V, H]^T`` chunk by chunk, never holding [T, V]
    logits: ``(loss, stats, dloss/dhidden, dloss/dweight)`` (the last in float32)."""
    loss, stats, d_hidden, d_weight = _linear_outputs(hidden, weight, lambda_)
    hidden, weight, labels, old_logp = _contig(hidden, weight, labels, old_logp)
    batch = _batch(advantages, mask, cu_seqlens, lambda_, objectives, membership, ref_logp, None, normalizers, None,
                   adv_per_token, config)
    _native.fused_linear_grpo_loss(hidden, weight, labels, old_logp, batch, temperature,
                                   chunk_tokens if chunk_tokens > 0 else None, memory_budget, fp32_logits, d_hidden,
                                   d_weight, loss, stats, batch_invariant)
    return loss, stats, d_hidden, d_weight


@fused_linear_grpo_loss.register_fake
def _(hidden, weight, labels, old_logp, advantages, mask, cu_seqlens, lambda_, objectives, membership, ref_logp,
      normalizers, adv_per_token, config, temperature, chunk_tokens, memory_budget, fp32_logits,
      batch_invariant=False):
    return _linear_outputs(hidden, weight, lambda_)


def _linear_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2], output[3])
    ctx.weight_dtype = inputs[1].dtype


def _linear_backward(ctx, g_loss, g_stats, g_dh, g_dw):
    d_hidden, d_weight = ctx.saved_tensors
    return (d_hidden * g_loss.to(d_hidden.dtype), (d_weight * g_loss).to(ctx.weight_dtype)) + (None,) * 17


fused_linear_grpo_loss.register_autograd(_linear_backward, setup_context=_linear_setup)


def _linear_async_outputs(hidden: Tensor, weight: Tensor, objectives: List[int]):
    return (_empty(hidden, (), torch.float32), _empty(hidden, hidden.shape, hidden.dtype),
            _empty(hidden, weight.shape, torch.float32),
            _empty(hidden, (_native.logits_output_len(len(objectives)),), torch.float64))


@torch.library.custom_op("recap::fused_linear_grpo_loss_async", mutates_args=())
def fused_linear_grpo_loss_async(hidden: Tensor, weight: Tensor, labels: Tensor, old_logp: Tensor,
                                 advantages: Tensor, mask: Tensor, cu_seqlens: Tensor, lambda_: Tensor,
                                 objectives: List[int], membership: Optional[Tensor], ref_logp: Optional[Tensor],
                                 normalizers: Optional[Tensor], adv_per_token: bool, config: str,
                                 temperature: float, chunk_tokens: int, memory_budget: int,
                                 fp32_logits: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused-linear loss without a host synchronization: ``(loss, dloss/dhidden, dloss/dweight,
    out)``, ``out`` as ``grpo_loss_from_logits_async``'s; the workspace (one chunk of logits) comes
    from PyTorch's allocator."""
    _, d_hidden, d_weight, out = _linear_async_outputs(hidden, weight, objectives)
    hidden, weight, labels, old_logp = _contig(hidden, weight, labels, old_logp)
    chunk = chunk_tokens if chunk_tokens > 0 else None
    b = (cu_seqlens.shape[0] - 1) if cu_seqlens.dim() == 1 else 0
    ws = _empty(hidden, (_native.fused_linear_workspace_len(hidden.shape[0], b, len(objectives), weight.shape[0],
                                                            chunk, memory_budget, fp32_logits),), torch.uint8)
    batch = _batch(advantages, mask, cu_seqlens, lambda_, objectives, membership, ref_logp, None, normalizers, None,
                   adv_per_token, config)
    _native.fused_linear_grpo_loss_async(hidden, weight, labels, old_logp, batch, temperature, chunk, memory_budget,
                                         fp32_logits, ws, d_hidden, d_weight, out)
    return out[0].to(torch.float32), d_hidden, d_weight, out


@fused_linear_grpo_loss_async.register_fake
def _(hidden, weight, labels, old_logp, advantages, mask, cu_seqlens, lambda_, objectives, membership, ref_logp,
      normalizers, adv_per_token, config, temperature, chunk_tokens, memory_budget, fp32_logits):
    return _linear_async_outputs(hidden, weight, objectives)


def _linear_async_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])
    ctx.weight_dtype = inputs[1].dtype


def _linear_async_backward(ctx, g_loss, g_dh, g_dw, g_out):
    d_hidden, d_weight = ctx.saved_tensors
    return (d_hidden * g_loss.to(d_hidden.dtype), (d_weight * g_loss).to(ctx.weight_dtype)) + (None,) * 16


fused_linear_grpo_loss_async.register_autograd(_linear_async_backward, setup_context=_linear_async_setup)


# --- group advantages ---------------------------------------------------------------------------
@torch.library.custom_op("recap::group_advantages", mutates_args=())
def group_advantages(rewards: Tensor, group_ids: Optional[Tensor], lengths: Optional[Tensor], group_size: int,
                     num_groups: int, modes: str, eps: float, singletons: str,
                     reward_weights: Optional[list[float]] = None, baselines: Optional[Tensor] = None) -> Tensor:
    """Group advantages of ``rewards`` [B, K]; ``modes``: one per objective, comma-separated (grpo,
    dr_grpo, rloo, batch, grpo_passk, dr_grpo_passk, opo, gpg, reinforce_plus_plus,
    reinforce_plus_plus_baseline, gdpo, remax); ``lengths`` [B] int32 response lengths (opo and
    REINFORCE++); ``singletons``: what a group of one gets, ``zero`` or ``verl``; ``reward_weights``
    [K]: one advantage [B, 1] of the weighted columns; ``baselines`` (shaped as the output; remax).
    Not differentiable."""
    out = _empty(rewards, _adv_shape(rewards, reward_weights), torch.float32)
    rewards, group_ids, lengths, baselines = _contig(rewards, group_ids, lengths, baselines)
    _native.group_advantages(rewards, group_ids, lengths, baselines, group_size, num_groups, modes.split(","), eps,
                             singletons, reward_weights, out)
    return out


def _adv_shape(rewards, reward_weights):
    return rewards.shape if reward_weights is None else (rewards.shape[0], 1)


@group_advantages.register_fake
def _(rewards, group_ids, lengths, group_size, num_groups, modes, eps, singletons, reward_weights=None, baselines=None):
    return _empty(rewards, _adv_shape(rewards, reward_weights), torch.float32)


@torch.library.custom_op("recap::optimal_token_baseline", mutates_args=())
def optimal_token_baseline(token_rewards: Tensor, old_logp: Tensor, sum_pi_squared: Tensor,
                           rollout_is_weights: Optional[Tensor], mask: Tensor, cu_seqlens: Tensor,
                           group_ids: Optional[Tensor], group_size: int, multi_turn: bool, handle_zero_tail: bool,
                           eps: float) -> Tuple[Tensor, Tensor]:
    """verl's optimal token baseline of packed ``[T]`` inputs: ``(advantages, returns)``;
    ``cu_seqlens`` and ``group_ids`` ``[B]`` are CPU int32 tensors. Not differentiable."""
    adv = _empty(token_rewards, token_rewards.shape, torch.float32)
    ret = _empty(token_rewards, token_rewards.shape, torch.float32)
    token_rewards, old_logp, sum_pi_squared, rollout_is_weights, mask, group_ids = _contig(
        token_rewards, old_logp, sum_pi_squared, rollout_is_weights, mask, group_ids)
    _native.optimal_token_baseline(token_rewards, old_logp, sum_pi_squared, rollout_is_weights, mask, cu_seqlens,
                                   group_ids, group_size, multi_turn, handle_zero_tail, eps, adv, ret)
    return adv, ret


@optimal_token_baseline.register_fake
def _(token_rewards, old_logp, sum_pi_squared, rollout_is_weights, mask, cu_seqlens, group_ids, group_size,
      multi_turn, handle_zero_tail, eps):
    return (_empty(token_rewards, token_rewards.shape, torch.float32),
            _empty(token_rewards, token_rewards.shape, torch.float32))



@torch.library.custom_op("recap::gae", mutates_args=())
def gae(token_rewards: Tensor, values: Tensor, mask: Tensor, cu_seqlens: Tensor, gamma: float, lam: float,
        whiten: bool) -> Tuple[Tensor, Tensor]:
    """Generalized advantage estimation of packed ``[T]`` inputs: ``(advantages, returns)``;
    ``cu_seqlens`` is a CPU int32 tensor. Not differentiable."""
    adv = _empty(token_rewards, token_rewards.shape, torch.float32)
    ret = _empty(token_rewards, token_rewards.shape, torch.float32)
    token_rewards, values, mask = _contig(token_rewards, values, mask)
    _native.gae(token_rewards, values, mask, cu_seqlens, gamma, lam, whiten, adv, ret)
    return adv, ret


@gae.register_fake
def _(token_rewards, values, mask, cu_seqlens, gamma, lam, whiten):
    return (_empty(token_rewards, token_rewards.shape, torch.float32),
            _empty(token_rewards, token_rewards.shape, torch.float32))

# --- tensor parallelism: vocabulary shards ------------------------------------------------------
@torch.library.custom_op("recap::tp_partials", mutates_args=())
def tp_partials(logits: Tensor, labels: Tensor, vocab_start: int, temperature: float, ignore_index: int,
                sum_pi_squared: bool = False) -> Tensor:
    """A vocabulary shard's partials ``[3, T]`` (its LSE, its entropy, the label's logit or -inf),
    ``[4, T]`` with ``sum_pi_squared`` (and the shard's own ``sum_j p_j^2``), of ``logits``
    ``[T, V_r]`` holding the columns ``[vocab_start, vocab_start + V_r)``."""
    out = _empty(logits, (4 if sum_pi_squared else 3, _rows(logits)), torch.float32)
    (labels,) = _contig(labels)
    _native.tp_partials(logits, labels, vocab_start, temperature, ignore_index, out)
    return out


@tp_partials.register_fake
def _(logits, labels, vocab_start, temperature, ignore_index, sum_pi_squared=False):
    return _empty(logits, (4 if sum_pi_squared else 3, _rows(logits)), torch.float32)


@torch.library.custom_op("recap::tp_combine", mutates_args=())
def tp_combine(partials: Tensor, labels: Tensor, ignore_index: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The shards' partials ``[P, 3, T]`` or ``[P, 4, T]`` (ascending vocab_start) combined into the
    whole vocabulary's ``(logp, entropy, lse, sum_pi_squared)`` (the last ``[0]`` with 3 planes)."""
    t = partials.shape[2]
    logp, ent, lse = (_empty(partials, (t,), torch.float32) for _ in range(3))
    spp = _empty(partials, (t if partials.shape[1] == 4 else 0,), torch.float32)
    partials, labels = _contig(partials, labels)
    _native.tp_combine(partials, labels, ignore_index, logp, ent, lse, spp if partials.shape[1] == 4 else None)
    return logp, ent, lse, spp


@tp_combine.register_fake
def _(partials, labels, ignore_index):
    t = partials.shape[2]
    return tuple(_empty(partials, (t,), torch.float32) for _ in range(3)) + (
        _empty(partials, (t if partials.shape[1] == 4 else 0,), torch.float32),)


@torch.library.custom_op("recap::tp_backward_", mutates_args=("logits",))
def tp_backward_(logits: Tensor, labels: Tensor, vocab_start: int, lse: Tensor, entropy: Tensor, g_logp: Tensor,
                 g_entropy: Optional[Tensor], temperature: float, ignore_index: int,
                 sum_pi_squared: Optional[Tensor] = None, g_sum_pi_squared: Optional[Tensor] = None) -> None:
    """The shard's slice of the whole-vocabulary gradient, over the shard's ``logits`` (with the
    combined ``sum_pi_squared`` and its gradient, both or neither)."""
    labels, lse, entropy, g_logp, g_entropy, sum_pi_squared, g_sum_pi_squared = _contig(
        labels, lse, entropy, g_logp, g_entropy, sum_pi_squared, g_sum_pi_squared)
    _native.tp_backward_(logits, labels, vocab_start, lse, entropy, g_logp, g_entropy, temperature, ignore_index,
                         sum_pi_squared, g_sum_pi_squared)


@tp_backward_.register_fake
def _(logits, labels, vocab_start, lse, entropy, g_logp, g_entropy, temperature, ignore_index, sum_pi_squared=None,
      g_sum_pi_squared=None):
    return None
