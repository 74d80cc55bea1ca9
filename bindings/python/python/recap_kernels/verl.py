"""Drop-ins for verl (``verl.trainer.ppo.core_algos``): the policy losses with verl's signature and
metric names, ``agg_loss``, ``kl_penalty``, the rollout rejection mask, the optimal token baseline
estimators, the rollout IS weights, ``register()`` to add the losses to verl's policy-loss registry,
and ``FusedLinearForPPO`` (``use_recap_fused_linear()`` puts it in place of verl's for
``actor_rollout_ref.model.use_fused_kernels=True``).

    from recap_kernels import verl as rk_verl
    rk_verl.register()                       # actor.policy_loss.loss_mode: recap_vanilla (or recap_gspo, ...)
    pg_loss, pg_metrics = rk_verl.compute_policy_loss(old_log_prob, log_prob, advantages, response_mask,
                                                      loss_agg_mode="token-mean", config=actor_config)

The config is read from any object with attributes or ``.get`` (verl's ``ActorConfig``, an
OmegaConf ``DictConfig``, a dict): ``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high``,
``clip_ratio_c``, ``tau_pos``, ``tau_neg``, ``policy_loss.loss_mode``, ``policy_loss.dro_beta``, the
Clip-Cov / KL-Cov fields of ``policy_loss`` (below) and ``global_batch_info``
(``dp_size``, ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``). Metric values are
0-dim tensors (verl's ``Metric`` accepts them); nothing here but Clip-Cov and KL-Cov reads a value
back to the host (a ``global_batch_info`` count given as a GPU tensor is read by the op, which
synchronizes: pass Python numbers or CPU tensors).

Where verl changed between versions, these follow the installed verl (the newest, 0.9, when none is
installed): ``seq-mean-token-sum-norm`` is the sum of the sequences' token sums over
``loss_scale_factor`` before 0.9 and ``seq-mean-token-sum`` over it from 0.9; GSPO is aggregated
``seq-mean-token-mean`` before 0.9 and by ``loss_agg_mode`` from 0.9.

GMPO (``geo_mean``) is exact for advantages constant over each sequence (verl supports only those);
its sequence ratio is capped at exp(10), as GSPO's.

Clip-Cov and KL-Cov (``clip_cov``, ``kl_cov``; ``policy_loss.clip_cov_ratio``, ``clip_cov_lb``,
``clip_cov_ub``, ``kl_cov_ratio``, ``ppo_kl_coef``) choose their tokens over the whole micro-batch
as verl does, in PyTorch on the inputs' device: the covariance ``(A - mean A)(logp - mean logp)`` over
the valid tokens; Clip-Cov draws its tokens with ``torch.randperm`` on the default generator (the
same draw as verl's under the same seed) and the fused loss drops them (a zero policy weight);
KL-Cov adds ``ppo_kl_coef |logp - old|`` at its top ``kl_cov_ratio`` tokens to the unclipped
``-A r`` (the penalty through ``agg_loss``, with the same normalizers). Both read counts back to the
host to size the selection (verl's do too).

Differences from verl: an empty micro-batch gives loss 0 (verl divides by zero); CISPO reports
``pg_clipfrac`` as the fraction of tokens whose ratio lies outside the clip band;
``seq-mean-token-mean`` divides by each sequence's token count exactly (verl adds 1e-8).
"""
import copy
import math
import threading
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from . import _args as A
from . import distributed
from . import functional as F
from ._native import RecapError

__all__ = ["compute_policy_loss", "compute_policy_loss_vanilla", "compute_policy_loss_gspo",
           "compute_policy_loss_sapo", "compute_policy_loss_cispo", "compute_policy_loss_gpg",
           "compute_policy_loss_dppo_tv", "compute_policy_loss_dppo_kl", "compute_policy_loss_dro",
           "compute_policy_loss_geo_mean", "compute_policy_loss_clip_cov", "compute_policy_loss_kl_cov", "agg_loss",
           "kl_penalty", "compute_rollout_rejection_mask", "compute_rollout_correction_weights", "compute_optimal_token_baseline_advantage",
           "compute_multi_turn_optimal_token_baseline_advantage", "compute_gae_advantage_return", "use_recap_gae", "register", "POLICY_LOSSES",
           "FusedLinearForPPO", "use_recap_fused_linear"]

_MISSING = object()


def _get(config: Any, name: str, default=None):
    """``config.name`` or ``config.get(name)`` or ``config[name]``; ``default`` when absent or None."""
    if config is None:
        return default
    value = getattr(config, name, _MISSING)
    if value is _MISSING and hasattr(config, "get"):
        value = config.get(name, _MISSING)
    return default if value is _MISSING or value is None else value


_VERSION = []


def _verl_version() -> Tuple[int, int]:
    """The installed verl's (major, minor); (0, 9) when verl is not installed (the newest semantics)."""
    if not _VERSION:
        try:
            import verl

            parts = str(getattr(verl, "__version__", "0.9")).split(".")
            _VERSION.append((int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)))
        except Exception:
            _VERSION.append((0, 9))
    return _VERSION[0]


def _agg(mode: str, mask: Tensor, info) -> Tuple[dict, Optional[Tensor], float]:
    """Our aggregation options, global normalizers and a factor on the loss for verl's
    ``loss_agg_mode`` and ``global_batch_info`` (verl multiplies by ``dp_size`` what it divides by the
    global count: the same as dividing by the global count over ``dp_size``)."""
    dp = _get(info, "dp_size", 1)
    factor = 1.0
    if mode == "seq-mean-token-sum-norm":
        scale = float(_get(info, "loss_scale_factor", mask.shape[-1]))
        if _verl_version() < (0, 9):
            # verl before 0.9: the sum of the sequences' token sums over the constant
            return {"agg_mode": "token-sum-norm", "norm_constant": scale}, None, 1.0
        # verl 0.9: seq-mean-token-sum over the constant
        mode, factor = "seq-mean-token-sum", 1.0 / scale
    if mode == "token-sum":
        # verl: the masked sum times dp_size (DDP then averages the ranks' gradients)
        return {"agg_mode": "token-sum-norm", "norm_constant": 1.0 / float(dp)}, None, 1.0
    if mode not in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        raise RecapError(f"invalid argument `loss_agg_mode`: expected token-mean, token-sum, seq-mean-token-mean, "
                         f"seq-mean-token-sum or seq-mean-token-sum-norm, got {mode!r}")
    count = _get(info, "batch_num_tokens") if mode == "token-mean" else _get(info, "global_batch_size")
    if count is None:
        return {"agg_mode": mode}, None, factor
    per_rank = torch.as_tensor(count, dtype=torch.float64) / dp
    # one objective and the KL slot; only the slots of this mode are read (tokens or sequences)
    n = per_rank.reshape(1).expand(4).reshape(2, 2).contiguous()
    return {"agg_mode": mode}, n, factor


def _policy_loss(loss_mode: str, old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                 loss_agg_mode: str, config, rollout_is_weights: Optional[Tensor]) -> Tuple[Tensor, Dict[str, Tensor]]:
    clip = _get(config, "clip_ratio", 0.2)
    options = {"clip_low": float(_get(config, "clip_ratio_low", clip)),
               "clip_high": float(_get(config, "clip_ratio_high", clip))}
    if loss_mode == "vanilla":
        options["dual_clip"] = float(_get(config, "clip_ratio_c", 3.0))
    elif loss_mode == "gspo":
        options.update(policy_loss="gspo", dual_clip=None)
        if _verl_version() < (0, 9):
            loss_agg_mode = "seq-mean-token-mean"  # verl before 0.9 aggregates GSPO per sequence
    elif loss_mode == "sapo":
        options.update(policy_loss={"sapo": {"tau_pos": float(_get(config, "tau_pos", 1.0)),
                                             "tau_neg": float(_get(config, "tau_neg", 1.05))}}, dual_clip=None)
        loss_agg_mode = "seq-mean-token-mean"
    elif loss_mode == "cispo":
        options.update(policy_loss="cispo", dual_clip=None)
    elif loss_mode == "gpg":
        options.update(policy_loss="gpg", dual_clip=None)
    elif loss_mode in ("dppo_tv", "dppo_kl"):
        # the clip values are the trust region's thresholds; the ratio is truncated at clip_ratio_c
        options.update(policy_loss=loss_mode, dual_clip=float(_get(config, "clip_ratio_c", 20.0)))
    elif loss_mode == "dro":
        beta = _get(_get(config, "policy_loss"), "dro_beta")
        if beta is None or not float(beta) > 0:
            raise RecapError("invalid argument `config.policy_loss.dro_beta`: DRO needs a positive beta, "
                             f"got {beta!r}")
        options.update(policy_loss={"dro": {"beta": float(beta)}}, dual_clip=None)
    elif loss_mode == "geo_mean":
        options.update(policy_loss="geo_mean", dual_clip=None)
    elif loss_mode == "clip_cov":
        options["dual_clip"] = None
        keep = _clip_cov_keep(old_log_prob, log_prob, advantages, response_mask, options, config)
        rollout_is_weights = keep if rollout_is_weights is None else keep * rollout_is_weights
    elif loss_mode == "kl_cov":
        # the unclipped -A r: a lower bound of 0 and no upper one (the ratio is at most e^20)
        options.update(clip_low=1.0, clip_high=1e30, dual_clip=None)
        selected, kl_coef = _kl_cov_selection(log_prob, advantages, response_mask, config)
    else:
        raise RecapError(f"invalid argument `loss_mode`: expected {', '.join(POLICY_LOSSES)}, got {loss_mode!r}")
    if loss_mode == "geo_mean":
        # verl's GMPO ignores loss_agg_mode: the mean over the batch's rows (empty ones included) of
        # each sequence's loss; its rollout IS weight is the geometric mean of the tokens' weights
        rows = torch.full((2, 2), float(response_mask.shape[0]), dtype=torch.float64)
        agg, normalizers, factor = {"agg_mode": "seq-mean-token-mean"}, rows, 1.0
        if rollout_is_weights is not None:
            m = response_mask.to(rollout_is_weights.dtype)
            seq = torch.exp((torch.log(rollout_is_weights + 1e-10) * m).sum(-1) / (m.sum(-1) + 1e-8))
            rollout_is_weights = seq[:, None].expand_as(rollout_is_weights)
    else:
        agg, normalizers, factor = _agg(loss_agg_mode, response_mask, _get(config, "global_batch_info"))
    options.update(agg)
    loss, m = F.grpo_loss(log_prob, old_log_prob, advantages, response_mask, policy_weight=rollout_is_weights,
                          normalizers=normalizers, **options)
    if loss_mode == "kl_cov":
        penalty = kl_coef * (log_prob - old_log_prob).abs() * selected
        if rollout_is_weights is not None:
            penalty = penalty * rollout_is_weights
        loss = loss + F.weighted_reduce(penalty, response_mask, normalizers=normalizers, **agg)[0]
    if factor != 1.0:
        loss = loss * factor
    metrics = {"actor/pg_clipfrac": m["actor/pg_clipfrac"][0], "actor/ppo_kl": m["actor/ppo_kl"],
               "actor/pg_clipfrac_lower": m["actor/pg_clipfrac_lower"][0]}
    if loss_mode == "sapo":
        # verl reports no clip fractions for SAPO (our native metrics count the ratios outside the band)
        zero = torch.zeros((), dtype=metrics["actor/ppo_kl"].dtype, device=metrics["actor/ppo_kl"].device)
        metrics["actor/pg_clipfrac"], metrics["actor/pg_clipfrac_lower"] = zero, zero
    if loss_mode == "clip_cov":
        # verl's Clip-Cov reports the fraction of tokens it dropped
        metrics["actor/pg_clipfrac"] = _masked_mean((keep == 0).to(log_prob.dtype), response_mask).detach()
    if loss_mode == "kl_cov":
        metrics["actor/ppo_kl"] = _masked_mean((log_prob - old_log_prob).abs(), response_mask).detach()
    # the metrics verl's own function returns for this mode
    names = {"gpg": (), "dro": ("actor/ppo_kl",), "clip_cov": ("actor/pg_clipfrac", "actor/ppo_kl"),
             "kl_cov": ("actor/ppo_kl",)}.get(loss_mode)
    if names is not None:
        metrics = {k: v for k, v in metrics.items() if k in names}
    return loss, metrics


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """verl's ``masked_mean``: the masked sum over the mask's sum plus 1e-8 (a non-finite value at a
    masked token is left out, not multiplied by 0 into NaN)."""
    return torch.where(mask != 0, x * mask, torch.zeros((), dtype=x.dtype, device=x.device)).sum() / (mask.sum() + 1e-8)


def _cov_ratio(config, name: str) -> float:
    ratio = float(_get(_get(config, "policy_loss"), name, 0.0002))
    if not 0.0 < ratio <= 1.0:
        raise RecapError(f"invalid argument `config.policy_loss.{name}`: expected a fraction in (0, 1], got {ratio!r}")
    return ratio


def _clip_cov_keep(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                   options: dict, config) -> Tensor:
    """verl's Clip-Cov selection, as a policy weight: 0 at up to ``max(int(clip_cov_ratio N), 1)`` tokens
    drawn (``torch.randperm``) among the valid, unclipped tokens whose covariance
    ``(A - mean A)(logp - mean logp)`` lies strictly inside ``(clip_cov_lb, clip_cov_ub)``, 1 elsewhere."""
    ratio = _cov_ratio(config, "clip_cov_ratio")
    lb = float(_get(_get(config, "policy_loss"), "clip_cov_lb", 1.0))
    ub = float(_get(_get(config, "policy_loss"), "clip_cov_ub", 5.0))
    with torch.no_grad():
        valid = response_mask > 0
        r = torch.exp(log_prob - old_log_prob)
        clipped = (-advantages * torch.clamp(r, 1 - options["clip_low"], 1 + options["clip_high"])
                   > -advantages * r) & valid
        cov = (advantages - _masked_mean(advantages, response_mask)) * (
            log_prob - _masked_mean(log_prob, response_mask))
        cov = cov.masked_fill(~valid | clipped, float("-inf"))
        candidates = torch.nonzero((cov < ub) & (cov > lb) & valid)
        keep = torch.ones_like(log_prob)
        if len(candidates) > 0:
            count = max(int(ratio * response_mask.sum().item()), 1)
            drop = candidates[torch.randperm(len(candidates))[:min(count, len(candidates))]]
            keep[tuple(drop.t())] = 0
    return keep


def _kl_cov_selection(log_prob: Tensor, advantages: Tensor, response_mask: Tensor, config) -> Tuple[Tensor, float]:
    """verl's KL-Cov selection: 1 at the ``max(1, int(N kl_cov_ratio))`` valid tokens of largest
    covariance ``(A - mean A)(logp - mean logp)`` (means over the valid tokens), 0 elsewhere; and
    ``ppo_kl_coef`` (default 1)."""
    ratio = _cov_ratio(config, "kl_cov_ratio")
    coef = float(_get(_get(config, "policy_loss"), "ppo_kl_coef", 1.0))
    with torch.no_grad():
        valid = (response_mask > 0).reshape(-1)
        index = torch.nonzero(valid, as_tuple=True)[0]
        adv, logp = advantages.reshape(-1)[index], log_prob.reshape(-1)[index]
        selected = torch.zeros(log_prob.numel(), dtype=log_prob.dtype, device=log_prob.device)
        if index.numel() > 0:
            cov = (adv - adv.mean()) * (logp - logp.mean())
            selected[index[torch.topk(cov, max(1, int(index.numel() * ratio))).indices]] = 1
    return selected.view_as(log_prob), coef


def _verl_loss(mode: str, doc: str):
    """verl's ``compute_policy_loss_<mode>``, with verl's signature."""

    def loss_fn(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                loss_agg_mode: str = "token-mean", config=None,
                rollout_is_weights: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        return _policy_loss(mode, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                            rollout_is_weights)

    loss_fn.__name__ = loss_fn.__qualname__ = f"compute_policy_loss_{mode}"
    loss_fn.__doc__ = doc
    return loss_fn


compute_policy_loss_vanilla = _verl_loss(
    "vanilla", "verl's ``compute_policy_loss_vanilla``: the dual-clip PPO surrogate, ``(pg_loss, pg_metrics)``.")
compute_policy_loss_gspo = _verl_loss(
    "gspo", "verl's ``compute_policy_loss_gspo`` (sequence ratio in its GSPO-token form).")
compute_policy_loss_sapo = _verl_loss(
    "sapo", "verl's ``compute_policy_loss_sapo`` (soft gates, ``tau_pos`` / ``tau_neg``).")
compute_policy_loss_cispo = _verl_loss(
    "cispo", "verl's ``compute_policy_loss_cispo`` (clipped, stop-gradient IS weights times log-probs).")
compute_policy_loss_gpg = _verl_loss("gpg", "verl's ``compute_policy_loss_gpg``: ``-A logp``, no ratio (no metrics, as verl).")
compute_policy_loss_dppo_tv = _verl_loss(
    "dppo_tv", "verl's ``compute_policy_loss_dppo_tv``: ``-A sg(min(r, clip_ratio_c)) logp`` on the tokens whose "
               "probability moved less than the clip thresholds.")
compute_policy_loss_dppo_kl = _verl_loss(
    "dppo_kl", "verl's ``compute_policy_loss_dppo_kl``: as DPPO-TV with the binary-KL trust region.")
compute_policy_loss_geo_mean = _verl_loss(
    "geo_mean", "verl's ``compute_policy_loss_geo_mean`` (GMPO): ``-A exp(mean of the sign-clipped log-ratio)`` "
                "per sequence, averaged over the batch's rows.")
compute_policy_loss_clip_cov = _verl_loss(
    "clip_cov", "verl's ``compute_policy_loss_clip_cov``: the clipped surrogate without dual-clip, with a random "
                "``clip_cov_ratio`` of the tokens of covariance in ``(clip_cov_lb, clip_cov_ub)`` dropped.")
compute_policy_loss_kl_cov = _verl_loss(
    "kl_cov", "verl's ``compute_policy_loss_kl_cov``: ``-A r`` plus ``ppo_kl_coef |logp - old|`` at the "
              "``kl_cov_ratio`` tokens of largest covariance.")
compute_policy_loss_dro = _verl_loss(
    "dro", "verl's ``compute_policy_loss_dro``: ``-(A logp - beta (logp - old)^2 / 2)``, beta from "
           "``config.policy_loss.dro_beta``.")

POLICY_LOSSES = {mode: globals()[f"compute_policy_loss_{mode}"]
                 for mode in ["vanilla", "gspo", "sapo", "cispo", "gpg", "dppo_tv", "dppo_kl", "dro", "geo_mean",
                              "clip_cov", "kl_cov"]}


def compute_policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                        loss_agg_mode: str = "token-mean", config=None, rollout_is_weights: Optional[Tensor] = None,
                        loss_mode: Optional[str] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The policy loss of ``loss_mode`` (default: ``config.policy_loss.loss_mode``, else vanilla;
    a ``recap_`` prefix is accepted), with verl's signature and metrics."""
    if loss_mode is None:
        loss_mode = _get(_get(config, "policy_loss"), "loss_mode", "vanilla")
    loss_mode = loss_mode[len("recap_"):] if loss_mode.startswith("recap_") else loss_mode
    return _policy_loss(loss_mode, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights)


def agg_loss(loss_mat: Tensor, loss_mask: Tensor, loss_agg_mode: str, dp_size: int = 1,
             batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None) -> Tensor:
    """verl's ``agg_loss`` (same modes and global-batch arguments), differentiable in ``loss_mat``."""
    info = {"dp_size": dp_size, "batch_num_tokens": batch_num_tokens, "global_batch_size": global_batch_size,
            "loss_scale_factor": loss_scale_factor}
    options, normalizers, factor = _agg(loss_agg_mode, loss_mask, info)
    total, _ = F.weighted_reduce(loss_mat, loss_mask, normalizers=normalizers, **options)
    return total * factor if factor != 1.0 else total


def compute_rollout_rejection_mask(log_ratio: Tensor, response_mask: Tensor, rollout_rs: Optional[str] = "token_k1",
                                   rollout_rs_threshold=None, rollout_token_veto_threshold: Optional[float] = None
                                   ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """verl's ``compute_rollout_rejection_mask`` (``rollout_corr_helper``): the response mask with the
    tokens that any ``rollout_rs`` option rejects set to 0, and verl's fraction metrics
    (``rollout_rs_<option>_masked_fraction``, ``rollout_rs_<option>_seq_masked_fraction``,
    ``rollout_rs_masked_fraction``, ``rollout_rs_seq_masked_fraction``) as 0-dim tensors; verl's
    summaries of the statistics (``_mean``, ``_max``, ``_std``, ...) are not computed.

    ``rollout_token_veto_threshold`` is the older verl API's veto (verl 0.6-0.7, in
    ``compute_rollout_correction_and_rejection_mask``): every sequence holding an unmasked token of
    ratio ``exp(log_ratio)`` below it is rejected, in the same kernel call, with verl 0.7's metrics
    ``rollout_is_veto_fraction`` (of the sequences) and ``rollout_is_catastrophic_token_fraction``
    (of the unmasked tokens); ``rollout_rs`` may then be ``None``. The overall ``rollout_rs_*``
    fractions count the veto's rejections too."""
    if rollout_rs and rollout_rs_threshold is None:
        raise RecapError("invalid argument `rollout_rs_threshold`: rejection sampling needs a threshold")
    if response_mask.shape[0] == 0:
        return response_mask, {}
    new_mask, flags = F.rollout_rejection(log_ratio, response_mask, rollout_rs=rollout_rs,
                                          rollout_rs_threshold=rollout_rs_threshold,
                                          rollout_token_veto_threshold=rollout_token_veto_threshold)
    valid = response_mask > 0
    seq_valid = valid.any(-1).to(torch.float32)
    n_seq = seq_valid.sum()

    def fractions(rejected: Tensor) -> Tuple[Tensor, Tensor]:
        token = _masked_mean(rejected.to(torch.float32), response_mask)
        seq = (rejected & valid).any(-1).to(torch.float32)
        return token, torch.where(n_seq > 0, (seq * seq_valid).sum() / n_seq.clamp(min=1), torch.zeros_like(n_seq))

    metrics = {}
    options = list(dict.fromkeys(o.strip() for o in str(rollout_rs or "").split(",") if o.strip()))
    for i, name in enumerate(options):
        token, seq = fractions((flags >> i) & 1 == 1)
        metrics[f"rollout_rs_{name}_masked_fraction"] = token
        metrics[f"rollout_rs_{name}_seq_masked_fraction"] = seq
    if rollout_token_veto_threshold is not None:
        vetoed = ((flags >> len(options)) & 1 == 1) & valid
        metrics["rollout_is_veto_fraction"] = vetoed.any(-1).to(torch.float32).mean()
        catastrophic = log_ratio.detach() < math.log(rollout_token_veto_threshold)
        metrics["rollout_is_catastrophic_token_fraction"] = _masked_mean(catastrophic.to(torch.float32),
                                                                         response_mask)
    rejected = flags != 0
    metrics["rollout_rs_masked_fraction"] = _masked_mean(rejected.to(torch.float32), response_mask)
    metrics["rollout_rs_seq_masked_fraction"] = (rejected & valid).any(-1).to(torch.float32).mean()
    return new_mask, metrics


def compute_rollout_correction_weights(log_ratio: Tensor, response_mask: Tensor, rollout_is: str = "token",
                                       rollout_is_threshold=2.0, rollout_is_batch_normalize: bool = False
                                       ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """verl's ``compute_rollout_correction_weights`` (``rollout_corr_helper``), same arguments and
    defaults: ``(rollout_is_weights, metrics)``, the weights from the op (``functional.rollout_is_weights``,
    also ``rollout_is="geometric"``) and verl's metrics (``rollout_is_mean``, ``_max``, ``_min``,
    ``_ratio_fraction_high``, ``_ratio_fraction_low``, ``_std``, ``_eff_sample_size``, ``_seq_mean``,
    ``_seq_std``, ``_seq_max``, ``_seq_min``, ``_seq_max_deviation``, ``_seq_fraction_high``,
    ``_seq_fraction_low``, ``_oob_ratio`` for IcePop, ``_batch_norm_factor`` with normalization) as
    0-dim tensors, computed in PyTorch from the weights before normalization. Under ``torch.distributed`` the
    batch mean is taken over the world (``distributed.rollout_is_weights``), as verl's
    ``distributed_masked_mean``. Differences: a NaN log-ratio at a valid token is an error naming
    ``log_ratio``; a fractional mask weight does not scale the weight (it weighs the token in the
    means); a lower bound of 0 is accepted."""
    if not bool((response_mask != 0).any()):
        raise RecapError("invalid argument `response_mask`: no valid token (verl's metrics need one)")
    level, threshold = str(rollout_is), F._is_threshold(rollout_is_threshold)
    weights, stats = F.rollout_is_weights(log_ratio, response_mask, rollout_is=level, rollout_is_threshold=threshold)
    metrics = _rollout_is_metrics(log_ratio.detach().float(), response_mask, weights, level, threshold)
    if rollout_is_batch_normalize:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            stats = distributed.rollout_is_sums(stats)
        weights, stats = F.rollout_is_normalize(weights, stats, level)
        metrics["rollout_is_batch_norm_factor"] = stats["factor"]
    return weights, metrics


def _rollout_is_metrics(log_ratio: Tensor, mask: Tensor, w: Tensor, level: str, threshold: str) -> Dict[str, Tensor]:
    """verl's ``compute_is_metrics`` of the applied weights ``w`` (before normalization)."""
    lower_s, _, upper_s = threshold.rpartition("_")
    upper = float(upper_s)
    lower = float(lower_s) if lower_s else 1.0 / upper
    m = mask.to(torch.float32)
    if level == "token":
        log_w = log_ratio
    else:
        log_w = (log_ratio * m).sum(-1, keepdim=True)
        if level == "geometric":
            log_w = log_w / m.sum(-1, keepdim=True).clamp(min=1.0)
    raw = torch.exp(log_w.clamp(-20.0, 20.0)).expand_as(log_ratio) * m
    metrics: Dict[str, Tensor] = {"rollout_is_mean": _masked_mean(w, m)}
    if level == "token":
        metrics["rollout_is_ratio_fraction_high"] = _masked_mean((raw > upper).float(), m)
        metrics["rollout_is_ratio_fraction_low"] = _masked_mean((raw < lower).float(), m)
        valid = m != 0
        metrics["rollout_is_max"] = w.masked_fill(~valid, float("-inf")).max()
        metrics["rollout_is_min"] = w.masked_fill(~valid, float("inf")).min()
    else:
        metrics["rollout_is_max"] = torch.exp(log_w.max().clamp(max=20.0))
        metrics["rollout_is_min"] = torch.exp(log_w.min())
        metrics["rollout_is_ratio_fraction_high"] = (log_w > math.log(upper)).float().mean()
        metrics["rollout_is_ratio_fraction_low"] = (log_w < math.log(lower) if lower > 0 else
                                                    torch.zeros_like(log_w, dtype=torch.bool)).float().mean()
    clamped = w.clamp(min=0.0, max=upper)
    mean_c = _masked_mean(clamped, m)
    if m.sum() > 1:
        metrics["rollout_is_std"] = (_masked_mean(clamped.square(), m) - mean_c.square()).clamp(min=0.0).sqrt()
    else:
        metrics["rollout_is_std"] = torch.zeros((), device=w.device)
    metrics["rollout_is_eff_sample_size"] = 1.0 / _masked_mean((clamped / (mean_c + 1e-8)).square(), m)
    if w.dim() > 1:
        seq = (w * m).sum(-1) / (m.sum(-1) + 1e-8)
        metrics["rollout_is_seq_mean"] = seq.mean()
        metrics["rollout_is_seq_std"] = seq.std() if seq.numel() > 1 else torch.zeros((), device=w.device)
        metrics["rollout_is_seq_max"] = seq.max()
        metrics["rollout_is_seq_min"] = seq.min()
        metrics["rollout_is_seq_max_deviation"] = (seq - 1.0).abs().max()
        raw_seq = (raw * m).sum(-1) / (m.sum(-1) + 1e-8)
        metrics["rollout_is_seq_fraction_high"] = (raw_seq > upper).float().mean()
        metrics["rollout_is_seq_fraction_low"] = (raw_seq < lower).float().mean()
    if lower_s:
        metrics["rollout_is_oob_ratio"] = _masked_mean(((raw < lower) | (raw > upper)).float(), m)
    return metrics


def compute_optimal_token_baseline_advantage(token_level_rewards: Tensor, response_mask: Tensor, index,
                                             old_log_probs: Tensor, sum_pi_squared: Tensor,
                                             rollout_is_weights: Optional[Tensor] = None,
                                             handle_zero_tail: bool = True, epsilon: float = 1e-8,
                                             **kwargs) -> Tuple[Tensor, Tensor]:
    """verl's ``compute_optimal_token_baseline_advantage`` (``adv_estimator=optimal_token_baseline``),
    same arguments and defaults (verl 0.8 and 0.9; other keyword arguments, such as the ``config``
    verl's trainer passes, are ignored as verl ignores them): ``(advantages, returns)`` ``[B, L]``
    float32; ``index`` groups the rows (verl's uids). Differences: non-finite values at unmasked tokens are an error naming the argument, and
    masked tokens are never read (in verl a NaN there spreads through the product with the mask)."""
    return F.optimal_token_baseline(token_level_rewards, response_mask, old_log_probs, sum_pi_squared,
                                    group_ids=index, rollout_is_weights=rollout_is_weights, multi_turn=False,
                                    handle_zero_tail=handle_zero_tail, eps=epsilon)


def compute_multi_turn_optimal_token_baseline_advantage(token_level_rewards: Tensor, response_mask: Tensor, index,
                                                        old_log_probs: Tensor, sum_pi_squared: Tensor,
                                                        rollout_is_weights: Optional[Tensor] = None,
                                                        handle_zero_tail: bool = True, epsilon: float = 1e-8,
                                                        **kwargs) -> Tuple[Tensor, Tensor]:
    """verl's ``compute_multi_turn_optimal_token_baseline_advantage``
    (``adv_estimator=tir_optimal_token_baseline``): as the single-turn one, with positions counted
    over each row's unmasked tokens."""
    return F.optimal_token_baseline(token_level_rewards, response_mask, old_log_probs, sum_pi_squared,
                                    group_ids=index, rollout_is_weights=rollout_is_weights, multi_turn=True,
                                    handle_zero_tail=handle_zero_tail, eps=epsilon)



def compute_gae_advantage_return(token_level_rewards: Tensor, values: Tensor, response_mask: Tensor, gamma, lam,
                                 **kwargs) -> Tuple[Tensor, Tensor]:
    """verl's ``compute_gae_advantage_return`` (``adv_estimator=gae``), same arguments (``gamma`` and
    ``lam`` floats or 0-dim tensors; other keyword arguments are ignored): ``(advantages, returns)``
    ``[B, L]`` float32, the advantages whitened as verl's. Differences: non-finite rewards or values
    at unmasked tokens are an error naming the argument, masked tokens' rewards are never read, and
    a batch whose mask sums to at most 1 gets advantages 0 where verl raises."""
    return F.gae_advantage_return(token_level_rewards, values, response_mask, float(gamma), float(lam))


_VERL_GAE: list = []  # verl's own compute_gae_advantage_return, once use_recap_gae has run


def use_recap_gae(enable: bool = True) -> None:
    """Puts ``compute_gae_advantage_return`` in place of verl's: the name verl's trainer calls
    (``verl.trainer.ppo.core_algos.compute_gae_advantage_return``) and the ``gae`` entry of its
    advantage-estimator registry; ``enable=False`` puts verl's back. Raises ImportError when verl is
    not installed."""
    from verl.trainer.ppo import core_algos

    if not _VERL_GAE:
        _VERL_GAE.append(core_algos.compute_gae_advantage_return)
    fn = compute_gae_advantage_return if enable else _VERL_GAE[0]
    core_algos.compute_gae_advantage_return = fn
    registry = getattr(core_algos, "ADV_ESTIMATOR_REGISTRY", {})
    if "gae" in registry:
        registry["gae"] = fn

def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kl_penalty: str) -> Tensor:
    """verl's ``kl_penalty``: kl/k1, abs, mse/k2, low_var_kl/k3, and the straight-through k1+ / k3+."""
    return F.kl_penalty(logprob, ref_logprob, kl_penalty)


def register(prefix: str = "recap_") -> list:
    """Adds these losses to verl's policy-loss registry as ``recap_vanilla``, ``recap_gspo``,
    ``recap_sapo``, ``recap_cispo``, ``recap_gpg``, ``recap_dppo_tv``, ``recap_dppo_kl``,
    ``recap_dro``, ``recap_geo_mean``, ``recap_clip_cov`` and ``recap_kl_cov`` (select one with ``actor.policy_loss.loss_mode``). Returns
    the names registered; raises ImportError when verl is not installed."""
    from verl.trainer.ppo import core_algos

    names = []
    for mode, fn in POLICY_LOSSES.items():
        name = prefix + mode
        registry = getattr(core_algos, "POLICY_LOSS_REGISTRY", {})
        if name not in registry:
            core_algos.register_policy_loss(name)(fn)
        names.append(name)
    return names


class FusedLinearForPPO(torch.nn.Module):
    """verl's ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` (what verl's models call
    with ``use_fused_kernels=True`` and ``fused_kernel_options.impl_backend`` ``torch`` or ``liger``):
    the same constructor, call and return, computed by ``fused_linear_logprobs``. ``forward(
    hidden_states [T, H] or [B, L, H], vocab_weights [V, H], input_ids shaped like hidden_states[:-1],
    temperature)`` returns ``(log_probs, entropy)`` shaped like ``input_ids``: the log-probabilities of
    ``input_ids`` under ``softmax(hidden_states @ vocab_weights.T / temperature)`` in float32 and the
    entropy in ``hidden_states``' dtype, as verl's; differentiable with respect to ``hidden_states``
    and ``vocab_weights``. ``chunk_size`` rows of logits at a time (verl's default 512), in the
    inputs' dtype with float32 softmax statistics; ``impl_backend`` is accepted and checked as verl
    checks it (both run our kernels). ``batch_invariant`` (ours; default: the class attribute, which
    ``use_recap_fused_linear(batch_invariant=True)`` sets): each row's log-prob and entropy the same
    bits whatever micro-batch computes it, so on-policy ``old_log_prob`` equals ``log_prob``
    exactly (``fused_linear_logprobs(batch_invariant=True)``).

    Differences from verl's: the temperature divides the logits in float32 inside the kernel (verl's
    divides the bf16 logits and rounds); the backward's logit gradient stays float32 up to the two
    GEMMs (verl's rounds it to the inputs' dtype first); a label equal to -100 gives log-prob 0
    and no gradient (verl's raises an index error)."""

    batch_invariant = False
    original = None  # verl's FusedLinearForPPO, set by use_recap_fused_linear
    engine_patched = False  # verl's FSDP engine takes Σπ² from the forward-only calls (use_recap_fused_linear)

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch", *, batch_invariant: Optional[bool] = None):
        super().__init__()
        if batch_invariant is not None:
            self.batch_invariant = A.boolean("batch_invariant", batch_invariant)
        if impl_backend not in ("torch", "liger"):
            raise ValueError(f"Unsupported FusedLinearForPPO backend: {impl_backend}. Choose 'torch' or 'liger'.")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(self, hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor,
                temperature: float = 1.0) -> Tuple[Tensor, Tensor]:
        if not isinstance(hidden_states, Tensor) or hidden_states.ndim not in (2, 3):
            raise ValueError(f"hidden_states: expected [T, H] or [B, L, H], got "
                             f"{tuple(getattr(hidden_states, 'shape', ()))}")
        if not isinstance(input_ids, Tensor) or input_ids.shape != hidden_states.shape[:-1]:
            raise ValueError(f"input_ids: expected shape {tuple(hidden_states.shape[:-1])} (hidden_states' "
                             f"leading dims), got {tuple(getattr(input_ids, 'shape', ()))}")
        if self.engine_patched and not torch.is_grad_enabled():
            # a forward-only pass (verl's old log-probs): Σπ² from the same read of each row, kept
            # for the engine's prepare_model_outputs (use_recap_fused_linear's patch)
            log_probs, entropy, spp = F.fused_linear_logprobs(hidden_states, vocab_weights, input_ids, temperature,
                                                              chunk_tokens=self.chunk_size, return_sum_pi_squared=True,
                                                              batch_invariant=self.batch_invariant)
            _LAST_SUM_PI_SQUARED.value = spp
        else:
            log_probs, entropy = F.fused_linear_logprobs(hidden_states, vocab_weights, input_ids, temperature,
                                                         chunk_tokens=self.chunk_size,
                                                         batch_invariant=self.batch_invariant)
        return log_probs.float(), entropy.to(hidden_states.dtype)


def use_recap_fused_linear(enable: bool = True, *, batch_invariant: bool = False) -> None:
    """Puts ``FusedLinearForPPO`` in place of verl's (``verl.utils.experimental.torch_functional``),
    which verl's model forwards construct on every call when ``actor_rollout_ref.model.
    use_fused_kernels=True`` with ``fused_kernel_options.impl_backend`` ``torch`` (the default) or
    ``liger``; ``enable=False`` restores verl's. In verl's worker processes it takes one config line,
    ``actor_rollout_ref.model.external_lib=recap_kernels.verl_fused_linear`` (verl imports that module
    in each worker, and importing it calls this). verl's ``triton`` backend is not replaced. Raises
    ImportError when verl is not installed. ``batch_invariant``: the module's default
    (``FusedLinearForPPO.batch_invariant``). It also lets verl's FSDP engine give Σπ² with fused
    kernels (``actor.calculate_sum_pi_squared=True``, which verl's optimal token baseline needs and
    verl 0.9 refuses with ``use_fused_kernels``), from the same read of each row."""
    FusedLinearForPPO.batch_invariant = A.boolean("batch_invariant", batch_invariant)
    from verl.utils.experimental import torch_functional as tf

    if tf.FusedLinearForPPO is not FusedLinearForPPO:
        FusedLinearForPPO.original = tf.FusedLinearForPPO
    if enable:
        tf.FusedLinearForPPO = FusedLinearForPPO
    elif FusedLinearForPPO.original is not None:
        tf.FusedLinearForPPO = FusedLinearForPPO.original
    _patch_fsdp_engine(enable)


_LAST_SUM_PI_SQUARED = threading.local()  # this thread's last forward-only FusedLinearForPPO Σπ²


def _patch_fsdp_engine(enable: bool) -> None:
    """Lets verl's FSDP engine (``FSDPEngineWithLMHead.prepare_model_outputs``) give Σπ² with
    ``use_fused_kernels=True`` (verl 0.9 raises NotImplementedError: its fused kernels do not
    surface it): the forward-only pass's ``FusedLinearForPPO`` computes it in the same read of each
    row, and the engine lays it out as it lays out the log-probs (the same unpadding, gathering
    and nesting, by running verl's own code on it). So ``actor.calculate_sum_pi_squared=True``
    (the optimal token baseline) works with fused kernels. Nothing happens where the engine
    cannot be imported (its dependencies are not installed)."""
    try:
        from verl.workers.engine.fsdp import transformer_impl as ti
    except ImportError:
        return
    cls = ti.FSDPEngineWithLMHead
    original = getattr(cls.prepare_model_outputs, "recap_original", None)
    if not enable:
        FusedLinearForPPO.engine_patched = False
        if original is not None:
            cls.prepare_model_outputs = original
        return
    FusedLinearForPPO.engine_patched = True
    if original is not None:
        return
    original = cls.prepare_model_outputs
    tu = ti.tu

    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        wanted = (tu.get_non_tensor_data(data=micro_batch, key="calculate_sum_pi_squared", default=False)
                  and tu.get_non_tensor_data(data=micro_batch, key="use_fused_kernels", default=False))
        if not wanted:
            return original(self, output, output_args, micro_batch, logits_processor_func)
        spp, _LAST_SUM_PI_SQUARED.value = getattr(_LAST_SUM_PI_SQUARED, "value", None), None
        if spp is None or getattr(output, "log_probs", None) is None or spp.shape != output.log_probs.shape:
            raise RecapError("calculate_sum_pi_squared with use_fused_kernels needs recap_kernels' FusedLinearForPPO "
                             "in a forward-only pass (actor_rollout_ref.model.external_lib="
                             "recap_kernels.verl_fused_linear, fused_kernel_options.impl_backend torch or liger)")
        rest = micro_batch.copy()
        tu.assign_non_tensor(rest, calculate_sum_pi_squared=False)
        model_output = original(self, output, output_args, rest, logits_processor_func)
        # verl's own layout of a per-token output: Σπ² in the place of the log-probs
        as_logp = copy.copy(output)
        as_logp.log_probs = spp
        tu.assign_non_tensor(rest, calculate_entropy=False, distillation_use_topk=False, distillation_only=False)
        model_output["sum_pi_squared"] = original(self, as_logp, output_args, rest, logits_processor_func)["log_probs"]
        return model_output

    prepare_model_outputs.recap_original = original
    cls.prepare_model_outputs = prepare_model_outputs
