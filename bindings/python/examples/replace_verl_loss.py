"""Replacing verl's `compute_policy_loss` + `agg_loss` (and TRL's GRPO loss) by the fused kernel in a
training loop. Needs a CUDA device and the built library (cargo build --release).

verl, before:
    pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower = compute_policy_loss(
        old_log_prob, log_prob, advantages, response_mask, cliprange_low=0.2, cliprange_high=0.2,
        clip_ratio_c=3.0, loss_agg_mode="token-mean")
    kl = kl_penalty(log_prob, ref_log_prob, "low_var_kl"); loss = pg_loss + beta * agg_loss(kl, ...)

after (one fused call, same formulas and defaults, gradient computed in the same pass):
    loss, metrics = grpo_loss(log_prob, old_log_prob, advantages, response_mask,
                              ref_logp=ref_log_prob, kl_coef=beta)

TRL's GRPOTrainer (loss_type="dapo", epsilon_high=0.28, beta=0.04):
    loss, metrics = grpo_loss(per_token_logps, old_per_token_logps, advantages, completion_mask,
                              ref_logp=ref_per_token_logps, clip_ratio_high=0.28, clip_ratio_c=None,
                              kl_coef=0.04, kl_loss_type="k3")
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from recap_kernels import RecapWeights, grpo_loss, logprobs_from_logits  # noqa: E402


def main():
    torch.manual_seed(0)
    b, l, v, h = 8, 64, 4096, 256
    head = torch.nn.Linear(h, v, bias=False, device="cuda", dtype=torch.bfloat16)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    feats = torch.randn(b, l, h, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, v, (b, l), device="cuda")
    mask = torch.ones(b, l, device="cuda")
    with torch.no_grad():
        old = logprobs_from_logits(head(feats).view(-1, v), labels.view(-1), entropy=False).view(b, l)
    adv = torch.randn(b, device="cuda")
    weights = RecapWeights(["reward"])  # one objective here; RECAP shifts weight between several
    for step in range(3):
        logits = head(feats).view(-1, v)
        logp, entropy = logprobs_from_logits(logits, labels.view(-1))  # gradient written over logits
        loss, metrics = grpo_loss(logp.view(b, l), old, adv, mask, lambda_=weights.weights())
        opt.zero_grad()
        loss.backward()
        opt.step()
        weights.observe([float(adv.mean().abs()) + 1.0])
        print(f"step {step}: loss {loss.item():.4f} ppo_kl {metrics['actor/ppo_kl']:.2e} "
              f"entropy {entropy.mean().item():.3f}")


if __name__ == "__main__":
    main()
