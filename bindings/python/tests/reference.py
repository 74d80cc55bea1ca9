"""verl's and TRL's formulas written out in PyTorch (our own code, from their definitions), the
references the package is checked against."""
import math

import torch


def masked_mean(x, m):
    return (x * m).sum() / m.sum()


def agg_loss(x, m, mode, num_tokens=None, num_seqs=None, dp=1, scale=None):
    """verl's agg_loss (0.9): token-mean, token-sum, seq-mean-token-mean, seq-mean-token-sum,
    seq-mean-token-sum-norm."""
    if mode == "token-mean":
        n = m.sum() if num_tokens is None else num_tokens
        return (x * m).sum() / n * dp
    if mode == "token-sum":
        return (x * m).sum() * dp
    factor = 1.0
    if mode == "seq-mean-token-sum-norm":  # verl 0.9: seq-mean-token-sum over the constant
        factor = 1.0 / (m.shape[-1] if scale is None else scale)
        mode = "seq-mean-token-sum"
    n_b = m.sum(-1)
    per = (x * m).sum(-1)
    if mode == "seq-mean-token-mean":
        per = per / n_b.clamp(min=1e-30)
    elif mode != "seq-mean-token-sum":
        raise ValueError(mode)
    s = (n_b > 0).sum() if num_seqs is None else num_seqs
    return (per * (n_b > 0)).sum() / s * dp * factor


def kl_penalty(logp, ref, kind):
    d = logp - ref
    if kind in ("k1", "kl"):
        return d
    if kind == "abs":
        return d.abs()
    if kind in ("k2", "mse"):
        return 0.5 * d * d
    if kind in ("k3", "low_var_kl", "k1+", "k3+"):
        if kind == "k1+":
            fwd = d
        else:
            x = torch.clamp(-d, -20, 20)
            fwd = torch.clamp(torch.exp(x) - x - 1, -10, 10)
        if kind in ("k1+", "k3+"):
            k2 = 0.5 * d * d
            return k2 - k2.detach() + fwd.detach()
        return fwd
    raise ValueError(kind)


def ratio(logp, old):
    return torch.exp(torch.clamp(logp - old, -20.0, 20.0))


def verl_vanilla(old, logp, adv, m, lo=0.2, hi=0.2, c=3.0):
    """Per-token dual-clip PPO loss and verl's metrics (pg_clipfrac, ppo_kl, pg_clipfrac_lower)."""
    d = torch.clamp(logp - old, -20.0, 20.0)
    r = torch.exp(d)
    l1, l2 = -adv * r, -adv * torch.clamp(r, 1 - lo, 1 + hi)
    cl = torch.maximum(l1, l2)
    clipfrac = masked_mean((l2 > l1).float(), m)
    if c is None:
        return cl, clipfrac, masked_mean(-d, m), torch.zeros(())
    l3 = -adv * c
    lower = masked_mean(((cl > l3) & (adv < 0)).float(), m)
    return torch.where(adv < 0, torch.minimum(l3, cl), cl), clipfrac, masked_mean(-d, m), lower


def verl_gspo(old, logp, adv, m, lo, hi):
    n = m.sum(-1).clamp(min=1)
    seq = ((logp - old) * m).sum(-1) / n
    log_s = torch.clamp(logp - logp.detach() + seq.detach()[:, None], max=10.0)
    s = torch.exp(log_s)
    l1, l2 = -adv * s, -adv * torch.clamp(s, 1 - lo, 1 + hi)
    return torch.maximum(l1, l2)


def sapo(old, logp, adv, m, tau_pos=1.0, tau_neg=1.05):
    r = ratio(logp, old)
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
    return -torch.sigmoid(tau * (r - 1)) * 4 / tau * adv


def cispo(old, logp, adv, m, lo, hi):
    r = ratio(logp, old)
    return -torch.clamp(r, 1 - lo, 1 + hi).detach() * adv * logp


def gpg(old, logp, adv, m):
    return -logp * adv


def dro(old, logp, adv, m, beta):
    d = logp - old
    return -(logp * adv - 0.5 * beta * d * d)


def dppo(old, logp, adv, m, lo, hi, c, kind):
    """verl's DPPO-TV / DPPO-KL per-token loss and metrics (pg_clipfrac, pg_clipfrac_lower)."""
    r = ratio(logp, old)
    tr = torch.clamp(r, max=c).detach()
    p, po = torch.exp(logp), torch.exp(old)
    if kind == "tv":
        pos, neg = (p - po) <= hi, (p - po) >= -lo
    else:
        bkl = po * (old - logp) + (1 - po) * torch.log((1.0 - po + 1e-8) / (1.0 - p + 1e-8))
        pos, neg = (bkl <= hi) | (p <= po), (bkl <= lo) | (p >= po)
    valid = torch.where(adv > 0, pos, neg).detach().float()
    per = -adv * tr * logp * valid
    return per, masked_mean(1.0 - valid, m), masked_mean((r > c).float() * valid, m)


def trl_off_policy_mask(adv, logp, sampling, mask, threshold):
    """TRL's get_off_policy_mask: [B, 1], keep a sequence when A >= 0 or its mean
    sampling - logp over valid tokens (NaN as 0) is at most the threshold."""
    kl = torch.nan_to_num(sampling - logp.detach(), nan=0.0)
    mean = (kl * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
    return ((adv[:, None] >= 0) | (mean <= threshold)).to(mask.dtype)


def trl_loss(logp, old, adv, mask, ref=None, *, loss_type="dapo", beta=0.0, eps=0.2, eps_high=None, delta=None,
             level="token", weight=None, num_items=None, num_processes=1, max_len=None, gas=1, bias_kl=False,
             tau_pos=1.0, tau_neg=1.05, spg=None):
    """TRL's GRPOTrainer._compute_loss formulas (TRL 1.16) for [B, T] tensors; ``spg`` TRL's
    steps_per_generation (None: equal to ``gas``)."""
    eps_high = eps if eps_high is None else eps_high
    adv = adv[:, None] if adv.dim() == 1 else adv
    lr = logp - old
    if level == "sequence":
        lr = ((lr * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    c1 = torch.exp(lr)
    ratio = c1  # the KL correction's (before delta)
    if loss_type == "cispo":
        per = -torch.clamp(c1, max=eps_high).detach() * adv * logp
    elif loss_type == "vespo":
        # the gamma weight of the sequence ratio (TRL's defaults k 2 / 3, lambda 3 / 2), detached
        with torch.no_grad():
            log_w = ((logp - old).clamp(-20, 20) * mask).sum(-1, keepdim=True).clamp(math.log(1e-8), 20.0)
            k = torch.where(adv >= 0, 2.0, 3.0)
            lam = torch.where(adv >= 0, 3.0, 2.0)
            phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(0.0, 0.0, 0.0)
        per = -phi * adv * logp
    elif loss_type == "sapo":
        t = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
        per = -torch.sigmoid(t * (c1 - 1)) * 4 / t * adv
    else:
        c2 = torch.clamp(c1, 1 - eps, 1 + eps_high)
        if delta is not None:
            c1 = torch.clamp(c1, max=delta)
        per = -torch.min(c1 * adv, c2 * adv)
    if weight is not None:
        per = per * weight
    if beta != 0.0:
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        if bias_kl:
            kl = kl * ratio
        per = per + beta * kl
    per = per.expand(mask.shape) if per.shape != mask.shape else per
    if loss_type in ("grpo", "sapo"):
        return ((per * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / gas
    if loss_type == "bnpo":
        return (per * mask).sum() / mask.sum().clamp(min=1.0) / gas
    if loss_type == "dr_grpo":
        return (per * mask).sum() / (per.shape[0] * max_len) / gas
    if loss_type == "luspo":
        return (per * mask).sum(-1).mean() / gas
    n = mask.sum() if num_items is None else torch.as_tensor(float(num_items))
    return (per * mask).sum() / (n.clamp(min=1.0) / num_processes * gas / (gas if spg is None else spg))


def masked_whiten(x, m):
    """verl's masked_whiten: token mean and unbiased token variance over the mask."""
    n = m.sum()
    mean = (x * m).sum() / (n + 1e-8)
    var = ((x - mean) ** 2 * m).sum() / (n + 1e-8) * n / (n - 1)
    return (x - mean) * torch.rsqrt(var + 1e-8)


def verl_outcome_advantages(scores, mask, index, mode, eps=1e-6):
    """verl's outcome advantage estimators, token level ([B, L]) from the scores [B] and the
    response mask: grpo (norm by std, or dr_grpo without), grpo_passk (or dr_grpo_passk), opo, gpg, reinforce_plus_plus (gamma 1)
    and reinforce_plus_plus_baseline; groups of one as verl (mean 0, std 1)."""
    scores = scores.double()
    m = mask.double()
    lens = m.sum(-1)
    out = torch.zeros_like(scores)
    groups = {}
    for i, g in enumerate(index):
        groups.setdefault(int(g), []).append(i)
    nnz = int((scores != 0).sum())
    for rows in groups.values():
        x = scores[rows]
        one = len(rows) == 1
        mu = torch.tensor(0.0, dtype=x.dtype) if one else x.mean()
        if mode in ("grpo", "dr_grpo"):
            sd = torch.tensor(1.0, dtype=x.dtype) if one else x.std()
            out[rows] = (x - mu) / (sd + eps) if mode == "grpo" else x - mu
        elif mode in ("grpo_passk", "dr_grpo_passk"):
            top = torch.topk(x, 2).values
            best = rows[int(torch.argmax(x))]
            gap = top[0] - top[1]
            out[best] = gap / (x.std() + eps) if mode == "grpo_passk" else gap
        elif mode == "opo":
            bsl = mu if one else (lens[rows] * x).sum() / lens[rows].sum()
            out[rows] = x - bsl
        elif mode == "gpg":
            out[rows] = len(scores) / max(nnz, 1) * (x - mu)
        elif mode == "reinforce_plus_plus_baseline":
            out[rows] = x - mu
        elif mode == "reinforce_plus_plus":
            out[rows] = x
    adv = out[:, None] * m
    if mode.startswith("reinforce_plus_plus"):
        adv = masked_whiten(adv, m) * m
    return adv


def trl_multi_objective(rewards, g, weights, aggregation, eps=1e-4, scale_rewards="group"):
    """TRL's multi_objective_aggregation over rewards [B, K] in consecutive groups of g:
    sum_then_normalize (scale_rewards group, batch or none) or normalize_then_sum."""
    w = torch.as_tensor(weights, dtype=rewards.dtype)
    if aggregation == "sum_then_normalize":
        x = (rewards * w).sum(1)
        centred = (x.view(-1, g) - x.view(-1, g).mean(1, keepdim=True)).reshape(-1)
        if scale_rewards == "none":
            return centred
        std = x.std().expand_as(x) if scale_rewards == "batch" else x.view(-1, g).std(1).repeat_interleave(g)
        return centred / (std + eps)
    grouped = rewards.view(-1, g, rewards.shape[1])
    z = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + eps)
    x = (z.reshape(-1, rewards.shape[1]) * w).sum(1)
    return (x - x.mean()) / (x.std() + eps)


def geo_mean(old, logp, adv, m, lo, hi, is_weights=None):
    """verl's GMPO (geo_mean): per sequence -A exp(mean of the sign-clipped log-ratio), the mean over
    the batch's rows; (loss, pg_clipfrac, pg_clipfrac_lower)."""
    d = logp - old
    s = torch.sign(adv)
    c = s * torch.minimum(s * d, s * d.clamp(-lo, hi))
    n = m.sum(-1)
    ratio = torch.exp((c * m).sum(-1) / (n + 1e-8))
    a = (adv * m).sum(-1) / (n + 1e-8)
    per = -a * ratio
    if is_weights is not None:
        per = per * torch.exp((torch.log(is_weights + 1e-10) * m).sum(-1) / (n + 1e-8))
    outside = (d != d.clamp(-lo, hi)).float()
    return per.mean(), masked_mean(outside * (adv > 0), m), masked_mean(outside * (adv < 0), m)


def covariance(adv, logp, m):
    """(A - mean A)(logp - mean logp) per token, the means over the valid tokens (Clip-Cov, KL-Cov)."""
    v = m > 0
    return (adv - adv[v].mean()) * (logp - logp[v].mean())


def clip_cov(old, logp, adv, m, lo, hi, ratio, lb, ub, seed):
    """verl's Clip-Cov, written out token by token: the clipped surrogate (no dual-clip) with
    max(int(ratio N), 1) tokens dropped, drawn (torch.randperm under `seed`) in row-major order among
    the valid, unclipped tokens of covariance strictly inside (lb, ub). Returns (loss, dropped)."""
    per, _, _, _ = verl_vanilla(old, logp, adv, m, lo, hi, None)
    with torch.no_grad():
        r = torch.exp(logp - old)
        cov = covariance(adv, logp, m)
        candidates = [(i, j) for i in range(m.shape[0]) for j in range(m.shape[1])
                      if m[i, j] > 0 and not (-adv[i, j] * min(max(r[i, j], 1 - lo), 1 + hi) > -adv[i, j] * r[i, j])
                      and lb < cov[i, j] < ub]
        keep = torch.ones_like(m)
        if candidates:
            torch.manual_seed(seed)
            count = max(int(ratio * float(m.sum())), 1)
            for k in torch.randperm(len(candidates))[:count].tolist():
                keep[candidates[k]] = 0
    return per * keep, keep == 0


def kl_cov(old, logp, adv, m, ratio, coef):
    """verl's KL-Cov: -A r plus coef |logp - old| at the max(1, int(N ratio)) valid tokens of largest
    covariance. Returns (per-token loss, selected)."""
    with torch.no_grad():
        cov = covariance(adv, logp, m).masked_fill(m == 0, float("-inf"))
        k = max(1, int(float(m.sum()) * ratio))
        selected = torch.zeros_like(m, dtype=torch.bool)
        selected.view(-1)[cov.reshape(-1).argsort(descending=True)[:k]] = True
    return -adv * torch.exp(logp - old) + coef * (logp - old).abs() * selected, selected


def rollout_rejection(log_ratio, mask, options, thresholds):
    """verl's rollout_rs written out per sequence and token (f64): for each option its keep mask;
    k1 options keep -lr (or its sequence sum / mean) inside [log lower, log upper], the others keep
    the statistic at most the threshold. Returns (new mask, [per-option rejected bool])."""
    lr = log_ratio.double().clamp(-20, 20)
    m = mask.double()
    stats = {"k1": -lr, "k2": 0.5 * lr ** 2, "k3": torch.exp(lr) - 1 - lr}
    rejected = []
    for opt, th in zip(options, thresholds):
        level, est = opt.rsplit("_", 1)
        v = stats[est]
        if level == "token":
            s = v
        elif level == "seq_sum":
            s = (v * m).sum(-1, keepdim=True).expand_as(v)
        elif level == "seq_mean":
            s = ((v * m).sum(-1) / (m.sum(-1) + 1e-8))[:, None].expand_as(v)
        else:
            mx = v.masked_fill(m == 0, float("-inf")).max(-1).values
            s = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)[:, None].expand_as(v)
        if est == "k1":
            lo, hi = th
            keep = (s >= math.log(lo)) & (s <= math.log(hi))
        else:
            keep = s <= th
        rejected.append(~keep & (m > 0))
    any_rejected = torch.stack(rejected).any(0)
    return mask * (~any_rejected), rejected


def rollout_is_weights(log_ratio, mask, level, upper, lower=None, normalize=False):
    """verl's compute_rollout_correction_weights written out (f64): the ratio of the token's
    log-ratio (token), of the sequence's masked sum (sequence) or mean (geometric), clamped to
    +-20 in log space; truncated at ``upper`` or, with ``lower`` (IcePop), zeroed outside the band;
    0 at masked tokens. With ``normalize``, divided by the batch mean (tokens: masked mean;
    sequences: mean over the sequences with a valid token) where it exceeds 1e-8.
    Returns (weights, factor)."""
    lr = log_ratio.double()
    m = mask.double()
    if level == "token":
        lw = lr
    else:
        lw = (lr * m).sum(-1, keepdim=True)
        if level == "geometric":
            lw = lw / m.sum(-1, keepdim=True).clamp(min=1)
        lw = lw.expand_as(lr)
    raw = torch.exp(lw.clamp(-20, 20))
    if lower is None:
        w = raw.clamp(max=upper)
    else:
        w = torch.where((raw >= lower) & (raw <= upper), raw, torch.zeros_like(raw))
    w = w * (m > 0)
    factor = 1.0
    if normalize:
        if level == "token":
            mean = (w * m).sum() / (m.sum() + 1e-8)
        else:
            seq = (w * m).sum(-1) / (m.sum(-1) + 1e-8)
            valid = (m.sum(-1) > 0).double()
            mean = (seq * valid).sum() / valid.sum().clamp(min=1e-8)
        if mean > 1e-8:
            factor = float(mean)
            w = w / mean
    return w, factor
