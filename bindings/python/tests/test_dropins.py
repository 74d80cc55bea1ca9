"""The verl and TRL drop-ins against PyTorch implementations of verl's core_algos and TRL's
GRPOTrainer._compute_loss formulas: every loss variant, aggregation mode and normalization."""
import math
import sys
import types
from dataclasses import dataclass, field

import pytest
import torch

import recap_kernels as rk
from reference import (agg_loss, cispo, clip_cov, dppo, dro, geo_mean, gpg, kl_cov, kl_penalty, rollout_is_weights,
                       rollout_rejection, sapo, trl_loss, trl_multi_objective, trl_off_policy_mask, verl_gspo,
                       verl_outcome_advantages, verl_vanilla)


def batch(device, gen, b=6, l=21):
    old = -torch.rand(b, l, generator=gen) * 3
    logp = old + torch.randn(b, l, generator=gen) * 0.3
    ref = old + torch.randn(b, l, generator=gen) * 0.2
    adv = torch.randn(b, generator=gen)
    mask = (torch.rand(b, l, generator=gen) > 0.25).float()
    mask[3] = 0
    return [x.to(device) for x in (old, logp, ref, adv, mask)]


@dataclass
class PolicyLossConfig:
    loss_mode: str = "vanilla"
    dro_beta: float = 0.1
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 0.0002
    ppo_kl_coef: float = 0.1


@dataclass
class ActorConfig:
    """The fields of verl's ActorConfig the policy losses read."""
    clip_ratio: float = 0.2
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float = 3.0
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    policy_loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    global_batch_info: dict = field(default_factory=dict)

    def get(self, key, default=None):
        return getattr(self, key, default)


def close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("mode", ["vanilla", "gspo", "sapo", "cispo"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_verl_policy_losses(device, gen, mode, agg):
    old, logp, ref, adv, mask = batch(device, gen)
    a = adv[:, None].expand_as(logp)  # verl passes per-token advantages
    cfg = ActorConfig(policy_loss=PolicyLossConfig(mode))
    x = logp.clone().requires_grad_()
    loss, metrics = rk.verl.compute_policy_loss(old, x, a, mask, agg, cfg)
    loss.backward()
    y = logp.clone().requires_grad_()
    if mode == "vanilla":
        per, clipfrac, ppo_kl, lower = verl_vanilla(old, y, a, mask, 0.2, 0.28, 3.0)
        close(metrics["actor/pg_clipfrac_lower"], lower)
        close(metrics["actor/pg_clipfrac"], clipfrac)
    elif mode == "gspo":
        per = verl_gspo(old, y, a, mask, 0.2, 0.28)
    elif mode == "sapo":
        per = sapo(old, y, a, mask)
    else:
        per = cispo(old, y, a, mask, 0.2, 0.28)
    want = agg_loss(per, mask, "seq-mean-token-mean" if mode == "sapo" else agg)  # verl 0.9 forces it for SAPO
    want.backward()
    close(loss, want)
    close(x.grad, y.grad, atol=1e-7)
    assert set(metrics) == {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}
    assert all(v.dim() == 0 and v.device == device for v in metrics.values())
    close(metrics["actor/ppo_kl"], ((old - logp) * mask).sum() / mask.sum())


@pytest.mark.parametrize("mode", ["gpg", "dro", "dppo_tv", "dppo_kl"])
@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-mean"])
def test_verl_newer_policy_losses(device, gen, mode, agg):
    """verl's gpg, dro, dppo_tv and dppo_kl (and its token-sum aggregation): values, gradients and
    the metrics verl's own functions return."""
    old, logp, ref, adv, mask = batch(device, gen)
    a = adv[:, None].expand_as(logp)
    cfg = ActorConfig(policy_loss=PolicyLossConfig(mode), clip_ratio_low=0.1, clip_ratio_high=0.2)
    cfg.global_batch_info = {"dp_size": 2} if agg == "token-sum" else {}
    x = logp.clone().requires_grad_()
    loss, metrics = rk.verl.compute_policy_loss(old, x, a, mask, agg, cfg)
    loss.backward()
    y = logp.clone().requires_grad_()
    if mode == "gpg":
        per, keys = gpg(old, y, a, mask), set()
    elif mode == "dro":
        per, keys = dro(old, y, a, mask, 0.1), {"actor/ppo_kl"}
    else:
        per, clipfrac, lower = dppo(old, y, a, mask, 0.1, 0.2, 3.0, mode[len("dppo_"):])
        keys = {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}
        assert 0 < clipfrac < 1, "the batch exercises the trust region"
        close(metrics["actor/pg_clipfrac"], clipfrac)
        close(metrics["actor/pg_clipfrac_lower"], lower)
    want = agg_loss(per, mask, agg, dp=2 if agg == "token-sum" else 1)
    want.backward()
    close(loss, want)
    close(x.grad, y.grad, atol=1e-7)
    assert set(metrics) == keys
    with pytest.raises(rk.RecapError, match="dro_beta"):
        rk.verl.compute_policy_loss(old, x, a, mask, agg, ActorConfig(policy_loss=PolicyLossConfig("dro", 0.0)))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("with_is", [False, True])
def test_verl_geo_mean(device, gen, agg, with_is):
    """verl's GMPO (geo_mean) with per-sequence advantages, a fully masked row and rollout IS
    weights: value, gradient (sequence-level GMPO) and verl's clip fractions; loss_agg_mode plays
    no part, as in verl."""
    old, logp, ref, adv, mask = batch(device, gen)
    a = adv[:, None].expand_as(logp)
    w = (torch.rand(logp.shape, generator=gen) + 0.5).to(device) if with_is else None
    cfg = ActorConfig(policy_loss=PolicyLossConfig("geo_mean"), clip_ratio_low=0.2, clip_ratio_high=0.25)
    x = logp.clone().requires_grad_()
    loss, metrics = rk.verl.compute_policy_loss(old, x, a, mask, agg, cfg, rollout_is_weights=w)
    loss.backward()
    y = logp.clone().requires_grad_()
    want, clipfrac, lower = geo_mean(old, y, a, mask, 0.2, 0.25, w)
    want.backward()
    assert 0 < clipfrac < 1 and 0 < lower < 1, "the batch exercises both clip sides"
    close(loss, want)
    close(x.grad, y.grad, atol=1e-7)
    close(metrics["actor/pg_clipfrac"], clipfrac)
    close(metrics["actor/pg_clipfrac_lower"], lower)


@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-mean"])
@pytest.mark.parametrize("with_is", [False, True])
def test_verl_clip_cov_and_kl_cov(device, gen, agg, with_is):
    """verl's Clip-Cov (its random draw under a seed) and KL-Cov against the token-by-token
    formulas: value, gradient, the tokens chosen and verl's metrics; rollout IS weights multiply
    the whole per-token loss, KL-Cov's penalty included."""
    old, logp, ref, adv, mask = batch(device, gen, b=8, l=33)
    a = adv[:, None].expand_as(logp).contiguous()
    w = (torch.rand(logp.shape, generator=gen) + 0.5).to(device) if with_is else None
    pl = PolicyLossConfig("clip_cov", clip_cov_ratio=0.05, clip_cov_lb=0.5, clip_cov_ub=3.0, kl_cov_ratio=0.05,
                          ppo_kl_coef=0.5)
    cfg = ActorConfig(policy_loss=pl, clip_ratio_low=0.1, clip_ratio_high=0.2)
    cfg.global_batch_info = {"dp_size": 2} if agg == "token-sum" else {}
    dp = 2 if agg == "token-sum" else 1
    cpu = [t.cpu() for t in (old, logp, a, mask)]
    for mode in ["clip_cov", "kl_cov"]:
        x = logp.clone().requires_grad_()
        torch.manual_seed(5)
        loss, metrics = rk.verl.compute_policy_loss(old, x, a, mask, agg, cfg, rollout_is_weights=w, loss_mode=mode)
        loss.backward()
        y = cpu[1].clone().requires_grad_()
        if mode == "clip_cov":
            per, chosen = clip_cov(cpu[0], y, cpu[2], cpu[3], 0.1, 0.2, 0.05, 0.5, 3.0, seed=5)
            assert int(chosen.sum()) == max(int(0.05 * float(mask.sum())), 1), "enough candidates to draw from"
            close(metrics["actor/pg_clipfrac"], chosen.float().sum() / mask.sum())
            close(metrics["actor/ppo_kl"], ((old - logp) * mask).sum() / mask.sum())
            assert set(metrics) == {"actor/pg_clipfrac", "actor/ppo_kl"}
        else:
            per, chosen = kl_cov(cpu[0], y, cpu[2], cpu[3], 0.05, 0.5)
            assert int(chosen.sum()) == int(0.05 * float(mask.sum())) > 1
            close(metrics["actor/ppo_kl"], ((logp - old).abs() * mask).sum() / mask.sum())
            assert set(metrics) == {"actor/ppo_kl"}
        if w is not None:
            per = per * w.cpu()
        want = agg_loss(per, cpu[3], agg, dp=dp)
        want.backward()
        close(loss.cpu(), want)
        close(x.grad.cpu(), y.grad, atol=1e-7)
        # the chosen tokens are the ones treated differently: no gradient (Clip-Cov), the penalty's (KL-Cov)
        unselected = (verl_vanilla(cpu[0], cpu[1], cpu[2], cpu[3], 0.1, 0.2, None)[0] if mode == "clip_cov"
                      else -cpu[2] * torch.exp(cpu[1] - cpu[0]))
        plain = agg_loss(unselected * (1 if w is None else w.cpu()), cpu[3], agg, dp=dp)
        assert not torch.allclose(want, plain), "the selection changes the loss"
    # an empty micro-batch selects nothing and gives 0; a ratio outside (0, 1] is refused
    empty = torch.zeros_like(mask)
    for mode in ["clip_cov", "kl_cov"]:
        loss, _ = rk.verl.compute_policy_loss(old, logp, a, empty, agg, cfg, loss_mode=mode)
        assert float(loss) == 0.0
    bad = ActorConfig(policy_loss=PolicyLossConfig("kl_cov", kl_cov_ratio=0.0))
    with pytest.raises(rk.RecapError, match="kl_cov_ratio"):
        rk.verl.compute_policy_loss(old, logp, a, mask, agg, bad)
    bad = ActorConfig(policy_loss=PolicyLossConfig("clip_cov", clip_cov_ratio=1.5))
    with pytest.raises(rk.RecapError, match="clip_cov_ratio"):
        rk.verl.compute_policy_loss(old, logp, a, mask, agg, bad)


@pytest.mark.parametrize("rs,threshold,parsed", [
    ("token_k1", "0.8_1.25", [(0.8, 1.25)]),
    ("token_k2,seq_mean_k3", "0.02", [0.02, 0.02]),
    ("seq_sum_k1,seq_max_k3,token_k3", "0.5_2.0,0.05,0.04", [(0.5, 2.0), 0.05, 0.04]),
    ("seq_mean_k1,seq_sum_k2,seq_max_k2", "1.05,0.5,0.1", [(1 / 1.05, 1.05), 0.5, 0.1]),
])
def test_verl_rollout_rejection(device, gen, rs, threshold, parsed):
    """verl's compute_rollout_rejection_mask against the criteria written out: the new mask, which
    option rejected which token, verl's fraction metrics; a NaN log-ratio rejects its token and, for
    sequence options, its sequence; the rejected tokens leave the loss's normalizers."""
    old, logp, ref, adv, mask = batch(device, gen, b=8, l=33)
    rollout = old + (torch.randn(old.shape, generator=gen) * 0.15).to(device)
    lr = old - rollout
    lr[5, 7] = float("nan")
    mask[5, 7] = 1.0
    new_mask, metrics = rk.verl.compute_rollout_rejection_mask(lr, mask, rs, threshold)
    options = rs.split(",")
    want, rejected = rollout_rejection(lr.cpu(), mask.cpu(), options, parsed)
    close(new_mask.cpu(), want)
    assert new_mask.dtype == mask.dtype
    assert 0 < float(new_mask.sum()) < float(mask.sum()), "some tokens rejected, some kept"
    assert float(new_mask[5, 7]) == 0.0
    if any(o.startswith("seq") for o in options):
        assert float(new_mask[5].sum()) == 0.0, "a NaN rejects its sequence under a sequence option"
    m = mask.cpu()
    for opt, r in zip(options, rejected):
        close(metrics[f"rollout_rs_{opt}_masked_fraction"], r.double().sum() / m.sum())
        seqs = (m.sum(-1) > 0).double()
        close(metrics[f"rollout_rs_{opt}_seq_masked_fraction"], (r.any(-1).double() * seqs).sum() / seqs.sum())
    close(metrics["rollout_rs_masked_fraction"], 1 - want.sum() / m.sum())
    close(metrics["rollout_rs_seq_masked_fraction"], ((m - want).sum(-1) > 0).double().mean())
    # the flags name the rejecting options; the loss counts only the kept tokens
    _, flags = rk.rollout_rejection(lr, mask, rollout_rs=rs, rollout_rs_threshold=threshold)
    for i, r in enumerate(rejected):
        assert torch.equal(((flags.cpu() >> i) & 1) == 1, r)
    _, met = rk.grpo_loss(logp, old, adv, new_mask)
    assert float(met["actor/num_tokens"]) == float(want.sum())


@pytest.mark.parametrize("rs", [None, "seq_mean_k3"])
def test_verl_token_veto(device, gen, rs):
    """The older verl API's rollout_token_veto_threshold (verl 0.7's
    compute_rollout_correction_and_rejection_mask, written out): a sequence with an unmasked token of
    ratio below the threshold leaves the mask whole, alone or chained after a rollout_rs option;
    verl 0.7's veto metrics."""
    old, logp, ref, adv, mask = batch(device, gen, b=8, l=33)
    lr = torch.randn(old.shape, generator=gen) * 0.2
    lr[0, 4], mask[0, 4] = -2.0, 1.0  # vetoed: ratio 0.14 < 0.5
    lr[2, 3], mask[2, 3] = -0.68, 1.0  # kept: ratio 0.507
    lr = lr.to(device)
    t = 0.5
    catastrophic = (lr.cpu() < math.log(t)) & (mask.cpu() > 0)
    vetoed = catastrophic.any(-1, keepdim=True)
    want = mask.cpu() * ~vetoed
    if rs:
        want = want * rollout_rejection(lr.cpu(), mask.cpu(), [rs], [0.02])[0]
    new_mask, metrics = rk.verl.compute_rollout_rejection_mask(lr, mask, rs, 0.02 if rs else None,
                                                               rollout_token_veto_threshold=t)
    close(new_mask.cpu(), want)
    assert 0 < int(vetoed.sum()) < vetoed.shape[0], "some sequences vetoed, some kept"
    close(metrics["rollout_is_veto_fraction"], vetoed.double().mean())
    close(metrics["rollout_is_catastrophic_token_fraction"], catastrophic.double().sum() / mask.cpu().sum())
    close(metrics["rollout_rs_masked_fraction"], 1 - want.sum() / mask.cpu().sum())
    _, flags = rk.rollout_rejection(lr, mask, rollout_rs=rs, rollout_rs_threshold=0.02,
                                    rollout_token_veto_threshold=t)
    bit = 1 if rs else 0
    assert torch.equal(((flags.cpu() >> bit) & 1) == 1, vetoed.expand_as(lr) & (mask.cpu() > 0))
    for bad in [0.0, -1.0, 1e-12]:
        with pytest.raises(rk.RecapError, match="rollout_token_veto_threshold"):
            rk.verl.compute_rollout_rejection_mask(lr, mask, rs, 0.02, rollout_token_veto_threshold=bad)
    with pytest.raises(rk.RecapError, match="rollout_rs"):
        rk.rollout_rejection(lr, mask, rollout_rs=None)


def test_verl_rollout_rejection_errors(gen):
    old, logp, ref, adv, mask = batch(torch.device("cpu"), gen)
    for rs, th, arg in [("token_k4", "1", "rollout_rs"), ("seq_max_k1", "2", "rollout_rs"),
                        ("token_k2", "0.1_2", "rollout_rs_threshold"), ("token_k1,token_k2", "1,2,3", "threshold"),
                        ("token_k2", None, "rollout_rs_threshold")]:
        with pytest.raises(rk.RecapError, match=arg):
            rk.verl.compute_rollout_rejection_mask(old - logp, mask, rs, th)
    with pytest.raises(rk.RecapError, match="mask"):
        rk.rollout_rejection(old - logp, mask[:, :5], rollout_rs="token_k2", rollout_rs_threshold=1.0)


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize("threshold,upper,lower", [(2.0, 2.0, None), ("1.5", 1.5, None), ("0.5_2.0", 2.0, 0.5)])
@pytest.mark.parametrize("normalize", [False, True])
def test_verl_rollout_is_weights(device, gen, level, threshold, upper, lower, normalize):
    """verl's compute_rollout_correction_weights against its formulas written out (f64): the weights
    (truncated or IcePop, at token or sequence level, batch-normalized or not), verl's metrics, and
    the weights as the loss's policy_weight; sequences of lengths 0, 1, 31, 32, 33 and a fully
    masked one."""
    lengths = [0, 1, 31, 32, 33, 5]
    lr = torch.zeros(len(lengths), 33)
    mask = torch.zeros(len(lengths), 33)
    for i, n in enumerate(lengths):
        mask[i, :n] = (torch.rand(n, generator=gen) > 0.2).float()
        lr[i] = torch.randn(33, generator=gen) * (0.5 if level == "token" else 0.05)
    mask[5] = 0  # fully masked
    lr, mask = lr.to(device), mask.to(device)
    w, metrics = rk.verl.compute_rollout_correction_weights(lr, mask, level, threshold, normalize)
    want, factor = rollout_is_weights(lr.cpu(), mask.cpu(), level, upper, lower, normalize)
    close(w.cpu(), want)
    assert w.dtype == torch.float32 and w.shape == mask.shape
    assert float(w[mask == 0].abs().sum()) == 0.0
    base, _ = rollout_is_weights(lr.cpu(), mask.cpu(), level, upper, lower)
    m = mask.cpu().double()
    close(metrics["rollout_is_mean"], (base * m).sum() / m.sum())
    if level == "token":
        close(metrics["rollout_is_max"], base[m > 0].max())
        raw = torch.exp(lr.cpu().double())
        close(metrics["rollout_is_ratio_fraction_high"], ((raw > upper).double() * m).sum() / m.sum())
        close(metrics["rollout_is_ratio_fraction_low"], ((raw < (lower or 1 / upper)).double() * m).sum() / m.sum())
    seq = (base * m).sum(-1) / (m.sum(-1) + 1e-8)
    close(metrics["rollout_is_seq_mean"], seq.mean())
    close(metrics["rollout_is_seq_max"], seq.max())
    assert ("rollout_is_oob_ratio" in metrics) == (lower is not None)
    assert ("rollout_is_batch_norm_factor" in metrics) == normalize
    if normalize:
        close(metrics["rollout_is_batch_norm_factor"], torch.tensor(factor))
        assert factor != 1.0
    # the op's own normalization gives the same bits as the drop-in's (one float32 division)
    own, stats = rk.rollout_is_weights(lr, mask, rollout_is=level, rollout_is_threshold=threshold,
                                       rollout_is_batch_normalize=normalize)
    assert torch.equal(own, w)
    close(stats["factor"], torch.tensor(factor))
    # as the loss's policy weight: the vanilla loss with each token's term scaled by its weight
    old, logp, ref, adv, _ = batch(device, gen, b=6, l=33)
    loss, _ = rk.grpo_loss(logp, old, adv, mask, policy_weight=w)
    r = torch.exp(logp.cpu().double() - old.cpu().double())
    a = adv.cpu().double()[:, None]
    pg = torch.maximum(-a * r, -a * r.clamp(0.8, 1.2))
    pg = torch.where(a < 0, torch.minimum(pg, -3.0 * a), pg) * want  # dual clip c = 3
    close(loss.cpu(), (pg * m).sum() / m.sum())


def test_rollout_is_weights_errors(gen):
    old, logp, ref, adv, mask = batch(torch.device("cpu"), gen)
    lr = old - logp
    for level, th, arg in [("tokens", 2.0, "rollout_is"), ("token", "2_x", "rollout_is_threshold"),
                           ("token", -1.0, "rollout_is_threshold"), ("sequence", "2.0_0.5", "rollout_is_threshold"),
                           ("token", True, "rollout_is_threshold")]:
        with pytest.raises(rk.RecapError, match=arg):
            rk.verl.compute_rollout_correction_weights(lr, mask, level, th)
    with pytest.raises(rk.RecapError, match="mask"):
        rk.rollout_is_weights(lr, mask[:, :5])
    with pytest.raises(rk.RecapError, match="response_mask"):
        rk.verl.compute_rollout_correction_weights(lr, torch.zeros_like(mask))
    bad = lr.clone()
    bad[0, mask[0].argmax()] = float("nan")
    with pytest.raises(rk.RecapError, match="log_ratio"):
        rk.rollout_is_weights(bad, mask)
    bad = lr.clone()
    bad[3, 0] = float("nan")  # a masked token is never read
    w, _ = rk.rollout_is_weights(bad, mask, rollout_is="sequence")
    assert bool(torch.isfinite(w).all())


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_verl_global_batch_info(device, gen, agg):
    """global_batch_info (dp_size, batch_num_tokens, global_batch_size) as verl's agg_loss uses it,
    from a dict config, with rollout IS weights."""
    old, logp, ref, adv, mask = batch(device, gen)
    w = torch.rand(logp.shape, generator=gen).to(device) + 0.5
    info = {"dp_size": 4, "batch_num_tokens": 321, "global_batch_size": 17}
    cfg = {"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": 0.3, "global_batch_info": info}
    x = logp.clone().requires_grad_()
    loss, _ = rk.verl.compute_policy_loss_vanilla(old, x, adv[:, None].expand_as(x), mask, agg, cfg,
                                                  rollout_is_weights=w)
    loss.backward()
    y = logp.clone().requires_grad_()
    per = verl_vanilla(old, y, adv[:, None].expand_as(y), mask, 0.2, 0.3, 3.0)[0] * w
    want = agg_loss(per, mask, agg, num_tokens=321, num_seqs=17, dp=4)
    want.backward()
    close(loss, want)
    close(x.grad, y.grad, atol=1e-7)


def test_verl_agg_loss_and_kl_penalty(device, gen):
    old, logp, ref, adv, mask = batch(device, gen)
    x = torch.randn(logp.shape, generator=gen).to(device).requires_grad_()
    for mode in ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]:
        got = rk.verl.agg_loss(x, mask, mode, dp_size=2, batch_num_tokens=50, global_batch_size=9,
                               loss_scale_factor=40)
        close(got, agg_loss(x, mask, mode, num_tokens=50, num_seqs=9, dp=2, scale=40))
    for kind in ["kl", "abs", "mse", "low_var_kl", "k3+"]:
        close(rk.verl.kl_penalty(logp, ref, kind), kl_penalty(logp, ref, kind))


def test_verl_register_adds_our_losses_to_the_registry(monkeypatch, gen):
    """register() against a stand-in of verl.trainer.ppo.core_algos (verl itself when installed)."""
    try:
        from verl.trainer.ppo import core_algos  # noqa: F401
        real = True
    except ImportError:
        real = False
        registry = {}
        core = types.ModuleType("verl.trainer.ppo.core_algos")
        core.POLICY_LOSS_REGISTRY = registry

        def register_policy_loss(name):
            def deco(fn):
                registry[name] = fn
                return fn
            return deco

        core.register_policy_loss = register_policy_loss
        core.get_policy_loss_fn = lambda name: registry[name]
        for name in ["verl", "verl.trainer", "verl.trainer.ppo"]:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setitem(sys.modules, "verl.trainer.ppo.core_algos", core)
        sys.modules["verl.trainer.ppo"].core_algos = core
    from verl.trainer.ppo import core_algos

    names = rk.verl.register()
    assert names == ["recap_vanilla", "recap_gspo", "recap_sapo", "recap_cispo", "recap_gpg", "recap_dppo_tv",
                     "recap_dppo_kl", "recap_dro", "recap_geo_mean", "recap_clip_cov", "recap_kl_cov"]
    assert rk.verl.register() == names  # idempotent
    fn = core_algos.get_policy_loss_fn("recap_vanilla")
    old, logp, ref, adv, mask = batch(torch.device("cpu"), gen)
    loss, metrics = fn(old, logp, adv[:, None].expand_as(logp), mask, "token-mean", ActorConfig())
    close(loss, agg_loss(verl_vanilla(old, logp, adv[:, None].expand_as(logp), mask, 0.2, 0.28)[0], mask,
                         "token-mean"))
    assert real or "actor/pg_clipfrac" in metrics


TRL_CASES = [
    dict(loss_type="dapo", num_items=230, num_processes=2),
    dict(loss_type="dapo", beta=0.04, eps_high=0.28),
    dict(loss_type="grpo", gas=4),
    dict(loss_type="grpo", beta=0.1, bias_kl=True),
    dict(loss_type="bnpo", delta=1.5, gas=2),
    dict(loss_type="dr_grpo", max_len=30),
    dict(loss_type="cispo", eps_high=5.0, num_items=230),
    dict(loss_type="sapo", tau_pos=1.0, tau_neg=1.05),
    dict(loss_type="dapo", level="sequence"),
    dict(loss_type="grpo", level="sequence", eps=3e-4, eps_high=4e-4),
    dict(loss_type="luspo", gas=2),
    dict(loss_type="luspo", level="sequence", beta=0.04),
    dict(loss_type="vespo", num_items=230, num_processes=2),
    dict(loss_type="vespo", beta=0.04),
    # TRL 1.16: the normalizer of a generation batch larger than the step batch
    dict(loss_type="dapo", num_items=230, spg=2),
    dict(loss_type="cispo", eps_high=5.0, num_items=230, gas=2, spg=4),
    # delta below 1 + epsilon_high, and the KL correction by the ratio before delta
    dict(loss_type="dapo", delta=1.05, eps_high=0.28, beta=0.04, bias_kl=True),
    # GSPO's KL corrected by the sequence ratio (its gradient reaches every token)
    dict(loss_type="grpo", level="sequence", beta=0.04, bias_kl=True),
    dict(loss_type="dapo", level="sequence", beta=0.04, bias_kl=True, num_items=230),
]


@pytest.mark.parametrize("case", TRL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_trl_loss_types(device, gen, case):
    old, logp, ref, adv, mask = batch(device, gen)
    logp = old + torch.randn(logp.shape, generator=gen).to(device) * 0.05  # KL well inside the k3 clamps
    w = (torch.rand(logp.shape, generator=gen) > 0.3).float().to(device)  # an entropy mask
    kw = dict(loss_type=case["loss_type"], beta=case.get("beta", 0.0), epsilon=case.get("eps", 0.2),
              epsilon_high=case.get("eps_high"), delta=case.get("delta"),
              importance_sampling_level=case.get("level", "token"), use_bias_correction_kl=case.get("bias_kl", False),
              sapo_temperature_pos=case.get("tau_pos", 1.0), sapo_temperature_neg=case.get("tau_neg", 1.05),
              num_items_in_batch=case.get("num_items"), num_processes=case.get("num_processes", 1),
              max_completion_length=case.get("max_len"), gradient_accumulation_steps=case.get("gas", 1),
              steps_per_generation=case.get("spg"))
    x = logp.clone().requires_grad_()
    entropy_mask = None if case.get("level") == "sequence" else w.bool()
    loss, metrics = rk.trl.grpo_loss(x, old, adv, mask, ref, entropy_mask=entropy_mask, **kw)
    loss.backward()
    y = logp.clone().requires_grad_()
    want = trl_loss(y, old, adv, mask, ref, loss_type=kw["loss_type"], beta=kw["beta"], eps=kw["epsilon"],
                    eps_high=kw["epsilon_high"], delta=kw["delta"], level=kw["importance_sampling_level"],
                    weight=None if entropy_mask is None else w, num_items=kw["num_items_in_batch"],
                    num_processes=kw["num_processes"], max_len=kw["max_completion_length"],
                    gas=kw["gradient_accumulation_steps"], bias_kl=kw["use_bias_correction_kl"],
                    tau_pos=kw["sapo_temperature_pos"], tau_neg=kw["sapo_temperature_neg"], spg=case.get("spg"))
    want.backward()
    close(loss, want)
    close(x.grad, y.grad, atol=1e-7)
    assert metrics["policy_loss"].dim() == 0 and metrics["policy_loss"].device == device
    # TRL's metric names for the loss type
    family = {"cispo": {"cispo_clip_ratio"}, "vespo": {"vespo/phi_seq_mean"}, "sapo": set()}.get(
        case["loss_type"], {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                            "clip_ratio/low_min", "clip_ratio/high_max"})
    trl_names = {k for k in metrics if not k.startswith(("actor/", "mismatch/"))} - {"policy_loss"}
    assert trl_names == family | ({"kl"} if kw["beta"] else set()), trl_names


def test_trl_unclamped_k3_and_off_policy_mask(device, gen):
    """TRL's k3 has no clamps (a log-ratio to the reference of 25 counts in full), and its off-policy
    sequence mask drops the negative-advantage sequences that drifted from the sampler."""
    old, logp, ref, adv, mask = batch(device, gen)
    ref = ref.clone()
    ref[0, :3] = logp[0, :3] + 25.0  # x = ref - logp beyond k3's clamp at 20 (and its value clamp at 10)
    sampling = old.clone()
    sampling[2:5] += 0.5  # three sequences drift: mean KL 0.5 > 0.3
    adv = adv.clone()
    adv[2], adv[3], adv[4] = -1.0, 1.0, -0.5  # dropped, kept (A >= 0), dropped
    keep = trl_off_policy_mask(adv, logp, sampling, mask, 0.3)
    assert keep[:, 0].tolist()[2:5] == [0.0, 1.0, 0.0]
    close(rk.trl.off_policy_mask(adv, logp, sampling, mask, 0.3), keep)
    x = logp.clone().requires_grad_()
    loss, _ = rk.trl.grpo_loss(x, old, adv, mask, ref, loss_type="dapo", beta=0.04, off_policy_mask_threshold=0.3,
                               sampling_per_token_logps=sampling)
    loss.backward()
    y = logp.clone().requires_grad_()
    want = trl_loss(y, old, adv, mask, ref, loss_type="dapo", beta=0.04, weight=keep.expand_as(y))
    want.backward()
    close(loss, want)
    close(x.grad, y.grad, atol=1e-6)


@pytest.mark.parametrize("aggregation,scale", [("sum_then_normalize", "group"), ("sum_then_normalize", "batch"),
                                               ("sum_then_normalize", "none"), ("normalize_then_sum", "group")])
def test_trl_compute_advantages(device, gen, aggregation, scale):
    rewards = torch.cat([torch.randint(0, 2, (16, 1), generator=gen).float(), torch.randn(16, 2, generator=gen)], 1)
    weights = [1.0, 0.25, 2.0]
    want = trl_multi_objective(rewards.double(), 8, weights, aggregation, scale_rewards=scale)
    got = rk.trl.compute_advantages(rewards.to(device), 8, weights, scale_rewards=scale,
                                    multi_objective_aggregation=aggregation)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(rk.RecapError, match="scale_rewards"):
        rk.trl.compute_advantages(rewards, 8, scale_rewards="global")


def test_trl_top_entropy_quantile(gen):
    b, t = 4, 10
    ent = torch.rand(b, t, generator=gen)
    mask = (torch.rand(b, t, generator=gen) > 0.2).float()
    m = rk.trl.high_entropy_mask(ent, mask, 0.3)
    kept = ent[m]
    assert m.sum() >= 1 and (kept >= torch.quantile(ent[mask.bool()], 0.7)).all()
    assert not m[mask == 0].any()


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    @staticmethod
    def gather(x):
        return x.reshape(-1)

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


class _StandInTrainer:
    """The parts of trl.GRPOTrainer that RecapGRPOMixin uses (TRL is not a test dependency)."""

    def __init__(self, logits):
        self.args = types.SimpleNamespace(delta=None, use_bias_correction_kl=False)
        self.model = types.SimpleNamespace(training=True)
        self.accelerator = _Accelerator()
        self.loss_type, self.beta, self.epsilon_low, self.epsilon_high = "dapo", 0.04, 0.2, 0.28
        self.importance_sampling_level, self.top_entropy_quantile, self.max_completion_length = "token", 1.0, 8
        self.current_gradient_accumulation_steps = 1
        self._metrics = {"train": __import__("collections").defaultdict(list)}
        self.logits = logits
        self.logged = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           compute_entropy=True, **kw):
        ls = torch.log_softmax(self.logits, -1)
        ids = input_ids[:, -logits_to_keep:]
        return ls.gather(-1, ids[..., None]).squeeze(-1), -(ls.exp() * ls).sum(-1), None

    def log(self, logs, start_time=None):
        self.logged = {k: sum(v) / len(v) for k, v in self._metrics["train"].items()}


class _Trainer(rk.trl.RecapGRPOMixin, _StandInTrainer):
    pass


def test_trl_mixin_with_a_stand_in_trainer(gen):
    b, p, t, v = 3, 2, 8, 11
    logits = torch.randn(b, t, v, generator=gen, requires_grad=True)
    completion = torch.randint(0, v, (b, t), generator=gen)
    mask = torch.ones(b, t)
    mask[1, 5:] = 0
    inputs = {"prompt_ids": torch.zeros(b, p, dtype=torch.long), "prompt_mask": torch.ones(b, p),
              "completion_ids": completion, "completion_mask": mask, "advantages": torch.randn(b, generator=gen),
              "ref_per_token_logps": -torch.rand(b, t, generator=gen) - 2, "num_items_in_batch": mask.sum()}
    trainer = _Trainer(logits)
    loss = trainer._compute_loss(None, inputs)
    loss.backward()
    y = logits.detach().clone().requires_grad_()
    lp = torch.log_softmax(y, -1).gather(-1, completion[..., None]).squeeze(-1)
    want = trl_loss(lp, lp.detach(), inputs["advantages"], mask, inputs["ref_per_token_logps"], beta=0.04,
                    eps_high=0.28, num_items=mask.sum())
    want.backward()
    close(loss, want, rtol=1e-4, atol=1e-5)
    close(logits.grad, y.grad, rtol=1e-4, atol=1e-6)
    assert all(isinstance(v[0], torch.Tensor) for v in trainer._metrics["train"].values())
    trainer.log({})
    assert set(trainer.logged) == {"kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
                                   "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max"}
    assert all(isinstance(v, float) for v in trainer.logged.values())


def test_recap_reward_weights_callback_with_a_stand_in_trainer():
    """The callback reads each reward function's logged batch means since the last step, feeds them
    to the scheduler and sets trainer.reward_weights (TRL's sum-then-normalize weights)."""
    from collections import defaultdict

    trainer = types.SimpleNamespace(reward_func_names=["format", "accuracy"], _metrics={"train": defaultdict(list)},
                                    reward_weights=torch.ones(2))
    cb = rk.trl.RecapRewardWeights(trainer, window=3)
    reference = rk.RecapWeights(["reward", "reward"], window=3)
    for step in range(10):
        # two generation batches per optimizer step (gradient accumulation)
        for half in (0, 1):
            trainer._metrics["train"]["rewards/format/mean"].append(1.0)
            trainer._metrics["train"]["rewards/accuracy/mean"].append(0.1 + 0.05 * step + 0.01 * half)
        cb.on_step_end()
        reference.observe([1.0, 0.1 + 0.05 * step + 0.005])
        if step == 4:
            trainer._metrics["train"].clear()  # what the trainer's log() does
    assert torch.equal(trainer.reward_weights, reference.tensor())
    w = trainer.reward_weights.tolist()
    assert w[1] > 1.0 > w[0], "the improving reward gains weight, the saturated one loses it"
    again = rk.trl.RecapRewardWeights(trainer, window=3)
    again.load_state_dict(cb.state_dict())
    assert again.weights.weights() == cb.weights.weights()
    cb.on_step_end()  # nothing logged since: no observation
    assert cb.weights.steps == 10


@pytest.mark.parametrize("norm", [True, False])
def test_verl_recap_estimator(gen, norm):
    """The verl estimator ``recap`` called directly (no verl needed): each step the reward keys'
    finite means go to the scheduler and the advantages are verl's GRPO on sum_k lambda_k r_k
    (NaN components skipped); the KL penalty verl put in the rewards stays; metrics are the step's."""
    from recap_kernels import verl_recap

    verl_recap.reset_recap_state()
    config = {"norm_adv_by_std_in_grpo": norm, "recap": {"reward_keys": ["fmt", "acc"], "window": 2}}
    replica = rk.RecapWeights(["reward", "reward"], window=2)
    b, length = 10, 7
    index = ["a"] * 4 + ["b"] * 3 + ["c"] * 2 + ["d"]  # a group of one
    for step in range(8):
        fmt = (torch.rand(b, generator=gen) < 0.2 + 0.1 * step).double()
        fmt[2] = float("nan")
        acc = torch.rand(b, generator=gen).double()
        mask = (torch.rand(b, length, generator=gen) > 0.3).float()
        scores = torch.zeros(b, length)
        penalty = 0.01 * torch.rand(b, length, generator=gen) * mask
        adv, ret = verl_recap.compute_recap_outcome_advantage(
            scores - penalty, mask, index, norm_adv_by_std_in_grpo=norm, config=config,
            non_tensor_batch={"fmt": fmt.numpy(), "acc": acc.tolist(), "uid": index},
            batch={"token_level_scores": scores})
        replica.observe([float(fmt.nanmean()), float(acc.mean())])
        lam = replica.weights()
        score = torch.nan_to_num(fmt) * lam[0] + acc * lam[1] - penalty.double().sum(-1)
        want = verl_outcome_advantages(score.float(), mask, [ord(i) for i in index], "grpo" if norm else "dr_grpo")
        torch.testing.assert_close(adv.double(), want, atol=2e-6, rtol=1e-5)
        assert adv is ret
        assert verl_recap.recap_state().take_metrics() == {
            "recap/lambda/fmt": lam[0], "recap/lambda/acc": lam[1],
            "recap/monitored/fmt": pytest.approx(float(fmt.nanmean())), "recap/monitored/acc": pytest.approx(float(acc.mean()))}
    assert lam != [1.0, 1.0]
    # a step where a reward key has no finite value observes nothing and reports NaN for it
    fmt = torch.full((b,), float("nan"), dtype=torch.float64)
    adv, _ = verl_recap.compute_recap_outcome_advantage(
        torch.zeros(b, length), mask, index, norm_adv_by_std_in_grpo=norm, config=config,
        non_tensor_batch={"fmt": fmt.numpy(), "acc": acc.tolist()})
    assert verl_recap.recap_state().weights.steps == 8
    metrics = verl_recap.recap_state().take_metrics()
    assert math.isnan(metrics["recap/monitored/fmt"]) and metrics["recap/lambda/acc"] == lam[1]
    want = verl_outcome_advantages((acc * lam[1]).float(), mask, [ord(i) for i in index], "grpo" if norm else "dr_grpo")
    torch.testing.assert_close(adv.double(), want, atol=2e-6, rtol=1e-5)
    verl_recap.reset_recap_state()


def test_verl_recap_estimator_errors():
    from recap_kernels import verl_recap

    verl_recap.reset_recap_state()
    r, m = torch.zeros(2, 3), torch.ones(2, 3)
    cfg = {"recap": {"reward_keys": ["fmt"]}}
    with pytest.raises(rk.RecapError, match=r"`algorithm\.recap\.reward_keys`: adv_estimator=recap needs"):
        verl_recap.compute_recap_outcome_advantage(r, m, ["a", "a"], config={}, non_tensor_batch={})
    with pytest.raises(rk.RecapError, match="a key appears twice"):
        verl_recap.compute_recap_outcome_advantage(r, m, ["a", "a"], config={"recap": {"reward_keys": ["x", "x"]}},
                                                   non_tensor_batch={"x": [1.0, 2.0]})
    with pytest.raises(rk.RecapError, match="non_tensor_batch"):
        verl_recap.compute_recap_outcome_advantage(r, m, ["a", "a"], config=cfg)
    with pytest.raises(rk.RecapError, match=r"reward key 'fmt' is not in the batch's reward extra info \(it has \['acc'\]\)"):
        verl_recap.compute_recap_outcome_advantage(r, m, ["a", "a"], config=cfg, non_tensor_batch={"acc": [1, 2]})
    with pytest.raises(rk.RecapError, match=r"`fmt`: expected B = 2 values"):
        verl_recap.compute_recap_outcome_advantage(r, m, ["a", "a"], config=cfg, non_tensor_batch={"fmt": [1.0]})
    with pytest.raises(rk.RecapError, match=r"`fmt`: expected a number per response"):
        verl_recap.compute_recap_outcome_advantage(r, m, ["a", "a"], config=cfg, non_tensor_batch={"fmt": ["x", 1]})
    with pytest.raises(rk.RecapError, match=r"`response_mask`: expected \[B, L\] = \[2, 3\]"):
        verl_recap.compute_recap_outcome_advantage(r, m[:, :2], ["a", "a"], config=cfg, non_tensor_batch={"fmt": [1, 2]})
    with pytest.raises(rk.RecapError, match="`token_level_rewards`: expected \\[B, L\\]"):
        verl_recap.compute_recap_outcome_advantage(r[0], m[0], ["a", "a"], config=cfg, non_tensor_batch={"fmt": [1, 2]})
    with pytest.raises(rk.RecapError, match=r"`fmt`: expected finite rewards \(NaN or None where the reward does "
                                            r"not apply\), got inf for response 1"):
        verl_recap.compute_recap_outcome_advantage(r, m, ["a", "a"], config=cfg,
                                                   non_tensor_batch={"fmt": [1.0, float("inf")]})
    with pytest.raises(rk.RecapError, match=r"`index`: expected B = 2 group ids"):
        verl_recap.compute_recap_outcome_advantage(r, m, ["a"], config=cfg, non_tensor_batch={"fmt": [1, 2]})
    with pytest.raises(rk.RecapError, match=r"`epsilon`: expected a positive finite number"):
        verl_recap.compute_recap_outcome_advantage(r, m, ["a", "a"], epsilon=0.0, config=cfg,
                                                   non_tensor_batch={"fmt": [1, 2]})
    with pytest.raises(rk.RecapError, match=r"`token_level_scores`: expected \[B, L\] = \[2, 3\]"):
        verl_recap.compute_recap_outcome_advantage(r, m, ["a", "a"], config=cfg, non_tensor_batch={"fmt": [1, 2]},
                                                   batch={"token_level_scores": torch.zeros(2, 4)})
    poisoned = r.clone()
    poisoned[1, 2] = float("nan")
    with pytest.raises(rk.RecapError, match=r"`token_level_rewards`: not finite, less token_level_scores .* response 1"):
        verl_recap.compute_recap_outcome_advantage(poisoned, m, ["a", "a"], config=cfg, non_tensor_batch={"fmt": [1, 2]},
                                                   batch={"token_level_scores": r})
    assert verl_recap.recap_state() is None or verl_recap.recap_state().weights.steps == 0
    verl_recap.reset_recap_state()


def test_recap_weights_presets():
    """preset="authors" is the crate's RecapConfig::preset("authors") (its authors' code, alpha 1),
    with the options given over it; "paper" the defaults."""
    authors = rk.RecapWeights(["reward", "loss"], preset="authors", window=3).state_dict()["recap_scheduler"]["config"]
    assert authors == {"window": 3, "temperature": 5.0, "priority": "softmax_mixture", "alpha": 1.0,
                       "max_steps": None, "sigma": "population", "denominator": "mean", "warmup": False,
                       "convergence": "worsening"}
    paper = rk.RecapWeights(["reward", "loss"]).state_dict()["recap_scheduler"]["config"]
    assert paper["priority"] == "sum" and paper["warmup"] is True and paper["window"] == 10
    # without a warm-up the authors' weights move once a previous window exists; the paper's stay 1
    # until 2W values exist
    a = rk.RecapWeights(["reward", "reward"], preset="authors", window=2)
    p = rk.RecapWeights(["reward", "reward"], window=2)
    for step in range(3):
        a.observe([0.1 * step + 0.05, 1.0])
        p.observe([0.1 * step + 0.05, 1.0])
    assert p.weights() == [1.0, 1.0] and a.weights() != [1.0, 1.0]
