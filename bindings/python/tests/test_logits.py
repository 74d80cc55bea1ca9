"""Log-probabilities and entropy from logits against autograd through log_softmax; the in-place
backward; the loss from logits and the fused-linear loss against their unfused PyTorch forms."""
import pytest
import torch

import recap_kernels as rk
from reference import agg_loss, trl_multi_objective, verl_outcome_advantages, verl_vanilla


def torch_logprobs(logits, labels, temperature, ignore_index=-100):
    ls = torch.log_softmax(logits.float() / temperature, -1)
    valid = labels != ignore_index
    lp = ls.gather(-1, labels.clamp(min=0).long()[:, None]).squeeze(-1) * valid
    return lp, -(ls.exp() * ls).sum(-1)


@pytest.mark.parametrize("dtype,temperature", [(torch.float32, 1.0), (torch.float32, 0.7), (torch.bfloat16, 1.0),
                                               (torch.float16, 1.3)])
@pytest.mark.parametrize("t", [1, 31, 33])
def test_logprobs_match_log_softmax(device, gen, dtype, temperature, t):
    v = 1031
    logits = (torch.randn(t, v, generator=gen) * 3).to(dtype).to(device)
    labels = torch.randint(0, v, (t,), generator=gen).to(device)
    labels[t // 2] = -100
    g_lp, g_h = torch.randn(t, generator=gen).to(device), torch.randn(t, generator=gen).to(device)
    for inplace in (False, True):
        z = logits.clone().requires_grad_()
        lp, h = rk.logprobs_from_logits(z * 1, labels, temperature=temperature, inplace_backward=inplace)
        ((lp * g_lp).sum() + (h * g_h).sum()).backward()
        x = logits.clone().requires_grad_()
        want_lp, want_h = torch_logprobs(x, labels, temperature)
        ((want_lp * g_lp).sum() + (want_h * g_h).sum()).backward()
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(lp, want_lp, **tol)
        torch.testing.assert_close(h, want_h, **tol)
        torch.testing.assert_close(z.grad.float(), x.grad.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1e-3, 0.05, 1.0, 50.0])
@pytest.mark.parametrize("inplace", [False, True])
def test_sum_pi_squared_matches_log_softmax(device, gen, dtype, temperature, inplace):
    """``return_sum_pi_squared``: sum_j p_j^2 against exp(2 log_softmax) summed in float64 (tiny and
    large temperatures, ignored labels: every row has one), its gradient with the log-prob and
    entropy terms through the same backward, and the other outputs' values unchanged by asking."""
    t, v = 33, 1031
    logits = (torch.randn(t, v, generator=gen) * 3).to(dtype).to(device)
    labels = torch.randint(0, v, (t,), generator=gen).to(device)
    labels[::4] = -100
    g_lp, g_h, g_s = (torch.randn(t, generator=gen).to(device) for _ in range(3))
    z = logits.clone().requires_grad_()
    lp, h, spp = rk.logprobs_from_logits(z * 1, labels, temperature=temperature, inplace_backward=inplace,
                                         return_sum_pi_squared=True)
    ((lp * g_lp).sum() + (h * g_h).sum() + (spp * g_s).sum()).backward()
    x = logits.double().clone().requires_grad_()
    ls = torch.log_softmax(x / temperature, -1)
    want_spp = (2 * ls).exp().sum(-1)
    torch.testing.assert_close(want_spp, (torch.logsumexp(2 * x / temperature, -1)
                                          - 2 * torch.logsumexp(x / temperature, -1)).exp())
    want_lp = ls.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1) * (labels != -100)
    want_h = -(ls.exp() * ls).sum(-1)
    ((want_lp * g_lp.double()).sum() + (want_h * g_h.double()).sum() + (want_spp * g_s.double()).sum()).backward()
    torch.testing.assert_close(spp.double(), want_spp, rtol=1e-5, atol=1e-7)
    assert spp.shape == lp.shape and bool((spp > 0).all()) and bool((spp <= 1 + 1e-6).all())
    plain_lp, plain_h = rk.logprobs_from_logits(logits, labels, temperature=temperature)
    assert torch.equal(plain_lp, lp.detach()) and torch.equal(plain_h, h.detach())
    # the gradient: exact in f32 up to the row statistics, in half precision one rounding of it,
    # relative to the row's largest; below the dtype's resolution (probabilities under f32's range
    # at tiny temperatures, f16's subnormals) absolute
    f32 = dtype == torch.float32
    scale = x.grad.abs().amax(-1, keepdim=True) + (1e-6 if f32 else 1e-4)
    tol = 1e-4 if f32 else 1e-2
    err = ((z.grad.double() - x.grad) / scale).abs().amax()
    assert err < tol, f"gradient error {err:.3g} of the row's largest"
    # spp alone takes part in the backward only where it has a gradient
    z2 = logits.clone().requires_grad_()
    lp2, spp2 = rk.logprobs_from_logits(z2 * 1, labels, temperature=temperature, entropy=False,
                                        return_sum_pi_squared=True)
    (lp2 * g_lp).sum().backward()
    z3 = logits.clone().requires_grad_()
    (rk.logprobs_from_logits(z3 * 1, labels, temperature=temperature, entropy=False) * g_lp).sum().backward()
    assert torch.equal(z2.grad, z3.grad)


def test_inplace_backward_writes_over_the_logits(device):
    t, v = 8, 100
    w = torch.randn(t, v, device=device, requires_grad=True)
    logits = w * 2.0  # non-leaf, as an LM head's output
    ptr = logits.data_ptr()
    grads = {}
    logits.register_hook(lambda g: grads.update(ptr=g.data_ptr()))
    lp = rk.logprobs_from_logits(logits, torch.zeros(t, dtype=torch.long, device=device), entropy=False)
    lp.sum().backward()
    assert grads["ptr"] == ptr, "the gradient reuses the logits' storage"
    y = w.detach().clone().requires_grad_()
    torch.log_softmax(y * 2.0, -1)[:, 0].sum().backward()
    torch.testing.assert_close(w.grad, y.grad, rtol=1e-5, atol=1e-6)


def test_inplace_backward_misuse_is_caught(device):
    """Logits saved by another op before ours: the in-place backward would corrupt them, and
    autograd's version counter says so."""
    w = torch.randn(4, 50, device=device, requires_grad=True)
    logits = w * 2.0
    other = (logits ** 2).mean()  # saves logits for its backward
    lp = rk.logprobs_from_logits(logits, torch.zeros(4, dtype=torch.long, device=device), entropy=False)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (lp.sum() + other).backward()


def test_strided_rows_and_batched_shapes(device, gen):
    big = torch.randn(2, 5, 70, generator=gen).to(device)
    view = big[..., :64]  # rows 70 elements apart
    labels = torch.randint(0, 64, (2, 5), generator=gen).to(device)
    lp, h = rk.logprobs_from_logits(view, labels)
    want_lp, want_h = torch_logprobs(view.reshape(-1, 64), labels.reshape(-1), 1.0)
    assert lp.shape == (2, 5)
    torch.testing.assert_close(lp.reshape(-1), want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.reshape(-1), want_h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("agg,policy_agg", [("token-mean", None), ("seq-mean-token-sum", "seq-mean-token-mean")])
def test_loss_from_logits_matches_the_composition(device, gen, agg, policy_agg):
    """grpo_loss_from_logits = log-probs -> policy loss + KL - entropy bonus, in one call; with
    policy_agg_mode the policy term in its own mode, KL and entropy in agg_mode."""
    b, l, v = 3, 11, 257
    logits = torch.randn(b, l, v, generator=gen).to(device)
    labels = torch.randint(0, v, (b, l), generator=gen).to(device)
    labels[1, 3] = -100
    old = torch_logprobs(logits.reshape(-1, v), labels.reshape(-1), 1.0)[0].reshape(b, l) + 0.1
    ref = old - 0.05
    adv = torch.randn(b, generator=gen).to(device)
    mask = torch.ones(b, l, device=device)
    mask[2, 7:] = 0
    z = logits.clone().requires_grad_()
    loss, m = rk.grpo_loss_from_logits(z, labels, old, adv, mask, ref_logp=ref, kl_coef=0.1, entropy_coef=0.01,
                                       temperature=0.9, agg_mode=agg, policy_agg_mode=policy_agg)
    loss.backward()
    x = logits.clone().requires_grad_()
    lp, h = torch_logprobs(x.reshape(-1, v), labels.reshape(-1), 0.9)
    lp, h = lp.reshape(b, l), h.reshape(b, l)
    valid = mask * (labels != -100)
    pg = verl_vanilla(old, lp, adv[:, None].expand(b, l), valid)[0]
    d = -torch.clamp(lp - ref, -20, 20)
    k3 = torch.clamp(torch.exp(d) - d - 1, -10, 10)
    want = agg_loss(pg, valid, policy_agg or agg) + 0.1 * agg_loss(k3, valid, agg) - 0.01 * agg_loss(h, valid, agg)
    want.backward()
    torch.testing.assert_close(loss.double(), want.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.grad, x.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m["actor/entropy"].float(), ((h * valid).sum() / valid.sum()).detach(), rtol=1e-5,
                               atol=1e-6)


def test_fused_linear_matches_unfused_autograd(device, gen):
    t, h, v = 96, 32, 301
    hidden = (torch.randn(t, h, generator=gen) * 0.1).to(torch.bfloat16).to(device)
    weight = (torch.randn(v, h, generator=gen) * 0.1).to(torch.bfloat16).to(device)
    labels = torch.randint(0, v, (t,), generator=gen).to(device)
    old = (-torch.rand(t, generator=gen) * 2 - 5).to(device)
    adv = torch.randn(3, generator=gen).to(device)
    mask = torch.ones(t, device=device, dtype=torch.uint8)
    cu = [0, 40, 70, 96]
    x0, w0 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, m = rk.fused_linear_grpo_loss(x0, w0, labels, old, adv, mask, cu, chunk_tokens=32, fp32_logits=True)
    loss.backward()
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = torch.log_softmax((x.float() @ w.float().T), -1).gather(-1, labels[:, None]).squeeze(-1)
    seq = torch.repeat_interleave(torch.arange(3, device=device), torch.tensor([40, 30, 26], device=device))
    pg = verl_vanilla(old, logp, adv[seq], mask.float())[0]
    want = (pg * mask).sum() / mask.sum()
    want.backward()
    assert abs(loss.item() - want.item()) <= 1e-3 * abs(want.item()) + 1e-4
    assert x0.grad.dtype == torch.bfloat16 and w0.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x0.grad.float(), x.grad.float(), rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(w0.grad.float(), w.grad.float(), rtol=5e-2, atol=5e-3)
    assert m["actor/num_tokens"].item() == t
    # the batch-invariant mode: the same loss and gradients (the GEMMs on whole padded chunks)
    x1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss1, _ = rk.fused_linear_grpo_loss(x1, w1, labels, old, adv, mask, cu, chunk_tokens=32, fp32_logits=True,
                                         batch_invariant=True)
    loss1.backward()
    assert abs(loss1.item() - loss.item()) <= 1e-5 * abs(loss.item()) + 1e-6
    torch.testing.assert_close(x1.grad.float(), x0.grad.float(), rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(w1.grad.float(), w0.grad.float(), rtol=2e-2, atol=1e-3)
    with pytest.raises(rk.RecapTypeError, match="batch_invariant"):
        rk.fused_linear_grpo_loss(hidden, weight, labels, old, adv, mask, cu, batch_invariant="yes")


def test_group_advantages(device):
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0], device=device)
    s = (1.0 / 3.0) ** 0.5
    want = torch.tensor([0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0], device=device) / (s + 1e-6)
    torch.testing.assert_close(rk.group_advantages(r, 4), want, rtol=1e-5, atol=1e-6)
    ids = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0], device=device)
    two = torch.stack([r, r * 2], -1)
    a = rk.group_advantages(two, group_ids=ids, num_groups=2, mode=["dr_grpo", "rloo"])
    g1, g0 = r[ids == 1], r[ids == 0]
    torch.testing.assert_close(a[ids == 1, 0], g1 - g1.mean())
    loo = (2 * g0.sum() - 2 * g0) / (len(g0) - 1)
    torch.testing.assert_close(a[ids == 0, 1], 2 * g0 - loo)
    # a group of one: 0, or verl's mean 0 / std 1
    lone = torch.tensor([3.0, 1.0, 0.0, 1.0], device=device)
    gid = torch.tensor([5, 2, 2, 2], device=device)
    for mode, want in [("grpo", 3.0 / (1 + 1e-6)), ("dr_grpo", 3.0), ("rloo", 3.0)]:
        assert rk.group_advantages(lone, group_ids=gid, num_groups=6, mode=mode)[0].item() == 0.0
        got = rk.group_advantages(lone, group_ids=gid, num_groups=6, mode=mode, singletons="verl")
        torch.testing.assert_close(got[0], torch.tensor(want, device=device))


@pytest.mark.parametrize("mode", ["grpo_passk", "dr_grpo_passk", "opo", "gpg", "reinforce_plus_plus",
                                  "reinforce_plus_plus_baseline"])
def test_verl_estimators(device, mode):
    """verl's further estimators against their token-level formulas (tests/reference.py): outcome
    scores, groups of uneven sizes with unique bests, response masks of different lengths."""
    g = torch.Generator().manual_seed(5)
    index = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    scores = torch.randn(len(index), generator=g)
    scores[3] = 0.0  # a zero (GPG counts the non-zero scores)
    lens = torch.randint(1, 9, (len(index),), generator=g)
    mask = (torch.arange(8)[None, :] < lens[:, None]).float()
    singletons = "zero" if mode.endswith("passk") else "verl"  # verl raises for Pass@k groups of one
    keep = index != 3 if mode.endswith("passk") else torch.ones(len(index), dtype=torch.bool)
    want = verl_outcome_advantages(scores[keep], mask[keep], index[keep], mode)
    got = rk.group_advantages(scores[keep].to(device), group_ids=index[keep].to(device), num_groups=4, mode=mode,
                              singletons=singletons, response_mask=mask[keep].to(device))
    torch.testing.assert_close((got.cpu()[:, None] * mask[keep]).double(), want, rtol=1e-5, atol=1e-6)
    if mode in ("opo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"):
        with pytest.raises(rk.RecapError, match="lengths"):
            rk.group_advantages(scores.to(device), 2, mode=mode)


def test_verl_remax(device):
    """verl's compute_remax_outcome_advantage written out (the reward-to-go of an outcome reward on
    each response's last token, minus the greedy response's reward, over the response mask) against
    mode="remax" with the baselines; without baselines an error naming them."""
    g = torch.Generator().manual_seed(6)
    scores, base = torch.randn(7, generator=g), torch.randn(7, generator=g)
    lens = torch.randint(1, 9, (7,), generator=g)
    mask = (torch.arange(8)[None, :] < lens[:, None]).float()
    token_rewards = torch.zeros(7, 8)
    token_rewards[torch.arange(7), lens - 1] = scores
    returns = (token_rewards * mask).flip(-1).cumsum(-1).flip(-1)
    want = returns - base[:, None] * mask
    got = rk.group_advantages(scores.to(device), 1, mode="remax", baselines=base.to(device))
    torch.testing.assert_close(got.cpu()[:, None] * mask, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(rk.RecapError, match="baselines"):
        rk.group_advantages(scores.to(device), 1, mode="remax")
    with pytest.raises(rk.RecapError, match="baselines"):
        rk.group_advantages(scores.to(device), 1, mode="remax", baselines=base[:3].to(device))


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_trl_multi_objective_aggregation(device, aggregation):
    """TRL's reward_weights with both multi_objective_aggregation settings (normalize_then_sum is
    GDPO), against their formulas (tests/reference.py), TRL's eps 1e-4."""
    g = torch.Generator().manual_seed(9)
    rewards = torch.cat([torch.randint(0, 2, (12, 1), generator=g).float(), torch.randn(12, 2, generator=g)], 1)
    weights = [1.0, 0.5, 2.0]
    want = trl_multi_objective(rewards.double(), 4, weights, aggregation)
    mode = "gdpo" if aggregation == "normalize_then_sum" else "grpo"
    got = rk.group_advantages(rewards.to(device), 4, mode=mode, eps=1e-4, reward_weights=weights)
    assert got.shape == (12,)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-5)


def test_recap_weights():
    w = rk.RecapWeights(["reward", "loss"])
    assert w.weights() == [1.0, 1.0]
    for i in range(25):
        w.observe([0.1 + 0.02 * i, 2.0 - 0.001 * i])
    before = w.weights()
    assert abs(sum(before) - 2.0) < 1e-4 and before[0] > 1.0 > before[1]
    assert w.tensor().dtype == torch.float32 and w.steps == 25
    w2 = rk.RecapWeights(["reward", "loss"])
    w2.load_state_dict(w.state_dict())
    assert w2.weights() == before
    w3 = rk.RecapWeights(["reward", "loss"], window=2, temperature=1.0)
    for i in range(4):
        w3.observe([i, 1.0])
    assert w3.weights() != [1.0, 1.0]


@pytest.mark.parametrize("layout_on_device", [False, True])
def test_async_losses_from_logits_match_the_synchronous_ones(device, gen, layout_on_device):
    """grpo_loss_from_logits_async and fused_linear_grpo_loss_async: the synchronous calls' loss,
    gradients and metrics, the metrics read back only when asked for; the layout (cu_seqlens,
    lambda_, membership) as CPU tensors or, on a GPU, as tensors on the device."""
    if layout_on_device and device.type == "cpu":
        pytest.skip("the layout on the device needs a GPU")
    t, h, v = 64, 16, 97
    logits = torch.randn(t, v, generator=gen).to(device)
    labels = torch.randint(0, v, (t,), generator=gen).to(device)
    labels[5] = -100
    old = (-torch.rand(t, generator=gen) * 2 - 3).to(device)
    ref = old - 0.05
    adv = torch.randn(3, 2, generator=gen).to(device)
    mask = torch.ones(t, device=device)
    mask[50:] = 0
    cu = torch.tensor([0, 20, 45, t], dtype=torch.int32)
    opts = dict(ref_logp=ref, kl_coef=0.05, entropy_coef=0.01, lambda_=[0.7, 1.3], membership=[3, 1, 2],
                objective_names=["a", "b"])
    z0 = logits.clone().requires_grad_()
    want, wm = rk.grpo_loss_from_logits(z0, labels, old, adv, mask, cu, **opts)
    want.backward()
    layout = dict(opts)
    c = cu
    if layout_on_device:
        c = cu.to(device)
        layout["lambda_"] = torch.tensor(opts["lambda_"], device=device)
        layout["membership"] = torch.tensor(opts["membership"], dtype=torch.int32, device=device)
    z = logits.clone().requires_grad_()
    loss, pending = rk.grpo_loss_from_logits_async(z, labels, old, adv, mask, c, **layout)
    assert isinstance(pending, rk.GrpoPending) and loss.device == logits.device
    assert loss.item() == want.item()
    loss.backward()
    assert torch.equal(z.grad, z0.grad)
    m = pending.metrics()
    assert m.keys() == wm.keys()
    for key in wm:
        assert torch.equal(m[key].double().cpu(), wm[key].double().cpu()), key

    hidden = (torch.randn(t, h, generator=gen) * 0.3).to(torch.bfloat16).to(device)
    weight = (torch.randn(v, h, generator=gen) * 0.3).to(torch.bfloat16).to(device)
    lin = dict(opts, chunk_tokens=24)
    lin.pop("entropy_coef")
    x0, w0 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want, wm = rk.fused_linear_grpo_loss(x0, w0, labels, old, adv, mask.to(torch.uint8), cu, **lin)
    want.backward()
    lin_layout = dict(layout, chunk_tokens=24)
    lin_layout.pop("entropy_coef")
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, pending = rk.fused_linear_grpo_loss_async(x, w, labels, old, adv, mask.to(torch.uint8), c, **lin_layout)
    assert loss.item() == want.item()
    loss.backward()
    assert torch.equal(x.grad, x0.grad) and torch.equal(w.grad, w0.grad)
    m = pending.metrics()
    for key in wm:
        assert torch.equal(m[key].double().cpu(), wm[key].double().cpu()), key


def test_async_loss_from_logits_reports_bad_labels(device, gen):
    """A label outside [0, V): the host reference refuses it at the call, a device when the output
    is read; either way the error names the labels."""
    t, v = 12, 9
    logits = torch.randn(t, v, generator=gen).to(device)
    labels = torch.randint(0, v, (t,), generator=gen).to(device)
    labels[3] = v + 2
    old = torch.full((t,), -2.0, device=device)
    with pytest.raises(rk.RecapError, match="labels"):
        loss, pending = rk.grpo_loss_from_logits_async(logits, labels, old, torch.zeros(2, device=device),
                                                       torch.ones(t, device=device), [0, 5, t])
        pending.metrics()
    if device.type == "cuda":
        # the top-entropy-quantile mask sorts on the host: refused asynchronously on a device
        with pytest.raises(rk.RecapError, match="top_entropy_quantile"):
            rk.grpo_loss_from_logits_async(logits, labels.clamp(0, v - 1), old, torch.zeros(2, device=device),
                                           torch.ones(t, device=device), [0, 5, t], top_entropy_quantile=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk,with_bias", [(1, False), (7, True), (4096, True)])
def test_fused_linear_logprobs_against_autograd(device, gen, dtype, chunk, with_bias):
    """``fused_linear_logprobs``: log-probs, entropies and Σπ² of ``hidden @ W^T + b`` chunk by chunk
    against autograd through ``log_softmax`` in float64 (values, and the gradients of hidden, W and b
    through all three outputs, ignored labels included), the same bits for any chunk size, and the
    same values as the logits path on the materialized logits."""
    t, h, v, tau = 19, 24, 301, 0.8
    hidden = (torch.randn(t, h, generator=gen)).to(dtype).to(device)
    weight = (torch.randn(v, h, generator=gen) * 0.3).to(dtype).to(device)
    bias = (torch.randn(v, generator=gen) * 0.1).to(dtype).to(device) if with_bias else None
    labels = torch.randint(0, v, (t,), generator=gen).to(device)
    labels[::5] = -100
    g_lp, g_h, g_s = (torch.randn(t, generator=gen).to(device) for _ in range(3))
    xs = [p.clone().requires_grad_() for p in (hidden, weight) + ((bias,) if with_bias else ())]
    lp, ent, spp = rk.fused_linear_logprobs(xs[0], xs[1], labels, tau, bias=xs[2] if with_bias else None,
                                            chunk_tokens=chunk, return_sum_pi_squared=True)
    ((lp * g_lp).sum() + (ent * g_h).sum() + (spp * g_s).sum()).backward()
    ds = [p.clone().double().requires_grad_() for p in (hidden, weight) + ((bias,) if with_bias else ())]
    z = ds[0] @ ds[1].T + (ds[2] if with_bias else 0)
    ls = torch.log_softmax(z / tau, -1)
    want_lp = ls.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1) * (labels != -100)
    want_h = -(ls.exp() * ls).sum(-1)
    want_s = (2 * ls).exp().sum(-1)
    ((want_lp * g_lp.double()).sum() + (want_h * g_h.double()).sum() + (want_s * g_s.double()).sum()).backward()
    f32 = dtype == torch.float32
    # bf16: the logits themselves are rounded to bf16 (as the LM head's output would be)
    rtol, atol = (1e-4, 1e-5) if f32 else (3e-2, 3e-2)
    for name, got, want in (("logp", lp, want_lp), ("entropy", ent, want_h), ("sum_pi_squared", spp, want_s)):
        torch.testing.assert_close(got.double(), want.detach(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    for name, p, d in zip(("hidden", "weight", "bias"), xs, ds):
        err = ((p.grad.double() - d.grad).norm() / d.grad.norm()).item()
        assert err < (1e-4 if f32 else 3e-2), f"d{name}: relative error {err:.3g}"
    # another chunking: the same values up to the GEMM's rounding (torch's GEMMs are not batch
    # invariant: the bits of a row's logits can depend on how many rows the GEMM takes); one chunk
    # of all rows: the logits path on the same logits, bit for bit
    lp1, ent1, spp1 = rk.fused_linear_logprobs(hidden, weight, labels, tau, bias=bias, chunk_tokens=5,
                                               return_sum_pi_squared=True)
    for a, b in ((lp1, lp), (ent1, ent), (spp1, spp)):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5 if f32 else 2e-2, atol=1e-5 if f32 else 2e-2)
    if chunk >= t:
        logits = hidden @ weight.T + (bias if with_bias else 0)
        lp2, ent2, spp2 = rk.logprobs_from_logits(logits, labels, tau, return_sum_pi_squared=True)
        assert torch.equal(lp2, lp.detach()) and torch.equal(ent2, ent.detach()) and torch.equal(spp2, spp.detach())


def test_fused_linear_logprobs_errors(gen):
    h = torch.randn(4, 8, generator=gen)
    w = torch.randn(5, 8, generator=gen)
    y = torch.randint(0, 5, (4,), generator=gen)
    cases = {
        "weight": lambda: rk.fused_linear_logprobs(h, w[:, :7], y),
        "weight dtype": lambda: rk.fused_linear_logprobs(h, w.double(), y),
        "bias": lambda: rk.fused_linear_logprobs(h, w, y, bias=torch.zeros(4)),
        "labels": lambda: rk.fused_linear_logprobs(h, w, y[:3]),
        "chunk_tokens": lambda: rk.fused_linear_logprobs(h, w, y, chunk_tokens=0),
        "batch_invariant": lambda: rk.fused_linear_logprobs(h, w, y, batch_invariant=1),
    }
    for name, call in cases.items():
        with pytest.raises(rk.RecapError, match=name.split()[0]):
            call()


def test_fused_linear_logprobs_computes_only_the_rows_that_carry_loss(device, gen):
    """``mask``: the masked rows cost nothing and give 0 with no gradient; the others are the same
    values and gradients as without the mask (one chunk: the same GEMM shape per row, to rounding)."""
    b, l, h, v = 3, 9, 16, 97
    hidden = torch.randn(b, l, h, generator=gen).to(device)
    weight = (torch.randn(v, h, generator=gen) * 0.3).to(device)
    labels = torch.randint(0, v, (b, l), generator=gen).to(device)
    mask = (torch.rand(b, l, generator=gen) > 0.6).to(device)
    mask[1] = False  # a fully masked sequence
    g_lp, g_h, g_s = (torch.randn(b, l, generator=gen).to(device) for _ in range(3))
    grads = []
    outs = []
    for m in (mask, None):
        xs = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
        lp, ent, spp = rk.fused_linear_logprobs(*xs, labels, 0.9, mask=m, return_sum_pi_squared=True)
        keep = mask.float()
        ((lp * g_lp * keep).sum() + (ent * g_h * keep).sum() + (spp * g_s * keep).sum()).backward()
        outs.append((lp.detach(), ent.detach(), spp.detach()))
        grads.append([x.grad for x in xs])
    for got, want in zip(outs[0], outs[1]):
        assert bool((got[~mask] == 0).all())
        torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=1e-6)
    assert bool((grads[0][0][~mask] == 0).all()), "no gradient into the masked rows"
    for got, want in zip(grads[0], grads[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # every row masked: zeros, and a zero gradient that still reaches hidden and weight
    xs = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    lp, ent = rk.fused_linear_logprobs(*xs, labels, mask=torch.zeros(b, l, dtype=torch.bool, device=device))
    (lp.sum() + ent.sum()).backward()
    assert lp.shape == (b, l) and bool((lp == 0).all()) and bool((xs[0].grad == 0).all())
    with pytest.raises(rk.RecapError, match="mask"):
        rk.fused_linear_logprobs(hidden, weight, labels, mask=mask[:, :4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_logprobs_batch_invariant(device, gen, dtype):
    """``batch_invariant=True``: a row's log-prob, entropy, Σπ² and hidden gradient are the same bits
    alone, in every prefix of the batch (sizes 1 .. 70 over chunks of 32: full and partial chunks),
    at another position, behind padding rows and under a mask. (Without it, on this machine's CPU
    float32 GEMMs, prefixes and single rows do differ in the last bits.)"""
    t, h, v, chunk = 70, 96, 301, 32
    hidden = torch.randn(t, h, generator=gen).to(dtype).to(device)
    weight = (torch.randn(v, h, generator=gen) * 0.2).to(dtype).to(device)
    labels = torch.randint(0, v, (t,), generator=gen).to(device)
    g = [torch.randn(t, generator=gen).to(device) for _ in range(3)]

    def rows(idx, x=hidden, y=labels, **kw):
        x = x[idx].clone().requires_grad_()
        outs = rk.fused_linear_logprobs(x, weight, y[idx], 0.8, chunk_tokens=chunk, return_sum_pi_squared=True,
                                        batch_invariant=True, **kw)
        sum(o * gi[idx] for o, gi in zip(outs, g)).sum().backward()
        return [o.detach() for o in outs] + [x.grad]

    full = rows(torch.arange(t))
    for n in list(range(1, 40)) + [63, 64, 65, 69]:
        part = rows(torch.arange(n))
        for a, b in zip(part, full):
            assert torch.equal(a, b[:n]), n
    for i in (0, 17, 31, 32, 69):
        for a, b in zip(rows(torch.tensor([i])), full):
            assert torch.equal(a, b[i:i + 1]), i
    perm = torch.randperm(t, generator=gen)
    for a, b in zip(rows(perm), full):
        assert torch.equal(a, b[perm])
    # behind padding rows (zeros, label -100) and with a mask that drops some rows
    pad = torch.cat([torch.zeros(5, h, dtype=dtype, device=device), hidden])
    ypad = torch.cat([torch.full((5,), -100, device=device, dtype=labels.dtype), labels])
    g = [torch.cat([torch.zeros(5, device=device), gi]) for gi in g]
    mask = torch.rand(t + 5, generator=gen).to(device) > 0.3
    got = rows(torch.arange(t + 5), x=pad, y=ypad, mask=mask)
    keep = mask[5:]
    for a, b in zip(got, full):
        assert torch.equal(a[5:][keep], b[keep])
