"""``rk.gae_advantage_return`` against verl's own ``compute_gae_advantage_return`` (the pinned verl
of scripts/install-peers.sh), called the way verl's ``compute_advantage`` calls it for
``adv_estimator=gae``: identical padded float32 batches (multi-turn holes, a fully masked row, a
one-token row), verl's default gamma = lam = 1 and PPO's usual 0.99 / 0.95.

Without verl installed the module is skipped; with RECAP_REQUIRE_PEERS=1 (CI) it fails instead."""
import os

import pytest
import torch

try:
    from verl.trainer.ppo.core_algos import AdvantageEstimator, compute_gae_advantage_return, get_adv_estimator_fn
except ImportError:
    if os.environ.get("RECAP_REQUIRE_PEERS") == "1":
        raise
    pytest.skip("verl is not installed (scripts/install-peers.sh installs the pinned one)", allow_module_level=True)

import recap_kernels as rk


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_verls_gae(gamma, lam, seed):
    assert get_adv_estimator_fn(AdvantageEstimator.GAE) is compute_gae_advantage_return
    gen = torch.Generator().manual_seed(seed)
    b, length = 16, 65
    lens = torch.randint(1, length + 1, (b,), generator=gen)
    lens[0], lens[1] = length, 1
    mask = (torch.arange(length)[None, :] < lens[:, None]) & (torch.rand(b, length, generator=gen) > 0.25)
    mask[2] = False  # a fully masked row
    mask = mask.float()
    rewards = torch.zeros(b, length)
    rewards[torch.arange(b), (lens - 1).clamp(min=0)] = torch.randn(b, generator=gen)  # outcome reward at the end
    values = torch.randn(b, length, generator=gen)
    want_a, want_r = compute_gae_advantage_return(rewards, values, mask, torch.tensor(gamma), torch.tensor(lam))
    got_a, got_r = rk.gae_advantage_return(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(got_a, want_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_r, want_r, atol=1e-5, rtol=1e-5)
