"""``rk.gae_advantage_return`` and the drop-in ``rk.verl.use_recap_gae()`` against verl's own
``compute_gae_advantage_return`` (the pinned verl of scripts/install-peers.sh), called the way
verl's ``compute_advantage`` calls it for ``adv_estimator=gae``: identical padded float32 batches
(multi-turn holes, a fully masked row, a one-token row), verl's default gamma = lam = 1 and PPO's
usual 0.99 / 0.95; and verl's own ``compute_advantage`` (what its trainers call) with the drop-in
in place.

Without verl installed the module is skipped; with RECAP_REQUIRE_PEERS=1 (CI) it fails instead."""
import os

import pytest
import torch

try:
    from verl import DataProto
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo.ray_trainer import compute_advantage
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


def test_drop_in_replaces_verls_names():
    """use_recap_gae puts ours where verl's trainer looks it up, gives the same numbers, and puts
    verl's back."""
    gen = torch.Generator().manual_seed(3)
    r, v = torch.randn(4, 9, generator=gen), torch.randn(4, 9, generator=gen)
    m = (torch.rand(4, 9, generator=gen) > 0.3).float()
    want = compute_gae_advantage_return(r, v, m, torch.tensor(0.99), torch.tensor(0.95))
    try:
        rk.verl.use_recap_gae()
        assert core_algos.compute_gae_advantage_return is rk.verl.compute_gae_advantage_return
        assert get_adv_estimator_fn(AdvantageEstimator.GAE) is rk.verl.compute_gae_advantage_return
        got = core_algos.compute_gae_advantage_return(token_level_rewards=r, values=v, response_mask=m, gamma=0.99,
                                                      lam=0.95)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    finally:
        rk.verl.use_recap_gae(False)
    assert core_algos.compute_gae_advantage_return is compute_gae_advantage_return
    assert get_adv_estimator_fn(AdvantageEstimator.GAE) is compute_gae_advantage_return


def test_verls_compute_advantage_with_the_drop_in():
    """verl's compute_advantage(adv_estimator=gae) on a DataProto, with verl's estimator and with
    ours in its place: the same advantages and returns."""
    gen = torch.Generator().manual_seed(4)
    b, length = 6, 17
    mask = (torch.rand(b, length, generator=gen) > 0.2).long()
    data = DataProto.from_dict({"token_level_rewards": torch.randn(b, length, generator=gen),
                                "values": torch.randn(b, length, generator=gen), "response_mask": mask})
    want = compute_advantage(data, adv_estimator=AdvantageEstimator.GAE, gamma=0.99, lam=0.95, config={})
    want = (want.batch["advantages"].clone(), want.batch["returns"].clone())
    try:
        rk.verl.use_recap_gae()
        got = compute_advantage(data, adv_estimator=AdvantageEstimator.GAE, gamma=0.99, lam=0.95, config={})
    finally:
        rk.verl.use_recap_gae(False)
    torch.testing.assert_close(got.batch["advantages"], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.batch["returns"], want[1], atol=1e-5, rtol=1e-5)
