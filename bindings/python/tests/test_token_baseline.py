"""verl's optimal token baseline (rk.optimal_token_baseline and the rk.verl drop-ins): a hand-computed
case, verl's single-turn formula written out on random padded batches, the multi-turn variant as the
single-turn one of the batch with each row's unmasked tokens moved to the front, and the errors."""
import numpy as np
import pytest
import torch

import recap_kernels as rk
from recap_kernels import verl as rk_verl


def verl_single_turn(rewards, mask, index, old, spp, rho, zero_tail, eps):
    """verl's compute_optimal_token_baseline_advantage, written out (dense, float64)."""
    returns = (rewards * mask).flip(-1).cumsum(-1).flip(-1)
    w = 1 - 2 * old.exp() + spp
    if rho is not None:
        w = w * rho ** 2
    cum = (w * mask).cumsum(-1)
    base = torch.zeros_like(returns)
    for key in dict.fromkeys(index):
        rows = [i for i, k in enumerate(index) if k == key]
        if len(rows) == 1:
            continue
        g, c, m = returns[rows], cum[rows], mask[rows]
        base[rows] = ((g * c * m).sum(0) / ((c * m).sum(0) + eps)).expand(len(rows), -1)
        if zero_tail:
            lens = m.sum(-1)
            top, second = lens.sort().values[-1], lens.sort().values[-2]
            if (lens == top).sum() == 1 and top > second:
                base[rows[int((lens == top).nonzero()[0])], int(second):] = 0.0
    return (returns - base) * mask, returns


def batch(gen, b=12, length=33, groups=4, holes=False):
    lens = torch.randint(0, length + 1, (b,), generator=gen)
    lens[0], lens[1] = length, 1
    mask = (torch.arange(length)[None, :] < lens[:, None]).float()
    if holes:  # tool outputs between turns
        mask = mask * (torch.rand(b, length, generator=gen) > 0.3).float()
    rewards = torch.randn(b, length, generator=gen) * (torch.rand(b, length, generator=gen) < 0.2)
    old = -torch.rand(b, length, generator=gen) * 3
    pi = old.exp()  # a real distribution: sum p^2 lies in [pi^2, pi^2 + (1 - pi)^2], so w >= 0
    spp = pi ** 2 + torch.rand(b, length, generator=gen) * (1 - pi) ** 2
    rho = torch.rand(b, length, generator=gen) * 1.5 + 0.2
    index = np.array([f"uid-{i % groups}" for i in torch.randperm(b, generator=gen).tolist()], dtype=object)
    return rewards, mask, index, old, spp, rho


def test_hand_computed(device):
    """One group of two: w = 1 - 2 + 2 = 1 everywhere, W = [1, 2]; G = [1, 1] and [3, 3]; the
    baseline (1 + 3) / 2 = (2 + 6) / 4 = 2 at both positions; a third row alone gets A = G."""
    rewards = torch.tensor([[0.0, 1.0], [0.0, 3.0], [2.0, 0.5]], device=device)
    mask = torch.ones(3, 2, device=device)
    zeros, twos = torch.zeros(3, 2, device=device), torch.full((3, 2), 2.0, device=device)
    adv, ret = rk.optimal_token_baseline(rewards, mask, zeros, twos, group_ids=[7, 7, 3], eps=0.0)
    assert adv.device == device and adv.shape == (3, 2)
    assert adv.cpu().tolist() == [[-1.0, -1.0], [1.0, 1.0], [2.5, 0.5]]
    assert ret.cpu().tolist() == [[1.0, 1.0], [3.0, 3.0], [2.5, 0.5]]


@pytest.mark.parametrize("zero_tail", [False, True])
@pytest.mark.parametrize("with_rho", [False, True])
def test_single_turn_matches_verl_formula(device, gen, zero_tail, with_rho):
    for length in (1, 31, 32, 33, 4097):
        rewards, mask, index, old, spp, rho = batch(gen, length=length)
        rho = rho if with_rho else None
        want_a, want_r = verl_single_turn(rewards.double(), mask.double(), list(index), old.double(), spp.double(),
                                          None if rho is None else rho.double(), zero_tail, 1e-8)
        on = [x.to(device) if x is not None else None for x in (rewards, mask, old, spp, rho)]
        got_a, got_r = rk_verl.compute_optimal_token_baseline_advantage(
            on[0], on[1], index, on[2], on[3], rollout_is_weights=on[4], handle_zero_tail=zero_tail)
        assert got_a.dtype == torch.float32
        torch.testing.assert_close(got_a.cpu().double(), want_a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_r.cpu().double(), want_r, rtol=1e-5, atol=1e-5)


def compact(x, mask):
    """Each row's unmasked entries moved to the front (zeros after)."""
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        keep = x[i][mask[i] > 0]
        out[i, :keep.numel()] = keep
    return out


@pytest.mark.parametrize("zero_tail", [False, True])
def test_multi_turn_is_single_turn_of_the_compacted_rows(device, gen, zero_tail):
    """tir_optimal_token_baseline aligns the k-th unmasked token of each row: on the rows that hold
    unmasked tokens it equals the single-turn baseline of the compacted batch, read back at those
    tokens; masked tokens get 0, and the returns are the reward-to-go of every token."""
    rewards, mask, index, old, spp, rho = batch(gen, b=16, length=33, groups=3, holes=True)
    mask[5] = 0.0  # a fully masked row is no member of its group
    live = (mask.sum(-1) > 0).nonzero().flatten().tolist()
    c = [compact(x, mask).double()[live] for x in (rewards, mask, old, spp, rho)]
    want_a, _ = verl_single_turn(c[0], c[1], [index[i] for i in live], c[2], c[3], c[4], zero_tail, 1e-8)
    on = [x.to(device) for x in (rewards, mask, old, spp, rho)]
    got_a, got_r = rk_verl.compute_multi_turn_optimal_token_baseline_advantage(
        on[0], on[1], index, on[2], on[3], rollout_is_weights=on[4], handle_zero_tail=zero_tail)
    got_a, got_r = got_a.cpu().double(), got_r.cpu().double()
    for j, i in enumerate(live):
        keep = mask[i] > 0
        n = int(keep.sum())
        torch.testing.assert_close(got_a[i][keep], want_a[j, :n], rtol=1e-5, atol=1e-5)
        assert (got_a[i][~keep] == 0).all()
    assert (got_a[5] == 0).all()
    want_r = (rewards * mask).flip(-1).cumsum(-1).flip(-1).double()
    torch.testing.assert_close(got_r, want_r, rtol=1e-5, atol=1e-5)


def test_masked_tokens_are_not_read_and_ids_of_any_kind(device, gen):
    rewards, mask, index, old, spp, rho = batch(gen, length=17)
    want, _ = rk.optimal_token_baseline(rewards.to(device), mask.to(device), old.to(device), spp.to(device),
                                        group_ids=index)
    poisoned = [x.clone() for x in (rewards, old, spp)]
    for x in poisoned:
        x[mask == 0] = float("nan")
    got, _ = rk.optimal_token_baseline(*(x.to(device) for x in (poisoned[0], mask, poisoned[1], poisoned[2])),
                                       group_ids=index)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the same groups as int64 ids (any values) and as a bool mask
    dense = {k: i for i, k in enumerate(dict.fromkeys(index))}
    ids = torch.tensor([10 ** 12 * dense[k] - 5 for k in index], device=device)
    again, _ = rk.optimal_token_baseline(rewards.to(device), mask.bool().to(device), old.to(device), spp.to(device),
                                         group_ids=ids)
    torch.testing.assert_close(again, want, rtol=0, atol=0)


def test_packed_with_cu_seqlens(device, gen):
    rewards, mask, index, old, spp, _ = batch(gen, b=8, length=9, groups=2)
    lens = mask.sum(-1).long()
    keep = mask > 0
    cu = [0] + torch.cumsum(lens, 0).tolist()
    packed = [x[keep].to(device) for x in (rewards, mask, old, spp)]
    got, ret = rk.optimal_token_baseline(packed[0], packed[1], packed[2], packed[3], cu, group_ids=index)
    want, want_r = rk.optimal_token_baseline(rewards.to(device), mask.to(device), old.to(device), spp.to(device),
                                             group_ids=index)
    torch.testing.assert_close(got, want[keep.to(device)], rtol=0, atol=0)
    torch.testing.assert_close(ret, want_r[keep.to(device)], rtol=0, atol=0)


def test_errors_name_the_argument(device):
    r = torch.zeros(4, 3, device=device)
    m = torch.ones(4, 3, device=device)
    cases = {
        "sum_pi_squared": lambda: rk.optimal_token_baseline(r, m, r, None, group_size=2),
        "group_size": lambda: rk.optimal_token_baseline(r, m, r, r),
        "groups": lambda: rk.optimal_token_baseline(r, m, r, r, group_size=3),
        "group_ids": lambda: rk.optimal_token_baseline(r, m, r, r, group_ids=[0, 1]),
        "old_logp": lambda: rk.optimal_token_baseline(r, m, r[:, :2], r, group_size=2),
        "eps": lambda: rk.optimal_token_baseline(r, m, r, r, group_size=2, eps=-1.0),
        "token_rewards": lambda: rk.optimal_token_baseline(torch.full_like(r, float("inf")), m, r, r, group_size=2),
    }
    for name, call in cases.items():
        with pytest.raises(rk.RecapError, match=name):
            call()


def test_empty_batch(device):
    e = torch.zeros(0, 5, device=device)
    adv, ret = rk.optimal_token_baseline(e, e, e, e, group_size=2)
    assert adv.shape == (0, 5) and ret.shape == (0, 5)
