"""The PyTorch package against PyTorch implementations of verl's formulas (values and gradients) and
autograd through log_softmax. Needs a CUDA device and the built library (RECAP_KERNELS_LIB or
target/release/librecap_kernels.so); skips otherwise.

    RECAP_KERNELS_LIB=target/release/librecap_kernels.so python3 -m pytest python/tests -q
"""
import itertools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def rk():
    import recap_kernels

    try:
        recap_kernels._lib()
    except recap_kernels.RecapError as e:
        pytest.skip(str(e))
    return recap_kernels


# --- verl's formulas (core_algos.py), written out in PyTorch ---------------------------------
def verl_policy_loss(old, logp, adv, mask, lo, hi, c, agg):
    neg_kl = torch.clamp(logp - old, -20.0, 20.0)
    ratio = torch.exp(neg_kl)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - lo, 1 + hi)
    clipped = torch.maximum(l1, l2)
    if c is not None:
        l3 = -adv * c
        pg = torch.where(adv < 0, torch.minimum(l3, clipped), clipped)
    else:
        pg = clipped
    return agg_loss(pg, mask, agg)


def agg_loss(x, mask, mode):
    if mode == "token-mean":
        return (x * mask).sum() / mask.sum()
    if mode == "seq-mean-token-mean":
        n = mask.sum(-1)
        per = (x * mask).sum(-1) / n.clamp(min=1)
        return per[n > 0].mean()
    if mode == "seq-mean-token-sum":
        n = mask.sum(-1)
        return (x * mask).sum(-1)[n > 0].sum() / (n > 0).sum()
    raise ValueError(mode)


def kl_penalty(logp, ref, kind):
    d = logp - ref
    if kind == "k1":
        return d
    if kind == "abs":
        return d.abs()
    if kind == "k2":
        return 0.5 * d * d
    x = torch.clamp(-d, -20, 20)
    return torch.clamp(torch.exp(x) - x - 1, -10, 10)


@pytest.mark.parametrize(
    "clip,kl,agg",
    list(itertools.product([(0.2, 0.2, 3.0), (0.2, 0.28, None), (0.1, 0.3, 1.5)], ["k1", "abs", "k2", "low_var_kl"],
                           ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])),
)
def test_grpo_loss_matches_verl(rk, clip, kl, agg):
    g = torch.Generator(device="cuda").manual_seed(hash((clip, kl, agg)) % 2**31)
    b, l = 6, 33
    old = -torch.rand(b, l, device="cuda", generator=g) * 4
    logp = (old + torch.randn(b, l, device="cuda", generator=g) * 0.4).requires_grad_()
    ref = old + torch.randn(b, l, device="cuda", generator=g) * 0.3
    adv = torch.randn(b, device="cuda", generator=g)
    mask = (torch.rand(b, l, device="cuda", generator=g) > 0.2).float()
    mask[2] = 0  # a fully masked sequence
    lo, hi, c = clip
    loss, metrics = rk.grpo_loss(logp, old, adv, mask, ref_logp=ref, clip_ratio_low=lo, clip_ratio_high=hi,
                                 clip_ratio_c=c, loss_agg_mode=agg, kl_coef=0.1, kl_loss_type=kl)
    loss.backward()
    ours = logp.grad.clone()
    x = logp.detach().clone().requires_grad_()
    want = verl_policy_loss(old, x, adv[:, None].expand(b, l), mask, lo, hi, c, agg) + 0.1 * agg_loss(
        kl_penalty(x, ref, "k3" if kl == "low_var_kl" else kl), mask, agg)
    want.backward()
    assert abs(loss.item() - want.item()) <= 1e-6 + 1e-5 * abs(want.item())
    torch.testing.assert_close(ours, x.grad, rtol=1e-5, atol=1e-7)
    assert metrics["actor/num_tokens"] == mask.sum().item()


@pytest.mark.parametrize("dtype,temperature", [(torch.float32, 1.0), (torch.float32, 0.7), (torch.bfloat16, 1.0)])
def test_logprobs_match_log_softmax(rk, dtype, temperature):
    g = torch.Generator(device="cuda").manual_seed(3)
    t, v = 37, 5003
    logits = (torch.randn(t, v, device="cuda", generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (t,), device="cuda", generator=g)
    labels[5] = -100
    g_lp = torch.randn(t, device="cuda", generator=g)
    g_h = torch.randn(t, device="cuda", generator=g)
    z = logits.clone().requires_grad_()
    lp, h = rk.logprobs_from_logits(z, labels, temperature=temperature, inplace_backward=False)
    ((lp * g_lp).sum() + (h * g_h).sum()).backward()
    x = logits.float().clone().requires_grad_()
    ls = torch.log_softmax(x / temperature, -1)
    want_lp = ls.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1) * (labels != -100)
    want_h = -(ls.exp() * ls).sum(-1)
    ((want_lp * g_lp).sum() + (want_h * g_h).sum()).backward()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lp, want_lp, **tol)
    torch.testing.assert_close(h, want_h, **tol)
    torch.testing.assert_close(z.grad.float(), x.grad, **tol)


def test_inplace_backward_writes_over_the_logits(rk):
    t, v = 8, 1000
    logits = torch.randn(t, v, device="cuda").requires_grad_()
    ptr = logits.data_ptr()
    lp = rk.logprobs_from_logits(logits, torch.zeros(t, dtype=torch.long, device="cuda"), entropy=False)
    lp.sum().backward()
    assert logits.grad is not None and logits.grad.shape == (t, v)
    assert logits.grad.data_ptr() == ptr, "the gradient reuses the logits' storage"


def test_recap_weights_checkpoint(rk):
    w = rk.RecapWeights(["reward", "loss"])
    for i in range(25):
        w.observe([0.1 + 0.02 * i, 2.0 - 0.001 * i])
    before = w.weights()
    assert abs(sum(before) - 2.0) < 1e-4 and before[0] > 1.0
    w2 = rk.RecapWeights(["reward", "loss"])
    w2.load_state_dict(w.state_dict())
    assert w2.weights() == before


def test_errors_name_the_argument(rk):
    x = torch.zeros(4, 8, device="cuda")
    with pytest.raises(ValueError, match="CUDA"):
        rk.grpo_loss(x.cpu(), x, torch.zeros(4, device="cuda"), x)
    with pytest.raises(TypeError, match="dtype"):
        rk.grpo_loss(x.double(), x, torch.zeros(4, device="cuda"), x)
    with pytest.raises(rk.RecapError, match="clip_low"):
        rk.grpo_loss(x, x, torch.zeros(4, device="cuda"), x.fill_(1), clip_ratio_low=2.0)


def test_group_advantages(rk):
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0], device="cuda")
    a = rk.group_advantages(r, 4)
    s = (1.0 / 3.0) ** 0.5
    want = torch.tensor([0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0], device="cuda") / (s + 1e-6)
    want[4:] = 0
    torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-6)


def test_fused_linear_matches_unfused_autograd(rk):
    g = torch.Generator(device="cuda").manual_seed(11)
    t, h, v = 96, 64, 3001
    hidden = (torch.randn(t, h, device="cuda", generator=g) * 0.1).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=g) * 0.1).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, v, (t,), device="cuda", generator=g)
    old = -torch.rand(t, device="cuda", generator=g) * 8 - 4
    adv = torch.randn(3, device="cuda", generator=g)
    mask = torch.ones(t, device="cuda", dtype=torch.uint8)
    cu = [0, 40, 70, 96]
    loss, _ = rk.fused_linear_grpo_loss(hidden, weight, labels, old, adv, mask, cu, chunk_tokens=32,
                                        fp32_logits=True)
    loss.backward()
    x = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logp = torch.log_softmax((x @ w.T).float(), -1).gather(-1, labels[:, None]).squeeze(-1)
    seq = torch.repeat_interleave(torch.arange(3, device="cuda"), torch.tensor([40, 30, 26], device="cuda"))
    want = verl_policy_loss(old, logp, adv[seq], mask.float(), 0.2, 0.2, 3.0, "token-mean")
    want.backward()
    assert abs(loss.item() - want.item()) <= 1e-3 * abs(want.item()) + 1e-4
    torch.testing.assert_close(hidden.grad.float(), x.grad.float(), rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(weight.grad.float(), w.grad.float(), rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("mask shape", ValueError, "mask"),
        ("old_logp shape", ValueError, "old_logp"),
        ("packed without cu_seqlens", ValueError, "cu_seqlens"),
        ("non-contiguous", ValueError, "contiguous"),
        ("unknown agg mode", ValueError, "loss_agg_mode"),
        ("unknown kl", ValueError, "kl_loss_type"),
        ("dual-clip c <= 1", "recap", "dual_clip"),
        ("cu_seqlens not ending at T", "recap", "cu_seqlens"),
        ("advantages length", ValueError, "advantages"),
        ("ref_logp length", ValueError, "ref_logp"),
        ("lambda length", ValueError, "lambda_"),
        ("membership length", ValueError, "membership"),
        ("unknown orientation", ValueError, "orientations"),
        ("K above the maximum", "recap", "lambda"),
        ("temperature 0", "recap", "temperature"),
        ("labels length", ValueError, "labels"),
        ("label out of range", "recap", "labels"),
        ("bf16 logp", TypeError, "dtype"),
    ],
)
def test_bad_inputs_raise_clear_errors(rk, case, exc, match):
    exc = rk.RecapError if exc == "recap" else exc
    x = torch.full((4, 8), -1.0, device="cuda")
    m = torch.ones(4, 8, device="cuda")
    a = torch.zeros(4, device="cuda")
    calls = {
        "mask shape": lambda: rk.grpo_loss(x, x, a, m[:, :7].contiguous()),
        "old_logp shape": lambda: rk.grpo_loss(x, x[:3].contiguous(), a, m),
        "packed without cu_seqlens": lambda: rk.grpo_loss(x.view(-1), x.view(-1), a, m.view(-1)),
        "non-contiguous": lambda: rk.grpo_loss(x.t(), x.t(), a, m.t()),
        "unknown agg mode": lambda: rk.grpo_loss(x, x, a, m, loss_agg_mode="seq-mean"),
        "unknown kl": lambda: rk.grpo_loss(x, x, a, m, kl_loss_type="k9"),
        "dual-clip c <= 1": lambda: rk.grpo_loss(x, x, a, m, clip_ratio_c=0.5),
        "cu_seqlens not ending at T": lambda: rk.grpo_loss(x.view(-1), x.view(-1), a, m.view(-1),
                                                           cu_seqlens=[0, 8, 16, 24, 30]),
        "advantages length": lambda: rk.grpo_loss(x.view(-1), x.view(-1), a[:3].contiguous(), m.view(-1),
                                                  cu_seqlens=[0, 8, 16, 24, 32]),
        "ref_logp length": lambda: rk.grpo_loss(x, x, a, m, ref_logp=x[:3].contiguous()),
        "lambda length": lambda: rk.grpo_loss(x, x, a, m, lambda_=[1.0, 0.5]),
        "membership length": lambda: rk.grpo_loss(x, x, a, m, membership=[1, 1]),
        "unknown orientation": lambda: rk.RecapWeights(["reward", "rewards"]),
        "K above the maximum": lambda: rk.grpo_loss(x, x, torch.zeros(4, 17, device="cuda"), m),
        "temperature 0": lambda: rk.logprobs_from_logits(torch.zeros(2, 5, device="cuda"),
                                                         torch.zeros(2, dtype=torch.long, device="cuda"), 0.0),
        "labels length": lambda: rk.logprobs_from_logits(torch.zeros(2, 5, device="cuda"),
                                                         torch.zeros(3, dtype=torch.long, device="cuda")),
        "label out of range": lambda: rk.logprobs_from_logits(torch.zeros(2, 5, device="cuda"),
                                                              torch.full((2,), 7, dtype=torch.long, device="cuda")),
        "bf16 logp": lambda: rk.grpo_loss(x.bfloat16(), x, a, m),
    }
    with pytest.raises(exc, match=match):
        calls[case]()
