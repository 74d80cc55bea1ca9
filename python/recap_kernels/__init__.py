"""recap-kernels for PyTorch: the fused GRPO loss, log-probabilities and entropy from logits, group
advantages and the RECAP weights, on PyTorch's own CUDA tensors and current stream, without copies.

Pure Python over the C ABI of the Rust crate (ctypes; build the library with `cargo build
--release`, then point RECAP_KERNELS_LIB at target/release/librecap_kernels.so, or leave it to be
found there or beside this package).

    from recap_kernels import grpo_loss, logprobs_from_logits, RecapWeights
    logp, entropy = logprobs_from_logits(logits, labels, temperature=1.0)
    loss, metrics = grpo_loss(logp, old_logp, advantages, mask)      # verl's defaults and metric names
    loss.backward()
"""
import ctypes
import json
import os
from pathlib import Path

import torch

__all__ = ["grpo_loss", "logprobs_from_logits", "fused_linear_grpo_loss", "group_advantages", "RecapWeights",
           "RecapError"]

RECAP_OK = 0


class RecapError(RuntimeError):
    """A failed call: the library's status code and message."""


class _Config(ctypes.Structure):
    _fields_ = [
        ("clip_low", ctypes.c_float), ("clip_high", ctypes.c_float), ("dual_clip", ctypes.c_float),
        ("log_ratio_clamp", ctypes.c_float), ("agg_mode", ctypes.c_int32), ("norm_constant", ctypes.c_float),
        ("kl_coef", ctypes.c_float), ("kl_estimator", ctypes.c_int32), ("entropy_coef", ctypes.c_float),
        ("allow_nonfinite", ctypes.c_int32), ("policy_loss", ctypes.c_int32), ("tau_pos", ctypes.c_float),
        ("tau_neg", ctypes.c_float), ("delta", ctypes.c_float), ("kl_is_correction", ctypes.c_int32),
        ("top_entropy_quantile", ctypes.c_float), ("rollout_level", ctypes.c_int32),
        ("rollout_mode", ctypes.c_int32), ("rollout_upper", ctypes.c_float), ("rollout_lower", ctypes.c_float),
    ]


class _Result(ctypes.Structure):
    _fields_ = [(n, ctypes.c_double) for n in (
        "loss", "kl_loss", "ppo_kl", "ratio_mean", "ratio_min", "ratio_max", "kl_mean", "num_tokens", "num_seqs",
        "policy_tokens", "nonfinite", "rollout_is_mean", "rollout_is_min", "rollout_is_max",
        "rollout_is_corrected_fraction")]


_LIB = None


def _lib():
    global _LIB
    if _LIB is not None:
        return _LIB
    here = Path(__file__).resolve().parent
    candidates = [os.environ.get("RECAP_KERNELS_LIB"), here / "librecap_kernels.so",
                  here.parent.parent / "target" / "release" / "librecap_kernels.so",
                  here.parent.parent / "target" / "debug" / "librecap_kernels.so"]
    for c in candidates:
        if c and Path(c).exists():
            lib = ctypes.CDLL(str(c))
            break
    else:
        raise RecapError("librecap_kernels.so not found: build it with `cargo build --release` and set "
                         "RECAP_KERNELS_LIB to its path")
    P, I32, I64, F, D = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_double
    lib.recap_last_error.restype = ctypes.c_char_p
    lib.recap_version.restype = ctypes.c_char_p
    lib.recap_grpo_config_default.argtypes = [ctypes.POINTER(_Config)]
    lib.recap_grpo_loss.argtypes = [I32, P, I64, P, P, P, P, P, I32, P, I32, P, I64, P, P, P, I32,
                                    ctypes.POINTER(_Config), P, ctypes.POINTER(_Result), P]
    lib.recap_logprob_forward.argtypes = [I32, P, P, I32, I64, I64, I64, P, F, I32, P, P, P]
    lib.recap_logprob_backward_inplace.argtypes = [I32, P, P, I32, I64, I64, I64, P, P, P, P, P, F, I32]
    lib.recap_group_advantages.argtypes = [I32, P, P, I64, I32, I64, P, I64, P, D, P]
    lib.recap_fused_linear_grpo_loss.argtypes = [I32, P, I64, I64, I64, P, P, P, P, P, P, I32, P, P, I64, P, P, P,
                                                 I32, ctypes.POINTER(_Config), F, I64, I64, I32, P, P,
                                                 ctypes.POINTER(_Result), P]
    lib.recap_scheduler_new.restype = P
    lib.recap_scheduler_new.argtypes = [P, I32, I32, D, D]
    lib.recap_scheduler_observe.argtypes = [P, P, I32]
    lib.recap_scheduler_weights.argtypes = [P, P, I32]
    lib.recap_scheduler_to_json.argtypes = [P, P, I64, ctypes.POINTER(I64)]
    lib.recap_scheduler_from_json.restype = P
    lib.recap_scheduler_from_json.argtypes = [ctypes.c_char_p]
    lib.recap_scheduler_free.argtypes = [P]
    _LIB = lib
    return lib


def _check(status):
    if status != RECAP_OK:
        raise RecapError(_lib().recap_last_error().decode())


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def _cuda(name, t, dtypes, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"{name}: expected a CUDA tensor, got one on {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous())")
    return t


def _check_sizes(t, b, k, adv, per_token, lam, kinds, membership=None, **per_token_tensors):
    """The C ABI takes raw pointers: every length is checked here, before the call, against T, B, K."""
    want = t if per_token else b * k
    if adv.numel() != want:
        shape = f"[T = {t}] per token" if per_token else f"[B = {b}] or [B, K] = [{b}, {k}] per sequence"
        raise ValueError(f"advantages: expected {shape}, got shape {tuple(adv.shape)}")
    for name, x in per_token_tensors.items():
        if x is not None and x.numel() != t:
            raise ValueError(f"{name}: expected [T = {t}] elements like logp, got shape {tuple(x.shape)}")
    for name, x in (("lambda_", lam), ("objectives", kinds)):
        if len(x) != k:
            raise ValueError(f"{name}: expected K = {k} entries (one per advantage column), got {len(x)}")
    if membership is not None and len(membership) != b:
        raise ValueError(f"membership: expected B = {b} bit masks, got {len(membership)}")


def _stream(device):
    return ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)


_AGG = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2, "token-sum-norm": 3,
        "seq-mean-token-sum-norm": 3}
_KL = {"k1": 0, "kl": 0, "abs": 1, "k2": 2, "mse": 2, "k3": 3, "low_var_kl": 3, "k1+": 4, "k3+": 5}
_LOSS = {"vanilla": 0, "grpo": 0, "cispo": 1, "sapo": 2, "gspo": 3}


def _config(clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0, loss_agg_mode="token-mean",
            norm_constant=None, kl_coef=0.0, kl_loss_type="low_var_kl", entropy_coeff=0.0, loss_mode="vanilla",
            tau_pos=1.0, tau_neg=1.05, delta=None, use_bias_correction_kl=False, top_entropy_quantile=1.0,
            rollout_is_level=None, rollout_is_mode="truncate", rollout_is_threshold=2.0,
            rollout_is_threshold_lower=None, allow_nonfinite=False):
    c = _Config()
    _check(_lib().recap_grpo_config_default(ctypes.byref(c)))
    if loss_agg_mode not in _AGG:
        raise ValueError(f"loss_agg_mode: expected one of {sorted(_AGG)}, got {loss_agg_mode!r}")
    if kl_loss_type not in _KL:
        raise ValueError(f"kl_loss_type: expected one of {sorted(_KL)}, got {kl_loss_type!r}")
    if loss_mode not in _LOSS:
        raise ValueError(f"loss_mode: expected one of {sorted(_LOSS)}, got {loss_mode!r}")
    c.clip_low, c.clip_high = clip_ratio_low, clip_ratio_high
    c.dual_clip = clip_ratio_c if clip_ratio_c is not None else 0.0
    c.agg_mode, c.norm_constant = _AGG[loss_agg_mode], norm_constant or 0.0
    c.kl_coef, c.kl_estimator, c.entropy_coef = kl_coef, _KL[kl_loss_type], entropy_coeff
    c.policy_loss, c.tau_pos, c.tau_neg = _LOSS[loss_mode], tau_pos, tau_neg
    c.delta, c.kl_is_correction = delta or 0.0, int(use_bias_correction_kl)
    c.top_entropy_quantile, c.allow_nonfinite = top_entropy_quantile, int(allow_nonfinite)
    levels = {None: -1, "token": 0, "sequence": 1, "geometric": 2}
    modes = {"truncate": 0, "mask": 1, "metrics": 2}
    if rollout_is_level not in levels or rollout_is_mode not in modes:
        raise ValueError("rollout_is_level: None, token, sequence or geometric; rollout_is_mode: truncate, mask "
                         "or metrics")
    c.rollout_level, c.rollout_mode = levels[rollout_is_level], modes[rollout_is_mode]
    c.rollout_upper, c.rollout_lower = rollout_is_threshold, rollout_is_threshold_lower or 0.0
    return c


class _GrpoLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, args):
        grad = torch.empty_like(logp)
        res = _Result()
        k = args["k"]
        obj = (ctypes.c_double * k)()
        _check(_lib().recap_grpo_loss(
            logp.device.index or 0, _stream(logp.device), logp.numel(), _ptr(logp), _ptr(args["old"]),
            _ptr(args["ref"]), _ptr(args["rollout"]), _ptr(args["adv"]), int(args["per_token"]), _ptr(args["mask"]),
            int(args["mask"].dtype == torch.uint8), args["cu"].ctypes, args["b"], args["lambda"].ctypes,
            args["objectives"].ctypes, args["membership"].ctypes if args["membership"] is not None else None, k,
            ctypes.byref(args["cfg"]), _ptr(grad), ctypes.byref(res), ctypes.cast(obj, ctypes.c_void_p)))
        ctx.save_for_backward(grad)
        args["result"], args["objective_loss"] = res, list(obj)  # read back by grpo_loss
        return torch.tensor(res.loss, device=logp.device, dtype=torch.float32)

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g, None


class _HostArray:
    """A host int/float array kept alive for a ctypes call."""

    def __init__(self, values, ctype):
        self.buf = (ctype * max(len(values), 1))(*values)
        self.ctypes = ctypes.cast(self.buf, ctypes.c_void_p)


def grpo_loss(logp, old_logp, advantages, mask, cu_seqlens=None, ref_logp=None, rollout_logp=None,
              lambda_=None, objectives=None, membership=None, objective_names=None, **config):
    """The fused GRPO loss (verl's compute_policy_loss + agg_loss, plus the KL term) and its metrics.

    Shapes: `logp`, `old_logp`, `mask` as verl's [B, L] (padded; `cu_seqlens` then defaults to
    rows of L) or packed [T] with `cu_seqlens` [B + 1]; `advantages` [B, L] / [T] (per token, one
    objective), [B] or [B, K] (per sequence). `lambda_` [K] objective weights, `objectives` [K]
    ("policy" or "nll"), `membership` [B] bit masks (host lists or CPU tensors). `config`: verl's
    names (clip_ratio_low, clip_ratio_high, clip_ratio_c, loss_agg_mode, kl_coef, kl_loss_type,
    loss_mode, ...). Returns (loss, metrics) with the loss differentiable with respect to `logp`.
    """
    dev = logp.device
    logp = _cuda("logp", logp, (torch.float32,))
    old = _cuda("old_logp", old_logp, (torch.float32,), dev)
    if old.shape != logp.shape:
        raise ValueError(f"old_logp: expected shape {tuple(logp.shape)}, got {tuple(old.shape)}")
    mask = _cuda("mask", mask, (torch.float32, torch.uint8, torch.bool), dev)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    if mask.shape != logp.shape:
        raise ValueError(f"mask: expected shape {tuple(logp.shape)}, got {tuple(mask.shape)}")
    if cu_seqlens is None:
        if logp.dim() != 2:
            raise ValueError("cu_seqlens: required for packed [T] inputs (or pass [B, L] tensors)")
        b, l = logp.shape
        cu = [i * l for i in range(b + 1)]
    else:
        cu = [int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]
        b = len(cu) - 1
    adv = _cuda("advantages", advantages, (torch.float32,), dev)
    per_token = adv.shape == logp.shape and not (logp.dim() == 1 and adv.shape[0] == b)
    k = 1 if per_token or adv.dim() == 1 else adv.shape[-1]
    lam = [1.0] * k if lambda_ is None else [float(x) for x in lambda_]
    kinds = [0] * k if objectives is None else [0 if o in ("policy", 0) else 1 for o in objectives]
    ref = _cuda("ref_logp", ref_logp, (torch.float32,), dev) if ref_logp is not None else None
    rollout = _cuda("rollout_logp", rollout_logp, (torch.float32,), dev) if rollout_logp is not None else None
    if membership is not None:
        membership = [int(x) for x in membership]
    _check_sizes(logp.numel(), b, k, adv, per_token, lam, kinds, membership, ref_logp=ref, rollout_logp=rollout)
    args = {
        "old": old, "mask": mask, "adv": adv, "per_token": per_token, "k": k, "b": b,
        "ref": ref, "rollout": rollout,
        "cu": _HostArray(cu, ctypes.c_int32), "lambda": _HostArray(lam, ctypes.c_float),
        "objectives": _HostArray(kinds, ctypes.c_int32),
        "membership": _HostArray(membership, ctypes.c_uint32) if membership is not None else None,
        "cfg": _config(**config),
    }
    loss = _GrpoLoss.apply(logp, args)
    res = args["result"]
    names = objective_names or [str(i) for i in range(k)]
    metrics = {
        "actor/pg_loss": dict(zip(names, args["objective_loss"])),
        "actor/ppo_kl": res.ppo_kl, "actor/kl_loss": res.kl_loss, "actor/kl_mean": res.kl_mean,
        "actor/ratio_mean": res.ratio_mean, "actor/ratio_min": res.ratio_min, "actor/ratio_max": res.ratio_max,
        "actor/num_tokens": res.num_tokens, "actor/num_seqs": res.num_seqs,
        "mismatch/rollout_is_mean": res.rollout_is_mean,
        "mismatch/rollout_is_corrected_fraction": res.rollout_is_corrected_fraction,
        "objectives": names,
    }
    return loss, metrics


_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class _Logprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, inplace):
        t, v = logits.shape
        logp = torch.empty(t, device=logits.device, dtype=torch.float32)
        ent = torch.empty_like(logp)
        lse = torch.empty_like(logp)
        _check(_lib().recap_logprob_forward(
            logits.device.index or 0, _stream(logits.device), _ptr(logits), _DTYPES[logits.dtype], t, v, v,
            _ptr(labels), temperature, ignore_index, _ptr(logp), _ptr(ent), _ptr(lse)))
        ctx.save_for_backward(logits, labels, lse, ent)
        ctx.cfg = (temperature, ignore_index, inplace)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, labels, lse, ent = ctx.saved_tensors
        temperature, ignore_index, inplace = ctx.cfg
        z = logits if inplace else logits.clone()
        t, v = z.shape
        g_logp = (g_logp if g_logp is not None else torch.zeros_like(lse)).contiguous().float()
        g_ent = g_ent.contiguous().float() if g_ent is not None else None
        _check(_lib().recap_logprob_backward_inplace(
            z.device.index or 0, _stream(z.device), _ptr(z), _DTYPES[z.dtype], t, v, v, _ptr(labels), _ptr(lse),
            _ptr(ent), _ptr(g_logp), _ptr(g_ent), temperature, ignore_index))
        return z, None, None, None, None


def logprobs_from_logits(logits, labels, temperature=1.0, entropy=True, inplace_backward=True, ignore_index=-100):
    """Per-token log-probabilities (and entropy) of `labels` under `logits / temperature`, as verl's
    log_softmax(...).gather: logits [T, V] (or [..., V], flattened) in bf16, f16 or f32. With
    `inplace_backward` the gradient is written over the logits' storage (no [T, V] temporary): the
    logits must not be used after backward."""
    dev = logits.device
    shape = logits.shape[:-1]
    z = _cuda("logits", logits, tuple(_DTYPES), dev).reshape(-1, logits.shape[-1])
    y = _cuda("labels", labels.to(torch.int32).contiguous(), (torch.int32,), dev).reshape(-1)
    if y.numel() != z.shape[0]:
        raise ValueError(f"labels: expected {z.shape[0]} labels (one per row of logits), got {y.numel()}")
    logp, ent = _Logprobs.apply(z, y, float(temperature), int(ignore_index), bool(inplace_backward))
    logp, ent = logp.view(shape), ent.view(shape)
    return (logp, ent) if entropy else logp


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, args):
        t, h = hidden.shape
        v = weight.shape[0]
        d_hidden = torch.empty_like(hidden)
        d_weight = torch.empty(v, h, device=hidden.device, dtype=torch.float32)
        res = _Result()
        k = args["k"]
        obj = (ctypes.c_double * k)()
        _check(_lib().recap_fused_linear_grpo_loss(
            hidden.device.index or 0, _stream(hidden.device), t, h, v, _ptr(hidden), _ptr(weight), _ptr(args["labels"]),
            _ptr(args["old"]), _ptr(args["ref"]), _ptr(args["adv"]), int(args["per_token"]), _ptr(args["mask"]),
            args["cu"].ctypes, args["b"], args["lambda"].ctypes, args["objectives"].ctypes, None, k,
            ctypes.byref(args["cfg"]), args["temperature"], args["chunk_tokens"], args["memory_budget"],
            int(args["fp32_logits"]), _ptr(d_hidden), _ptr(d_weight), ctypes.byref(res),
            ctypes.cast(obj, ctypes.c_void_p)))
        args["result"], args["objective_loss"] = res, list(obj)
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.weight_dtype = weight.dtype
        return torch.tensor(res.loss, device=hidden.device, dtype=torch.float32)

    @staticmethod
    def backward(ctx, g):
        d_hidden, d_weight = ctx.saved_tensors
        return (d_hidden * g.to(d_hidden.dtype)), (d_weight * g).to(ctx.weight_dtype), None


def fused_linear_grpo_loss(hidden, weight, labels, old_logp, advantages, mask, cu_seqlens, ref_logp=None,
                           temperature=1.0, chunk_tokens=None, memory_budget=512 << 20, fp32_logits=False,
                           lambda_=None, objectives=None, objective_names=None, **config):
    """The GRPO loss of a policy whose last layer is `hidden [T, H] @ weight[V, H]^T` (bf16), chunk
    by chunk, never holding [T, V] logits; differentiable with respect to `hidden` and `weight`.
    Per-token `labels`, `old_logp`, `mask` [T] (packed, `cu_seqlens` [B + 1]); advantages [B] /
    [B, K] per sequence or [T] per token; `config` as `grpo_loss` (entropy_coeff adds the bonus).
    Returns (loss, metrics)."""
    dev = hidden.device
    x = _cuda("hidden", hidden, (torch.bfloat16,))
    w = _cuda("weight", weight, (torch.bfloat16,), dev)
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"hidden [T, H] and weight [V, H]: got {tuple(x.shape)} and {tuple(w.shape)}")
    t = x.shape[0]
    y = _cuda("labels", labels.to(torch.int32).contiguous(), (torch.int32,), dev)
    old = _cuda("old_logp", old_logp, (torch.float32,), dev)
    m = _cuda("mask", mask.to(torch.uint8).contiguous(), (torch.uint8,), dev)
    adv = _cuda("advantages", advantages, (torch.float32,), dev)
    for name, a in (("labels", y), ("old_logp", old), ("mask", m)):
        if a.numel() != t:
            raise ValueError(f"{name}: expected [T = {t}], got {tuple(a.shape)}")
    cu = [int(c) for c in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]
    b = len(cu) - 1
    per_token = adv.dim() == 1 and adv.shape[0] == t and t != b
    k = 1 if adv.dim() == 1 else adv.shape[1]
    lam = [1.0] * k if lambda_ is None else [float(v) for v in lambda_]
    kinds = [0] * k if objectives is None else [0 if o in ("policy", 0) else 1 for o in objectives]
    ref = _cuda("ref_logp", ref_logp, (torch.float32,), dev) if ref_logp is not None else None
    _check_sizes(t, b, k, adv, per_token, lam, kinds, ref_logp=ref)
    args = {
        "labels": y, "old": old, "mask": m, "adv": adv, "per_token": per_token, "k": k, "b": b,
        "ref": ref, "cu": _HostArray(cu, ctypes.c_int32),
        "lambda": _HostArray(lam, ctypes.c_float), "objectives": _HostArray(kinds, ctypes.c_int32),
        "cfg": _config(**config), "temperature": float(temperature), "chunk_tokens": chunk_tokens or 0,
        "memory_budget": memory_budget, "fp32_logits": fp32_logits,
    }
    loss = _FusedLinear.apply(x, w, args)
    res = args["result"]
    names = objective_names or [str(i) for i in range(k)]
    return loss, {"actor/pg_loss": dict(zip(names, args["objective_loss"])), "actor/ppo_kl": res.ppo_kl,
                  "actor/kl_loss": res.kl_loss, "actor/ratio_mean": res.ratio_mean,
                  "actor/num_tokens": res.num_tokens}


def group_advantages(rewards, group_size, mode="grpo", eps=1e-6):
    """GRPO group advantages of rewards [B] or [B, K] in groups of `group_size` consecutive rollouts
    (mode: grpo, dr_grpo, rloo or batch, one for all objectives or a list)."""
    r = _cuda("rewards", rewards, (torch.float32,))
    b = r.shape[0]
    k = 1 if r.dim() == 1 else r.shape[1]
    names = {"grpo": 0, "dr_grpo": 1, "rloo": 2, "batch": 3}
    modes = [mode] * k if isinstance(mode, str) else list(mode)
    out = torch.empty_like(r)
    m = _HostArray([names[x] for x in modes], ctypes.c_int32)
    _check(_lib().recap_group_advantages(r.device.index or 0, _stream(r.device), _ptr(r), b, k, group_size, None, 0,
                                         m.ctypes, eps, _ptr(out)))
    return out


class RecapWeights:
    """RECAP's dynamic objective weights: `observe([...])` once per step, `weights()` -> K floats;
    `state_dict()` / `load_state_dict()` checkpoint it exactly."""

    def __init__(self, orientations, window=10, temperature=5.0, alpha=None):
        bad = [x for x in orientations if x not in ("reward", "loss", 1, 0)]
        if bad:
            raise ValueError(f"orientations: expected 'reward' (higher is better) or 'loss' (lower is "
                             f"better) per objective, got {bad!r}")
        o = [1 if x in ("reward", 1) else 0 for x in orientations]
        self.k = len(o)
        arr = _HostArray(o, ctypes.c_int32)
        self._h = _lib().recap_scheduler_new(arr.ctypes, self.k, window, temperature, -1.0 if alpha is None else alpha)
        if not self._h:
            raise RecapError(_lib().recap_last_error().decode())

    def observe(self, values):
        v = _HostArray([float(x) for x in values], ctypes.c_double)
        _check(_lib().recap_scheduler_observe(self._h, v.ctypes, len(values)))

    def weights(self):
        out = (ctypes.c_float * self.k)()
        _check(_lib().recap_scheduler_weights(self._h, ctypes.cast(out, ctypes.c_void_p), self.k))
        return list(out)

    def state_dict(self):
        need = ctypes.c_int64(0)
        _lib().recap_scheduler_to_json(self._h, None, 0, ctypes.byref(need))
        buf = ctypes.create_string_buffer(need.value)
        _check(_lib().recap_scheduler_to_json(self._h, ctypes.cast(buf, ctypes.c_void_p), need.value,
                                              ctypes.byref(need)))
        return {"recap_scheduler": json.loads(buf.value.decode())}

    def load_state_dict(self, state):
        h = _lib().recap_scheduler_from_json(json.dumps(state["recap_scheduler"]).encode())
        if not h:
            raise RecapError(_lib().recap_last_error().decode())
        _lib().recap_scheduler_free(self._h)
        self._h = h

    def __del__(self):
        if getattr(self, "_h", None):
            _lib().recap_scheduler_free(self._h)
            self._h = None
