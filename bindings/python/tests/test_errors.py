"""Bad inputs raise RecapError naming the argument (and the expected shape), before any launch;
nothing crashes the interpreter."""
import pytest
import torch

import recap_kernels as rk


def calls(device):
    x = torch.full((4, 8), -1.0, device=device)
    m = torch.ones(4, 8, device=device)
    a = torch.zeros(4, device=device)
    z = torch.zeros(2, 5, device=device)
    y = torch.zeros(2, dtype=torch.long, device=device)
    other = "cpu" if device.type == "cuda" else "meta"
    return {
        "mask shape": (lambda: rk.grpo_loss(x, x, a, m[:, :7]), "mask"),
        "old_logp shape": (lambda: rk.grpo_loss(x, x[:3], a, m), "old_logp"),
        "packed without cu_seqlens": (lambda: rk.grpo_loss(x.view(-1), x.view(-1), a, m.view(-1)), "cu_seqlens"),
        "cu_seqlens on the GPU or not ending at T": (
            lambda: rk.grpo_loss(x.view(-1), x.view(-1), a, m.view(-1),
                                 cu_seqlens=torch.tensor([0, 8, 16, 24, 30], device=device)), "cu_seqlens"),
        "cu_seqlens decreasing": (lambda: rk.grpo_loss(x.view(-1), x.view(-1), a, m.view(-1),
                                                       cu_seqlens=[0, 8, 6, 24, 32]), "cu_seqlens"),
        "unknown agg mode": (lambda: rk.grpo_loss(x, x, a, m, agg_mode="seq-mean"), "agg_mode"),
        "unknown option": (lambda: rk.grpo_loss(x, x, a, m, clip_ratio_low=0.2), "clip_ratio_low"),
        "unknown kl": (lambda: rk.grpo_loss(x, x, a, m, kl_estimator="k9"), "k9"),
        "dual-clip c <= 1": (lambda: rk.grpo_loss(x, x, a, m, dual_clip=0.5), "dual_clip"),
        "advantages length": (lambda: rk.grpo_loss(x.view(-1), x.view(-1), a[:3], m.view(-1),
                                                   cu_seqlens=[0, 8, 16, 24, 32]), "advantages"),
        "ref_logp length": (lambda: rk.grpo_loss(x, x, a, m, ref_logp=x[:3]), "ref_logp"),
        "lambda length": (lambda: rk.grpo_loss(x, x, a, m, lambda_=[1.0, 0.5]), "lambda"),
        "lambda on the GPU": (lambda: rk.grpo_loss(x, x, a, m, lambda_=torch.ones(1, device=other)), "lambda_"),
        "membership length": (lambda: rk.grpo_loss(x, x, a, m, membership=[1, 1]), "membership"),
        "membership bits": (lambda: rk.grpo_loss(x, x, a, m, membership=[1, 1, 2, 1]), "membership"),
        "objective kind": (lambda: rk.grpo_loss(x, x, a, m, objectives=["value"]), "objectives"),
        "device mismatch": (lambda: rk.grpo_loss(x, x.to(other), a, m), "old_logp"),
        "integer logp": (lambda: rk.grpo_loss(x.long(), x, a, m), "logp"),
        "not a tensor": (lambda: rk.grpo_loss(x, [1.0], a, m), "old_logp"),
        "K above the maximum": (lambda: rk.grpo_loss(x, x, torch.zeros(4, 17, device=device), m), "lambda"),
        "normalizers shape": (lambda: rk.grpo_loss(x, x, a, m, normalizers=torch.ones(3, dtype=torch.float64)),
                              "normalizers"),
        "temperature 0": (lambda: rk.logprobs_from_logits(z, y, 0.0), "temperature"),
        "labels length": (lambda: rk.logprobs_from_logits(z, torch.zeros(3, dtype=torch.long, device=device)),
                          "labels"),
        "label out of range": (lambda: rk.logprobs_from_logits(z, torch.full((2,), 7, device=device)), "labels"),
        "integer logits": (lambda: rk.logprobs_from_logits(z.long(), y), "logits"),
        "column-strided logits": (lambda: torch.ops.recap.logprob_forward(torch.zeros(5, 2, device=device).t(),
                                                                          y.int(), 1.0, -100, False), "logits"),
        "unknown orientation": (lambda: rk.RecapWeights(["reward", "rewards"]), "orientations"),
        "scheduler option": (lambda: rk.RecapWeights(["reward"], windw=3), "windw"),
        "scheduler preset": (lambda: rk.RecapWeights(["reward"], preset="nope"), "preset"),
        "non-finite observation": (lambda: rk.RecapWeights(["reward"]).observe([float("nan")]), "values"),
        "advantage mode": (lambda: rk.group_advantages(a, 2, mode="ppo"), "ppo"),
        "groups": (lambda: rk.group_advantages(a, 3), "groups"),
        "fused-linear dtype": (lambda: rk.fused_linear_grpo_loss(z, torch.zeros(3, 5, device=device), y, a[:2],
                                                                 a[:1], y, [0, 2]), "hidden"),
    }


CASES = list(calls(torch.device("cpu")))


@pytest.mark.parametrize("case", CASES)
def test_bad_inputs_raise_clear_errors(device, case):
    fn, name = calls(device)[case]
    with pytest.raises(rk.RecapError, match=name):
        fn()


def test_errors_name_the_expected_shape():
    x = torch.zeros(4, 8)
    with pytest.raises(rk.RecapError, match=r"old_logp.*\[T\] = 32"):
        rk.grpo_loss(x, x[:3], torch.zeros(4), torch.ones(4, 8))


def test_verl_and_trl_options():
    x, m, a = torch.zeros(2, 4), torch.ones(2, 4), torch.zeros(2)
    with pytest.raises(rk.RecapError, match="loss_mode"):
        rk.verl.compute_policy_loss(x, x, a, m, config={"clip_ratio": 0.2}, loss_mode="ppo")
    with pytest.raises(rk.RecapError, match="loss_agg_mode"):
        rk.verl.agg_loss(x, m, "token-max")
    with pytest.raises(rk.RecapError, match="loss_type"):
        rk.trl.grpo_loss(x, x, a, m, loss_type="ppo")
    with pytest.raises(rk.RecapError, match="importance_sampling_level"):
        rk.trl.grpo_loss(x, x, a, m, loss_type="vespo", importance_sampling_level="sequence")
    with pytest.raises(rk.RecapError, match="max_completion_length"):
        rk.trl.grpo_loss(x, x, a, m, loss_type="dr_grpo")
    with pytest.raises(rk.RecapError, match="importance_sampling_level"):
        rk.trl.grpo_loss(x, x, a, m, importance_sampling_level="seq")
