"""RECAP's replay objective in verl (``+algorithm.recap.replay_data=...``; ``recap_kernels.verl_replay``)
driven through verl's own code at the pinned version: the v1 trainer's ``_compute_advantage`` and
``_update_actor``, the actor worker's ``TrainingWorker.train_mini_batch`` and ``train_batch``,
``BaseEngine.train_batch``, ``FSDPEngine.forward_backward_batch`` (verl's token count, its
micro-batches, its per-micro-batch metrics), verl's ``ppo_loss`` with the actor config verl's CLI
composes (``FSDPActorConfig``) and its policy loss. In place of what needs a GPU cluster: the
model's forward (a tiny embedding-and-head model on the CPU, log-probs laid out as verl's), an
optimizer that records each mini-batch's gradient, the TransferQueue (in memory) and Ray's
dispatch (one process, data parallel size 1, gloo).

Each PPO mini-batch with replay must give verl's gradient on the same rollouts plus lambda times
the gradient of the mini-batch's token-mean replay NLL, and log that NLL.

Without verl installed the module is skipped; with RECAP_REQUIRE_PEERS=1 (CI) it fails instead."""
import contextlib
import functools
import json
import os
import types

import pytest
import torch

try:
    import test_verl_recap  # its verl config (and the same import-or-skip)
    from tensordict import NonTensorStack, TensorDict
    from verl.trainer.ppo.v1 import trainer_base
    from verl.utils import seqlen_balancing
    from verl.utils import tensordict_utils as tu
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers import engine_workers
    from verl.workers.engine import base as engine_base
    from verl.workers.engine.fsdp import transformer_impl
except ImportError:
    if os.environ.get("RECAP_REQUIRE_PEERS") == "1":
        raise
    pytest.skip("verl is not installed (scripts/install-peers.sh installs the pinned one)", allow_module_level=True)

from recap_kernels import verl_recap, verl_replay
from recap_kernels._native import RecapError

KEYS = test_verl_recap.KEYS
VOCAB = 23


def verl_config(*overrides):
    """verl's config as its CLI composes it with the README's recap lines (test_verl_recap's), PPO
    mini-batches of 2 prompts x 4 responses, micro-batches of 2."""
    return test_verl_recap.verl_config("actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
                                       "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", *overrides)


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """verl's engine reduces over its data-parallel group: one gloo process, for this module only."""
    mine = not torch.distributed.is_initialized()
    if mine:
        store = tmp_path_factory.mktemp("gloo") / "store"
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    if mine:
        torch.distributed.destroy_process_group()


@pytest.fixture(autouse=True)
def fresh(monkeypatch, process_group):
    verl_recap.reset_recap_state()
    # verl's FSDP engine and micro-batch balancing put their counts on the accelerator; here the CPU
    monkeypatch.setattr(transformer_impl, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(seqlen_balancing, "get_device_name", lambda: "cpu")
    yield
    verl_recap.reset_recap_state()


class Model(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.head = torch.nn.Linear(8, VOCAB)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


def log_probs(model, input_ids):
    """verl's layout: over each sequence's tokens, position j holds log p(token j+1)."""
    ids = input_ids.values()
    logp = torch.log_softmax(model(ids).float(), -1).gather(-1, torch.roll(ids, -1)[:, None]).squeeze(-1)
    return torch.nested.nested_tensor_from_jagged(logp, offsets=input_ids.offsets())


class Engine:
    """What verl's TrainingWorker asks of its engine, on the CPU: verl's own
    ``BaseEngine.train_batch`` and ``FSDPEngine.forward_backward_batch``; the forward is the tiny
    model's, and the optimizer step averages the gradient over the data-parallel ranks (as FSDP's
    reduce-scatter does), records it (then zeroes it) or, with ``lr``, takes an SGD step."""

    ulysses_sequence_parallel_size = 1
    engine_config = types.SimpleNamespace(use_no_sync_for_gradient_accumulation=True)
    train_batch = engine_base.BaseEngine.train_batch
    forward_backward_batch = transformer_impl.FSDPEngine.forward_backward_batch
    _gradient_sync_context = transformer_impl.FSDPEngine._gradient_sync_context

    def __init__(self, model, lr=0.0):
        self.module, self.lr = model, lr
        self.grads, self.batches = [], []

    def get_data_parallel_size(self):
        return torch.distributed.get_world_size()

    def get_data_parallel_rank(self):
        return torch.distributed.get_rank()

    def get_data_parallel_group(self):
        return torch.distributed.group.WORLD

    def is_mp_src_rank_with_outputs(self):
        return True

    @contextlib.contextmanager
    def train_mode(self, **kwargs):
        yield

    def lr_scheduler_step(self):
        return self.lr

    def optimizer_zero_grad(self):
        self.module.zero_grad(set_to_none=False)

    def optimizer_step(self):
        for p in self.module.parameters():
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
        grads = [p.grad.detach().clone() for p in self.module.parameters()]
        self.grads.append(grads)
        with torch.no_grad():
            for p in self.module.parameters():
                p -= self.lr * p.grad
        return float(torch.sqrt(sum((g * g).sum() for g in grads)))

    def forward_step(self, micro_batch, loss_function, forward_only):
        self.batches.append(micro_batch)
        model_output = {"log_probs": log_probs(self.module, micro_batch["input_ids"])}
        loss, metrics = loss_function(model_output=model_output, data=micro_batch,
                                      dp_group=self.get_data_parallel_group())
        return loss, {"model_output": {}, "loss": loss.detach().item(), "metrics": metrics}


def worker(model, config, lr=0.0, loss=None, dynamic=False):
    """verl's actor TrainingWorker around ``Engine``, its loss built as verl's worker builds it
    (``dynamic``: verl's dynamic batch size, micro-batches of at most 24 tokens)."""
    w = engine_workers.TrainingWorker.__new__(engine_workers.TrainingWorker)
    w.engine = Engine(model, lr)
    w.engine_config = types.SimpleNamespace(use_dynamic_bsz=dynamic, max_token_len_per_gpu=24,
                                            micro_batch_size_per_gpu=2, use_fused_kernels=False,
                                            forward_only=False)
    w.model_config = {}
    w.device_name = "cpu"
    w.profiler = types.SimpleNamespace(rank=0, step=lambda: None, check_enable=lambda: False,
                                       check_this_step=lambda: False, check_this_rank=lambda: False)
    w.flops_counter = types.SimpleNamespace(estimate_flops=lambda *a, **k: (1.0, 1.0))
    actor_config = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    w.loss_fn = functools.partial(loss or engine_workers.ppo_loss, config=actor_config)
    return w


def rollout_rows(gen, model, count, step=0):
    """Trajectories as verl's v1 agent loop and its old-log-prob and advantage steps leave them in
    the TransferQueue (one output per session)."""
    keys, rows = [], []
    for i in range(count):
        p = int(torch.randint(1, 5, (1,), generator=gen))
        r = int(torch.randint(1, 9, (1,), generator=gen))
        prompts = torch.randint(0, VOCAB, (p,), generator=gen)
        responses = torch.randint(0, VOCAB, (r,), generator=gen)
        input_ids = torch.cat([prompts, responses])
        with torch.no_grad():
            old = log_probs(model, torch.nested.as_nested_tensor([input_ids], layout=torch.jagged)).values()[p - 1:-1]
        mask = torch.ones(r, dtype=torch.int64)
        if i == 3:
            mask[:] = 0  # a fully masked response
        fmt = 0.1 * step + 0.3 * float(torch.rand(1, generator=gen))
        acc = float(torch.rand(1, generator=gen) > 0.5)
        keys.append(f"s{step}_{i // 4}_{i}_0")
        rows.append({"prompts": prompts, "responses": responses, "input_ids": input_ids,
                     "attention_mask": torch.ones_like(input_ids), "position_ids": torch.arange(p + r),
                     "response_mask": mask, "loss_mask": mask.clone(), "rm_scores": torch.zeros(r),
                     "old_log_probs": old + 0.05 * torch.randn(r, generator=gen),
                     "advantages": torch.randn(r, generator=gen) * mask,
                     "uid": f"s{step}_{i // 4}", "multi_modal_inputs": {},
                     "extra_fields": {"reward_extra_info": {"format_reward": fmt, "accuracy_reward": acc}}})
        rows[-1]["rm_scores"][-1] = fmt + acc
    return keys, rows


def as_fetched(rows, extra_info):
    """The TensorDict a worker gets from the TransferQueue (verl's _async_meta_to_realdata): jagged
    rows, non-tensor stacks, the batch's extra_info as non-tensor data."""
    out = {}
    for field in rows[0]:
        values = [r[field] for r in rows]
        if isinstance(values[0], torch.Tensor):
            out[field] = torch.nested.as_nested_tensor(values, layout=torch.jagged)
        else:
            out[field] = NonTensorStack(*values)
    td = TensorDict(out, batch_size=[len(rows)])
    for k, v in extra_info.items():
        tu.assign_non_tensor_data(td, k, v)
    return td


EXTRA = {"global_batch_size": 8, "mini_batch_size": 8, "epochs": 1, "seed": 1,
         "dataloader_kwargs": {"shuffle": False}, "temperature": 1.0, "calculate_entropy": False}


def replay_nll(model, seqs):
    """The token-mean NLL of ``seqs`` (each token after the first predicted), by hand."""
    total, count = 0.0, 0
    for s in seqs:
        ids = torch.tensor(s)
        logp = torch.log_softmax(model(ids[:-1]).float(), -1).gather(-1, ids[1:, None]).squeeze(-1)
        total = total - logp.sum()
        count += len(s) - 1
    return total / count


def general(gen, count):
    return [torch.randint(0, VOCAB, (int(torch.randint(2, 12, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(count)]


@pytest.mark.parametrize("kl,dynamic,loss_mode", [(False, False, "vanilla"), (True, False, "vanilla"),
                                                  (False, True, "vanilla"), (True, False, "recap_vanilla")])
def test_each_mini_batch_is_verls_gradient_plus_lambda_replay(kl, dynamic, loss_mode):
    """Two PPO mini-batches of 8 rollouts (one fully masked) and 2 replay sequences each, micro-
    batches of 2 (or verl's dynamic batch size), verl's policy loss or ours registered in verl
    (``recap_vanilla``): per mini-batch, the gradient equals verl's on the rollouts alone plus lambda
    times the replay NLL's gradient; verl's own metrics (pg_loss, the KL loss) are unchanged; the
    replay NLL is logged."""
    overrides = ["actor_rollout_ref.actor.use_kl_loss=True", "actor_rollout_ref.actor.kl_loss_coef=0.1"] if kl else []
    overrides.append(f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}")
    config = verl_config(*overrides)
    gen = torch.Generator().manual_seed(3)
    model = Model()
    keys, rows = rollout_rows(gen, model, 16)
    if kl:
        for r in rows:
            r["ref_log_prob"] = r["old_log_probs"] - 0.1 * torch.rand(r["responses"].shape[0], generator=gen)
    seqs = general(gen, 4)
    lam = 0.7
    extra = dict(EXTRA, **{verl_replay.EXTRA: {"rows": seqs, "per_mini_batch": 2, "lambda": lam}})
    ours = worker(model, config, dynamic=dynamic)
    out_ours = ours.train_mini_batch(as_fetched(rows, extra))
    theirs = worker(model, config, loss=engine_workers.ppo_loss.__wrapped__, dynamic=dynamic)
    out_theirs = theirs.train_mini_batch(as_fetched(rows, EXTRA))
    assert len(ours.engine.grads) == len(theirs.engine.grads) == 2
    nlls = []
    for m in range(2):
        model.zero_grad()
        nll = replay_nll(model, seqs[2 * m:2 * m + 2])
        nll.backward()
        nlls.append(nll.item())
        for g_ours, g_theirs, p in zip(ours.engine.grads[m], theirs.engine.grads[m], model.parameters()):
            torch.testing.assert_close(g_ours, g_theirs + lam * p.grad, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(g_ours, g_theirs, atol=1e-4)  # the replay term is there
    metrics_ours, metrics_theirs = tu.get(out_ours, "metrics"), tu.get(out_theirs, "metrics")
    # per mini-batch (verl's sum over its micro-batches): its replay NLL; verl's own metrics as without replay
    assert metrics_ours[verl_replay.METRIC] == pytest.approx(nlls, rel=1e-5)
    for key in ("actor/pg_loss", "kl_loss") if kl else ("actor/pg_loss",):
        assert metrics_ours[key] == pytest.approx(metrics_theirs[key], rel=1e-5, abs=1e-7)
    if dynamic:  # verl's token-balanced micro-batches hold the same rows
        assert len(ours.engine.batches) > 4
        seen = sorted(r.tolist() for mb in ours.engine.batches for r in mb["input_ids"].unbind())
        assert seen == sorted([r["input_ids"].tolist() for r in rows] + seqs)
        return
    # each mini-batch: its 8 rollouts in verl's order, then its 2 replay rows (5 micro-batches of 2)
    assert len(ours.engine.batches) == 10 and len(theirs.engine.batches) == 8
    seen = [r.tolist() for mb in ours.engine.batches for r in mb["input_ids"].unbind()]
    expected = [r["input_ids"].tolist() for r in rows[:8]] + seqs[:2] + [r["input_ids"].tolist() for r in rows[8:]] \
        + seqs[2:]
    assert seen == expected


def test_without_replay_the_worker_is_verls():
    """No replay in the batch: the wrapped worker and loss give verl's gradients bit for bit."""
    config = verl_config()
    gen = torch.Generator().manual_seed(4)
    model = Model()
    _, rows = rollout_rows(gen, model, 16)
    ours = worker(model, config)
    ours.train_mini_batch(as_fetched(rows, EXTRA))
    theirs = worker(model, config, loss=engine_workers.ppo_loss.__wrapped__)
    theirs.train_mini_batch(as_fetched(rows, EXTRA))
    for a, b in zip(ours.engine.grads, theirs.engine.grads):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_splice_shares_rows_and_weights_over_ranks():
    """Data parallel 2, rank 1: its half of each mini-batch's replay sequences, each response token
    weighted 1/N with N the mini-batch's replay tokens over both ranks; the rank's rollouts in order."""
    gen = torch.Generator().manual_seed(5)
    _, rows = rollout_rows(gen, Model(), 8)
    seqs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11, 12, 13, 14], [1, 1], [2, 2, 2], [3, 3, 3, 3], [4, 4]]
    data = as_fetched(rows, dict(EXTRA, mini_batch_size=8))  # 4 rows per rank per mini-batch: 2 mini-batches
    out = verl_replay.splice(data, {"rows": seqs, "per_mini_batch": 4, "lambda": 0.5}, dp_size=2, dp_rank=1)
    assert tu.get(out, "mini_batch_size") == 12
    assert tu.get(out, verl_replay.LAMBDA) == 0.5
    ids = [r.tolist() for r in out["input_ids"].unbind()]
    assert ids == [r["input_ids"].tolist() for r in rows[:4]] + seqs[2:4] + [r["input_ids"].tolist() for r in rows[4:]] \
        + seqs[6:8]
    w = [r.tolist() for r in out[verl_replay.FIELD].unbind()]
    n0, n1 = sum(len(s) - 1 for s in seqs[:4]), sum(len(s) - 1 for s in seqs[4:])
    assert w[4] == pytest.approx([1 / n0] * 3) and w[5] == pytest.approx([1 / n0] * 4)
    assert w[10] == pytest.approx([1 / n1] * 3) and w[11] == pytest.approx([1 / n1])
    assert all(sum(x) == 0 for i, x in enumerate(w) if i not in (4, 5, 10, 11))
    for field in ("response_mask", "loss_mask", "advantages", "old_log_probs"):
        assert out[field][4].abs().sum() == 0 and out[field][4].shape[0] == 3
    assert out["prompts"][4].tolist() == [seqs[2][0]] and out["responses"][4].tolist() == seqs[2][1:]
    assert out["position_ids"][5].tolist() == [0, 1, 2, 3, 4]
    assert out["multi_modal_inputs"][4] == {} and out["uid"][4] is None
    with pytest.raises(RecapError, match="replay_batch_size.*multiple of the actor's data-parallel size 2"):
        verl_replay.splice(as_fetched(rows, dict(EXTRA, mini_batch_size=8)),
                           {"rows": seqs[:6], "per_mini_batch": 3, "lambda": 1.0}, dp_size=2, dp_rank=0)


FakeTQ, Meta = test_verl_recap.FakeTQ, test_verl_recap.Meta  # the TransferQueue in memory, KVBatchMeta


class WorkerGroup:
    """verl's actor worker group in one process: update_actor fetches the batch's rows and its
    extra_info as verl's dispatch does and runs the actor's train_mini_batch (verl's
    ActorRolloutRefWorker.update_actor); the replay each call sent is kept; checkpoints recorded."""

    def __init__(self, tq, actor):
        self.tq, self.actor, self.sent, self.calls = tq, actor, [], []

    def update_actor(self, batch):
        self.sent.append(batch.extra_info.get(verl_replay.EXTRA))
        data = as_fetched([self.tq.rows[k] for k in batch.keys], batch.extra_info)
        return self.actor.train_mini_batch(data)

    def save_checkpoint(self, *args, **kwargs):
        self.calls.append(("save", kwargs.get("local_path", args[0] if args else None)))

    def load_checkpoint(self, *args, **kwargs):
        self.calls.append(("load", kwargs.get("local_path", args[0] if args else None)))


class Trainer:
    """What the v1 PPOTrainer's _compute_advantage, _update_actor, _save_checkpoint and
    _load_checkpoint read of it."""

    def __init__(self, config, tq, actor, tokenizer=None):
        self.config, self.tokenizer = config, tokenizer
        self.actor_rollout_wg = WorkerGroup(tq, actor)
        self.global_steps, self.use_critic, self.trainer_mode = 0, False, "sync"
        self.train_dataloader = types.SimpleNamespace(state_dict=lambda: {}, load_state_dict=lambda s: None,
                                                      __len__=lambda: 1000)
        self.checkpoint_callback = types.SimpleNamespace(on_save=lambda **k: None)


class Tokenizer:
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + (sum(map(ord, w)) % (VOCAB - 1)) for w in text.split()]}


def write_general(tmp_path, count=40):
    path = tmp_path / "general.jsonl"
    with open(path, "w") as f:
        for i in range(count):
            f.write(json.dumps({"text": " ".join(f"w{(3 * i + 5 * j) % 31}" for j in range(3 + i % 7))}) + "\n")
    return str(path)


def test_v1_trainer_steps_with_replay(tmp_path, monkeypatch):
    """The v1 trainer's own _compute_advantage and _update_actor, 8 steps, SGD on the tiny model:
    every step sends replay_batch_size sequences per mini-batch from the file (seeded order,
    cycling), the scheduler observes the reward means and the update's replay NLL after the update
    (lambda for the next step), the metrics carry recap/lambda/replay, recap/monitored/replay and
    actor/recap/replay_nll, and the replay NLL falls."""
    path = write_general(tmp_path)
    config = verl_config(f"+algorithm.recap.replay_data={path}", "+algorithm.recap.replay_batch_size=2",
                         "+algorithm.recap.window=2")
    tq = FakeTQ()
    monkeypatch.setattr(trainer_base, "tq", tq)
    model = Model()
    actor = worker(model, config, lr=0.5)
    trainer = Trainer(config, tq, actor, Tokenizer())
    gen = torch.Generator().manual_seed(6)
    history = []
    for step in range(8):
        keys, rows = rollout_rows(gen, model, 16, step)
        for k, r in zip(keys, rows):
            tq.rows[k] = r
        batch, metrics = Meta(keys), {}
        lam_before = verl_recap.recap_state().weights.weights() if step else [1.0, 1.0, 1.0]
        batch = trainer_base.PPOTrainer._compute_advantage(trainer, batch, metrics)
        trainer_base.PPOTrainer._update_actor(trainer, batch, metrics)
        state = verl_recap.recap_state()
        assert state.names == KEYS + ["replay"]
        assert metrics["recap/lambda/replay"] == pytest.approx(lam_before[2])
        assert metrics["recap/monitored/replay"] == pytest.approx(metrics["actor/recap/replay_nll"])
        assert state.weights.steps == step + 1
        assert verl_replay.EXTRA not in batch.extra_info
        history.append((metrics["actor/recap/replay_nll"], state.weights.weights()))
    assert state.replay.position == 8 * 2 * 2
    assert history[-1][0] < history[0][0]
    assert history[-1][1] != [1.0, 1.0, 1.0]


def test_replay_errors_name_the_setting(tmp_path, monkeypatch):
    path = write_general(tmp_path)
    tq = FakeTQ()
    monkeypatch.setattr(trainer_base, "tq", tq)
    gen = torch.Generator().manual_seed(7)
    model = Model()

    def step(config, tokenizer=Tokenizer()):
        verl_recap.reset_recap_state()
        keys, rows = rollout_rows(gen, model, 16)
        for k, r in zip(keys, rows):
            tq.rows[k] = r
        trainer = Trainer(config, tq, worker(model, config), tokenizer)
        batch = trainer_base.PPOTrainer._compute_advantage(trainer, Meta(keys), {})
        trainer_base.PPOTrainer._update_actor(trainer, batch, {})

    with pytest.raises(RecapError, match="actor_rollout_ref.actor.shuffle"):
        step(verl_config(f"+algorithm.recap.replay_data={path}", "actor_rollout_ref.actor.shuffle=True"))
    with pytest.raises(RecapError, match="replay_data.*no file"):
        step(verl_config(f"+algorithm.recap.replay_data={path}.missing.jsonl"))
    with pytest.raises(RecapError, match="replay_data.*.jsonl, .json or .parquet"):
        step(verl_config("+algorithm.recap.replay_data=general.csv"))
    with pytest.raises(RecapError, match="replay_batch_size.*integer >= 1"):
        step(verl_config(f"+algorithm.recap.replay_data={path}", "+algorithm.recap.replay_batch_size=0"))
    with pytest.raises(RecapError, match="replay_batch_size.*needs algorithm.recap.replay_data"):
        step(verl_config("+algorithm.recap.replay_batch_size=4"))
    with pytest.raises(RecapError, match="replay_batch_size.*ppo_micro_batch_size_per_gpu = 2"):
        step(verl_config(f"+algorithm.recap.replay_data={path}", "+algorithm.recap.replay_batch_size=1"))
    with pytest.raises(RecapError, match="reward_keys.*'replay' names the replay objective"):
        step(verl_config("+algorithm.recap.reward_keys=[format_reward,replay]"))
    verl_recap.reset_recap_state()
    with pytest.raises(RecapError, match="replay_data.*v1 trainer"):  # the legacy trainer's estimator call
        verl_recap.compute_recap_outcome_advantage(
            torch.zeros(2, 3), torch.ones(2, 3), ["a", "a"],
            config=verl_config(f"+algorithm.recap.replay_data={path}").algorithm,
            non_tensor_batch={k: [0.5, 1.0] for k in KEYS})
    assert verl_recap.recap_state() is None or verl_recap.recap_state().weights.steps == 0


def run_step(trainer, tq, gen, model, step):
    keys, rows = rollout_rows(gen, model, 16, step)
    for k, r in zip(keys, rows):
        tq.rows[k] = r
    metrics = {}
    batch = trainer_base.PPOTrainer._compute_advantage(trainer, Meta(keys), metrics)
    trainer_base.PPOTrainer._update_actor(trainer, batch, metrics)
    return metrics


def test_replay_resumes_from_verls_checkpoint(tmp_path, monkeypatch):
    """verl's own _save_checkpoint keeps the replay's position beside the scheduler and its
    _load_checkpoint restores both: the resumed run's next step sends the same replay sequences
    with the same lambda and ends with the same weights as the uninterrupted run."""
    path = write_general(tmp_path)
    ckpt = tmp_path / "ckpt"
    overrides = [f"+algorithm.recap.replay_data={path}", "+algorithm.recap.replay_batch_size=2",
                 "+algorithm.recap.window=2", f"trainer.default_local_dir={ckpt}"]
    config = verl_config(*overrides)
    tq = FakeTQ()
    monkeypatch.setattr(trainer_base, "tq", tq)
    model = Model()
    trainer = Trainer(config, tq, worker(model, config, lr=0.5), Tokenizer())
    gen = torch.Generator().manual_seed(8)
    for step in range(5):
        run_step(trainer, tq, gen, model, step)
    trainer.global_steps = 5
    trainer_base.PPOTrainer._save_checkpoint(trainer)
    saved = json.loads((ckpt / "global_step_5" / verl_recap.CHECKPOINT_FILE).read_text())
    assert saved["replay_position"] == 5 * 2 * 2 and saved["reward_keys"] == KEYS + ["replay"]
    at_save = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen_state = gen.get_state()
    run_step(trainer, tq, gen, model, 5)
    want_rows, want_weights = trainer.actor_rollout_wg.sent[-1], verl_recap.recap_state().weights.weights()

    verl_recap.reset_recap_state()  # a new driver process; the actor's weights restored as verl's workers do
    model.load_state_dict(at_save)
    resumed = Trainer(verl_config(*overrides), tq, worker(model, config, lr=0.5), Tokenizer())
    trainer_base.PPOTrainer._load_checkpoint(resumed)
    assert resumed.global_steps == 5
    assert verl_recap.recap_state().weights.steps == 5
    gen.set_state(gen_state)
    run_step(resumed, tq, gen, model, 5)
    assert resumed.actor_rollout_wg.sent[-1] == want_rows
    assert verl_recap.recap_state().weights.weights() == pytest.approx(want_weights, abs=1e-12)


def _two_ranks(rank, store, rows, seqs, lam, out):
    """One data-parallel rank of ``test_two_ranks_train_as_one``: its half of the batch (verl's
    dispatch: rank 0 the first half) through verl's worker; rank 0 saves the averaged gradients."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    transformer_impl.get_device_id = lambda: "cpu"
    seqlen_balancing.get_device_name = lambda: "cpu"
    model = Model()
    w = worker(model, verl_config())
    half = len(rows) // 2
    extra = dict(EXTRA, **{verl_replay.EXTRA: {"rows": seqs, "per_mini_batch": 4, "lambda": lam}})
    w.train_mini_batch(as_fetched(rows[rank * half:(rank + 1) * half], extra))
    if rank == 0:
        torch.save(w.engine.grads, out)
    torch.distributed.destroy_process_group()


def test_two_ranks_train_as_one(tmp_path):
    """Data parallel 2 (two gloo processes, each verl's worker on its half; gradients averaged as
    FSDP does) gives each mini-batch the gradient one rank gets from the same rows: verl's global
    token count and our replay weights (1/N over both ranks, times dp_size) make the split exact."""
    gen = torch.Generator().manual_seed(9)
    model = Model()
    _, rows = rollout_rows(gen, model, 16)
    seqs = general(gen, 8)  # 4 per mini-batch: 2 per rank
    lam = 0.6
    out = tmp_path / "grads.pt"
    torch.multiprocessing.spawn(_two_ranks, args=(str(tmp_path / "store"), rows, seqs, lam, str(out)), nprocs=2)
    split = torch.load(out)
    # one rank: mini-batch m is rank 0's m-th 4 rows and rank 1's, with the same replay sequences
    one = worker(model, verl_config())
    order = rows[0:4] + rows[8:12] + rows[4:8] + rows[12:16]
    one.train_mini_batch(as_fetched(order, dict(EXTRA, **{verl_replay.EXTRA: {
        "rows": seqs, "per_mini_batch": 4, "lambda": lam}})))
    assert len(split) == len(one.engine.grads) == 2
    for a, b in zip(split, one.engine.grads):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
