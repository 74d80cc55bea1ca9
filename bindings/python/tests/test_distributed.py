"""Data parallelism over torch.distributed (gloo, CPU): two ranks, each with its own sequences,
normalized by the whole batch's counts (one all_reduce): each rank's gradient is its slice of the
whole batch's gradient and the ranks' losses sum to the whole batch's loss; rollout IS weights
normalized over the ranks are the whole batch's."""
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import recap_kernels as rk

WORLD = 2
AGG = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]


def whole_batch():
    g = torch.Generator().manual_seed(99)
    b, l = 6, 13
    old = -torch.rand(b, l, generator=g) * 3
    logp = old + torch.randn(b, l, generator=g) * 0.3
    ref = old - 0.1 * torch.rand(b, l, generator=g)
    adv = torch.randn(b, generator=g)
    mask = torch.rand(b, l, generator=g) > 0.3
    mask[1] = False
    mask[4, 6:] = False  # ranks with different token counts
    return old, logp, ref, adv, mask


def rank_slice(rank):
    return slice(rank * 3, rank * 3 + 3)


def worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        old, logp, ref, adv, mask = (x[rank_slice(rank)] for x in whole_batch())
        results = {}
        for agg in AGG:
            norms = rk.distributed.global_normalizers(mask)
            x = logp.clone().requires_grad_()
            loss, _ = rk.grpo_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.1, agg_mode=agg, normalizers=norms)
            loss.backward()
            results[agg] = (loss.detach(), x.grad, norms)
            # DDP/FSDP average gradients: mean_reduced normalizers make that average the batch's gradient
            mean = rk.distributed.global_normalizers(mask, mean_reduced=True)
            y = logp.clone().requires_grad_()
            loss_m, _ = rk.grpo_loss(y, old, adv, mask, ref_logp=ref, kl_coef=0.1, agg_mode=agg, normalizers=mean)
            loss_m.backward()
            results[agg + "/mean"] = (loss_m.detach(), y.grad, mean)
        for level in ["token", "sequence"]:
            results["rollout_is/" + level] = rk.distributed.rollout_is_weights(old - logp, mask, rollout_is=level)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_two_ranks_reproduce_the_whole_batch():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(free_port(), d), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(WORLD)]
    old, logp, ref, adv, mask = whole_batch()
    for agg in AGG:
        x = logp.clone().requires_grad_()
        want, _ = rk.grpo_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.1, agg_mode=agg)
        want.backward()
        total = sum(r[agg][0] for r in ranks)
        torch.testing.assert_close(total, want, rtol=1e-6, atol=1e-7)
        for rank, r in enumerate(ranks):
            torch.testing.assert_close(r[agg][1], x.grad[rank_slice(rank)], rtol=1e-6, atol=1e-8)
            torch.testing.assert_close(r[agg][2], rk.count_normalizers(mask)[0])
            # mean_reduced: each rank's gradient is WORLD times its slice, so that the average over
            # the ranks (what DDP / FSDP compute for shared parameters) is the whole batch's gradient
            torch.testing.assert_close(r[agg + "/mean"][1], WORLD * x.grad[rank_slice(rank)], rtol=1e-6, atol=1e-8)
    # rollout IS weights normalized over the whole batch (verl's distributed_masked_mean): each rank's
    # weights are its slice of the whole batch's (to the rounding of the factor) and the stats the whole batch's
    for level in ["token", "sequence"]:
        want, stats = rk.rollout_is_weights(old - logp, mask, rollout_is=level, rollout_is_batch_normalize=True)
        assert float(stats["factor"]) != 1.0
        for rank, r in enumerate(ranks):
            w, st = r["rollout_is/" + level]
            torch.testing.assert_close(w, want[rank_slice(rank)], rtol=3e-7, atol=0.0)
            torch.testing.assert_close(st["factor"], stats["factor"], rtol=1e-12, atol=0.0)
            torch.testing.assert_close(st["units"], stats["units"])
