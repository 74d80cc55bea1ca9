"""rk.gae_advantage_return: a hand-computed case, verl's compute_gae_advantage_return written out
(float64 loop, masked_whiten) on random padded batches with multi-turn holes and fully masked rows,
the packed layout, and the errors."""
import pytest
import torch

import recap_kernels as rk


def verl_gae(r, v, m, gamma, lam, whiten=True):
    """verl's compute_gae_advantage_return, written out (float64)."""
    nv = torch.zeros(r.shape[0], dtype=r.dtype)
    lg = torch.zeros_like(nv)
    out = []
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * nv - v[:, t]
        lg_ = delta + gamma * lam * lg
        nv = v[:, t] * m[:, t] + (1 - m[:, t]) * nv
        lg = lg_ * m[:, t] + (1 - m[:, t]) * lg
        out.append(lg)
    adv = torch.stack(out[::-1], dim=1)
    ret = adv + v
    if whiten:
        w = m.sum()
        mean = (adv * m).sum() / (w + 1e-8)
        var = ((adv - mean) ** 2 * m).sum() / (w + 1e-8) * (w / (w - 1))
        adv = (adv - mean) * torch.rsqrt(var + 1e-8)
    return adv, ret


def test_hand_computed(device):
    """gamma 0.9, lam 0.8, rewards 0, 0, 1, values 0.5, 0.2, 0.1: A = 0.06736, 0.538, 0.9 (the
    deltas -0.32, -0.11, 0.9 discounted by 0.72); the middle token masked: A = 0.238, 0.9, 0.9."""
    r = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]], device=device)
    v = torch.tensor([[0.5, 0.2, 0.1], [0.5, 0.2, 0.1]], device=device)
    m = torch.tensor([[1, 1, 1], [1, 0, 1]], dtype=torch.bool, device=device)
    adv, ret = rk.gae_advantage_return(r, v, m, 0.9, 0.8, whiten=False)
    assert adv.device == device and adv.shape == (2, 3) and adv.dtype == torch.float32
    want_a = torch.tensor([[0.06736, 0.538, 0.9], [0.238, 0.9, 0.9]])
    want_r = torch.tensor([[0.56736, 0.738, 1.0], [0.738, 1.1, 1.0]])
    torch.testing.assert_close(adv.cpu(), want_a, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ret.cpu(), want_r, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_matches_verl_formula(device, gen, whiten, mask_dtype):
    b, length = 9, 37
    lens = torch.randint(0, length + 1, (b,), generator=gen)
    lens[0], lens[1], lens[2] = length, 1, 0  # a full row, a one-token row, a fully masked row
    m = (torch.arange(length)[None, :] < lens[:, None]) & (torch.rand(b, length, generator=gen) > 0.2)
    r = torch.randn(b, length, generator=gen)
    v = torch.randn(b, length, generator=gen)
    gamma, lam = 0.99, 0.95
    want_a, want_r = verl_gae(r.double(), v.double(), m.double(), gamma, lam, whiten)
    adv, ret = rk.gae_advantage_return(r.to(device), v.to(device), m.to(mask_dtype).to(device), gamma, lam,
                                       whiten=whiten)
    torch.testing.assert_close(adv.cpu().double(), want_a, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ret.cpu().double(), want_r, atol=2e-5, rtol=2e-5)
    again, _ = rk.gae_advantage_return(r.to(device), v.to(device), m.to(mask_dtype).to(device), gamma, lam,
                                       whiten=whiten)
    assert torch.equal(adv, again)


def test_packed_equals_padded(device, gen):
    """The packed layout (cu_seqlens) gives each sequence what its padded row gives."""
    lens = [5, 0, 33, 1]
    r = torch.randn(sum(lens), generator=gen)
    v = torch.randn(sum(lens), generator=gen)
    m = torch.rand(sum(lens), generator=gen) > 0.1
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    adv, ret = rk.gae_advantage_return(r.to(device), v.to(device), m.to(device), 0.9, 0.7, cu, whiten=False)
    for i, n in enumerate(lens):
        pad = lambda x: torch.nn.functional.pad(x[cu[i]:cu[i + 1]], (0, 40 - n))[None]  # noqa: E731
        a, t = rk.gae_advantage_return(pad(r).to(device), pad(v).to(device), pad(m).to(device), 0.9, 0.7,
                                       whiten=False)
        # padding after a sequence is masked: it carries nothing back into the sequence
        assert torch.equal(adv[cu[i]:cu[i + 1]].cpu(), a[0, :n].cpu())
        assert torch.equal(ret[cu[i]:cu[i + 1]].cpu(), t[0, :n].cpu())


def test_errors(device):
    r, v, m = (torch.zeros(2, 4, device=device) for _ in range(3))
    m[:, 0] = 1
    with pytest.raises(rk.RecapError, match="values"):
        rk.gae_advantage_return(r, v[:, :3], m)
    with pytest.raises(rk.RecapError, match="gamma"):
        rk.gae_advantage_return(r, v, m, gamma=-0.5)
    bad = v.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(rk.RecapError, match="values.*token 4"):
        rk.gae_advantage_return(r, bad, m)
    bad[1, 0], bad[1, 2] = 0.0, float("nan")  # at a masked token: its reward and value are not read
    adv, ret = rk.gae_advantage_return(r, bad, m, whiten=False)
    assert torch.isfinite(adv).all() and torch.isnan(ret[1, 2])
