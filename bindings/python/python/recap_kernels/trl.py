"""TRL's GRPO loss (``GRPOTrainer._compute_loss``) as a function of TRL's per-token tensors, and a
mixin that puts it into a ``GRPOTrainer``.

    from recap_kernels import trl as rk_trl
    loss, metrics = rk_trl.grpo_loss(per_token_logps, old_per_token_logps, advantages, completion_mask,
                                     ref_per_token_logps, loss_type="dapo", beta=0.04, epsilon=0.2,
                                     epsilon_high=0.28, num_items_in_batch=num_items_in_batch)

    from trl import GRPOTrainer
    class Trainer(rk_trl.RecapGRPOMixin, GRPOTrainer):   # the mixin first: its _compute_loss wins
        pass

    trainer.add_callback(rk_trl.RecapRewardWeights(trainer))  # RECAP's weights on the reward functions

    advantages = rk_trl.compute_advantages(rewards_per_func, num_generations, reward_weights,
                                           scale_rewards="group", multi_objective_aggregation="normalize_then_sum")

Loss types: grpo, bnpo, dr_grpo, dapo (clipped surrogate, ``delta`` two-sided clipping), luspo
(the same surrogate, each sequence's token sum averaged over the sequences), cispo (the ratio
capped at ``epsilon_high``), sapo (``sapo_temperature_pos`` / ``_neg``), vespo (``-phi A logp``
with the detached gamma weight ``phi`` of the sequence's ratio, ``vespo_weights``), with
``importance_sampling_level`` "token" or "sequence" (GSPO; per-sequence advantages), ``beta`` (TRL's
k3 KL to the reference, unclamped, ``use_bias_correction_kl``), TRL's entropy mask (``entropy_mask``,
or ``entropies`` with ``top_entropy_quantile``), vLLM's ``importance_sampling_ratio`` and the
off-policy sequence mask (``off_policy_mask_threshold``, from ``sampling_per_token_logps``, else the
old log-probs), each normalized as TRL normalizes that loss type (``num_items_in_batch``,
``num_processes``, ``max_completion_length``, ``gradient_accumulation_steps``).

Differences from TRL: the log-ratio is clamped to +-20 before ``exp`` (verl's guard; TRL has none);
GSPO's log sequence ratio is capped at 10; CISPO has a lower clip at 1 - 2^-24 (TRL none); the
quantile of ``top_entropy_quantile`` is this process's (TRL gathers the entropies of every process
first).
"""
import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from . import _args as A
from . import functional as F
from ._native import RecapError
from ._replay import Replay

__all__ = ["compute_advantages", "vespo_weights", "grpo_loss", "high_entropy_mask", "off_policy_mask", "RecapGRPOMixin",
           "RecapRewardWeights", "RecapChunkedLogProb", "use_recap_lm_head"]

# the largest float32 below 1: CISPO's lower clip bound 1 - clip_low is then 2^-24, below any ratio
# that matters (TRL's CISPO clips only above)
_NO_LOWER_CLIP = 1.0 - 2.0 ** -24


def compute_advantages(rewards_per_func: Tensor, num_generations: int, reward_weights=None,
                       scale_rewards: str = "group",
                       multi_objective_aggregation: str = "sum_then_normalize") -> Tensor:
    """The advantages ``[B]`` GRPOTrainer computes from ``rewards_per_func`` ``[B, K]`` (its
    ``_generate_and_score_completions``), groups of ``num_generations`` consecutive completions, its
    eps 1e-4: ``sum_then_normalize`` takes the weighted sum, minus the group mean, over the group's
    std (``scale_rewards="group"``), the batch's (``"batch"``) or none (``"none"``);
    ``normalize_then_sum`` (GDPO) normalizes each reward function's column in its group, sums them
    weighted and normalizes over the batch (``scale_rewards`` plays no part there, as in TRL).
    ``reward_weights``: ``[K]``, default ones. Differences from TRL: a non-finite reward is an error
    (TRL turns a completion every function failed to score into advantage 0); a group of one gives 0."""
    r = rewards_per_func if rewards_per_func.dim() == 2 else rewards_per_func[:, None]
    weights = [1.0] * r.shape[1] if reward_weights is None else [float(w) for w in reward_weights]
    if multi_objective_aggregation == "normalize_then_sum":
        mode = "gdpo"
    elif multi_objective_aggregation == "sum_then_normalize":
        modes = {"group": "grpo", "batch": "batch", "none": "dr_grpo"}
        if scale_rewards not in modes:
            raise RecapError(f"invalid argument `scale_rewards`: expected group, batch or none, got {scale_rewards!r}")
        mode = modes[scale_rewards]
    else:
        raise RecapError("invalid argument `multi_objective_aggregation`: expected sum_then_normalize or "
                         f"normalize_then_sum, got {multi_objective_aggregation!r}")
    return F.group_advantages(r, num_generations, mode=mode, eps=1e-4, reward_weights=weights)


def high_entropy_mask(entropies: Tensor, mask: Tensor, top_entropy_quantile: float) -> Tensor:
    """TRL's ``get_high_entropy_mask`` on this process's tokens: 1 where a valid token's entropy is
    at or above the ``1 - q`` quantile of the valid tokens' entropies."""
    valid = mask.bool()
    local = entropies[valid].float()
    if local.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    threshold = torch.quantile(local, 1.0 - top_entropy_quantile)
    return (entropies * mask.float() >= threshold) & valid


def off_policy_mask(advantages: Tensor, per_token_logps: Tensor, sampling_per_token_logps: Tensor, mask: Tensor,
                    off_policy_threshold: float) -> Tensor:
    """TRL's ``get_off_policy_mask`` (DeepSeek-V3.2's off-policy sequence masking): ``[B, 1]``, 1 where
    a sequence is kept: its advantage is >= 0, or the mean over its tokens of
    ``sampling_logp - logp`` (unscorable NaN tokens counting 0) is at most the threshold."""
    kl = torch.nan_to_num(sampling_per_token_logps - per_token_logps.detach(), nan=0.0)
    m = mask.to(kl.dtype)
    mean_kl = (kl * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1.0)
    adv = advantages.reshape(advantages.shape[0], -1)[:, :1] if advantages.dim() > 1 else advantages[:, None]
    return ((adv >= 0) | (mean_kl <= off_policy_threshold)).to(dtype=mask.dtype)


def _options(loss_type: str, epsilon: float, epsilon_high: Optional[float], delta: Optional[float],
             importance_sampling_level: str, sapo_temperature_pos: float, sapo_temperature_neg: float,
             beta: float, use_bias_correction_kl: bool) -> dict:
    eps_high = epsilon if epsilon_high is None else epsilon_high
    o = {"dual_clip": None, "clip_low": float(epsilon), "clip_high": float(eps_high), "kl_coef": float(beta),
         "kl_estimator": "k3-unclamped", "kl_is_correction": bool(use_bias_correction_kl)}
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        if delta is not None:
            o["delta"] = float(delta)
    elif loss_type == "vespo":
        # -phi A logp with phi the detached gamma weight (a per-token policy weight, vespo_weights)
        if importance_sampling_level != "token":
            raise RecapError("invalid argument `importance_sampling_level`: vespo weighs sequences itself; TRL "
                             f"requires 'token', got {importance_sampling_level!r}")
        o.update(policy_loss="gpg")
    elif loss_type == "cispo":
        if eps_high < 1.0:
            raise RecapError(f"invalid argument `epsilon_high`: TRL's cispo caps the ratio at epsilon_high (e.g. "
                             f"5.0); expected a cap >= 1, got {eps_high}")
        o.update(policy_loss="cispo", clip_low=_NO_LOWER_CLIP, clip_high=float(eps_high) - 1.0)
    elif loss_type == "sapo":
        o.update(policy_loss={"sapo": {"tau_pos": float(sapo_temperature_pos),
                                       "tau_neg": float(sapo_temperature_neg)}})
    else:
        raise RecapError(f"invalid argument `loss_type`: expected grpo, bnpo, dr_grpo, dapo, luspo, cispo, sapo or "
                         f"vespo, got {loss_type!r}")
    if importance_sampling_level == "sequence":
        if loss_type in ("cispo", "sapo"):
            raise RecapError(f"invalid argument `importance_sampling_level`: 'sequence' is available for the "
                             f"clipped surrogate (grpo, bnpo, dr_grpo, dapo, luspo), not {loss_type}")
        o["policy_loss"] = "gspo"
    elif importance_sampling_level != "token":
        raise RecapError(f"invalid argument `importance_sampling_level`: expected 'token' or 'sequence', got "
                         f"{importance_sampling_level!r}")
    return o


def vespo_weights(advantages: Tensor, per_token_logps: Tensor, old_per_token_logps: Tensor, mask: Tensor,
                  importance_sampling_ratio: Optional[Tensor] = None, k_pos: float = 2.0, lambda_pos: float = 3.0,
                  k_neg: float = 3.0, lambda_neg: float = 2.0) -> Tensor:
    """VESPO's gamma weight of each sequence, ``[B, 1]`` (detached), as TRL's
    ``GRPOTrainer.get_gamma_weights``: ``w`` the sequence's ratio ``exp`` of the masked sum of the
    log-ratios (each clamped to +-20), plus the log vLLM IS ratios (clamped to [log 1e-8, 20]), the
    sum clamped to [log 1e-8, 20]; ``phi = exp(lambda + k log w - lambda w)`` with ``(k, lambda)``
    ``(k_pos, lambda_pos)`` for ``A >= 0`` else ``(k_neg, lambda_neg)`` (lambda at least 1e-4);
    non-finite weights give 0."""
    with torch.no_grad():
        lower = math.log(1e-8)
        lr = (per_token_logps - old_per_token_logps).clamp(-20.0, 20.0)
        seq = (lr * mask).sum(-1, keepdim=True)
        if importance_sampling_ratio is not None:
            log_is = torch.log(importance_sampling_ratio.expand(per_token_logps.shape)).clamp(lower, 20.0)
            seq = seq + log_is.sum(-1, keepdim=True)
        log_w = seq.clamp(lower, 20.0)
        a = advantages if advantages.dim() == 2 else advantages[:, None]
        nonneg = a >= 0
        k = torch.where(nonneg, torch.full_like(log_w, k_pos), torch.full_like(log_w, k_neg))
        lam = torch.where(nonneg, torch.full_like(log_w, lambda_pos), torch.full_like(log_w, lambda_neg)).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _masked_mean(x: Tensor, mask: Tensor, reduce) -> Tensor:
    """TRL's ``global_masked_mean``: over the sequences where ``x`` is ``[B, 1]`` (sequence level),
    else over the masked tokens; the sum and the count reduced over the processes by ``reduce``."""
    if x.shape[1] == 1:
        totals = torch.stack([x.sum().float(), torch.tensor(float(x.shape[0]), device=x.device)])
    else:
        totals = torch.stack([(x * mask).sum().float(), mask.sum().float()])
    totals = reduce(totals)
    return totals[0] / totals[1].clamp(min=1.0)


def _seq_mean(x: Tensor, mask: Tensor) -> Tensor:
    """TRL's ``masked_seq_mean``: one value per sequence (NaN for an empty one at token level)."""
    return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)


def _nan_extreme(x: Tensor, largest: bool) -> Tensor:
    """TRL's ``nanmin`` / ``nanmax`` without reading back: NaN where every value is NaN."""
    nan = torch.isnan(x)
    fill = torch.full_like(x, -math.inf if largest else math.inf)
    kept = torch.where(nan, fill, x)
    value = kept.max() if largest else kept.min()
    return torch.where(nan.all(), torch.full_like(value, math.nan), value)


def _aggregate(x: Tensor, mask: Tensor, loss_type: str, max_completion_length: Optional[int],
               per_process: Optional[Tensor]) -> Tensor:
    """A per-token term aggregated as TRL aggregates the loss of ``loss_type`` (before the
    gradient-accumulation scale)."""
    if loss_type in ("grpo", "sapo"):
        return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "luspo":
        return (x * mask).sum(-1).mean()
    if loss_type == "bnpo":
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (x * mask).sum() / (x.shape[0] * max_completion_length)
    return (x * mask).sum() / (mask.sum().clamp(min=1.0) if per_process is None else per_process)


def _trl_metrics(loss_type: str, coef_1: Tensor, advantages: Tensor, mask: Tensor, epsilon: float, eps_high: float,
                 delta: Optional[float], per_token_kl: Optional[Tensor], phi: Optional[Tensor], reduce,
                 gather) -> Dict[str, Tensor]:
    """The metrics TRL's ``_compute_loss`` logs for ``loss_type``, under its names (device tensors):
    ``kl`` with ``beta``; ``clip_ratio/low_mean``, ``high_mean``, ``region_mean``, ``low_min``,
    ``high_max`` for the clipped surrogate (of sequences at sequence level, of tokens at token
    level); ``cispo_clip_ratio``; ``vespo/phi_seq_mean``."""
    out = {}
    if per_token_kl is not None:
        out["kl"] = _masked_mean(per_token_kl, mask, reduce)
    a = advantages if advantages.dim() == 2 else advantages[:, None]
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        c = coef_1 if delta is None else coef_1.clamp(max=delta)
        low = ((c < 1 - epsilon) & (a < 0)).float()
        high = ((c > 1 + eps_high) & (a > 0)).float()
        out["clip_ratio/low_mean"] = _masked_mean(low, mask, reduce)
        out["clip_ratio/high_mean"] = _masked_mean(high, mask, reduce)
        out["clip_ratio/region_mean"] = _masked_mean(torch.maximum(low, high), mask, reduce)
        out["clip_ratio/low_min"] = _nan_extreme(gather(_seq_mean(low, mask)), largest=False)
        out["clip_ratio/high_max"] = _nan_extreme(gather(_seq_mean(high, mask)), largest=True)
    elif loss_type == "cispo":
        out["cispo_clip_ratio"] = _masked_mean(((coef_1 > eps_high) & (a > 0)).float(), mask, reduce)
    elif loss_type == "vespo":
        out["vespo/phi_seq_mean"] = _masked_mean(phi, mask, reduce)
    return out


def grpo_loss(per_token_logps: Tensor, old_per_token_logps: Optional[Tensor], advantages: Tensor,
              completion_mask: Tensor, ref_per_token_logps: Optional[Tensor] = None, *, loss_type: str = "dapo",
              beta: float = 0.0, epsilon: float = 0.2, epsilon_high: Optional[float] = None,
              delta: Optional[float] = None, importance_sampling_level: str = "token",
              use_bias_correction_kl: bool = False, sapo_temperature_pos: float = 1.0,
              sapo_temperature_neg: float = 1.05, entropy_mask: Optional[Tensor] = None,
              entropies: Optional[Tensor] = None, top_entropy_quantile: float = 1.0,
              importance_sampling_ratio: Optional[Tensor] = None, off_policy_mask_threshold: Optional[float] = None,
              sampling_per_token_logps: Optional[Tensor] = None, num_items_in_batch=None, num_processes: int = 1,
              max_completion_length: Optional[int] = None, gradient_accumulation_steps: int = 1,
              steps_per_generation: Optional[int] = None, vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
              vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0, reduce=None,
              gather=None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """TRL's GRPO loss for ``[B, T]`` per-token tensors (``advantages`` ``[B]``, ``[B, 1]`` or
    ``[B, T]``; ``old_per_token_logps`` None: ``per_token_logps.detach()``, as TRL). Returns the
    loss (scaled for gradient accumulation as TRL scales it) and metrics: TRL's (``policy_loss``,
    ``kl`` with ``beta``, the clip ratios of the loss type, ``cispo_clip_ratio``,
    ``vespo/phi_seq_mean``) and verl's (``actor/...``).

    For dapo, cispo and vespo ``num_items_in_batch`` counts the tokens of the whole generation
    batch (TRL's); the normalizer is ``num_items_in_batch / num_processes *
    gradient_accumulation_steps / steps_per_generation`` (TRL >= 1.16; ``steps_per_generation``
    None: equal to ``gradient_accumulation_steps``, as earlier TRL versions assume). At sequence
    level (GSPO) with ``beta`` and ``use_bias_correction_kl`` the KL term is multiplied by the
    sequence's ratio, whose gradient reaches every token of the sequence (TRL >= 1.16; earlier
    versions had no such correction). ``reduce`` / ``gather`` (default: this process alone) combine
    the metrics over the processes as TRL's accelerator does."""
    reduce = reduce or (lambda t: t)
    gather = gather or (lambda t: t)
    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()
    b = per_token_logps.shape[0]
    if advantages.dim() == 2 and advantages.shape[1] == 1:
        advantages = advantages[:, 0]
    if importance_sampling_level == "sequence" and advantages.dim() != 1:
        raise RecapError("invalid argument `advantages`: importance_sampling_level='sequence' takes per-sequence "
                         f"advantages [B], got shape {tuple(advantages.shape)}")
    options = _options(loss_type, epsilon, epsilon_high, delta, importance_sampling_level, sapo_temperature_pos,
                       sapo_temperature_neg, beta, use_bias_correction_kl)
    mask = completion_mask
    if entropy_mask is None and top_entropy_quantile < 1.0:
        if entropies is None:
            raise RecapError("invalid argument `entropies`: top_entropy_quantile < 1 needs the per-token entropies")
        entropy_mask = high_entropy_mask(entropies, mask, top_entropy_quantile)
    weight = None if entropy_mask is None else entropy_mask.float()
    if off_policy_mask_threshold is not None:
        sampling = old_per_token_logps if sampling_per_token_logps is None else sampling_per_token_logps
        keep = off_policy_mask(advantages, per_token_logps, sampling, mask, off_policy_mask_threshold).float()
        keep = keep.expand(per_token_logps.shape)
        weight = keep if weight is None else weight * keep
    phi = None
    if loss_type == "vespo":
        # the vLLM IS ratio enters the gamma weight, not the loss (as TRL)
        phi = vespo_weights(advantages, per_token_logps, old_per_token_logps, mask, importance_sampling_ratio,
                            vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)
        w = phi.float().expand(per_token_logps.shape)
        weight = w if weight is None else weight * w
    elif importance_sampling_ratio is not None:
        is_ratio = importance_sampling_ratio.float().expand(per_token_logps.shape)
        weight = is_ratio if weight is None else weight * is_ratio
    # the log importance weight: the token's log-ratio, or the sequence's mean (GSPO)
    mf = mask.to(per_token_logps.dtype)
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "sequence":
        log_w = ((log_ratio * mf).sum(-1) / mf.sum(-1).clamp(min=1.0))[:, None]
    else:
        log_w = log_ratio
    # GSPO's KL correction by the sequence ratio is a term of its own (its gradient reaches every
    # token of the sequence; the fused loss corrects each token's KL by its own ratio)
    sequence_kl = beta != 0.0 and use_bias_correction_kl and importance_sampling_level == "sequence"
    if sequence_kl:
        options["kl_coef"] = 0.0
        options["kl_is_correction"] = False
    per_process = None
    if loss_type in ("dapo", "cispo", "vespo") and num_items_in_batch is not None:
        spg = gradient_accumulation_steps if steps_per_generation is None else steps_per_generation
        per_process = (torch.as_tensor(num_items_in_batch, device=per_token_logps.device, dtype=torch.float32)
                       .clamp(min=1.0) / num_processes * (gradient_accumulation_steps / spg))
    normalizers, scale = None, 1.0 / gradient_accumulation_steps
    if loss_type in ("grpo", "sapo"):
        # the mean over all B sequences (an empty one counts, with loss 0), for the policy and KL terms
        options["agg_mode"] = "seq-mean-token-mean"
        normalizers = torch.full((2, 2), float(b), dtype=torch.float64)
    elif loss_type == "luspo":
        # each sequence's token sum, the mean over all B sequences
        options["agg_mode"] = "seq-mean-token-sum"
        normalizers = torch.full((2, 2), float(b), dtype=torch.float64)
    elif loss_type == "bnpo":
        options["agg_mode"] = "token-mean"
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise RecapError("invalid argument `max_completion_length`: dr_grpo normalizes by B * "
                             "max_completion_length")
        options.update(agg_mode="token-sum-norm", norm_constant=float(b * max_completion_length))
    else:  # dapo, cispo, vespo: the sum over the batch's tokens over the global token count per process
        options["agg_mode"] = "token-mean"
        scale = 1.0
    loss, m = F.grpo_loss(per_token_logps, old_per_token_logps, advantages, mask, ref_logp=ref_per_token_logps,
                          policy_weight=weight, normalizers=normalizers, **options)
    if per_process is not None:
        # token-mean over this batch times (its tokens / the normalizer): TRL's sum over the
        # normalizer, without reading either back to the host
        loss = loss * (mask.sum().to(loss.dtype) / per_process.to(loss.dtype))
    per_token_kl = None
    if ref_per_token_logps is not None and beta != 0.0:
        d = ref_per_token_logps - per_token_logps
        per_token_kl = torch.exp(d) - d - 1
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * torch.exp(log_w)
        if sequence_kl:
            loss = loss + beta * _aggregate(per_token_kl, mf, loss_type, max_completion_length, per_process)
    policy_loss = loss.detach()
    loss = loss * scale if scale != 1.0 else loss
    metrics = dict(m)
    with torch.no_grad():
        coef_1 = torch.exp(log_w.detach())
        eps_high = epsilon if epsilon_high is None else epsilon_high
        metrics.update(_trl_metrics(loss_type, coef_1, advantages, mf.detach(), epsilon, eps_high, delta,
                                    None if per_token_kl is None else per_token_kl.detach(), phi, reduce, gather))
    metrics["policy_loss"] = policy_loss
    return loss, metrics


class RecapGRPOMixin:
    """Put first in the bases of a ``trl.GRPOTrainer`` subclass: its ``_compute_loss`` computes the
    per-token log-probabilities and entropies with the trainer's own
    ``_get_per_token_logps_and_entropies`` and the loss with :func:`grpo_loss`, reading the
    trainer's settings (``loss_type``, ``beta``, ``epsilon_low`` / ``epsilon_high``,
    ``importance_sampling_level``, ``top_entropy_quantile``, ``args.delta``,
    ``steps_per_generation``, ...), adds TRL's entropy bonus (``entropy_coef``, static or adaptive,
    TRL's controller) and an MoE model's router loss (``router_aux_loss_coef``), and logs what TRL
    logs under its names into ``self._metrics`` (as device tensors, read back by ``log`` once per
    logging step). Multimodal inputs are passed through as TRL passes them.

    ``fused_logprobs=True`` (a keyword of the trainer's constructor): the log-probs and entropies
    (the policy's, the old and the reference ones) come from our fused-linear kernels through TRL's
    fused LM head, from the last hidden state and the LM head, never as ``[B, L, V]`` logits
    (:func:`use_recap_lm_head`; process-wide, so every trainer of the process uses them)."""

    def __init__(self, *args, fused_logprobs: bool = False, **kwargs):
        fused_logprobs = A.boolean("fused_logprobs", fused_logprobs)
        super().__init__(*args, **kwargs)
        self.fused_logprobs = fused_logprobs
        if fused_logprobs:
            use_recap_lm_head(True)

    _MODEL_INPUTS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                     "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        extra = {k: inputs.get(k) for k in self._MODEL_INPUTS if inputs.get(k) is not None}
        aux_enabled = getattr(self, "aux_loss_enabled", False)
        if aux_enabled:
            extra["compute_aux_loss"] = True
        per_token_logps, entropies, *rest = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True, **extra)
        args = self.args
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        quantile = getattr(self, "top_entropy_quantile", 1.0)
        entropy_mask = None
        if quantile < 1.0:
            # TRL's own threshold (over every process's tokens) where the trainer has it
            if hasattr(self, "get_high_entropy_mask"):
                entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - quantile)
            else:
                entropy_mask = high_entropy_mask(entropies, mask, quantile)
        use_is = getattr(self, "use_vllm", False) and getattr(self, "vllm_importance_sampling_correction", False)
        acc = self.accelerator
        loss, metrics = grpo_loss(
            per_token_logps, inputs.get("old_per_token_logps"), inputs["advantages"], mask,
            inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            loss_type=self.loss_type, beta=self.beta, epsilon=self.epsilon_low, epsilon_high=self.epsilon_high,
            delta=getattr(args, "delta", None),
            importance_sampling_level=getattr(self, "importance_sampling_level", "token"),
            use_bias_correction_kl=getattr(args, "use_bias_correction_kl", False),
            sapo_temperature_pos=getattr(args, "sapo_temperature_pos", 1.0),
            sapo_temperature_neg=getattr(args, "sapo_temperature_neg", 1.05), entropy_mask=entropy_mask,
            importance_sampling_ratio=inputs.get("importance_sampling_ratio") if use_is else None,
            off_policy_mask_threshold=getattr(self, "off_policy_mask_threshold", None),
            sampling_per_token_logps=inputs.get("sampling_per_token_logps"),
            num_items_in_batch=inputs.get("num_items_in_batch"),
            num_processes=acc.num_processes,
            max_completion_length=getattr(self, "max_completion_length", None),
            gradient_accumulation_steps=accumulation,
            steps_per_generation=getattr(args, "steps_per_generation", None) if mode == "train" else 1,
            vespo_k_pos=getattr(args, "vespo_k_pos", 2.0), vespo_lambda_pos=getattr(args, "vespo_lambda_pos", 3.0),
            vespo_k_neg=getattr(args, "vespo_k_neg", 3.0), vespo_lambda_neg=getattr(args, "vespo_lambda_neg", 2.0),
            reduce=lambda t: acc.reduce(t, reduction="sum"), gather=acc.gather)
        log = self._metrics[mode]
        if getattr(self, "_entropy_bonus_enabled", False):
            loss = self._recap_entropy_bonus(loss, metrics["policy_loss"], entropies, mask, entropy_mask, mode,
                                             accumulation)
        recap = getattr(self, "_recap", None)
        if recap is not None and recap.replay is not None and mode == "train":
            loss = loss + recap.replay_term(self, model, accumulation)
        if aux_enabled:
            # the router loss, scaled for gradient accumulation as the policy term (TRL)
            aux = rest[0]
            loss = loss + self.router_aux_loss_coef * aux / accumulation
            log["aux_loss"].append(acc.gather_for_metrics(aux.detach()).mean())
        # TRL's order and names; tensors here, log() reads them back once per logging step
        if "kl" in metrics:
            log["kl"].append(metrics["kl"])
        log["entropy"].append(_masked_mean(entropies.detach(), mask, lambda t: acc.reduce(t, reduction="sum")))
        for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
                    "clip_ratio/high_max", "cispo_clip_ratio", "vespo/phi_seq_mean"):
            if key in metrics:
                log[key].append(metrics[key])
        return loss

    def _recap_entropy_bonus(self, loss, policy_loss, entropies, mask, entropy_mask, mode, accumulation):
        """TRL's entropy bonus: ``loss - coef * H``, ``H`` the mean entropy over the tokens the
        policy term acts on (scaled only for gradient accumulation), ``coef`` TRL's static
        ``entropy_coef`` or its adaptive controller (which this updates at optimizer-step
        boundaries exactly as TRL does: one read-back per optimizer step, adaptive mode only)."""
        args, acc, log = self.args, self.accelerator, self._metrics[mode]
        effective = mask if entropy_mask is None else mask * entropy_mask
        entropy_loss = (entropies * effective).sum() / effective.sum().clamp(min=1.0) / accumulation
        adaptive = getattr(self, "use_adaptive_entropy", False)
        if adaptive:
            coef = self.entropy_coef if self._last_world_entropy <= args.entropy_target else 0.0
        else:
            coef = self.entropy_coef
        loss = loss - coef * entropy_loss
        log["policy_loss"].append(acc.gather(policy_loss).nanmean())
        if adaptive and mode == "train":
            stats = torch.stack([(entropies * effective).sum(), effective.sum()]).detach()
            window = self._entropy_window_stats
            self._entropy_window_stats = stats if window is None else window + stats
            if acc.sync_gradients:
                totals = acc.reduce(self._entropy_window_stats, reduction="sum")
                world = (totals[0] / totals[1].clamp(min=1.0)).item()
                if world <= args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
                self._last_world_entropy = world
                self._entropy_window_stats = None
        if mode == "train" and acc.sync_gradients:
            log["entropy_coef"].append(self.entropy_coef)
        return loss

    def log(self, logs, start_time=None):
        # TRL averages plain floats: the tensors recorded by _compute_loss become floats here, once
        # per logging step rather than once per micro-batch
        for values in self._metrics.values():
            for key, val in values.items():
                values[key] = [float(v) if isinstance(v, Tensor) else v for v in val]
        return super().log(logs, start_time)


class RecapChunkedLogProb:
    """TRL's fused LM head on our kernels: the interface of ``trl.kernels.ChunkedLogProbFunction``
    (what TRL >= 1.16's ``add_fused_lm_head`` calls for the policy, the reference model and the old
    log-probs), computed by :func:`recap_kernels.fused_linear_logprobs` (chunks of rows of
    ``[c, V]`` logits through the log-prob kernels, recomputed in the backward). ``logit_scale``
    folds into the temperature; ``log_sum_sq_probs`` is ``log`` of our Σπ² (no gradient). What it
    does not compute (``final_logit_softcapping``, ``mean_logits``, ``is_top1``, a non-positive
    scale) goes to TRL's own function. Install it with :func:`use_recap_lm_head`."""

    original = None  # TRL's ChunkedLogProbFunction, set by use_recap_lm_head
    batch_invariant = False  # fused_linear_logprobs' batch-invariant mode, set by use_recap_lm_head

    @classmethod
    def apply(cls, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        outputs = tuple(outputs)
        if (final_logit_softcapping is not None or not logit_scale > 0
                or any(o in ("mean_logits", "is_top1") for o in outputs)):
            return cls.original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                      final_logit_softcapping, logit_scale, outputs)
        dev = hidden.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        res = F.fused_linear_logprobs(hidden.to(dtype), weight.to(dtype), targets, float(temperature) / logit_scale,
                                      bias=None if bias is None else bias.to(dtype),
                                      entropy=True, return_sum_pi_squared="log_sum_sq_probs" in outputs,
                                      batch_invariant=cls.batch_invariant)
        logp, entropy = res[0], res[1]
        log_sum_sq = torch.log(res[2]).detach() if "log_sum_sq_probs" in outputs else None
        return logp, entropy if "entropy" in outputs else None, log_sum_sq, None, None


def use_recap_lm_head(enabled: bool = True, *, batch_invariant: bool = False) -> None:
    """Routes TRL's fused LM head (TRL >= 1.16: every ``model(..., fused_lm_head=True)`` call of a
    ``GRPOTrainer``: the policy's log-probs and entropies, the old and the reference log-probs)
    through our kernels (:class:`RecapChunkedLogProb`), or back to TRL's with ``enabled=False``.
    Process-wide (it replaces the function TRL's patched forward calls), so the old and new
    log-probs come from the same kernels. ``batch_invariant``: each token's log-prob and entropy
    the same bits whatever batch computes it (``fused_linear_logprobs(batch_invariant=True)``), so
    on-policy ``old_per_token_logps`` equal the policy's log-probs exactly. An error where the
    installed TRL has no fused LM head."""
    batch_invariant = A.boolean("batch_invariant", batch_invariant)
    try:
        import trl.trainer.utils as trl_utils
    except ImportError as e:
        raise RecapError(f"invalid call `use_recap_lm_head`: TRL is not importable ({e})") from None
    current = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if current is None:
        raise RecapError("invalid call `use_recap_lm_head`: the installed TRL has no fused LM head "
                         "(trl.trainer.utils._ChunkedLogProbFunction, TRL >= 1.16)")
    if current is not RecapChunkedLogProb:
        RecapChunkedLogProb.original = current
    if enabled:
        RecapChunkedLogProb.batch_invariant = batch_invariant
        trl_utils._ChunkedLogProbFunction = RecapChunkedLogProb
    elif RecapChunkedLogProb.original is not None:
        trl_utils._ChunkedLogProbFunction = RecapChunkedLogProb.original


try:  # a transformers TrainerCallback when transformers is installed (it is with TRL)
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # the callback still works when driven by hand
    class _CallbackBase:  # type: ignore[no-redef]
        pass


class RecapRewardWeights(_CallbackBase):
    """RECAP on a ``GRPOTrainer`` whose class has :class:`RecapGRPOMixin` first (or any
    ``GRPOTrainer`` without replay), as the RECAP authors apply it: weights on the reward
    functions, which TRL multiplies into the rewards before their group normalization
    (``trainer.reward_weights``, ``multi_objective_aggregation="sum_then_normalize"``), and, with
    ``replay``, a replay objective: the NLL of general-domain text (temperature 1, token mean) added
    to the loss with its own weight each micro-batch.

        class Trainer(rk_trl.RecapGRPOMixin, GRPOTrainer):
            pass
        trainer = Trainer(..., reward_funcs=[format_reward, accuracy_reward])
        trainer.add_callback(rk_trl.RecapRewardWeights(trainer, replay=general_texts, preset="authors"))

    After every optimizer step each reward function's mean reward over the completions scored
    since the last step (taken where the trainer scores them, its ``_calculate_rewards``, every
    process's completions gathered, so the scheduler sees every step whatever ``logging_steps`` and
    gradient accumulation) and the step's mean replay NLL go to the scheduler (orientations
    "reward" and "loss"); a step that generated nothing (``steps_per_generation`` > gradient
    accumulation) observes nothing. It logs ``recap/lambda/<name>`` (the weights, the replay's under
    ``replay``), ``recap/monitored/<name>`` (the observed values) and ``recap/replay_nll``.

    ``replay``: texts (a list of str, or a ``datasets.Dataset`` with a "text" column), tokenized by
    the trainer's processing class, or lists of token ids; ``replay_batch_size`` sequences (8) of at
    most ``replay_max_length`` tokens (256) per micro-batch, in a random order seeded by the
    trainer's seed. ``preset`` ("paper" or "authors") and ``options``: the
    scheduler's (``recap_kernels.RecapWeights``). ``state_dict`` / ``load_state_dict`` checkpoint the scheduler.
    A trainer without ``_calculate_rewards`` (older TRL) falls back to the logged
    ``rewards/<name>/mean``."""

    def __init__(self, trainer, replay=None, *, replay_batch_size: int = 8, replay_max_length: int = 256,
                 preset: str = "paper", **options):
        from .weights import RecapWeights

        self.trainer = trainer
        self.rewards = list(trainer.reward_func_names)
        self.replay = None
        if replay is not None:
            if not isinstance(trainer, RecapGRPOMixin):
                raise RecapError("invalid argument `replay`: the trainer's class must have RecapGRPOMixin first "
                                 "in its bases (it adds the replay term to the loss)")
            seed = getattr(getattr(trainer, "args", None), "seed", 0)
            self.replay = Replay(replay, trainer.processing_class, replay_batch_size, replay_max_length, seed)
        self.names = self.rewards + (["replay"] if self.replay is not None else [])
        self.weights = RecapWeights(["reward"] * len(self.rewards) + (["loss"] if self.replay is not None else []),
                                    preset=preset, **options)
        self.replay_lambda = 1.0
        self._replay_nll = []
        self._seen = {}
        self._scored = None
        calculate = getattr(trainer, "_calculate_rewards", None)
        if calculate is not None:
            self._scored = []

            def recorded(*args, **kwargs):
                rewards = calculate(*args, **kwargs)
                # [completions, reward functions]: the sums and counts of the finite values, on the device
                r = rewards.detach().float()
                finite = torch.isfinite(r)
                self._scored.append(torch.stack([torch.where(finite, r, torch.zeros_like(r)).sum(0),
                                                 finite.sum(0).float()]))
                return rewards

            trainer._calculate_rewards = recorded
        trainer._recap = self

    def replay_term(self, trainer, model, accumulation: int) -> Tensor:
        """The replay objective of one micro-batch: ``lambda_replay * NLL / accumulation``, the NLL
        the token mean of ``-log p`` of the next replay batch at temperature 1 (the log-probs from
        the logits in one read, ``logprobs_from_logits``)."""
        ids, attention = self.replay.next(trainer.accelerator.device)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        labels = ids[:, 1:].masked_fill(attention[:, 1:] == 0, -100)
        logp = F.logprobs_from_logits(logits.float(), labels, entropy=False)
        m = attention[:, 1:].to(logp.dtype)
        nll = -(logp * m).sum() / m.sum().clamp(min=1.0)
        self._replay_nll.append(nll.detach())
        trainer._metrics["train"]["recap/replay_nll"].append(nll.detach())
        return nll * (self.replay_lambda / accumulation)

    def _step_means(self):
        means = self._reward_means()
        if means is None or self.replay is None:
            self._replay_nll.clear()
            return means
        if not self._replay_nll:
            return None
        nll = float(torch.stack(self._replay_nll).double().mean())
        self._replay_nll.clear()
        return means + [nll]

    def _reward_means(self):
        if self._scored is not None:
            if not self._scored:
                return None
            totals = torch.stack(self._scored).sum(0).double().cpu()
            self._scored.clear()
            if bool((totals[1] == 0).any()):
                return None
            return (totals[0] / totals[1]).tolist()
        log = self.trainer._metrics["train"]
        means = []
        for name in self.rewards:
            values = log.get(f"rewards/{name}/mean", [])
            start = self._seen.get(name, 0)
            if start > len(values):  # the trainer's log() cleared its lists
                start = 0
            new = values[start:]
            self._seen[name] = len(values)
            if not new:
                return None
            means.append(sum(float(v) for v in new) / len(new))
        return means

    def on_step_end(self, args=None, state=None, control=None, **kwargs):
        means = self._step_means()
        if means is not None:
            self.weights.observe(means)
            w = self.weights.weights()
            n = len(self.rewards)
            self.trainer.reward_weights = torch.tensor(w[:n], dtype=torch.float32)
            if self.replay is not None:
                self.replay_lambda = w[n]
            log = self.trainer._metrics["train"]
            for name, lam, value in zip(self.names, w, means):
                log[f"recap/lambda/{name}"].append(lam)
                log[f"recap/monitored/{name}"].append(value)
        return control

    def state_dict(self):
        return self.weights.state_dict()

    def load_state_dict(self, state):
        self.weights.load_state_dict(state)
