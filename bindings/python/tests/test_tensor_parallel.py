"""Tensor (vocabulary) parallelism over torch.distributed (gloo, CPU), 2 and 4 processes this test
spawns: log-probabilities and entropy equal the whole vocabulary's (the same bits on every rank),
each shard's gradient equals its slice of the whole gradient; V not divisible by the ranks, labels in
every shard and ignored, a temperature; the loss from sharded logits and the sharded-head fused-linear
loss against their unsharded forms; the combine is the same for every order of arrival."""
import itertools
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import recap_kernels as rk
import recap_kernels.tensor_parallel as tp

T, V, H = 33, 37, 8
TEMPERATURE = 0.8


def shard_range(v, p, r):
    base, extra = divmod(v, p)
    start = r * base + min(r, extra)
    return start, start + base + (r < extra)


def data():
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(T, V, generator=g) * 3
    labels = torch.randint(0, V, (T,), generator=g)
    labels[[4, 11]] = -100
    # a label in every shard of every split tried
    labels[:8] = torch.tensor([0, 5, 10, 15, 20, 25, 30, 36])
    labels[4] = -100
    g1, g2 = torch.randn(T, generator=g), torch.randn(T, generator=g)
    old = -torch.rand(T, generator=g) * 3 - 1
    g3 = torch.randn(T, generator=torch.Generator().manual_seed(22))
    adv = torch.randn(3, generator=g)
    hidden = torch.randn(T, H, generator=g) * 0.5
    weight = torch.randn(V, H, generator=g) * 0.5
    return logits, labels, g1, g2, old, adv, hidden, weight, g3


CU = [0, 10, 20, T]


def worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        logits, labels, g1, g2, old, adv, hidden, weight, g3 = data()
        a, b = shard_range(V, world, rank)
        res = {}
        z = logits[:, a:b].clone().requires_grad_()
        logp, ent, spp = tp.logprobs_from_logits(z * 1.0, labels, a, temperature=TEMPERATURE,
                                                 return_sum_pi_squared=True)
        ((logp * g1).sum() + (ent * g2).sum() + (spp * g3).sum()).backward()
        res["logp"], res["entropy"], res["spp"], res["grad"] = logp.detach(), ent.detach(), spp.detach(), z.grad
        z0 = logits[:, a:b].clone().requires_grad_()
        lp0, ent0 = tp.logprobs_from_logits(z0 * 1.0, labels, a, temperature=TEMPERATURE)
        ((lp0 * g1).sum() + (ent0 * g2).sum()).backward()
        res["logp0"], res["grad0"] = lp0.detach(), z0.grad
        z2 = logits[:, a:b].clone().requires_grad_()
        loss, m = tp.grpo_loss_from_logits(z2 * 1.0, labels, a, old, adv, torch.ones(T), CU, temperature=TEMPERATURE,
                                           entropy_coef=0.01, kl_coef=0.0)
        loss.backward()
        res["loss"], res["loss_grad"], res["entropy_metric"] = loss.detach(), z2.grad, m["actor/entropy"]
        x = hidden.clone().requires_grad_()
        w = weight[a:b].clone().requires_grad_()
        fl, _ = tp.fused_linear_grpo_loss(x, w, a, labels, old, adv, torch.ones(T), CU, chunk_tokens=7,
                                          temperature=TEMPERATURE)
        fl.backward()
        res["fl"], res["fl_hidden"], res["fl_weight"] = fl.detach(), x.grad, w.grad
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_vocabulary_matches_the_whole(world):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(world, free_port(), d), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(world)]
    logits, labels, g1, g2, old, adv, hidden, weight, g3 = data()
    # the whole vocabulary, unsharded
    z = logits.clone().requires_grad_()
    logp, ent, spp = rk.logprobs_from_logits(z * 1.0, labels, temperature=TEMPERATURE, return_sum_pi_squared=True)
    ((logp * g1).sum() + (ent * g2).sum() + (spp * g3).sum()).backward()
    z0 = logits.clone().requires_grad_()
    lp0, ent0 = rk.logprobs_from_logits(z0 * 1.0, labels, temperature=TEMPERATURE)
    ((lp0 * g1).sum() + (ent0 * g2).sum()).backward()
    z2 = logits.clone().requires_grad_()
    loss, m = rk.grpo_loss_from_logits(z2 * 1.0, labels, old, adv, torch.ones(T), CU, temperature=TEMPERATURE,
                                       entropy_coef=0.01)
    loss.backward()
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp = torch.log_softmax((x @ w.T) / TEMPERATURE, -1).gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    fl, _ = rk.grpo_loss(lp, old, adv, (labels != -100).float(), CU)
    fl.backward()
    for r, res in enumerate(ranks):
        a, b = shard_range(V, world, r)
        # every rank the same bits
        assert torch.equal(res["logp"], ranks[0]["logp"]) and torch.equal(res["entropy"], ranks[0]["entropy"])
        torch.testing.assert_close(res["logp"], logp.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res["entropy"], ent.detach(), rtol=1e-5, atol=1e-5)
        assert torch.equal(res["spp"], ranks[0]["spp"])
        torch.testing.assert_close(res["spp"], spp.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(res["grad"], z.grad[:, a:b], rtol=1e-4, atol=1e-6)
        # without Σπ²: the same log-probs, and the gradient without its term
        assert torch.equal(res["logp0"], res["logp"])
        torch.testing.assert_close(res["grad0"], z0.grad[:, a:b], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(res["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["loss_grad"], z2.grad[:, a:b], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(res["entropy_metric"].float(), m["actor/entropy"].float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["fl"], fl.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["fl_hidden"], x.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(res["fl_weight"], w.grad[a:b], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("planes", [3, 4])
def test_the_combine_is_the_same_for_every_order_of_arrival(planes):
    logits, labels, *_ = data()
    y = labels.to(torch.int32)
    packed = []
    for r in range(4):
        a, b = shard_range(V, 4, r)
        part = torch.ops.recap.tp_partials(logits[:, a:b].contiguous(), y, a, TEMPERATURE, -100, planes == 4)
        assert part.shape == (planes, T)
        packed.append(tp.pack(part, a))
    first = tp.combine(torch.stack(packed), y, planes=planes)
    assert len(first) == planes
    for perm in itertools.permutations(range(4)):
        got = tp.combine(torch.stack([packed[i] for i in perm]), y, planes=planes)
        for g, f in zip(got, first):
            assert torch.equal(g, f), perm


def test_a_label_in_no_shard_is_an_error():
    logits, labels, *_ = data()
    y = labels.to(torch.int32).clone()
    y[0] = V + 5
    part = torch.ops.recap.tp_partials(logits.contiguous(), y, 0, 1.0, -100)
    with pytest.raises(rk.RecapError, match="no shard"):
        tp.combine(tp.pack(part, 0)[None], y)


def test_opcheck_tensor_parallel_ops():
    from torch.library import opcheck

    logits, labels, *_ = data()
    y = labels.to(torch.int32)
    part = torch.ops.recap.tp_partials(logits[:, :20].contiguous(), y, 0, 1.0, -100)
    rest = torch.ops.recap.tp_partials(logits[:, 20:].contiguous(), y, 20, 1.0, -100)
    opcheck(torch.ops.recap.tp_partials.default, (logits[:, :20].contiguous(), y, 0, 1.0, -100))
    opcheck(torch.ops.recap.tp_combine.default, (torch.stack([part, rest]), y, -100))
    _, ent, lse, none = torch.ops.recap.tp_combine(torch.stack([part, rest]), y, -100)
    assert none.numel() == 0
    opcheck(torch.ops.recap.tp_backward_.default, (logits[:, :20].contiguous(), y, 0, lse, ent, torch.randn(T),
                                                   torch.randn(T), 1.0, -100))
    # with Σπ²: 4 planes, the combined value and its gradient
    part4 = torch.ops.recap.tp_partials(logits[:, :20].contiguous(), y, 0, 1.0, -100, True)
    rest4 = torch.ops.recap.tp_partials(logits[:, 20:].contiguous(), y, 20, 1.0, -100, True)
    opcheck(torch.ops.recap.tp_partials.default, (logits[:, :20].contiguous(), y, 0, 1.0, -100, True))
    opcheck(torch.ops.recap.tp_combine.default, (torch.stack([part4, rest4]), y, -100))
    _, ent, lse, spp = torch.ops.recap.tp_combine(torch.stack([part4, rest4]), y, -100)
    opcheck(torch.ops.recap.tp_backward_.default, (logits[:, :20].contiguous(), y, 0, lse, ent, torch.randn(T),
                                                   torch.randn(T), 1.0, -100, spp, torch.randn(T)))
