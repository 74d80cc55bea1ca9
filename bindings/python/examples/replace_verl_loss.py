"""Replacing verl's policy loss (and TRL's GRPO loss) by recap-kernels in a small training loop, on
the GPU when there is one (else the CPU reference, the same ops):

    pip install ./bindings/python
    python bindings/python/examples/replace_verl_loss.py

verl, before (verl.trainer.ppo.core_algos):
    pg_loss, pg_metrics = compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask,
                                                      loss_agg_mode, config)
after (same signature, formulas, defaults and metric names; the gradient comes from the same pass):
    from recap_kernels import verl as rk_verl
    pg_loss, pg_metrics = rk_verl.compute_policy_loss_vanilla(old_log_prob, log_prob, advantages,
                                                              response_mask, loss_agg_mode, config)
or, with rk_verl.register(), `actor.policy_loss.loss_mode=recap_vanilla` in verl's config.

TRL (GRPOTrainer, loss_type="dapo", epsilon_high=0.28, beta=0.04):
    loss, metrics = rk_trl.grpo_loss(per_token_logps, old_per_token_logps, advantages, completion_mask,
                                     ref_per_token_logps, loss_type="dapo", beta=0.04, epsilon_high=0.28)
"""
import torch

import recap_kernels as rk
from recap_kernels import verl as rk_verl


def main():
    dev = torch.device("cuda" if torch.cuda.is_available() and rk.KERNELS_COMPILED else "cpu")
    torch.manual_seed(0)
    b, l, v, h = 8, 32, 512, 64
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    head = torch.nn.Linear(h, v, bias=False, device=dev, dtype=dtype)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    feats = torch.randn(b, l, h, device=dev, dtype=dtype)
    labels = torch.randint(0, v, (b, l), device=dev)
    mask = torch.ones(b, l, device=dev)
    mask[:, 28:] = 0  # padding
    with torch.no_grad():
        old = rk.logprobs_from_logits(head(feats), labels, entropy=False)
    ref = old.clone()
    # two objectives: a reward per rollout and a second one; RECAP weighs them from their progress
    adv = torch.randn(b, 2, device=dev)
    weights = rk.RecapWeights(["reward", "reward"])
    config = {"clip_ratio": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0}
    for step in range(5):
        logits = head(feats)
        logp, entropy = rk.logprobs_from_logits(logits, labels)  # backward writes over the logits
        # verl's own signature, one objective:
        pg_loss, pg_metrics = rk_verl.compute_policy_loss_vanilla(old, logp, adv[:, :1].expand(b, l), mask,
                                                                  "token-mean", config)
        # the multi-objective fused loss with RECAP's weights and a KL term:
        loss, metrics = rk.grpo_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=0.01, lambda_=weights.tensor(),
                                     clip_high=0.28, objective_names=["format", "accuracy"])
        opt.zero_grad()
        (loss - 0.001 * (entropy * mask).sum() / mask.sum()).backward()
        opt.step()
        weights.observe([1.0 + 0.1 * step, 1.0])
        print(f"step {step}: verl pg_loss {pg_loss.item():.4f} clipfrac {float(pg_metrics['actor/pg_clipfrac']):.3f}"
              f" | fused loss {loss.item():.4f} ppo_kl {float(metrics['actor/ppo_kl']):.2e}"
              f" pg_loss per objective {[round(x, 4) for x in metrics['actor/pg_loss'].tolist()]}")


if __name__ == "__main__":
    main()
