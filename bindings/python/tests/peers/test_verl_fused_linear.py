"""``recap_kernels.verl.FusedLinearForPPO`` against verl's own (the pinned verl of
scripts/install-peers.sh): the module alone on random inputs (2-D and 3-D, float32 and bfloat16,
temperatures), and inside a tiny random-init Qwen2 patched by verl's own
``patch_forward_with_backends`` (the step of ``apply_monkey_patch`` that installs the fused-kernel
forward; the whole of it fails with TRL 1.16 installed, which no longer has the value-head model verl
patches) with ``use_fused_kernels=True`` (verl's model forward, its label roll and temperature), swapped in
by ``use_recap_fused_linear()`` and by verl's ``external_lib`` import; log-probs, entropies and
every parameter's gradient compared. Also: installing the package makes verl load its plugin,
which registers the ``recap_*`` policy losses in every process that imports verl.

Without verl installed the module is skipped; with RECAP_REQUIRE_PEERS=1 (CI) it fails instead."""
import os
import subprocess
import sys

import pytest
import torch

try:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from verl.models.transformers.monkey_patch import patch_forward_with_backends
    from verl.utils.experimental import torch_functional as verl_tf
    from verl.utils.import_utils import import_external_libs
    import verl.utils.torch_functional as verl_F
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.utils.dataset.dataset_utils import DatasetPadMode
    from verl.workers.engine.fsdp import transformer_impl as fsdp_engine
except ImportError:
    if os.environ.get("RECAP_REQUIRE_PEERS") == "1":
        raise
    pytest.skip("verl is not installed (scripts/install-peers.sh installs the pinned one)", allow_module_level=True)

from recap_kernels import verl as rk_verl

VERLS = verl_tf.FusedLinearForPPO
VERLS_PREPARE = fsdp_engine.FSDPEngineWithLMHead.prepare_model_outputs


@pytest.fixture(autouse=True)
def verl_own_module():
    """Each test starts and ends with verl's own class in place."""
    rk_verl.use_recap_fused_linear(False)
    assert verl_tf.FusedLinearForPPO is VERLS
    yield
    rk_verl.use_recap_fused_linear(False)


def run(module, hidden, weight, ids, temperature, seed=0):
    """Outputs and the gradients of a random linear function of them."""
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    logp, ent = module(hidden, weight, ids, temperature=temperature)
    g = torch.Generator().manual_seed(seed)
    (logp * torch.randn(logp.shape, generator=g)).sum().add(
        (ent.float() * torch.randn(ent.shape, generator=g)).sum()).backward()
    return logp, ent, hidden.grad, weight.grad


@pytest.mark.parametrize("shape", [(37,), (3, 11), (1, 1), (2, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_module_matches_verls(shape, dtype, temperature):
    g = torch.Generator().manual_seed(len(shape) * 31 + shape[-1])
    h, v = 24, 53
    hidden = torch.randn(*shape, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.3).to(dtype)
    ids = torch.randint(0, v, shape, generator=g)
    chunk = 8  # several chunks
    want = run(VERLS(chunk_size=chunk), hidden, weight, ids, temperature)
    got = run(rk_verl.FusedLinearForPPO(chunk_size=chunk), hidden, weight, ids, temperature)
    names = ("log_probs", "entropy", "d_hidden", "d_weight")
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
    if dtype == torch.float32:
        for name, a, b in zip(names, got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, msg=name)
        return
    # bfloat16: verl rounds its logits and their gradient to bf16, so the two differ by bf16
    # roundings; each is compared with verl's formula in float64 on the same (rounded) inputs, and
    # ours must be as close to it as verl's is
    exact = run(VERLS(chunk_size=chunk), hidden.double(), weight.double(), ids, temperature)
    for name, a, b, x in zip(names, got, want, exact):
        if x.numel() == 0:
            continue
        ours, theirs = (a.double() - x).abs().max().item(), (b.double() - x).abs().max().item()
        assert ours <= 1.5 * theirs + 1e-3 * x.abs().max().item(), (name, ours, theirs)


def test_module_checks_as_verls():
    with pytest.raises(ValueError, match="triton"):
        rk_verl.FusedLinearForPPO(impl_backend="triton")
    with pytest.raises(ValueError, match="input_ids"):
        rk_verl.FusedLinearForPPO()(torch.randn(4, 8), torch.randn(5, 8), torch.zeros(3, dtype=torch.long))


def test_batch_invariant_rows_alone_and_in_a_micro_batch():
    """``use_recap_fused_linear(batch_invariant=True)`` makes it the default of every module verl
    builds: a sequence's log-probs and entropies are the same bits alone and in a micro-batch of 4
    (the on-policy old_log_prob == log_prob of verl #6280)."""
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(4, 45, 96, generator=g), torch.randn(301, 96, generator=g) * 0.2
    ids = torch.randint(0, 301, (4, 45), generator=g)
    rk_verl.use_recap_fused_linear(batch_invariant=True)
    try:
        module = verl_tf.FusedLinearForPPO(chunk_size=32)
        assert module.batch_invariant
        full = run(module, hidden, weight, ids, 0.8)
        for i in range(4):
            one = run(module, hidden[i:i + 1], weight, ids[i:i + 1], 0.8)
            for a, b in zip(one[:2], full[:2]):
                assert torch.equal(a, b[i:i + 1]), i
    finally:
        rk_verl.use_recap_fused_linear(False)
        rk_verl.FusedLinearForPPO.batch_invariant = False
    assert not rk_verl.FusedLinearForPPO().batch_invariant


def tiny_qwen2():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False)).float()


def model_pass(model, ids, temperature):
    """verl's fused-kernel forward of the model (log-probs of the rolled input ids) and the
    parameters' gradients of a random linear function of its outputs."""
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), return_dict=True, temperature=temperature)
    g = torch.Generator().manual_seed(1)
    (out.log_probs * torch.randn(out.log_probs.shape, generator=g)).sum().add(
        (out.entropy * torch.randn(out.entropy.shape, generator=g)).sum()).backward()
    return out.log_probs.detach(), out.entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def qwen2_forward():
    """verl patches the model class's forward: restored after the test."""
    forward = Qwen2ForCausalLM.forward
    yield
    Qwen2ForCausalLM.forward = forward


@pytest.mark.parametrize("way", ["call", "external_lib"])
def test_inside_verls_fused_kernel_model_forward(way, qwen2_forward, monkeypatch):
    calls = []
    fused = rk_verl.F.fused_linear_logprobs
    monkeypatch.setattr(rk_verl.F, "fused_linear_logprobs", lambda *a, **k: calls.append(1) or fused(*a, **k))
    model = tiny_qwen2()
    patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")
    ids = torch.randint(0, 61, (3, 17), generator=torch.Generator().manual_seed(2))
    logp0, ent0, grads0 = model_pass(model, ids, 0.7)
    if way == "call":
        rk_verl.use_recap_fused_linear()
    else:
        sys.modules.pop("recap_kernels.verl_fused_linear", None)
        import_external_libs("recap_kernels.verl_fused_linear")
    assert verl_tf.FusedLinearForPPO is rk_verl.FusedLinearForPPO
    logp, ent, grads = model_pass(model, ids, 0.7)
    assert calls == [1]
    assert not torch.equal(logp, torch.zeros_like(logp))
    torch.testing.assert_close(logp, logp0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent0, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads0.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads0[name], rtol=1e-4, atol=1e-6, msg=name)
    rk_verl.use_recap_fused_linear(False)
    assert verl_tf.FusedLinearForPPO is VERLS


def test_installing_the_package_registers_the_losses_in_every_verl_process():
    """verl loads the ``verl.plugins`` entry points on import (VERL_USE_EXTERNAL_PLUGINS=auto, its
    default): a fresh process that imports verl finds the ``recap_*`` losses registered."""
    code = ("import verl\nfrom verl.trainer.ppo import core_algos\n"
            "print(sorted(n for n in core_algos.POLICY_LOSS_REGISTRY if n.startswith('recap_')))")
    env = dict(os.environ, VERL_USE_EXTERNAL_PLUGINS="auto")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    names = eval(out.stdout.strip().splitlines()[-1])
    assert "recap_vanilla" in names and "recap_gspo" in names and len(names) == len(rk_verl.POLICY_LOSSES)
    env["VERL_USE_EXTERNAL_PLUGINS"] = "none"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and eval(out.stdout.strip().splitlines()[-1]) == [], out.stderr[-2000:]


def engine_micro_batch(lens, remove_padding, **flags):
    """A micro-batch as verl's FSDP engine holds it: nested input ids, its non-tensor flags."""
    g = torch.Generator().manual_seed(9)
    seqs = [torch.randint(0, 61, (n,), generator=g) for n in lens]
    td = TensorDict({"input_ids": torch.nested.nested_tensor(seqs, layout=torch.jagged)}, batch_size=[len(lens)])
    tu.assign_non_tensor(td, use_remove_padding=remove_padding, pad_mode=DatasetPadMode.NO_PADDING,
                         use_fused_kernels=True, calculate_entropy=True, **flags)
    return td, seqs


@pytest.mark.parametrize("remove_padding", [True, False])
def test_verls_fsdp_engine_gives_sum_pi_squared_with_fused_kernels(remove_padding, qwen2_forward):
    """verl's FSDPEngineWithLMHead.prepare_model_outputs with use_fused_kernels and
    calculate_sum_pi_squared (verl 0.9 raises NotImplementedError): with our module in place its
    Σπ² is verl's own formula (calculate_sum_pi_squared_from_logits) on the model's logits, laid out
    as the log-probs (nested per sequence; the packed path's padding stripped), and the log-probs and
    entropies are what the engine gives without it."""
    model = tiny_qwen2()
    patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")
    engine = object.__new__(fsdp_engine.FSDPEngineWithLMHead)
    engine.use_ulysses_sp = False
    lens, temperature, pad = [5, 9, 3], 0.7, 2
    micro, seqs = engine_micro_batch(lens, remove_padding, calculate_sum_pi_squared=True)
    if remove_padding:  # one packed row, the engine's tail padding after it
        ids = torch.cat(seqs + [torch.zeros(pad, dtype=torch.long)])[None]
        pos = torch.cat([torch.arange(n) for n in lens] + [torch.arange(pad)])[None]
        args = {"input_ids_rmpad_rolled": torch.roll(ids, -1, 1)[0], "temperature_rmpad": torch.full(ids.shape[1:], temperature),
                "pad_size": pad, "temperature_is_one": False}
    else:  # padded rows
        ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        args = {"temperature": torch.full((len(lens),), temperature)}
    with torch.no_grad():
        hidden = model.model(input_ids=ids, position_ids=pos).last_hidden_state
        logits = hidden @ model.lm_head.weight.T / temperature
        want = verl_F.calculate_sum_pi_squared_from_logits(logits)
        want = [want[0, sum(lens[:i]):sum(lens[:i + 1])] for i in range(len(lens))] if remove_padding else \
            [want[i, :n] for i, n in enumerate(lens)]
        output = model(input_ids=ids, position_ids=pos, return_dict=True, temperature=temperature)
        with pytest.raises(NotImplementedError):  # verl's own module in place: verl refuses
            engine.prepare_model_outputs(output, args, micro, None)
        rk_verl.use_recap_fused_linear()
        try:
            output = model(input_ids=ids, position_ids=pos, return_dict=True, temperature=temperature)
            got = engine.prepare_model_outputs(output, args, micro, None)
            plain, _ = engine_micro_batch(lens, remove_padding, calculate_sum_pi_squared=False)
            without = engine.prepare_model_outputs(output, args, plain, None)
        finally:
            rk_verl.use_recap_fused_linear(False)
    assert fsdp_engine.FSDPEngineWithLMHead.prepare_model_outputs is VERLS_PREPARE
    assert set(got) == {"log_probs", "entropy", "sum_pi_squared"}
    for i, n in enumerate(lens):
        torch.testing.assert_close(got["sum_pi_squared"][i], want[i], rtol=1e-5, atol=1e-6)
        assert torch.equal(got["log_probs"][i], without["log_probs"][i])
        assert torch.equal(got["entropy"][i], without["entropy"][i])
