"""The fused loss, KL, the weighted reduction and the normalizers against PyTorch implementations of
verl's formulas: values, gradients and metrics, on every device."""
import itertools

import pytest
import torch

import recap_kernels as rk
from reference import agg_loss, cispo, kl_penalty, sapo, verl_gspo, verl_vanilla

AGG = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
KL = ["k1", "abs", "k2", "low_var_kl", "k1+", "k3+"]


def batch(device, gen, b=6, l=33, masked_row=2):
    old = -torch.rand(b, l, generator=gen) * 4
    logp = old + torch.randn(b, l, generator=gen) * 0.4
    ref = old + torch.randn(b, l, generator=gen) * 0.3
    adv = torch.randn(b, generator=gen)
    mask = (torch.rand(b, l, generator=gen) > 0.2).float()
    if masked_row is not None:
        mask[masked_row] = 0  # a fully masked sequence
    return [x.to(device) for x in (old, logp, ref, adv, mask)]


def close(ours, want, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(ours.double(), want.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("clip,kl,agg", list(itertools.product(
    [(0.2, 0.2, 3.0), (0.2, 0.28, None), (0.1, 0.3, 1.5)], KL, AGG)))
def test_vanilla_matches_verl(device, gen, clip, kl, agg):
    old, logp, ref, adv, mask = batch(device, gen)
    lo, hi, c = clip
    x = logp.clone().requires_grad_()
    loss, m = rk.grpo_loss(x, old, adv, mask, ref_logp=ref, clip_low=lo, clip_high=hi, dual_clip=c, agg_mode=agg,
                           kl_coef=0.1, kl_estimator=kl)
    loss.backward()
    y = logp.clone().requires_grad_()
    a = adv[:, None].expand_as(y)
    pg, clipfrac, ppo_kl, lower = verl_vanilla(old, y, a, mask, lo, hi, c)
    want = agg_loss(pg, mask, agg) + 0.1 * agg_loss(kl_penalty(y, ref, kl), mask, agg)
    want.backward()
    close(loss, want)
    close(x.grad, y.grad, atol=1e-7)
    # metrics: tensors on the inputs' device, verl's names
    assert m["actor/ppo_kl"].device == device and m["actor/ppo_kl"].dim() == 0
    assert m["actor/pg_clipfrac"].shape == (1,)
    close(m["actor/pg_clipfrac"][0], clipfrac)
    close(m["actor/pg_clipfrac_lower"][0], lower)
    close(m["actor/ppo_kl"], ppo_kl)
    close(m["actor/kl_mean"], (kl_penalty(logp, ref, kl) * mask).sum() / mask.sum())
    assert m["actor/num_tokens"].item() == mask.sum().item()
    assert m["actor/num_seqs"].item() == 5


def variant_case(variant, old, y, a, mask):
    """The options of a loss variant and verl's per-token loss of it (differentiable in ``y``)."""
    if variant == "gspo":
        return (dict(policy_loss="gspo", clip_low=3e-4, clip_high=4e-4, dual_clip=None),
                verl_gspo(old, y, a, mask, 3e-4, 4e-4))
    if variant == "sapo":
        return dict(policy_loss={"sapo": {"tau_pos": 1.0, "tau_neg": 1.05}}, dual_clip=None), sapo(old, y, a, mask)
    return (dict(policy_loss="cispo", clip_low=0.2, clip_high=0.28, dual_clip=None),
            cispo(old, y, a, mask, 0.2, 0.28))


@pytest.mark.parametrize("variant", ["gspo", "sapo", "cispo"])
@pytest.mark.parametrize("agg", AGG)
def test_variants_match_verl(device, gen, variant, agg):
    old, logp, ref, adv, mask = batch(device, gen)
    x = logp.clone().requires_grad_()
    y = logp.clone().requires_grad_()
    a = adv[:, None].expand_as(y)
    opts, per = variant_case(variant, old, y, a, mask)
    loss, _ = rk.grpo_loss(x, old, adv, mask, agg_mode=agg, **opts)
    loss.backward()
    want = agg_loss(per, mask, agg)
    want.backward()
    close(loss, want)
    close(x.grad, y.grad, atol=1e-7)


@pytest.mark.parametrize("variant", ["gspo", "sapo"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_per_term_aggregation_as_verl_before_0_9(device, gen, variant, agg):
    """policy_agg_mode: verl before 0.9 aggregates GSPO's and SAPO's policy term with
    seq-mean-token-mean while the KL term follows loss_agg_mode; one fused call."""
    old, logp, ref, adv, mask = batch(device, gen)
    x = logp.clone().requires_grad_()
    y = logp.clone().requires_grad_()
    a = adv[:, None].expand_as(y)
    opts, per = variant_case(variant, old, y, a, mask)
    loss, m = rk.grpo_loss(x, old, adv, mask, ref_logp=ref, agg_mode=agg, policy_agg_mode="seq-mean-token-mean",
                           kl_coef=0.1, kl_estimator="low_var_kl", **opts)
    loss.backward()
    kl = agg_loss(kl_penalty(y, ref, "low_var_kl"), mask, agg)
    want = agg_loss(per, mask, "seq-mean-token-mean") + 0.1 * kl
    want.backward()
    close(loss, want)
    close(x.grad, y.grad, atol=1e-7)
    close(m["actor/kl_loss"], kl)
    with pytest.raises(rk.RecapError, match="policy_agg_mode"):
        rk.grpo_loss(logp, old, adv, mask, policy_agg_mode="seq-mean")


def test_rollout_weights_and_policy_weight(device, gen):
    """verl's rollout_is_weights multiply the per-token policy loss: our policy_weight."""
    old, logp, ref, adv, mask = batch(device, gen)
    w = torch.rand(logp.shape, generator=gen).to(device) * 2
    x = logp.clone().requires_grad_()
    loss, _ = rk.grpo_loss(x, old, adv, mask, policy_weight=w)
    loss.backward()
    y = logp.clone().requires_grad_()
    pg = verl_vanilla(old, y, adv[:, None].expand_as(y), mask)[0] * w
    want = agg_loss(pg, mask, "token-mean")
    want.backward()
    close(loss, want)
    close(x.grad, y.grad, atol=1e-7)


def test_packed_objectives_weights_and_membership(device, gen):
    """K = 3 packed: two policy objectives with their own advantages and a replay (nll) objective,
    weights lambda and membership bits: L = (1/K) sum_k lambda_k agg_k."""
    lens = [5, 0, 9, 1, 31, 32, 33]
    t = sum(lens)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    old = (-torch.rand(t, generator=gen) * 3).to(device)
    logp = (old.cpu() + torch.randn(t, generator=gen) * 0.3).to(device)
    mask = (torch.rand(t, generator=gen) > 0.1).to(device)
    adv = torch.randn(len(lens), 3, generator=gen).to(device)
    membership = [0b011, 0b011, 0b100, 0b011, 0b100, 0b001, 0b111]
    lam = torch.tensor([1.2, 0.5, 1.3])
    x = logp.clone().requires_grad_()
    loss, m = rk.grpo_loss(x, old, adv, mask, cu, lambda_=lam, objectives=["policy", "policy", "nll"],
                           membership=membership, objective_names=["format", "accuracy", "replay"])
    loss.backward()
    y = logp.clone().requires_grad_()
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)).to(device)
    member = torch.tensor(membership, device=device)[seq]
    mf = mask.float()
    total = 0
    for k in range(3):
        mk = mf * ((member >> k) & 1).float()
        per = -y if k == 2 else verl_vanilla(old, y, adv[seq, k], mk)[0]
        total = total + lam[k].item() * (per * mk).sum() / mk.sum()
    want = total / 3
    want.backward()
    close(loss, want)
    close(x.grad, y.grad, atol=1e-7)
    assert m["actor/pg_loss"].shape == (3,)
    assert m["actor/pg_clipfrac/accuracy"].dim() == 0
    assert m["actor/objective_tokens"][2].item() == (mf * ((member >> 2) & 1).float()).sum().item()


def test_micro_batches_with_global_normalizers_sum_to_the_batch(device, gen):
    """Two micro-batches normalized by the whole batch's counts: their losses sum to the batch's
    loss and their gradients concatenate to its gradient, in every aggregation mode."""
    old, logp, ref, adv, mask = batch(device, gen, b=8, l=17)
    for agg in AGG:
        x = logp.clone().requires_grad_()
        whole, _ = rk.grpo_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.05, agg_mode=agg)
        whole.backward()
        n = [rk.count_normalizers(mask[i:i + 4])[0] for i in (0, 4)]
        total = n[0] + n[1]
        assert total.device == device and total.shape == (2, 2)
        parts, grads = [], []
        for i in (0, 4):
            xp = logp[i:i + 4].clone().requires_grad_()
            lp, _ = rk.grpo_loss(xp, old[i:i + 4], adv[i:i + 4], mask[i:i + 4], ref_logp=ref[i:i + 4], kl_coef=0.05,
                                 agg_mode=agg, normalizers=total)
            lp.backward()
            parts.append(lp)
            grads.append(xp.grad)
        close(parts[0] + parts[1], whole)
        close(torch.cat(grads), x.grad, atol=1e-7)


def test_strided_inputs(device, gen):
    """verl's log_prob is a slice of a larger tensor: non-contiguous views work."""
    old, logp, ref, adv, mask = batch(device, gen, b=6, l=40)
    big = torch.cat([logp, logp], dim=1)
    view = big[:, 3:36]
    assert not view.is_contiguous()
    x = view.detach().clone().requires_grad_()
    loss_view, _ = rk.grpo_loss(view, old[:, :33], adv, mask[:, :33].t().contiguous().t())
    loss, _ = rk.grpo_loss(x.contiguous(), old[:, :33].contiguous(), adv, mask[:, :33].contiguous())
    close(loss_view, loss)


def test_kl_penalty_matches_verl(device, gen):
    old, logp, ref, adv, mask = batch(device, gen)
    for kind in KL:
        x = logp.clone().requires_grad_()
        out = rk.kl_penalty(x, ref, kind)
        (out * mask).sum().backward()
        y = logp.clone().requires_grad_()
        want = kl_penalty(y, ref, kind)
        (want * mask).sum().backward()
        assert out.shape == logp.shape
        close(out, want)
        close(x.grad, y.grad)


@pytest.mark.parametrize("agg", AGG)
def test_weighted_reduce_matches_agg_loss(device, gen, agg):
    old, logp, ref, adv, mask = batch(device, gen)
    losses = torch.randn(*logp.shape, 2, generator=gen).to(device)
    x = losses.clone().requires_grad_()
    total, per = rk.weighted_reduce(x, mask, lambda_=[0.5, 1.5], agg_mode=agg)
    total.backward()
    y = losses.clone().requires_grad_()
    a0, a1 = agg_loss(y[..., 0], mask, agg), agg_loss(y[..., 1], mask, agg)
    want = (0.5 * a0 + 1.5 * a1) / 2
    want.backward()
    close(total, want)
    close(per, torch.stack([a0, a1]))
    close(x.grad, y.grad, atol=1e-7)


def test_token_sum_norm(device, gen):
    old, logp, ref, adv, mask = batch(device, gen)
    x = logp.clone().requires_grad_()
    loss, _ = rk.grpo_loss(x, old, adv, mask, agg_mode="token-sum-norm", norm_constant=64.0)
    # sum(M * l) / C (Dr. GRPO; verl's seq-mean-token-sum-norm before 0.9)
    want = (verl_vanilla(old, logp, adv[:, None].expand_as(logp), mask)[0] * mask).sum() / 64.0
    close(loss, want)


def test_empty_and_fully_masked_batches(device):
    z = torch.zeros(3, 0, device=device)
    loss, m = rk.grpo_loss(z, z, torch.zeros(3, device=device), z)
    assert loss.item() == 0.0 and m["actor/num_tokens"].item() == 0.0
    x = torch.full((2, 5), -1.0, device=device, requires_grad=True)
    loss, m = rk.grpo_loss(x, x.detach(), torch.ones(2, device=device), torch.zeros(2, 5, device=device))
    loss.backward()
    assert loss.item() == 0.0 and x.grad.abs().sum().item() == 0.0 and m["actor/num_seqs"].item() == 0


def test_nonfinite_inputs_are_an_error_unless_allowed(device):
    x = torch.full((2, 4), -1.0, device=device)
    y = x.clone()
    y[0, 1] = float("nan")
    with pytest.raises(rk.RecapError, match="non-finite"):
        rk.grpo_loss(y, x, torch.ones(2, device=device), torch.ones(2, 4, device=device))
    loss, m = rk.grpo_loss(y, x, torch.ones(2, device=device), torch.ones(2, 4, device=device), allow_nonfinite=True)
    assert m["actor/nonfinite_inputs"].item() == 1.0
    # a NaN under the mask changes nothing
    mask = torch.ones(2, 4, device=device)
    mask[0, 1] = 0
    loss, _ = rk.grpo_loss(y, x, torch.ones(2, device=device), mask)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("agg", AGG)
def test_async_loss_matches_the_synchronous_one(device, gen, agg):
    """grpo_loss_async: the same loss bits, gradient and metrics as grpo_loss, the metrics read only
    when asked for; with the layout (cu_seqlens, lambda_, membership) as tensors on the device."""
    old, logp, ref, adv, mask = batch(device, gen)
    b, l = logp.shape
    adv2 = torch.stack([adv, -adv], dim=1)
    opts = dict(ref_logp=ref.reshape(-1), kl_coef=0.05, agg_mode=agg, dual_clip=3.0, lambda_=[0.7, 1.3],
                membership=[3, 1, 2, 3, 3, 1], objective_names=["a", "b"])
    cu = torch.arange(0, b * l + 1, l, dtype=torch.int32)
    x = logp.reshape(-1).clone().requires_grad_()
    want, wm = rk.grpo_loss(x, old.reshape(-1), adv2, mask.reshape(-1), cu, **opts)
    want.backward()
    for on_device in (False, True):
        layout = dict(opts)
        c = cu
        if on_device:
            c = cu.to(device)
            layout["lambda_"] = torch.tensor(opts["lambda_"], device=device)
            layout["membership"] = torch.tensor(opts["membership"], dtype=torch.int32, device=device)
        y = logp.reshape(-1).clone().requires_grad_()
        loss, pending = rk.grpo_loss_async(y, old.reshape(-1), adv2, mask.reshape(-1), c, **layout)
        assert isinstance(pending, rk.GrpoPending) and loss.device == logp.device
        assert loss.item() == want.item()
        loss.backward()
        assert torch.equal(y.grad, x.grad)
        m = pending.metrics()
        assert m.keys() == wm.keys()
        for key in wm:
            assert torch.equal(m[key].double().cpu(), wm[key].double().cpu()), key


def test_async_loss_reports_a_bad_layout_when_read(device, gen):
    """The read of an asynchronous call reports what the checks found; on the host the layout is
    checked at the call, as the synchronous loss checks it."""
    old, logp, ref, adv, mask = batch(device, gen)
    b, l = logp.shape
    cu = torch.arange(0, b * l + 1, l, dtype=torch.int32)
    cu[2] = cu[3] + 1  # decreasing
    with pytest.raises(rk.RecapError, match="cu_seqlens"):
        loss, pending = rk.grpo_loss_async(logp.reshape(-1), old.reshape(-1), adv, mask.reshape(-1), cu.to(device))
        pending.metrics()


def test_async_output_length():
    """The output holds the loss, the flags, the normalizers and 3 statistics per objective more."""
    assert rk.ops.grpo_output_len(2) - rk.ops.grpo_output_len(1) == 3
    assert rk.ops.grpo_output_len(1) > rk.ops.grpo_stats_len(1)
