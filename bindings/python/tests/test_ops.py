"""torch.library.opcheck on every op (schema, fake implementation, autograd registration, AOT
dispatch), and a verl-style training step compiled with torch.compile(fullgraph=True)."""
import pytest
import torch
from torch.library import opcheck

import recap_kernels as rk  # noqa: F401  (registers torch.ops.recap.*)

T, B, V = 12, 3, 37


def samples(device="cpu", requires_grad=True):
    g = torch.Generator().manual_seed(5)
    old = -torch.rand(T, generator=g) * 3
    logp = (old + 0.2 * torch.randn(T, generator=g)).requires_grad_(requires_grad)
    cu = torch.tensor([0, 4, 9, 12], dtype=torch.int32)
    mask = torch.ones(T, dtype=torch.uint8)
    adv = torch.randn(B, 2, generator=g)
    lam = torch.tensor([1.0, 0.5])
    cfg = rk.functional._config({"kl_coef": 0.1})
    return dict(g=g, old=old, logp=logp, cu=cu, mask=mask, adv=adv, lam=lam, cfg=cfg, ref=old - 0.1)


def cases():
    s = samples()
    g = s["g"]
    logits = torch.randn(T, V, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (T,), generator=g, dtype=torch.int32)
    lse, ent = torch.logsumexp(logits.detach(), -1), torch.rand(T, generator=g)
    hidden = (torch.randn(T, 8, generator=g) * 0.1).bfloat16().requires_grad_()
    weight = (torch.randn(V, 8, generator=g) * 0.1).bfloat16().requires_grad_()
    norms = torch.tensor([[12.0, 12.0, 12.0], [3.0, 3.0, 3.0]], dtype=torch.float64)
    ops = torch.ops.recap
    return {
        "grpo_loss": (ops.grpo_loss.default, (s["logp"], s["old"], s["adv"], s["mask"], s["cu"], s["lam"], [0, 1],
                                              torch.tensor([3, 1, 2]), s["ref"], None, None, norms, None, False,
                                              s["cfg"])),
        "grpo_loss_async": (ops.grpo_loss_async.default, (s["logp"], s["old"], s["adv"], s["mask"], s["cu"], s["lam"],
                                                          [0, 1], torch.tensor([3, 1, 2]), s["ref"], None, None, norms,
                                                          None, False, s["cfg"])),
        "kl": (ops.kl.default, (s["logp"], s["ref"], s["mask"], "k3+")),
        "rollout_rejection": (ops.rollout_rejection.default, ((s["old"] - s["logp"]).detach(), s["mask"], s["cu"],
                                                              "token_k1,seq_mean_k3", "0.8_1.25,0.01")),
        "rollout_is_weights": (ops.rollout_is_weights.default, ((s["old"] - s["logp"]).detach(), s["mask"], s["cu"],
                                                                "sequence", "0.5_2.0", True)),
        "weighted_reduce": (ops.weighted_reduce.default, (torch.randn(T, 2, generator=g, requires_grad=True),
                                                          s["mask"], s["cu"], s["lam"], None, None, None, s["cfg"])),
        "count_normalizers": (ops.count_normalizers.default, (s["mask"], s["cu"], None, 2)),
        "logprob_forward": (ops.logprob_forward.default, (logits, labels, 0.8, -100, False)),
        "logprob_forward_inplace": (ops.logprob_forward.default, (logits, labels, 1.0, -100, True)),
        "logprob_backward_": (ops.logprob_backward_.default, (logits.detach().clone(), labels, lse, ent,
                                                              torch.randn(T, generator=g), torch.randn(T, generator=g),
                                                              1.0, -100)),
        "logprob_backward": (ops.logprob_backward.default, (logits.detach(), labels, lse, ent,
                                                            torch.randn(T, generator=g), None, 1.0, -100)),
        "logprob_forward sum_pi_squared": (ops.logprob_forward.default, (logits, labels, 0.8, -100, False, True)),
        "logprob_backward sum_pi_squared": (ops.logprob_backward.default,
                                            (logits.detach(), labels, lse, ent, torch.randn(T, generator=g), None, 1.0,
                                             -100, torch.rand(T, generator=g), torch.randn(T, generator=g))),
        "grpo_loss_from_logits": (ops.grpo_loss_from_logits.default, (logits, labels, s["old"], s["adv"], s["mask"],
                                                                      s["cu"], s["lam"], [0, 0], None, s["ref"], None,
                                                                      None, None, False, s["cfg"], 1.0, -100)),
        "fused_linear_grpo_loss": (ops.fused_linear_grpo_loss.default, (hidden, weight, labels, s["old"], s["adv"],
                                                                        s["mask"], s["cu"], s["lam"], [0, 1], None,
                                                                        None, None, False, s["cfg"], 1.0, 5, 0,
                                                                        True)),
        "grpo_loss_from_logits_async": (ops.grpo_loss_from_logits_async.default,
                                        (logits, labels, s["old"], s["adv"], s["mask"], s["cu"], s["lam"], [0, 0],
                                         None, s["ref"], None, None, None, False, s["cfg"], 1.0, -100)),
        "fused_linear_grpo_loss_async": (ops.fused_linear_grpo_loss_async.default,
                                         (hidden, weight, labels, s["old"], s["adv"], s["mask"], s["cu"], s["lam"],
                                          [0, 1], None, None, None, False, s["cfg"], 1.0, 5, 0, True)),
        "group_advantages": (ops.group_advantages.default, (torch.randn(8, 2, generator=g), None, None, 4, 0,
                                                            "grpo,rloo", 1e-6, "verl")),
        "group_advantages lengths": (ops.group_advantages.default,
                                     (torch.randn(8, 2, generator=g), None, torch.arange(8, dtype=torch.int32), 4,
                                      0, "opo,reinforce_plus_plus_baseline", 1e-6, "zero")),
        "group_advantages gdpo": (ops.group_advantages.default, (torch.randn(8, 3, generator=g), None, None, 4, 0,
                                                                 "gdpo", 1e-4, "zero", [1.0, 0.5, 2.0])),
        "group_advantages remax": (ops.group_advantages.default, (torch.randn(8, 2, generator=g), None, None, 4, 0,
                                                                  "remax,grpo", 1e-6, "zero", None,
                                                                  torch.randn(8, 2, generator=g))),
        "optimal_token_baseline": (ops.optimal_token_baseline.default,
                                   (torch.randn(T, generator=g), s["old"], torch.rand(T, generator=g), None, s["mask"],
                                    s["cu"], torch.tensor([0, 1, 0], dtype=torch.int32), 0, False, False, 1e-8)),
        "optimal_token_baseline tir": (ops.optimal_token_baseline.default,
                                       (torch.randn(T, generator=g), s["old"], torch.rand(T, generator=g),
                                        torch.rand(T, generator=g), s["mask"], torch.tensor([0, 6, 12],
                                                                                            dtype=torch.int32),
                                        None, 2, True, True, 1e-8)),
    }


@pytest.mark.parametrize("name", list(cases()))
def test_opcheck(name):
    op, args = cases()[name]
    opcheck(op, args)


def verl_step(logits, labels, old, ref, adv, mask, lam):
    """logits -> log-probs + entropy -> policy loss + KL + entropy bonus -> loss."""
    logp, entropy = rk.logprobs_from_logits(logits, labels, temperature=0.9)
    loss, metrics = rk.grpo_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=0.05, lambda_=lam)
    ent, _ = rk.weighted_reduce(entropy, mask)
    return loss - 0.01 * ent, metrics["actor/pg_clipfrac"], metrics["actor/ppo_kl"]


def test_compiled_verl_step_has_no_graph_break_and_matches_eager():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(7)
    b, l, h, v = 4, 9, 16, 53
    head = torch.randn(v, h, generator=g) * 0.2
    feats = torch.randn(b, l, h, generator=g)
    labels = torch.randint(0, v, (b, l), generator=g)
    with torch.no_grad():
        old = torch.log_softmax(feats @ head.T / 0.9, -1).gather(-1, labels[..., None]).squeeze(-1) + 0.05
    ref, adv = old - 0.1, torch.randn(b, generator=g)
    mask = torch.rand(b, l, generator=g) > 0.2
    lam = torch.tensor([1.0])

    def run(fn):
        w = head.clone().requires_grad_()
        loss, clipfrac, ppo_kl = fn(feats @ w.T, labels, old, ref, adv, mask, lam)
        loss.backward()
        return loss.detach(), clipfrac, ppo_kl, w.grad

    eager = run(verl_step)
    compiled = run(torch.compile(verl_step, fullgraph=True))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7)
    # new weights as a CPU tensor reuse the compiled graph
    lam[0] = 0.7
    again = run(torch.compile(verl_step, fullgraph=True))
    torch.testing.assert_close(again[0], run(verl_step)[0])


def test_version_is_the_crates():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[3]
    text = (root / "Cargo.toml").read_text()
    version = re.search(r'\[workspace\.package\]\s*version\s*=\s*"([^"]+)"', text).group(1)
    assert rk.__version__ == version


def test_stat_lengths_follow_the_layout():
    from recap_kernels import _native, ops

    for k in (1, 2, 5, 16):
        *_, (name, off, n, _) = _native.grpo_stat_layout(k)
        assert ops.grpo_stats_len(k) == off + n
        *_, (name, off, n, _) = _native.logits_stat_layout(k)
        assert ops.logits_stats_len(k) == off + n
    # the rollout IS stats: one name per value the op writes
    assert len(rk.functional.ROLLOUT_IS_STATS) == ops.ROLLOUT_IS_STATS == 7
