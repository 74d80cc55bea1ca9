"""Our verl drop-ins against verl's own functions, called (not copied) from the installed package:
every policy loss (Clip-Cov's random draw under the same seed) x aggregation mode, agg_loss,
kl_penalty, the group advantage estimators, the optimal token baseline, the rollout rejection mask, the rollout IS
weights (with batch normalization), the older API's veto
(verl 0.7) and the fused-kernel path's FusedLinearForPPO, on random batches;
values, gradients and metrics. Run by scripts/peer-check.sh, which installs verl
(and TRL, whose off-policy mask is checked too) into a cached directory.

    python3 benches/peers/peer_check.py [--batches 20] [--json out.json]

Prints one line per check with its count of agreeing batches and exits non-zero on a mismatch.
"""
import argparse
import json
import sys

import numpy as np
import torch

import recap_kernels as rk


def actor_config(mode, info):
    """verl's own ActorConfig (some losses check its type) with the fields the losses read; built
    without its __post_init__, which validates trainer settings that play no part here."""
    from verl.workers.config import ActorConfig, PolicyLossConfig

    cfg = ActorConfig.__new__(ActorConfig)
    fields = dict(clip_ratio=0.2, clip_ratio_low=0.1, clip_ratio_high=0.28, clip_ratio_c=3.0, tau_pos=1.0,
                  tau_neg=1.05, policy_loss=PolicyLossConfig(loss_mode=mode, dro_beta=0.1, clip_cov_ratio=0.05,
                                                             kl_cov_ratio=0.05, ppo_kl_coef=0.5),
                  global_batch_info=info,
                  loss_agg_mode="token-mean")
    for k, v in fields.items():
        object.__setattr__(cfg, k, v)
    return cfg


def batch(gen, b=8, length=33):
    old = -torch.rand(b, length, generator=gen, dtype=torch.float64).float() * 3
    logp = old + torch.randn(b, length, generator=gen) * 0.3
    ref = old + torch.randn(b, length, generator=gen) * 0.2
    adv = torch.randn(b, generator=gen)
    mask = (torch.rand(b, length, generator=gen) > 0.2).float()
    mask[1] = 0  # a fully masked sequence
    return old, logp, ref, adv[:, None].expand_as(logp).contiguous(), mask


def close(a, b, rtol=2e-5, atol=2e-6):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))


class Tally:
    def __init__(self):
        self.rows = {}

    def add(self, name, ok, why=""):
        n, good, first = self.rows.get(name, (0, 0, ""))
        self.rows[name] = (n + 1, good + bool(ok), first or ("" if ok else why))


def check_policy_losses(core, tally, gen, batches):
    modes = ["vanilla", "gspo", "sapo", "cispo", "gpg", "dppo_tv", "dppo_kl", "dro", "geo_mean", "clip_cov", "kl_cov"]
    aggs = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
    for _ in range(batches):
        old, logp, _, adv, mask = batch(gen)
        for mode in modes:
            theirs_fn = core.get_policy_loss_fn(mode)
            for agg in aggs:
                info = {"dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": int((mask.sum(-1) > 0).sum())}
                if agg == "seq-mean-token-sum-norm":
                    info["loss_scale_factor"] = 64
                cfg = actor_config(mode, info)
                x = logp.clone().requires_grad_()
                torch.manual_seed(17)  # Clip-Cov's draw (torch.randperm): the same for both
                their_loss, their_metrics = theirs_fn(old, x, adv, mask, agg, cfg)
                their_loss.backward()
                y = logp.clone().requires_grad_()
                torch.manual_seed(17)
                our_loss, our_metrics = rk.verl.compute_policy_loss(old, y, adv, mask, agg, cfg, loss_mode=mode)
                our_loss.backward()
                why = f"loss {float(our_loss.detach()):.7g} vs {float(their_loss.detach()):.7g}"
                ok = close(our_loss, their_loss) and close(y.grad, x.grad, atol=1e-6)
                for k, v in their_metrics.items():
                    if k in our_metrics and not close(our_metrics[k], v, atol=1e-6):
                        ok, why = False, f"{k} {float(our_metrics[k]):.6g} vs {float(v):.6g}"
                tally.add(f"policy loss {mode} / {agg}", ok, why)


def check_agg_and_kl(core, tally, gen, batches):
    for _ in range(batches):
        old, logp, ref, _, mask = batch(gen)
        x = torch.randn(logp.shape, generator=gen)
        for agg in ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]:
            args = dict(dp_size=2, batch_num_tokens=150, global_batch_size=11, loss_scale_factor=40)
            tally.add(f"agg_loss {agg}", close(rk.verl.agg_loss(x, mask, agg, **args), core.agg_loss(x, mask, agg, **args)))
        for kind in ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+"]:
            a = logp.clone().requires_grad_()
            b = logp.clone().requires_grad_()
            ours, theirs = rk.verl.kl_penalty(a, ref, kind), core.kl_penalty(b, ref, kind)
            (ours * mask).sum().backward()
            (theirs * mask).sum().backward()
            tally.add(f"kl_penalty {kind}", close(ours, theirs) and close(a.grad, b.grad))


def check_advantages(core, tally, gen, batches):
    for _ in range(batches):
        # three groups of 6 rollouts and a group of one (verl's convention there: mean 0, std 1)
        sizes = [6, 6, 6, 1]
        index = np.repeat(np.arange(len(sizes)), sizes)
        b = len(index)
        scores = torch.randint(0, 3, (b,), generator=gen).float() / 2
        mask = torch.ones(b, 5)
        token_rewards = torch.zeros(b, 5)
        token_rewards[:, -1] = scores
        ids = torch.as_tensor(index, dtype=torch.int32)
        for name, mode, kwargs in [("grpo", "grpo", {}), ("grpo (norm_adv_by_std_in_grpo=False)", "dr_grpo",
                                                             {"norm_adv_by_std_in_grpo": False}), ("rloo", "rloo", {})]:
            fn = core.compute_rloo_outcome_advantage if mode == "rloo" else core.compute_grpo_outcome_advantage
            theirs, _ = fn(token_rewards, mask, index, epsilon=1e-6, **kwargs)
            ours = rk.group_advantages(scores, group_ids=ids, mode=mode, eps=1e-6, singletons="verl")
            tally.add(f"advantages {name}, a group of one included (singletons='verl')",
                      close(ours, theirs[:, 0], atol=1e-5))


def check_more_advantages(core, tally, gen, batches):
    """verl's Pass@k, OPO, GPG and REINFORCE++ estimators (token level, from an outcome reward on
    each response's last token) against ours (per rollout, from the scores and the response mask)."""
    from types import SimpleNamespace

    for _ in range(batches):
        sizes = [5, 5, 4, 1]
        index = np.repeat(np.arange(len(sizes)), sizes)
        b, length = len(index), 7
        scores = torch.randn(b, generator=gen)
        scores[torch.rand(b, generator=gen) < 0.2] = 0.0  # GPG counts the non-zero scores
        lens = torch.randint(1, length + 1, (b,), generator=gen)
        mask = (torch.arange(length)[None, :] < lens[:, None]).float()
        token_rewards = torch.zeros(b, length)
        token_rewards[torch.arange(b), lens - 1] = scores
        ids = torch.as_tensor(index, dtype=torch.int32)
        cases = [
            ("grpo_passk", "grpo_passk", lambda r, m, i: core.compute_grpo_passk_outcome_advantage(
                r, m, i, epsilon=1e-6, config={"norm_adv_by_std_in_grpo": True})),
            ("grpo_passk (norm_adv_by_std_in_grpo=False)", "dr_grpo_passk",
             lambda r, m, i: core.compute_grpo_passk_outcome_advantage(
                 r, m, i, epsilon=1e-6, config={"norm_adv_by_std_in_grpo": False})),
            ("opo", "opo", lambda r, m, i: core.compute_opo_outcome_advantage(r, m, i, epsilon=1e-6)),
            ("gpg", "gpg", lambda r, m, i: core.compute_gpg_outcome_advantage(r, m, i, epsilon=1e-6)),
            ("reinforce_plus_plus (gamma 1)", "reinforce_plus_plus",
             lambda r, m, i: core.compute_reinforce_plus_plus_outcome_advantage(r, m, config=SimpleNamespace(gamma=1.0))),
            ("reinforce_plus_plus_baseline", "reinforce_plus_plus_baseline",
             lambda r, m, i: core.compute_reinforce_plus_plus_baseline_outcome_advantage(r, m, i, epsilon=1e-6)),
        ]
        for name, mode, theirs_fn in cases:
            keep = slice(0, 14) if mode.endswith("passk") else slice(None)  # verl's Pass@k refuses a group of one
            theirs, _ = theirs_fn(token_rewards[keep].clone(), mask[keep], index[keep])
            ours = rk.group_advantages(scores[keep], group_ids=ids[keep], mode=mode, eps=1e-6, singletons="verl",
                                       response_mask=mask[keep])
            tally.add(f"advantages {name}, a group of one included where verl allows it",
                      close(ours[:, None] * mask[keep], theirs, atol=1e-5))


def check_remax(core, tally, gen, batches):
    """verl's ReMax (the reward-to-go of an outcome reward minus the greedy response's reward, over
    the response mask) against mode="remax" with the baselines."""
    for _ in range(batches):
        b, length = 12, 7
        scores, base = torch.randn(b, generator=gen), torch.randn(b, generator=gen)
        lens = torch.randint(1, length + 1, (b,), generator=gen)
        mask = (torch.arange(length)[None, :] < lens[:, None]).float()
        token_rewards = torch.zeros(b, length)
        token_rewards[torch.arange(b), lens - 1] = scores
        theirs, _ = core.compute_remax_outcome_advantage(token_rewards, base, mask)
        ours = rk.group_advantages(scores, 1, mode="remax", baselines=base)
        tally.add("advantages remax (compute_remax_outcome_advantage)", close(ours[:, None] * mask, theirs,
                                                                              atol=1e-6))


def check_token_baseline(core, tally, gen, batches):
    """verl's optimal token baseline, single-turn and multi-turn (tool-output holes in the mask, a
    fully masked row, a group of one), with and without rollout IS weights and the zero tail,
    against rk.verl's drop-ins of the same name and arguments."""
    fns = {"optimal_token_baseline": ("compute_optimal_token_baseline_advantage", False),
           "tir_optimal_token_baseline": ("compute_multi_turn_optimal_token_baseline_advantage", True)}
    for _ in range(batches):
        b, length = 13, 29
        lens = torch.randint(1, length + 1, (b,), generator=gen)
        mask = (torch.arange(length)[None, :] < lens[:, None]).float()
        mask[2] = 0.0
        rewards = torch.randn(b, length, generator=gen) * (torch.rand(b, length, generator=gen) < 0.3)
        old = -torch.rand(b, length, generator=gen) * 3
        pi = old.exp()  # a real distribution: sum p^2 lies in [pi^2, pi^2 + (1 - pi)^2], so w >= 0
        spp = pi ** 2 + torch.rand(b, length, generator=gen) * (1 - pi) ** 2
        rho = torch.rand(b, length, generator=gen) * 1.5 + 0.2
        index = np.array([f"uid-{i % 4}" for i in torch.randperm(b - 1, generator=gen).tolist()] + ["alone"],
                         dtype=object)
        for name, (fn, multi_turn) in fns.items():
            m = mask * (torch.rand(b, length, generator=gen) > 0.25).float() if multi_turn else mask
            for zero_tail in (False, True, None):  # None: each function's default
                for w in (None, rho):
                    args = (rewards, m, index, old, spp)
                    kw = dict(rollout_is_weights=w) if zero_tail is None else \
                        dict(rollout_is_weights=w, handle_zero_tail=zero_tail)
                    theirs, ours = getattr(core, fn)(*args, **kw), getattr(rk.verl, fn)(*args, **kw)
                    tail = {False: " no zero tail", True: " zero tail", None: " defaults"}[zero_tail]
                    label = f"advantages {name} ({fn}){tail}{' IS weights' if w is not None else ''}"
                    tally.add(label, close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
                              and close(ours[1], theirs[1], rtol=1e-5, atol=1e-5))



def check_gae(core, tally, gen, batches):
    """GAE (adv_estimator=gae): verl's compute_gae_advantage_return against rk.verl's drop-in of the
    same name and arguments, on padded batches with tool-output holes and a fully masked row, at
    verl's defaults and PPO's usual gamma and lam."""
    for _ in range(batches):
        b, length = 11, 41
        lens = torch.randint(1, length + 1, (b,), generator=gen)
        mask = (torch.arange(length)[None, :] < lens[:, None]).float()
        mask = mask * (torch.rand(b, length, generator=gen) > 0.2).float()
        mask[3] = 0.0
        rewards = torch.randn(b, length, generator=gen) * (torch.rand(b, length, generator=gen) < 0.1)
        values = torch.randn(b, length, generator=gen)
        for gamma, lam in ((1.0, 1.0), (0.99, 0.95)):
            theirs = core.compute_gae_advantage_return(rewards, values, mask, torch.tensor(gamma), torch.tensor(lam))
            ours = rk.verl.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
            tally.add(f"advantages gae (compute_gae_advantage_return) gamma {gamma} lam {lam}",
                      close(ours[0], theirs[0], rtol=1e-5, atol=1e-5) and close(ours[1], theirs[1], rtol=1e-5, atol=1e-5))

def check_recap(core, tally, gen, batches):
    """RECAP's reward weights (adv_estimator=recap): after each step's observation the advantages
    equal verl's compute_grpo_outcome_advantage on the score sum_k lambda_k r_k, lambda from an
    independent scheduler fed the same per-key means."""
    from recap_kernels import verl_recap

    verl_recap.reset_recap_state()
    config = {"recap": {"reward_keys": ["format", "accuracy"], "window": 2}}
    replica = rk.RecapWeights(["reward", "reward"], window=2)
    for step in range(batches):
        sizes = [5, 5, 5, 1]
        index = np.repeat(np.array([f"u{i}" for i in range(len(sizes))], dtype=object), sizes)
        b, length = len(index), 9
        cols = {"format": (torch.rand(b, generator=gen) < 0.3 + 0.03 * step).double().numpy(),
                "accuracy": torch.rand(b, generator=gen).double().numpy()}
        lens = torch.randint(1, length + 1, (b,), generator=gen)
        mask = (torch.arange(length)[None, :] < lens[:, None]).float()
        ours, _ = verl_recap.compute_recap_outcome_advantage(torch.zeros(b, length), mask, index, config=config,
                                                             non_tensor_batch=cols)
        replica.observe([float(cols[k].mean()) for k in ("format", "accuracy")])
        lam = replica.weights()
        token_rewards = torch.zeros(b, length)
        token_rewards[torch.arange(b), lens - 1] = torch.as_tensor(cols["format"] * lam[0] + cols["accuracy"] * lam[1],
                                                                   dtype=torch.float32)
        theirs, _ = core.compute_grpo_outcome_advantage(token_rewards, mask, index, epsilon=1e-6)
        tally.add("advantages recap (reward weights, then verl's grpo on sum_k lambda_k r_k)",
                  close(ours, theirs, atol=1e-5))
    verl_recap.reset_recap_state()


def check_rollout_rejection(tally, gen, batches):
    """verl's compute_rollout_rejection_mask (rollout_corr_helper) against ours: the new mask and the
    fraction metrics verl reports, for single and chained options."""
    from verl.trainer.ppo import rollout_corr_helper as rch

    cases = [("token_k1", "0.8_1.25"), ("token_k2", "0.02"), ("token_k3", "0.02"), ("seq_sum_k1", "0.5_2.0"),
             ("seq_sum_k3", "0.3"), ("seq_mean_k2", "0.01"), ("seq_mean_k3", "0.01"), ("seq_max_k2", "0.1"),
             ("seq_max_k3", "0.1"), ("token_k1,seq_mean_k3,seq_max_k2", "1.3,0.012,0.1")]
    for _ in range(batches):
        old, _, _, _, mask = batch(gen)
        lr = torch.randn(old.shape, generator=gen) * 0.15
        for rs, th in cases:
            theirs, their_metrics = rch.compute_rollout_rejection_mask(lr, mask, rs, th)
            ours, our_metrics = rk.verl.compute_rollout_rejection_mask(lr, mask, rs, th)
            ok, why = close(ours, theirs), "mask"
            for k, v in our_metrics.items():
                if k not in their_metrics or not close(v, their_metrics[k], atol=1e-6):
                    ok, why = False, f"{k} {float(v):.6g} vs {their_metrics.get(k)}"
            tally.add(f"rollout rejection {rs}", ok, why)


def check_rollout_is(tally, gen, batches):
    """verl's compute_rollout_correction_weights (rollout_corr_helper) against ours: the weights
    (token and sequence level, truncated and IcePop, with and without rollout_is_batch_normalize) and
    every metric verl reports."""
    from verl.trainer.ppo import rollout_corr_helper as rch

    cases = [(level, th, norm) for level in ("token", "sequence") for th in (2.0, "1.5", "0.5_2.0")
             for norm in (False, True)]
    for _ in range(batches):
        old, _, _, _, mask = batch(gen)
        noise = torch.randn(old.shape, generator=gen)
        for level, th, norm in cases:
            lr = noise * (0.4 if level == "token" else 0.15)  # both levels beyond the bounds at times
            theirs, their_metrics = rch.compute_rollout_correction_weights(lr, mask, level, th, norm)
            ours, our_metrics = rk.verl.compute_rollout_correction_weights(lr, mask, level, th, norm)
            ok, why = close(ours, theirs), "weights"
            missing = set(their_metrics) - set(our_metrics)
            if missing:
                ok, why = False, f"metrics not computed: {sorted(missing)}"
            for k, v in our_metrics.items():
                if k not in their_metrics or not close(v, their_metrics[k], rtol=1e-4, atol=1e-6):
                    ok, why = False, f"{k} {float(v):.6g} vs {their_metrics.get(k)}"
            tally.add(f"rollout IS weights {level} {th}{' normalized' if norm else ''}", ok, why)


def older_verl_rollout_corr_helper():
    """verl 0.7's rollout_corr_helper (the older API, with rollout_token_veto_threshold), loaded from
    the copy that scripts/peer-check.sh installs beside the current verl ($RECAP_OLD_VERL); its
    imports resolve to the current verl."""
    import importlib.util
    import os

    root = os.environ.get("RECAP_OLD_VERL")
    if not root:
        raise RuntimeError("RECAP_OLD_VERL is not set (scripts/peer-check.sh sets it)")
    path = os.path.join(root, "verl", "trainer", "ppo", "rollout_corr_helper.py")
    spec = importlib.util.spec_from_file_location("verl_older_rollout_corr_helper", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_token_veto(tally, gen, batches):
    """The older verl API's veto: verl 0.7's compute_rollout_correction_and_rejection_mask (no IS
    weights, no rollout_rs) against ours, the new mask and the two veto metrics; alone and after a
    current rollout_rs option (verl 0.7 cannot chain that, so the chain is checked as the product
    of verl 0.7's veto mask and the current verl's rollout_rs mask)."""
    name = "older verl API: rollout_token_veto_threshold"
    try:
        old_rch = older_verl_rollout_corr_helper()
        from verl.trainer.ppo import rollout_corr_helper as rch
    except Exception as e:
        tally.add(name, False, f"not importable: {e}")
        return
    for _ in range(batches):
        old, _, _, _, mask = batch(gen)
        rollout = old + torch.randn(old.shape, generator=gen) * 0.3
        lr = old - rollout
        for t in (0.5, 0.7):
            _, theirs, their_metrics = old_rch.compute_rollout_correction_and_rejection_mask(
                old, rollout, mask, rollout_is=None, rollout_rs=None, rollout_token_veto_threshold=t)
            ours, our_metrics = rk.verl.compute_rollout_rejection_mask(lr, mask, None, None,
                                                                       rollout_token_veto_threshold=t)
            ok, why = close(ours, theirs), "mask"
            for k in ("rollout_is_veto_fraction", "rollout_is_catastrophic_token_fraction"):
                theirs_k = their_metrics.get(f"rollout_corr/{k}", their_metrics.get(k))
                if theirs_k is None or not close(our_metrics[k], theirs_k, atol=1e-6):
                    ok, why = False, f"{k} {float(our_metrics[k]):.6g} vs {theirs_k}"
            tally.add(name, ok, why)
            chained, _ = rk.verl.compute_rollout_rejection_mask(lr, mask, "seq_mean_k3", "0.05",
                                                                rollout_token_veto_threshold=t)
            rs_mask, _ = rch.compute_rollout_rejection_mask(lr, mask, "seq_mean_k3", "0.05")
            tally.add(name + " after seq_mean_k3", close(chained, theirs * rs_mask))


def check_fused_linear(tally, gen, batches):
    """rk.verl.FusedLinearForPPO against verl's (use_fused_kernels=True, impl_backend torch): log-probs,
    entropies and both gradients, float32, 2-D and 3-D, several chunks."""
    from verl.utils.experimental.torch_functional import FusedLinearForPPO

    name = "verl FusedLinearForPPO (log_probs, entropy, d_hidden, d_weight)"
    for i in range(batches):
        shape = (int(torch.randint(1, 70, (1,), generator=gen)),) if i % 2 else (3, 1 + i)
        h, v = 16, int(torch.randint(2, 90, (1,), generator=gen))
        hidden = torch.randn(*shape, h, generator=gen)
        weight = torch.randn(v, h, generator=gen) * 0.4
        ids = torch.randint(0, v, shape, generator=gen)
        tau = float(torch.rand((), generator=gen)) + 0.5
        seeds = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        outs = []
        for module in (rk.verl.FusedLinearForPPO(chunk_size=7), FusedLinearForPPO(chunk_size=7)):
            x, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
            logp, ent = module(x, w, ids, temperature=tau)
            ((logp * seeds[0]).sum() + (ent * seeds[1]).sum()).backward()
            outs.append((logp.detach(), ent.detach(), x.grad, w.grad))
        bad = [k for k, a, b in zip(("log_probs", "entropy", "d_hidden", "d_weight"), *outs)
               if not close(a, b, rtol=1e-5, atol=2e-5)]
        tally.add(name, not bad, f"{bad} differ")


def check_trl(tally, gen, batches):
    try:
        from trl.trainer.grpo_trainer import GRPOTrainer
    except Exception as e:  # TRL needs more of its dependencies than this check installs
        tally.add("TRL off-policy mask (GRPOTrainer.get_off_policy_mask)", False, f"not importable: {e}")
        return
    for _ in range(batches):
        old, logp, _, adv, mask = batch(gen)
        rollout = old + torch.randn(old.shape, generator=gen) * 0.3
        theirs = GRPOTrainer.get_off_policy_mask(adv[:, :1], logp, rollout, mask, 0.05)  # TRL's [B, 1]
        ours = rk.trl.off_policy_mask(adv[:, 0], logp, rollout, mask, 0.05)
        tally.add("TRL off-policy mask (GRPOTrainer.get_off_policy_mask)", close(ours, theirs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    from verl.trainer.ppo import core_algos as core

    import verl
    gen = torch.Generator().manual_seed(0)
    tally = Tally()
    check_policy_losses(core, tally, gen, args.batches)
    check_agg_and_kl(core, tally, gen, args.batches)
    check_advantages(core, tally, gen, args.batches)
    check_more_advantages(core, tally, gen, args.batches)
    check_remax(core, tally, gen, args.batches)
    check_token_baseline(core, tally, gen, args.batches)
    check_gae(core, tally, gen, args.batches)
    check_recap(core, tally, gen, args.batches)
    check_rollout_rejection(tally, gen, args.batches)
    check_rollout_is(tally, gen, args.batches)
    check_token_veto(tally, gen, args.batches)
    check_fused_linear(tally, gen, args.batches)
    check_trl(tally, gen, args.batches)
    failed = 0
    print(f"peer check: verl {verl.__version__}, recap_kernels {rk.__version__}, {args.batches} batches per check")
    for name, (n, good, why) in tally.rows.items():
        failed += good < n
        print(f"{'ok      ' if good == n else 'MISMATCH'} {good:3d}/{n:<3d} {name}" + (f"  (first: {why})" if why else ""))
    print(f"peer check: {len(tally.rows) - failed} of {len(tally.rows)} checks agree on every batch")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: {"batches": n, "agree": g, "first_mismatch": w} for k, (n, g, w) in tally.rows.items()}, f,
                      indent=1)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
