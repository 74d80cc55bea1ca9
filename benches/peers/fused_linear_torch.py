"""Unfused PyTorch baseline for the fused-linear GRPO loss (the shape of `recap bench`'s
fused-linear case): logits = hidden @ W^T in bf16, verl-style log_softmax(logits.float()).gather plus
entropy, verl's clipped surrogate (compute_policy_loss_vanilla, dual-clip 3.0, clamp 20) aggregated
token-mean, then autograd back to hidden and W. Prints median time over timed runs (CUDA events,
after warm-up) and the peak memory allocated beyond the inputs, parameters and their gradients.

    python3 benches/peers/fused_linear_torch.py [T H V]
"""
import sys

import torch


def grpo_loss(hidden, weight, labels, old_logp, adv, mask, temperature=1.0, clip=0.2, clip_c=3.0):
    logits = (hidden @ weight.T).float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    neg_kl = torch.clamp(logp - old_logp, -20.0, 20.0)
    ratio = torch.exp(neg_kl)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - clip, 1 + clip)
    clipped = torch.maximum(l1, l2)
    l3 = -adv * clip_c
    pg = torch.where(adv < 0, torch.minimum(l3, clipped), clipped)
    loss = (pg * mask).sum() / mask.sum()
    return loss, (entropy.detach() * mask).sum() / mask.sum()


def main():
    t, h, v = (int(x) for x in sys.argv[1:4]) if len(sys.argv) >= 4 else (8192, 4096, 151936)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = (torch.randn(t, h, device=dev, generator=g) * 0.02).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device=dev, generator=g) * 0.02).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, v, (t,), device=dev, generator=g)
    old_logp = torch.full((t,), -12.0, device=dev)
    adv = torch.randn(t, device=dev, generator=g)
    mask = torch.ones(t, device=dev)
    # the gradients' own storage is allocated once, before the baseline
    hidden.grad = torch.zeros_like(hidden)
    weight.grad = torch.zeros_like(weight)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()

    def step():
        hidden.grad = None
        weight.grad = None
        loss, _ = grpo_loss(hidden, weight, labels, old_logp, adv, mask)
        loss.backward()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    peak = torch.cuda.max_memory_allocated() - base
    print(f"torch unfused T={t} H={h} V={v} bf16: median {times[len(times) // 2]:.2f} ms, "
          f"min {times[0]:.2f} ms, peak extra memory {peak / 2**20:.1f} MiB (torch {torch.__version__})")


if __name__ == "__main__":
    main()
