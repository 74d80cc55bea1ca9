"""The ops as functions of PyTorch tensors in the shapes verl and TRL use, returning the loss and
metrics as tensors (0-dim, or ``[K]`` per objective) on the inputs' device; differentiable, and
traceable by ``torch.compile(fullgraph=True)``.

Shapes: per-token tensors come padded ``[B, L]`` (with the mask; the sequence layout then follows
from the shape) or packed ``[T]`` with ``cu_seqlens`` ``[B + 1]`` (a list or a CPU tensor: it is read
on the host, so a CUDA tensor is refused rather than synchronized). Options are the fields of the
crate's ``GrpoConfig`` (``grpo_config`` lists them with their defaults, which are verl's).

Under ``torch.compile``, pass ``lambda_`` as a CPU tensor: a Python list is a constant of the graph,
so new weights every step would recompile it.
"""
import json
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _args as A
from . import _native, ops
from ._native import RecapError

__all__ = ["grpo_config", "grpo_loss", "grpo_loss_async", "GrpoPending", "grpo_loss_from_logits_async",
           "fused_linear_grpo_loss_async", "kl_penalty", "rollout_rejection", "rollout_is_weights", "rollout_is_normalize", "weighted_reduce", "count_normalizers",
           "logprobs_from_logits", "grpo_loss_from_logits", "fused_linear_grpo_loss", "fused_linear_logprobs", "group_advantages", "optimal_token_baseline", "gae_advantage_return", "RecapError"]

_OBJECTIVES = {"policy": 0, "nll": 1, 0: 0, 1: 1}


@torch.compiler.assume_constant_result
def _config_json(items: Tuple[Tuple[str, object], ...]) -> str:
    return _native.grpo_config(json.dumps(dict(items)))


def grpo_config(**options) -> dict:
    """The complete, validated loss configuration for ``options`` (the crate's ``GrpoConfig`` field
    names; unknown names and values out of range raise ``RecapError`` naming them)."""
    return json.loads(_native.grpo_config(json.dumps(options)))


def _config(options: dict) -> str:
    return _config_json(tuple(sorted(A.options(options).items())))


@torch.compiler.assume_constant_result
def _layout(k: int, logits: bool) -> Tuple[Tuple[str, int, int, bool], ...]:
    return tuple(tuple(f) for f in (_native.logits_stat_layout(k) if logits else _native.grpo_stat_layout(k)))


def _metrics(stats: Tensor, k: int, names: Optional[Sequence[str]], logits: bool = False) -> Dict[str, Tensor]:
    """Statistics as verl names them: 0-dim tensors, and ``[K]`` tensors for per-objective ones (with
    ``names``, also one 0-dim entry per objective, ``actor/pg_clipfrac/<name>``)."""
    out = {}
    stats = stats.detach()
    for name, off, n, per_objective in _layout(k, logits):
        if per_objective:
            out[name] = stats[off:off + n]
            if names is not None:
                for j, obj in enumerate(names):
                    out[f"{name}/{obj}"] = stats[off + j]
        else:
            out[name] = stats[off]
    return out


def _float(name: str, x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else A.floats(name, x)


def _mask(x: Tensor, name: str = "mask") -> Tensor:
    x = A.tensor(name, x)
    if x.dim() == 0:
        A.fail(name, "expected one weight per token, [T] or [B, L], got a 0-dim tensor")
    if x.dtype == torch.bool:
        return x.contiguous().view(torch.uint8)
    if x.dtype in (torch.uint8, torch.float32):
        return x
    if x.is_complex():
        A.fail(name, f"expected float weights or uint8 / bool flags, got {x.dtype}", True)
    return x.float()  # other dtypes act as weights, as in verl


def _host(name: str, x, dtype) -> Tensor:
    """A small host array (list, tuple or CPU tensor) as a CPU tensor of ``dtype``: integers are
    range-checked in the caller's dtype first (``dtype`` int32: its range; int64: membership bits,
    0 to 2^32 - 1), floats refused where integers are meant."""
    if dtype == torch.int32:
        return A.host_ints(name, x)
    if dtype == torch.int64:
        return A.host_ints(name, x, 0, 2 ** 32 - 1, torch.int64)
    if isinstance(x, Tensor):
        A.tensor(name, x)
        if x.device.type != "cpu":
            A.fail(name, f"expected a CPU tensor or a list (it is read on the host before any launch; reading it "
                         f"from {x.device} would synchronize), got a tensor on {x.device}")
        if x.is_complex() or x.dtype == torch.bool:
            A.fail(name, f"expected real numbers, got a {x.dtype} tensor", True)
        return x.reshape(-1).to(dtype).contiguous()
    if isinstance(x, (str, bytes)) or not hasattr(x, "__iter__"):
        A.fail(name, f"expected a list or a CPU tensor, got {type(x).__name__}", True)
    return torch.tensor([A.number(f"{name}[{i}]", v) for i, v in enumerate(x)], dtype=dtype)


def _tokens(name: str, x, what: str = "per-token values [T] or padded [B, L]") -> Tensor:
    """A per-token float tensor with at least one dimension."""
    x = A.floats(name, x)
    if x.dim() == 0:
        A.fail(name, f"expected {what}, got a 0-dim tensor")
    return x


def _padded_cu(b: int, length: int) -> Tensor:
    if length == 0:
        return torch.zeros(b + 1, dtype=torch.int32)
    return torch.arange(0, b * length + 1, length, dtype=torch.int32)


def _batch(shape, cu_seqlens) -> Tuple[Tensor, int]:
    """``cu_seqlens`` (CPU int32) and B, from the argument or from a padded ``[B, L]`` token shape."""
    if cu_seqlens is None:
        if len(shape) != 2:
            raise RecapError(f"invalid argument `cu_seqlens`: required for packed inputs (got per-token shape "
                             f"{tuple(shape)}; pass cu_seqlens [B + 1] or padded [B, L] tensors)")
        return _padded_cu(shape[0], shape[1]), shape[0]
    cu = A.host_ints("cu_seqlens", cu_seqlens, 0, A.INT32_MAX)
    if cu.shape[0] < 1:
        A.fail("cu_seqlens", "expected [B + 1] >= 1 boundaries starting at 0, got an empty array")
    return cu, cu.shape[0] - 1


def _advantages(adv: Tensor, shape, b: int, per_token: Optional[bool]) -> Tuple[Tensor, bool, int]:
    """Advantages as ``[B, K]`` (per sequence) or ``[T, K]`` (per token, for tokens of ``shape``),
    with K."""
    shape = tuple(shape)
    if per_token is None:
        per_token = tuple(adv.shape) == shape or (adv.dim() == len(shape) + 1 and tuple(adv.shape[:-1]) == shape)
    if per_token:
        k = 1 if tuple(adv.shape) == shape else adv.shape[-1]
    else:
        k = 1 if adv.dim() == 1 else adv.shape[-1]
        if adv.shape[0] != b:
            raise RecapError(f"invalid argument `advantages`: expected per-token advantages shaped like the "
                             f"tokens {shape} (or with a last dimension K), or per-sequence [B = {b}] / "
                             f"[B, K], got shape {tuple(adv.shape)}")
    return adv.reshape(-1), bool(per_token), k


def _weights(lambda_, k: int) -> Tensor:
    if lambda_ is None:
        return torch.ones(k, dtype=torch.float32)
    lam = _host("lambda_", lambda_, torch.float32)
    if lam.shape != (k,):
        raise RecapError(f"invalid argument `lambda_`: expected K = {k} objective weights (one per advantage "
                         f"column), got shape {tuple(lam.shape)}")
    # (in a traced graph the op checks them, naming `lambda`: no data-dependent branch here)
    if not torch.compiler.is_compiling() and (not bool(torch.isfinite(lam).all()) or bool((lam < 0).any())):
        A.fail("lambda_", f"expected finite objective weights >= 0, got {lam.tolist()}")
    return lam


_same_device = A.same_device


def _same_shape(first: Tensor, **tensors) -> None:
    """Every per-token tensor holding as many elements as the first (the tokens)."""
    for name, x in tensors.items():
        if x is not None:
            if not isinstance(x, Tensor):
                A.fail(name, f"expected a torch.Tensor, got {type(x).__name__}", True)
            if x.numel() != first.numel():
                A.fail(name, f"expected one value per token, {tuple(first.shape)}, got shape {tuple(x.shape)}")


def _kinds(objectives, k: int):
    if objectives is None:
        return [0] * k
    if isinstance(objectives, (str, bytes)) or not hasattr(objectives, "__iter__"):
        A.fail("objectives", f"expected a list of 'policy' / 'nll', one per objective, got {objectives!r}", True)
    kinds = []
    for o in objectives:
        if isinstance(o, bool) or not isinstance(o, (str, int)) or o not in _OBJECTIVES:
            A.fail("objectives", f"expected 'policy' or 'nll' per objective, got {o!r}")
        kinds.append(_OBJECTIVES[o])
    if len(kinds) != k:
        A.fail("objectives", f"expected K = {k} kinds (one per objective), got {len(kinds)}")
    return kinds


def _normalizers(normalizers, seq_tokens):
    if isinstance(normalizers, (tuple, list)):  # (normalizers, seq_tokens) as count_normalizers returns them
        normalizers, seq_tokens = normalizers
    return normalizers, seq_tokens


def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, cu_seqlens=None, *,
              ref_logp: Optional[Tensor] = None, rollout_logp: Optional[Tensor] = None,
              policy_weight: Optional[Tensor] = None, lambda_=None, objectives=None, membership=None,
              normalizers=None, seq_tokens: Optional[Tensor] = None, objective_names: Optional[Sequence[str]] = None,
              advantages_per_token: Optional[bool] = None, **options) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The fused GRPO loss of K objectives (verl's policy loss + ``agg_loss`` + the KL term) and its
    metrics; differentiable with respect to ``logp``.

    ``advantages``: per token, shaped like ``logp`` (one objective) or with a last dimension K, or per
    sequence ``[B]`` / ``[B, K]`` (``advantages_per_token`` decides when the shape is ambiguous).
    ``lambda_`` ``[K]`` objective weights (default 1), ``objectives`` ``[K]`` ("policy" or "nll"),
    ``membership`` ``[B]`` bit masks, ``normalizers`` the whole batch's (``count_normalizers``,
    ``distributed.global_normalizers``) for micro-batches and data-parallel ranks. ``options``: the
    ``GrpoConfig`` fields (``clip_low``, ``clip_high``, ``dual_clip``, ``agg_mode``, ``kl_coef``,
    ``kl_estimator``, ``policy_loss``, ...). Returns ``(loss, metrics)``.
    """
    logp = _tokens("logp", logp)
    cu, b = _batch(logp.shape, cu_seqlens)
    adv, per_token, k = _advantages(_tokens("advantages", advantages), logp.shape, b, advantages_per_token)
    lam = _weights(lambda_, k)
    kinds = _kinds(objectives, lam.shape[0])
    memb = None if membership is None else _host("membership", membership, torch.int64)
    normalizers, seq_tokens = _normalizers(normalizers, seq_tokens)
    flat = [None if x is None else x.reshape(-1) for x in
            (_tokens("old_logp", old_logp), _mask(mask), _float("ref_logp", ref_logp),
             _float("rollout_logp", rollout_logp), _float("policy_weight", policy_weight))]
    old, m, ref, roll, pw = flat
    _same_device(logp, old_logp=old, advantages=adv, mask=m, ref_logp=ref, rollout_logp=roll, policy_weight=pw)
    loss, _, stats = ops.grpo_loss(logp.reshape(-1), old, adv, m, cu, lam, kinds, memb, ref, roll, pw, normalizers,
                                   seq_tokens, per_token, _config(options))
    return loss, _metrics(stats, lam.shape[0], objective_names)


class GrpoPending:
    """An asynchronous loss call (``grpo_loss_async``, ``grpo_loss_from_logits_async``,
    ``fused_linear_grpo_loss_async``): its device-resident output ``out`` (float64; ``out[0]`` the
    loss) and what decoding it takes. ``metrics()`` reads it back, which synchronizes the stream:
    call it when the metrics are logged, not every micro-batch."""

    def __init__(self, out: Tensor, k: int, config: str, has_ref: bool, has_rollout: bool,
                 names: Optional[Sequence[str]], logits: Optional[Tuple[int, int]] = None):
        self.out, self._k, self._config = out, k, config
        self._has_ref, self._has_rollout, self._names = has_ref, has_rollout, names
        self._logits = logits  # (ignore_index, V) of a loss from logits

    def metrics(self) -> Dict[str, Tensor]:
        """The metrics the synchronous call returns (CPU tensors here), after the checks made on the
        device (a layout passed on the device, labels out of range): a failed one raises
        ``RecapError`` naming the argument."""
        if self._logits is None:
            _, stats = _native.grpo_output_read(self.out, self._k, self._config, self._has_ref, self._has_rollout)
        else:
            _, stats = _native.logits_output_read(self.out, self._k, self._config, self._has_ref, self._has_rollout,
                                                  *self._logits)
        return _metrics(torch.tensor(stats, dtype=torch.float64), self._k, self._names, logits=self._logits is not None)


def _device_or_host(name: str, x, dtype, device) -> Tensor:
    """A small per-batch array: on ``device`` (no synchronization) when it is a tensor there, else
    read on the host."""
    if isinstance(x, Tensor) and x.device == device and device.type != "cpu":
        return x.to(dtype).contiguous()
    return _host(name, x, dtype)


def _async_batch(dev, lead, cu_seqlens, advantages, advantages_per_token, lambda_, objectives, membership):
    """The batch layout of an asynchronous call: ``cu_seqlens``, ``lambda_`` and ``membership`` on
    ``dev`` (no synchronization) when ``cu_seqlens`` is a tensor there, else read on the host.
    Returns ``(cu, adv, per_token, lam, kinds, memb)``."""
    on_device = isinstance(cu_seqlens, Tensor) and cu_seqlens.device == dev and dev.type != "cpu"
    if on_device:
        cu = cu_seqlens.to(torch.int32).contiguous()
        b = cu.shape[0] - 1
    else:
        cu, b = _batch(lead, cu_seqlens)
    adv, per_token, k = _advantages(_tokens("advantages", advantages), lead, b, advantages_per_token)
    if on_device:
        lam = (torch.ones(k, dtype=torch.float32, device=dev) if lambda_ is None
               else _device_or_host("lambda_", lambda_, torch.float32, dev).to(dev))
        if lam.shape != (k,):
            raise RecapError(f"invalid argument `lambda_`: expected K = {k} objective weights, got shape "
                             f"{tuple(lam.shape)}")
        memb = None if membership is None else torch.as_tensor(membership, device=dev).to(torch.int32)
    else:
        lam = _weights(lambda_, k)
        memb = None if membership is None else _host("membership", membership, torch.int64)
    return cu, adv, per_token, lam, _kinds(objectives, lam.shape[0]), memb


def grpo_loss_async(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, cu_seqlens=None, *,
                    ref_logp: Optional[Tensor] = None, rollout_logp: Optional[Tensor] = None,
                    policy_weight: Optional[Tensor] = None, lambda_=None, objectives=None, membership=None,
                    normalizers=None, seq_tokens: Optional[Tensor] = None,
                    objective_names: Optional[Sequence[str]] = None, advantages_per_token: Optional[bool] = None,
                    **options) -> Tuple[Tensor, GrpoPending]:
    """``grpo_loss`` without a host synchronization: returns ``(loss, pending)`` at once, ``loss`` a
    0-dim tensor on the device (differentiable with respect to ``logp``), ``pending.metrics()`` the
    metrics, read back when asked for. ``cu_seqlens``, ``lambda_`` and ``membership`` may be tensors
    on the device of ``logp`` (all three, then: int32 / int64, float32, int32 bits), checked there;
    a failed check makes the loss NaN and ``pending.metrics()`` raise. With them on the device the
    call copies nothing from the host, so it can be captured in a CUDA graph (after one eager call
    of the same size). On CPU tensors the reference computes at once.
    """
    logp = _tokens("logp", logp)
    cu, adv, per_token, lam, kinds, memb = _async_batch(logp.device, logp.shape, cu_seqlens, advantages,
                                                        advantages_per_token, lambda_, objectives, membership)
    normalizers, seq_tokens = _normalizers(normalizers, seq_tokens)
    flat = [None if x is None else x.reshape(-1) for x in
            (_tokens("old_logp", old_logp), _mask(mask), _float("ref_logp", ref_logp),
             _float("rollout_logp", rollout_logp), _float("policy_weight", policy_weight))]
    old, m, ref, roll, pw = flat
    _same_device(logp, old_logp=old, advantages=adv, mask=m, ref_logp=ref, rollout_logp=roll, policy_weight=pw)
    config = _config(options)
    loss, _, out = ops.grpo_loss_async(logp.reshape(-1), old, adv, m, cu, lam, kinds, memb, ref, roll, pw,
                                       normalizers, seq_tokens, per_token, config)
    return loss, GrpoPending(out, len(kinds), config, ref is not None, roll is not None, objective_names)


def kl_penalty(logp: Tensor, ref_logp: Tensor, kl_penalty: str = "low_var_kl", mask: Optional[Tensor] = None) -> Tensor:
    """verl's ``kl_penalty``: the per-token KL estimator (k1/kl, abs, k2/mse, k3/low_var_kl, k1+, k3+),
    shaped like ``logp``, differentiable with respect to ``logp`` (masked tokens: 0)."""
    logp, ref_logp = _tokens("logp", logp), _tokens("ref_logp", ref_logp)
    shape = logp.shape
    _same_shape(logp, ref_logp=ref_logp, mask=mask)
    m = None if mask is None else _mask(mask).reshape(-1)
    _same_device(logp, ref_logp=ref_logp, mask=m)
    if not isinstance(kl_penalty, str):
        A.fail("kl_penalty", f"expected an estimator name (k1, abs, k2, k3, low_var_kl, ...), got {kl_penalty!r}", True)
    out, _ = ops.kl(logp.reshape(-1), ref_logp.reshape(-1), m, kl_penalty)
    return out.view(shape)


def rollout_rejection(log_ratio: Tensor, mask: Tensor, cu_seqlens=None, *, rollout_rs: Optional[str] = "token_k1",
                      rollout_rs_threshold=None,
                      rollout_token_veto_threshold: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """verl's rollout rejection sampling of ``log_ratio = old_logp - rollout_logp``:
    ``(new_mask, flags)``. ``flags`` (int32, shaped like the mask) has bit i set where option i of
    ``rollout_rs`` (comma-separated, repeats dropped; verl's names ``token_k1/k2/k3``,
    ``seq_sum_k1/k2/k3``, ``seq_mean_k1/k2/k3``, ``seq_max_k2/k3``) rejects the token, 0 at masked
    tokens; ``new_mask`` is the mask (its dtype) with every rejected token set to 0. Thresholds as
    verl's ``rollout_rs_threshold``: one for all options or one per option, comma-separated;
    ``lower_upper`` ratio bounds (or one upper bound u: ``1/u`` to u) for k1 options. Pass
    ``new_mask`` to ``count_normalizers`` and the loss: rejected tokens leave the normalizers, the KL
    term and the metrics. ``rollout_token_veto_threshold`` (the older verl API's veto; ``rollout_rs``
    may then be ``None``) rejects every sequence holding an unmasked token of ratio
    ``exp(log_ratio)`` below it; its flag is the last bit. Not differentiable (a selection)."""
    veto = None if rollout_token_veto_threshold is None else A.number("rollout_token_veto_threshold",
                                                                     rollout_token_veto_threshold)
    lr = _tokens("log_ratio", log_ratio)
    mask = _mask(mask)
    _same_shape(lr, mask=mask)
    shape = mask.shape
    cu, _ = _batch(shape, cu_seqlens)
    lr = lr.reshape(-1)
    m = mask.reshape(-1)
    _same_device(lr, mask=m)
    flags = ops.rollout_rejection(lr.detach(), m, cu, str(rollout_rs or ""), str(rollout_rs_threshold or ""),
                                  veto).view(shape)
    return torch.where(flags == 0, mask.view(shape), torch.zeros((), dtype=mask.dtype, device=mask.device)), flags


ROLLOUT_IS_STATS = ("weight_sum", "units", "ratio_min", "ratio_max", "corrected", "mean", "factor")


def _is_threshold(threshold) -> str:
    """verl's ``rollout_is_threshold`` (a number, or ``"lower_upper"``) as the op's string."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, str)):
        raise RecapError(f"invalid argument `rollout_is_threshold`: expected a number or a \"lower_upper\" "
                         f"string, got {threshold!r}")
    return repr(float(threshold)) if not isinstance(threshold, str) else threshold


def rollout_is_weights(log_ratio: Tensor, mask: Tensor, cu_seqlens=None, *, rollout_is: str = "token",
                       rollout_is_threshold=2.0, rollout_is_batch_normalize: bool = False
                       ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """verl's rollout importance-sampling weights of ``log_ratio = old_logp - rollout_logp``:
    ``(weights, stats)``. ``weights`` (float32, shaped like the mask, 0 at masked tokens) are
    ``exp(clamp(log-weight, -20, 20))`` of the token's log-ratio (``rollout_is="token"``), of the
    sequence's masked sum (``"sequence"``) or of its mean (``"geometric"``, ours), truncated at
    ``rollout_is_threshold`` (a number) or, for ``"lower_upper"`` (IcePop), set to 0 outside the band.
    With ``rollout_is_batch_normalize`` they are divided by their batch mean (tokens: the masked mean;
    sequences: the mean over the sequences with a valid token) where it exceeds 1e-8. ``stats``:
    0-dim float64 tensors ``weight_sum``, ``units`` (the mask sum, or the count of sequences with a
    valid token), ``ratio_min`` and ``ratio_max`` (of the raw ratios), ``corrected`` (the units
    truncated or zeroed), ``mean`` (the batch mean before normalization) and ``factor`` (what the
    weights were divided by; 1 without normalization). Pass the weights to ``grpo_loss`` as
    ``policy_weight``. Over data-parallel ranks, ``distributed.rollout_is_weights``. Not
    differentiable (verl detaches them)."""
    lr = _tokens("log_ratio", log_ratio)
    mask = _mask(mask)
    _same_shape(lr, mask=mask)
    shape = mask.shape
    cu, _ = _batch(shape, cu_seqlens)
    lr = lr.reshape(-1)
    m = mask.reshape(-1)
    _same_device(lr, mask=m)
    weights, stats = ops.rollout_is_weights(lr.detach(), m, cu, str(rollout_is), _is_threshold(rollout_is_threshold),
                                            bool(rollout_is_batch_normalize))
    return weights.view(shape), dict(zip(ROLLOUT_IS_STATS, stats.unbind()))


def rollout_is_normalize(weights: Tensor, stats: Dict[str, Tensor], rollout_is: str = "token"
                         ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Unnormalized rollout IS ``weights`` divided by the batch factor of ``stats["weight_sum"]`` and
    ``stats["units"]`` (e.g. summed over ranks or micro-batches), with ``mean`` and ``factor`` in the
    returned stats: the same float32 division as the op's own normalization. Reads the two sums back
    to the host (verl's ``weights_mean > 1e-8`` does too)."""
    mean, factor = _native.rollout_is_batch_factor(float(stats["weight_sum"]), float(stats["units"]), str(rollout_is))
    like = stats["weight_sum"]
    stats = dict(stats, mean=like.new_tensor(mean), factor=like.new_tensor(factor))
    if factor != 1.0:
        weights = weights / torch.tensor(factor, dtype=torch.float32, device=weights.device)
    return weights, stats


def weighted_reduce(losses: Tensor, mask: Tensor, cu_seqlens=None, *, lambda_=None, membership=None,
                    normalizers=None, seq_tokens=None, **options) -> Tuple[Tensor, Tensor]:
    """verl's ``agg_loss`` for K objectives at once: ``losses`` shaped like ``mask`` (one objective)
    or with a last dimension K. Returns ``(total, per_objective [K])`` with
    ``total = (1/K) sum_k lambda_k agg_k``, differentiable with respect to ``losses``."""
    losses, mask = _tokens("losses", losses), _mask(mask)
    one = losses.shape == mask.shape
    if not one and (losses.dim() != mask.dim() + 1 or losses.shape[:-1] != mask.shape):
        A.fail("losses", f"expected the mask's shape {tuple(mask.shape)} (one objective) or with a last dimension "
                         f"K, got shape {tuple(losses.shape)}")
    k = 1 if one else losses.shape[-1]
    cu, b = _batch(mask.shape, cu_seqlens)
    lam = _weights(lambda_, k)
    memb = None if membership is None else _host("membership", membership, torch.int64)
    normalizers, seq_tokens = _normalizers(normalizers, seq_tokens)
    _same_device(losses, mask=mask)
    total, _, stats = ops.weighted_reduce(_tokens("losses", losses).reshape(-1), _mask(mask).reshape(-1), cu, lam,
                                          memb, normalizers, seq_tokens, _config(options))
    return total, stats[:k]


def count_normalizers(mask: Tensor, cu_seqlens=None, membership=None, num_objectives: int = 1) -> Tuple[Tensor, Tensor]:
    """This batch's normalizers: ``([2, K + 1] float64, [B] float64)`` on the mask's device: token
    weights then sequence counts per objective (the KL slot last), and each sequence's token weight.
    Add them over micro-batches / ranks and pass the sum as ``normalizers=`` to every part (a part
    that cuts a sequence also passes the whole batch's ``seq_tokens`` of its sequences)."""
    mask = _mask(mask)
    cu, _ = _batch(mask.shape, cu_seqlens)
    memb = None if membership is None else _host("membership", membership, torch.int64)
    k = A.integer("num_objectives", num_objectives, 1, 16)
    if memb is not None and not torch.compiler.is_compiling() and bool((memb >= 2 ** k).any()):
        A.fail("membership", f"expected bits below K = {k} (membership bit k: a member of objective k), got "
                             f"{int(memb.max()):#x}")
    return ops.count_normalizers(_mask(mask).reshape(-1), cu, memb, k)


_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _logits(logits) -> Tensor:
    """Logits ``[..., V]`` (V >= 1) in a dtype the kernels read."""
    logits = A.tensor("logits", logits)
    if logits.dtype not in _LOGIT_DTYPES:
        A.fail("logits", f"expected a float32, float16 or bfloat16 tensor, got {logits.dtype}", True)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        A.fail("logits", f"expected [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    return logits


def _labels(labels, rows: int) -> Tensor:
    """``[T]`` int32 labels for ``rows`` rows: an integer tensor (wider dtypes narrowed with
    saturation: a label out of range stays out of range and is reported)."""
    y = A.device_ints("labels", labels).reshape(-1)
    if y.shape[0] != rows:
        A.fail("labels", f"expected {rows} labels (one per row), got shape {tuple(labels.shape)}")
    return y


def _options(temperature, ignore_index) -> Tuple[float, int]:
    return A.number("temperature", temperature), A.integer("ignore_index", ignore_index, A.INT32_MIN, A.INT32_MAX)


def _chunking(chunk_tokens, memory_budget) -> Tuple[int, int]:
    chunk = 0 if chunk_tokens is None else A.integer("chunk_tokens", chunk_tokens, 1, 2 ** 31 - 1)
    return chunk, A.integer("memory_budget", memory_budget, 1, 2 ** 62)


def _head(hidden, weight, any_dtype: bool = False) -> Tuple[Tensor, Tensor]:
    """The last layer's ``hidden [..., H]`` and ``weight [V, H]``: bfloat16 (the fused-linear loss's
    GEMMs), or with ``any_dtype`` one dtype the logits kernels read."""
    hidden, weight = A.tensor("hidden", hidden), A.tensor("weight", weight)
    if hidden.dim() < 1:
        A.fail("hidden", "expected [..., H], got a 0-dim tensor")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1] or weight.shape[0] == 0:
        A.fail("weight", f"expected hidden [..., H] and weight [V >= 1, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if any_dtype:
        if hidden.dtype not in _LOGIT_DTYPES or weight.dtype != hidden.dtype:
            A.fail("weight", f"expected `hidden` and `weight` of one dtype among float32, float16, bfloat16, got "
                             f"{hidden.dtype} and {weight.dtype}", True)
        return hidden, weight
    for name, x in (("hidden", hidden), ("weight", weight)):
        if x.dtype != torch.bfloat16:
            A.fail(name, f"expected bfloat16 (the LM head's GEMMs take bf16), got {x.dtype}", True)
    return hidden, weight


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0, *, entropy: bool = True,
                         inplace_backward: bool = True, ignore_index: int = -100,
                         return_sum_pi_squared: bool = False):
    """Per-token log-probabilities of ``labels`` under ``logits / temperature`` (verl's
    ``logprobs_from_logits``) and the entropy of each row, in one read of the logits ``[..., V]``
    (bf16, f16 or f32; the arithmetic is fp32). Differentiable with respect to ``logits``; with
    ``inplace_backward`` the gradient is written over the logits' storage (no ``[T, V]``
    temporary), so the logits must not be used by anything else that needs them for backward
    (autograd's version check then fails loudly). Returns ``(logp, entropy)`` shaped like
    ``labels`` (``logp`` alone with ``entropy=False``); with ``return_sum_pi_squared`` the tuple
    ends with ``sum_pi_squared``, each row's ``sum_j p_j^2`` of ``softmax(logits / temperature)``
    (verl's ``sum_pi_squared`` for the optimal token baseline; from the same read, every row
    whatever its label, differentiable too)."""
    logits = _logits(logits)
    shape = logits.shape[:-1]
    z = logits.reshape(-1, logits.shape[-1])
    if z.shape[0] > 1 and z.stride(-1) != 1:
        z = z.contiguous()
    y = _labels(labels, z.shape[0])
    _same_device(z, labels=y)
    tau, ignore = _options(temperature, ignore_index)
    spp_wanted = bool(return_sum_pi_squared)
    logp, ent, _, spp = ops.logprob_forward(z, y, tau, ignore, bool(inplace_backward), spp_wanted)
    out = [logp.view(shape)] + ([ent.view(shape)] if entropy else []) + ([spp.view(shape)] if spp_wanted else [])
    return out[0] if len(out) == 1 else tuple(out)


def _rows_times(x: Tensor, w: Tensor, rows: int) -> Tensor:
    """``x @ w`` computed as a product of ``rows`` rows when ``rows`` is given (``x`` padded with zero
    rows; the result cut back): one GEMM shape whatever ``x``'s row count, so the library picks one
    algorithm and each row's result does not depend on the batch (the batch-invariant mode)."""
    n = x.shape[0]
    if not rows or n == rows:
        return x @ w
    padded = x.new_zeros(rows, x.shape[1])
    padded[:n] = x
    return (padded @ w)[:n]


class _FusedLinearLogprobs(torch.autograd.Function):
    """Per-token log-probabilities, entropies and Σπ² of ``hidden @ weight^T (+ bias)``, chunk by
    chunk of rows: each chunk's ``[c, V]`` logits through the logits kernels, recomputed in the
    backward, where the logits gradient is taken in float32 (from the same logits) and multiplied
    into the hidden, weight and bias gradients in float32. With ``fixed`` every per-row GEMM (the
    logits, the hidden gradient) has ``chunk`` rows (see ``_rows_times``)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, chunk, want_spp, fixed):
        t = hidden.shape[0]
        rows = chunk if fixed else 0
        out = torch.empty(4, t, dtype=torch.float32, device=hidden.device)  # logp, entropy, lse, Σπ²
        for a in range(0, t, chunk):
            b = min(t, a + chunk)
            z = _rows_times(hidden[a:b], weight.T, rows)
            if bias is not None:
                z = z + bias
            lp, ent, lse, spp = ops.logprob_forward(z, labels[a:b], temperature, ignore_index, True, want_spp)
            out[0, a:b], out[1, a:b], out[2, a:b] = lp, ent, lse
            if want_spp:
                out[3, a:b] = spp
        ctx.save_for_backward(hidden, weight, bias, labels, out)
        ctx.options = (temperature, ignore_index, chunk, want_spp, rows)
        ctx.set_materialize_grads(False)
        return out[0].clone(), out[1].clone(), out[3].clone() if want_spp else out.new_empty(0)

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_spp):
        hidden, weight, bias, labels, out = ctx.saved_tensors
        temperature, ignore_index, chunk, want_spp, rows = ctx.options
        t = hidden.shape[0]
        g_logp = torch.zeros_like(out[0]) if g_logp is None else g_logp.float().contiguous()
        g_ent = None if g_ent is None else g_ent.float().contiguous()
        g_spp = g_spp.float().contiguous() if want_spp and g_spp is not None else None
        d_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        d_bias = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        w32 = weight.float()
        for a in range(0, t, chunk):
            b = min(t, a + chunk)
            z = _rows_times(hidden[a:b], weight.T, rows)
            if bias is not None:
                z = z + bias
            z = z.float().contiguous()  # the forward's logits, exactly; their gradient in float32
            ops.logprob_backward_(z, labels[a:b], out[2, a:b], out[1, a:b], g_logp[a:b],
                                  None if g_ent is None else g_ent[a:b], temperature, ignore_index,
                                  out[3, a:b] if g_spp is not None else None,
                                  None if g_spp is None else g_spp[a:b])
            d_hidden[a:b] = _rows_times(z, w32, rows).to(hidden.dtype)
            d_weight += z.T @ hidden[a:b].float()
            if d_bias is not None:
                d_bias += z.sum(0)
        return (d_hidden, d_weight.to(weight.dtype), None if d_bias is None else d_bias.to(bias.dtype),
                None, None, None, None, None, None)


def fused_linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0, *,
                          bias: Optional[Tensor] = None, ignore_index: int = -100,
                          chunk_tokens: Optional[int] = None, entropy: bool = True,
                          return_sum_pi_squared: bool = False, mask: Optional[Tensor] = None,
                          batch_invariant: bool = False):
    """Per-token log-probabilities of ``labels`` (and the entropy, and on request verl's
    ``sum_pi_squared``) of the last layer ``hidden [..., H] @ weight [V, H]^T (+ bias [V])`` at
    ``temperature``, never holding more than ``chunk_tokens`` rows of logits (default: 2^26 logits
    per chunk, ``2^26 // V`` rows; recomputed in the backward, where the chunk's gradient is float32);
    differentiable with respect to ``hidden``, ``weight`` and ``bias``. ``hidden`` and
    ``weight`` share a dtype (float32, float16 or bfloat16: the logits' dtype). Returns what
    ``logprobs_from_logits`` returns, shaped like ``labels``: ``(logp, entropy)``, ``logp`` alone
    with ``entropy=False``, and ``sum_pi_squared`` last with ``return_sum_pi_squared`` (what verl's
    optimal token baseline needs, from the fused path). ``mask`` (shaped like ``labels``): only the
    rows whose weight is not 0 are computed (their logits, GEMMs and kernels; prompt and padding
    rows cost nothing), the others give 0 in every output and no gradient; this gathers the rows
    (one read-back of their count, which synchronizes on a GPU).

    ``batch_invariant``: a row's log-prob, entropy, Σπ² and hidden gradient are the same bits
    whatever batch it is in (its position, the batch's size, the micro-batch split, the padding,
    the mask): every GEMM that produces a row's values (the logits, the hidden gradient) runs on
    exactly ``chunk_tokens`` rows, the last chunk padded with zero rows, so the GEMM library sees one
    shape and picks one algorithm (the logits kernels are row-local). It costs the padded rows: up to
    ``chunk_tokens - 1`` rows per call (a call of few rows computes ``chunk_tokens``; pass a smaller
    ``chunk_tokens`` for small calls). The weight and bias gradients sum over the batch's rows and
    are not invariant. Off by default: its cost on a GPU is unmeasured. ``chunk_tokens`` must then be
    the same in every call whose rows are compared."""
    hidden, weight = _head(hidden, weight, any_dtype=True)
    if bias is not None:
        bias = A.tensor("bias", bias)
        if bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype:
            A.fail("bias", f"expected [V = {weight.shape[0]}] of {weight.dtype}, got {tuple(bias.shape)} of "
                           f"{bias.dtype}")
    lead = hidden.shape[:-1]
    x = hidden.reshape(-1, hidden.shape[-1])
    y = _labels(labels, x.shape[0])
    tau, ignore = _options(temperature, ignore_index)
    chunk = max(1, (1 << 26) // weight.shape[0]) if chunk_tokens is None else A.integer(
        "chunk_tokens", chunk_tokens, 1, 2 ** 31 - 1)
    _same_device(x, weight=weight, labels=y, **({} if bias is None else {"bias": bias}))
    want_spp = bool(return_sum_pi_squared)
    rows, full = None, x.shape[0]
    if mask is not None:
        m = _mask(mask).reshape(-1)
        if m.shape[0] != x.shape[0]:
            A.fail("mask", f"expected {x.shape[0]} weights (one per row, shaped like labels), got shape "
                           f"{tuple(mask.shape)}")
        _same_device(x, mask=m)
        rows = torch.nonzero(m != 0).squeeze(1)
        x, y = x.index_select(0, rows), y.index_select(0, rows)
    outs = _FusedLinearLogprobs.apply(x, weight, bias, y.contiguous(), tau, ignore, chunk, want_spp,
                                      A.boolean("batch_invariant", batch_invariant))
    if rows is not None:
        # every output back to all rows, 0 where not computed (index_copy keeps the gradient path)
        outs = tuple(o.new_zeros(full).index_copy(0, rows, o) if i < 2 or want_spp else o
                     for i, o in enumerate(outs))
    logp, ent, spp = outs
    out = [logp.view(lead)] + ([ent.view(lead)] if entropy else []) + ([spp.view(lead)] if want_spp else [])
    return out[0] if len(out) == 1 else tuple(out)


def grpo_loss_from_logits(logits: Tensor, labels: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                          cu_seqlens=None, *, ref_logp=None, rollout_logp=None, lambda_=None, objectives=None,
                          membership=None, normalizers=None, seq_tokens=None, temperature: float = 1.0,
                          ignore_index: int = -100, objective_names=None, advantages_per_token=None,
                          **options) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The GRPO loss straight from logits ``[B, L, V]`` / ``[T, V]``: log-probabilities, the fused
    loss with its KL term and the entropy bonus (``entropy_coef``, verl's ``entropy_coeff``), with
    the gradient computed in the same call. Metrics add ``actor/entropy`` and ``actor/entropy_loss``.
    Allocates the ``[T, V]`` gradient (in the logits' dtype); for the in-place backward use
    ``logprobs_from_logits`` followed by ``grpo_loss``."""
    v = _logits(logits).shape[-1]
    lead = logits.shape[:-1]
    z = logits.reshape(-1, v)
    y = _labels(labels, z.shape[0])
    tau, ignore = _options(temperature, ignore_index)
    cu, b = _batch(lead, cu_seqlens)
    adv, per_token, k = _advantages(_tokens("advantages", advantages), lead, b, advantages_per_token)
    lam = _weights(lambda_, k)
    kinds = _kinds(objectives, lam.shape[0])
    memb = None if membership is None else _host("membership", membership, torch.int64)
    normalizers, seq_tokens = _normalizers(normalizers, seq_tokens)
    old, m, ref, roll = [None if x is None else x.reshape(-1) for x in
                         (_tokens("old_logp", old_logp), _mask(mask), _float("ref_logp", ref_logp),
                          _float("rollout_logp", rollout_logp))]
    _same_device(z, labels=y, old_logp=old, advantages=adv, mask=m, ref_logp=ref, rollout_logp=roll)
    loss, stats, _ = ops.grpo_loss_from_logits(z, y, old, adv, m, cu, lam, kinds, memb, ref, roll, normalizers,
                                               seq_tokens, per_token, _config(options), tau, ignore)
    return loss, _metrics(stats, lam.shape[0], objective_names, logits=True)


def fused_linear_grpo_loss(hidden: Tensor, weight: Tensor, labels: Tensor, old_logp: Tensor, advantages: Tensor,
                           mask: Tensor, cu_seqlens=None, *, ref_logp=None, lambda_=None, objectives=None,
                           membership=None, normalizers=None, temperature: float = 1.0,
                           chunk_tokens: Optional[int] = None, memory_budget: int = 512 << 20,
                           fp32_logits: bool = False, objective_names=None, advantages_per_token=None,
                           batch_invariant: bool = False, **options) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The GRPO loss of a policy whose last layer is ``hidden [..., H] @ weight[V, H]^T`` (bf16), chunk
    by chunk, never holding the ``[T, V]`` logits; differentiable with respect to ``hidden`` and
    ``weight``. ``chunk_tokens`` (default: sized from ``memory_budget`` bytes) and ``fp32_logits``
    tune the chunks. Returns ``(loss, metrics)`` as ``grpo_loss_from_logits``. Only the rows whose
    mask weight is not 0 (and label not ``ignore_index``) are computed on a GPU: the call reads the
    mask back (a synchronization), gathers those rows and runs the GEMMs over them alone; the other
    rows' ``hidden`` gradient is 0 and their labels are not checked. ``batch_invariant``: every
    GEMM that produces a row's values runs on exactly one chunk of rows (a partial chunk padded), so
    with the same ``normalizers`` a row's loss terms and ``hidden`` gradient do not depend on the
    rows around it (the crate's ``FusedLinearConfig::batch_invariant``; off by default)."""
    hidden, weight = _head(hidden, weight)
    lead = hidden.shape[:-1]
    x = hidden.reshape(-1, hidden.shape[-1])
    y = _labels(labels, x.shape[0])
    chunk, budget = _chunking(chunk_tokens, memory_budget)
    tau = A.number("temperature", temperature)
    cu, b = _batch(lead, cu_seqlens)
    adv, per_token, k = _advantages(_tokens("advantages", advantages), lead, b, advantages_per_token)
    lam = _weights(lambda_, k)
    kinds = _kinds(objectives, lam.shape[0])
    memb = None if membership is None else _host("membership", membership, torch.int64)
    normalizers, _ = _normalizers(normalizers, None)
    old, m, ref = [None if t is None else t.reshape(-1) for t in
                   (_tokens("old_logp", old_logp), _mask(mask), _float("ref_logp", ref_logp))]
    _same_device(x, weight=weight, labels=y, old_logp=old, advantages=adv, mask=m, ref_logp=ref)
    loss, stats, _, _ = ops.fused_linear_grpo_loss(
        x, weight, y, old, adv, m, cu, lam, kinds, memb, ref, normalizers, per_token,
        _config(options), tau, chunk, budget, bool(fp32_logits), A.boolean("batch_invariant", batch_invariant))
    return loss, _metrics(stats, lam.shape[0], objective_names, logits=True)


def grpo_loss_from_logits_async(logits: Tensor, labels: Tensor, old_logp: Tensor, advantages: Tensor,
                                mask: Tensor, cu_seqlens=None, *, ref_logp=None, rollout_logp=None, lambda_=None,
                                objectives=None, membership=None, normalizers=None, seq_tokens=None,
                                temperature: float = 1.0, ignore_index: int = -100, objective_names=None,
                                advantages_per_token=None, **options) -> Tuple[Tensor, GrpoPending]:
    """``grpo_loss_from_logits`` without a host synchronization: ``(loss, pending)`` at once, the loss
    a 0-dim device tensor (differentiable), ``pending.metrics()`` the metrics read back when asked
    for (labels out of range are reported there). ``cu_seqlens``, ``lambda_`` and ``membership``
    may be tensors on the device, as in ``grpo_loss_async`` (then capturable in a CUDA graph).
    ``top_entropy_quantile`` < 1 is refused (it sorts on the host)."""
    v = _logits(logits).shape[-1]
    lead = logits.shape[:-1]
    z = logits.reshape(-1, v)
    y = _labels(labels, z.shape[0])
    tau, ignore = _options(temperature, ignore_index)
    cu, adv, per_token, lam, kinds, memb = _async_batch(z.device, lead, cu_seqlens, advantages, advantages_per_token,
                                                        lambda_, objectives, membership)
    normalizers, seq_tokens = _normalizers(normalizers, seq_tokens)
    old, m, ref, roll = [None if x is None else x.reshape(-1) for x in
                         (_tokens("old_logp", old_logp), _mask(mask), _float("ref_logp", ref_logp),
                          _float("rollout_logp", rollout_logp))]
    _same_device(z, labels=y, old_logp=old, advantages=adv, mask=m, ref_logp=ref, rollout_logp=roll)
    config = _config(options)
    loss, _, out = ops.grpo_loss_from_logits_async(z, y, old, adv, m, cu, lam, kinds, memb, ref, roll, normalizers,
                                                   seq_tokens, per_token, config, tau, ignore)
    return loss, GrpoPending(out, len(kinds), config, ref is not None, roll is not None, objective_names,
                             logits=(ignore, v))


def fused_linear_grpo_loss_async(hidden: Tensor, weight: Tensor, labels: Tensor, old_logp: Tensor,
                                 advantages: Tensor, mask: Tensor, cu_seqlens=None, *, ref_logp=None, lambda_=None,
                                 objectives=None, membership=None, normalizers=None, temperature: float = 1.0,
                                 chunk_tokens: Optional[int] = None, memory_budget: int = 512 << 20,
                                 fp32_logits: bool = False, objective_names=None, advantages_per_token=None,
                                 **options) -> Tuple[Tensor, GrpoPending]:
    """``fused_linear_grpo_loss`` without a host synchronization: ``(loss, pending)`` as
    ``grpo_loss_from_logits_async`` returns them; differentiable with respect to ``hidden`` and
    ``weight``."""
    hidden, weight = _head(hidden, weight)
    lead = hidden.shape[:-1]
    x = hidden.reshape(-1, hidden.shape[-1])
    y = _labels(labels, x.shape[0])
    chunk, budget = _chunking(chunk_tokens, memory_budget)
    tau = A.number("temperature", temperature)
    cu, adv, per_token, lam, kinds, memb = _async_batch(x.device, lead, cu_seqlens, advantages, advantages_per_token,
                                                        lambda_, objectives, membership)
    normalizers, _ = _normalizers(normalizers, None)
    old, m, ref = [None if t is None else t.reshape(-1) for t in
                   (_tokens("old_logp", old_logp), _mask(mask), _float("ref_logp", ref_logp))]
    _same_device(x, weight=weight, labels=y, old_logp=old, advantages=adv, mask=m, ref_logp=ref)
    config = _config(options)
    loss, _, _, out = ops.fused_linear_grpo_loss_async(
        x, weight, y, old, adv, m, cu, lam, kinds, memb, ref, normalizers, per_token,
        config, tau, chunk, budget, bool(fp32_logits))
    return loss, GrpoPending(out, len(kinds), config, ref is not None, False, objective_names,
                             logits=(-100, weight.shape[0]))


def group_advantages(rewards: Tensor, group_size: Optional[int] = None, *, group_ids: Optional[Tensor] = None,
                     num_groups: Optional[int] = None, mode: Union[str, Sequence[str]] = "grpo",
                     eps: float = 1e-6, singletons: str = "zero", lengths: Optional[Tensor] = None,
                     response_mask: Optional[Tensor] = None,
                     reward_weights: Optional[Sequence[float]] = None, baselines: Optional[Tensor] = None) -> Tensor:
    """GRPO group advantages of ``rewards`` ``[B]`` or ``[B, K]``: groups of ``group_size``
    consecutive rollouts, or ``group_ids`` ``[B]`` (any ids on the CPU; on a GPU dense ids in
    ``[0, num_groups)`` with ``num_groups`` given, so nothing is read back). ``mode``, one for all
    objectives or one each: grpo (``(r - mean) / (std + eps)``), dr_grpo, rloo, batch, and verl's
    grpo_passk (the group's unique best gets ``(r_max - r_2nd) / (std + eps)``), dr_grpo_passk
    (without the std), opo (length-weighted baseline), gpg (``B / nnz (r - mean)``),
    reinforce_plus_plus and reinforce_plus_plus_baseline (whitened over the batch's tokens,
    gamma 1), remax (``r - b``, ``b`` from ``baselines``: the greedy responses' rewards, shaped as
    the result). opo and REINFORCE++ read the response lengths: ``lengths`` ``[B]``, or
    ``response_mask`` ``[B, L]`` (its row sums). A group of one rollout gets 0, or with
    ``singletons="verl"`` verl's convention (mean 0, std 1: grpo ``r / (1 + eps)``, dr_grpo, rloo
    and opo ``r``). ``reward_weights`` ``[K]`` (one ``mode``): one advantage ``[B]`` of the K
    columns, TRL's ``multi_objective_aggregation``: ``sum_then_normalize`` with any mode (the mode
    of ``sum_k w_k r_k``), ``normalize_then_sum`` with ``mode="gdpo"`` (each column's GRPO value,
    weighted and summed, then normalized over the batch; TRL's eps is 1e-4). Not
    differentiable."""
    r = _tokens("rewards", rewards)
    if r.dim() not in (1, 2):
        A.fail("rewards", f"expected [B] or [B, K], got shape {tuple(r.shape)}")
    one = r.dim() == 1
    r2 = r.reshape(r.shape[0], -1) if not one else r.reshape(-1, 1)
    k = r2.shape[1]
    weights = None if reward_weights is None else _host("reward_weights", reward_weights, torch.float32).tolist()
    if weights is not None and len(weights) != k:
        A.fail("reward_weights", f"expected K = {k} weights (one per reward column of {tuple(r.shape)}), got "
                                 f"{len(weights)}")
    if isinstance(mode, str):
        modes = [mode] * (k if weights is None else 1)
    else:
        if not hasattr(mode, "__iter__") or not all(isinstance(x, str) for x in mode):
            A.fail("mode", f"expected a mode name or a list of them, got {mode!r}", True)
        modes = list(mode)
        want = k if weights is None else 1
        if len(modes) != want:
            A.fail("mode", f"expected {want} mode(s) (one per reward column of {tuple(r.shape)}"
                           f"{', one with reward_weights' if weights is not None else ''}), got {len(modes)}")
    eps = A.number("eps", eps)
    if lengths is not None and response_mask is not None:
        raise RecapError("invalid argument `lengths`: give lengths or response_mask, not both")
    if response_mask is not None:
        response_mask = A.tensor("response_mask", response_mask)
        if response_mask.dim() != 2 or response_mask.shape[0] != r2.shape[0]:
            raise RecapError(f"invalid argument `response_mask`: expected [B = {r2.shape[0]}, L], "
                             f"got {list(response_mask.shape)}")
        lengths = response_mask.sum(-1)
        if lengths.is_floating_point():
            lengths = lengths.round().to(torch.int64)
    if lengths is not None:
        lengths = A.device_ints("lengths", lengths).reshape(-1)
        if lengths.shape[0] != r2.shape[0]:
            A.fail("lengths", f"expected [B = {r2.shape[0]}] response lengths, got {lengths.shape[0]}")
        _same_device(r2, lengths=lengths)
    base = None
    if baselines is not None:
        base = _float("baselines", baselines)
        if base.numel() != r2.numel():
            A.fail("baselines", f"expected the rewards' shape {tuple(r.shape)}, got {tuple(base.shape)}")
        base = base.reshape(-1)
        _same_device(r2, baselines=base)
    if group_ids is not None:
        ids = A.device_ints("group_ids", group_ids).reshape(-1)
        if ids.shape[0] != r2.shape[0]:
            A.fail("group_ids", f"expected [B = {r2.shape[0]}] group ids, got {ids.shape[0]}")
        _same_device(r2, group_ids=ids)
        if num_groups is None:
            if ids.device.type != "cpu":
                raise RecapError("invalid argument `num_groups`: required with group ids on a GPU (counting them "
                                 "would synchronize)")
            num_groups = 0  # any ids on the CPU
        out = ops.group_advantages(r2, ids, lengths, 0, A.integer("num_groups", num_groups, 0, 2 ** 31 - 1),
                                   ",".join(modes), eps, str(singletons), weights, base)
    else:
        if group_size is None:
            raise RecapError("invalid argument `group_size`: give group_size or group_ids")
        size = A.integer("group_size", group_size, 1, 2 ** 31 - 1)
        if r2.shape[0] % size != 0:
            A.fail("group_size", f"B = {r2.shape[0]} rollouts (rewards {tuple(r.shape)}) do not split into groups "
                                 f"of {size} consecutive rollouts")
        out = ops.group_advantages(r2, None, lengths, size, 0, ",".join(modes), eps, str(singletons), weights,
                                   base)
    return out.view(r.shape) if weights is None else out.view(-1)


def _group_ids(ids, b: int) -> Tensor:
    """``[B]`` int32 group ids as a CPU tensor (the op reads them on the host, like ``cu_seqlens``)
    from a tensor of integers or any sequence of hashable ids (verl's ``index``: a numpy array of
    uid strings)."""
    if isinstance(ids, Tensor):
        A.tensor("group_ids", ids)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            A.fail("group_ids", f"expected integer ids (or hashable values), got a {ids.dtype} tensor", True)
        flat = ids.reshape(-1)
        if flat.numel() != b:
            raise RecapError(f"invalid argument `group_ids`: expected [B = {b}] ids, got {tuple(ids.shape)}")
        flat = flat.cpu()
        if flat.dtype != torch.int32:  # dense ids: any int64 values fit
            flat = torch.unique(flat, return_inverse=True)[1]
        return flat.to(torch.int32)
    values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    if len(values) != b:
        raise RecapError(f"invalid argument `group_ids`: expected [B = {b}] ids, got {len(values)}")
    dense: Dict[object, int] = {}
    return torch.tensor([dense.setdefault(v, len(dense)) for v in values], dtype=torch.int32)


def optimal_token_baseline(token_rewards: Tensor, mask: Tensor, old_logp: Tensor, sum_pi_squared: Tensor,
                           cu_seqlens=None, *, group_size: Optional[int] = None, group_ids=None,
                           rollout_is_weights: Optional[Tensor] = None, multi_turn: bool = False,
                           handle_zero_tail: bool = True, eps: float = 1e-8) -> Tuple[Tensor, Tensor]:
    """verl's optimal token baseline (``optimal_token_baseline``; with ``multi_turn`` its
    ``tir_optimal_token_baseline``): ``(advantages, returns)``, float32, shaped like the tokens. Per
    token ``w = (1 - 2 exp(old_logp) + sum_pi_squared) rho^2`` (rho: ``rollout_is_weights``, else 1),
    ``W`` its masked cumulative sum, ``G`` the masked reward to go (the returns); per group and
    response position ``B = sum m G W / (sum m W + eps)`` and ``A = (G - B) m``. With ``multi_turn``
    a token's position is its index among the sequence's unmasked tokens (tool outputs between turns
    are skipped). A group of one gets baseline 0. ``handle_zero_tail`` (on by default, as in verl 0.8
    and 0.9): when one member is strictly the longest, its positions past the second longest length
    get baseline 0. Groups: ``group_size`` consecutive sequences, or ``group_ids`` ``[B]``
    (integers, or any hashable ids such as verl's uid strings; read on the host, so a CUDA tensor
    is copied back). ``sum_pi_squared`` is the sampling policy's ``sum_v p_v^2`` per token (verl's
    ``actor.calculate_sum_pi_squared``). On a GPU the kernel synchronizes once, to check that the
    inputs are finite at unmasked tokens. Not differentiable."""
    if sum_pi_squared is None:
        raise RecapError("invalid argument `sum_pi_squared`: required (the policy's sum of squared "
                         "probabilities per token; verl: actor.calculate_sum_pi_squared=True)")
    token_rewards = _tokens("token_rewards", token_rewards)
    shape = token_rewards.shape
    _same_shape(token_rewards, mask=mask, old_logp=old_logp, sum_pi_squared=sum_pi_squared,
                rollout_is_weights=rollout_is_weights)
    cu, b = _batch(shape, cu_seqlens)
    r = token_rewards.reshape(-1)
    old, spp = _tokens("old_logp", old_logp).reshape(-1), _float("sum_pi_squared", sum_pi_squared).reshape(-1)
    rho = _float("rollout_is_weights", rollout_is_weights)
    rho = None if rho is None else rho.reshape(-1)
    m = _mask(mask).reshape(-1)
    _same_device(r, old_logp=old, sum_pi_squared=spp, rollout_is_weights=rho, mask=m)
    if group_ids is not None:
        ids, size = _group_ids(group_ids, b), 0
    elif group_size is None:
        raise RecapError("invalid argument `group_size`: give group_size or group_ids")
    else:
        ids, size = None, A.integer("group_size", group_size, 1, 2 ** 31 - 1)
    adv, ret = ops.optimal_token_baseline(r.detach(), old.detach(), spp.detach(),
                                          None if rho is None else rho.detach(), m, cu, ids, size, bool(multi_turn),
                                          bool(handle_zero_tail), A.number("eps", eps))
    return adv.view(shape), ret.view(shape)


def gae_advantage_return(token_level_rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float = 1.0,
                         lam: float = 1.0, cu_seqlens=None, *, whiten: bool = True) -> Tuple[Tensor, Tensor]:
    """Generalized advantage estimation, verl's ``compute_gae_advantage_return`` (its arguments, in
    its order): ``(advantages, returns)``, float32, shaped like the tokens. Backward over each
    sequence, ``delta = r + gamma nv - v``, ``A = m (delta + gamma lam A) + (1 - m) A``,
    ``nv = m v + (1 - m) nv`` (a masked token carries the state through), returns ``A + v``; then
    the advantages whitened over the batch's masked tokens (verl's ``masked_whiten``; ``whiten=False``
    skips it; a batch whose mask sums to at most 1 gets 0 where verl raises). A non-finite reward or
    value at an unmasked token raises ``RecapError`` naming it; on a GPU the kernel synchronizes
    once to check that. Not differentiable."""
    token_level_rewards = _tokens("token_level_rewards", token_level_rewards)
    shape = token_level_rewards.shape
    _same_shape(token_level_rewards, values=values, response_mask=response_mask)
    cu, _ = _batch(shape, cu_seqlens)
    r = token_level_rewards.reshape(-1)
    v = _tokens("values", values).reshape(-1)
    m = _mask(response_mask, "response_mask").reshape(-1)
    _same_device(r, values=v, response_mask=m)
    adv, ret = ops.gae(r.detach(), v.detach(), m, cu, A.number("gamma", gamma), A.number("lam", lam), bool(whiten))
    return adv.view(shape), ret.view(shape)
