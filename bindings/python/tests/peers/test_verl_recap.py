"""RECAP's reward weights in verl (``algorithm.adv_estimator=recap``, ``recap_kernels.verl_recap``)
driven through verl's own code at the pinned version (scripts/install-peers.sh): the config composed
by hydra from verl's ``ppo_trainer`` with the documented overrides, verl's ``compute_advantage`` (the
legacy trainer's call, wrapped on import by the package's verl plugin), verl's
``compute_data_metrics``, and the v1 trainer's ``PPOTrainer._compute_advantage`` over an in-memory
stand-in for the TransferQueue. Each step is compared with verl's own ``grpo`` estimator on the
score ``sum_k lambda_k r_k``, lambda from an independent ``rk.RecapWeights`` fed the same means.

Without verl installed the module is skipped; with RECAP_REQUIRE_PEERS=1 (CI) it fails instead."""
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

try:
    import verl
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict
    from tensordict import NonTensorStack, TensorDict
    from verl import DataProto
    from verl.trainer.ppo import core_algos, ray_trainer
    from verl.trainer.ppo.v1 import trainer_base
except ImportError:
    if os.environ.get("RECAP_REQUIRE_PEERS") == "1":
        raise
    pytest.skip("verl is not installed (scripts/install-peers.sh installs the pinned one)", allow_module_level=True)

import recap_kernels as rk
from recap_kernels import verl_recap
from recap_kernels._native import RecapError

KEYS = ["format_reward", "accuracy_reward"]


def verl_config(*overrides, estimator="recap"):
    """verl's whole PPO config as its CLI composes it, with the README's lines (or another estimator)."""
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    lines = [f"algorithm.adv_estimator={estimator}"]
    if estimator == "recap":
        lines.append(f"+algorithm.recap.reward_keys=[{','.join(KEYS)}]")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose("ppo_trainer", overrides=[*lines, *overrides])


@pytest.fixture(autouse=True)
def fresh_scheduler():
    verl_recap.reset_recap_state()
    yield
    verl_recap.reset_recap_state()


def make_step(gen, step, groups=4, n=4, length=12):
    """One step's batch as verl's legacy trainer holds it before compute_advantage: uids, responses
    of random lengths (one fully masked), the reward columns (compute_score's dict, kept as reward
    extra info) and the score at the last response token. The format reward rises step by step,
    the accuracy reward is noisy; one group has a single response."""
    b = groups * n - (n - 1)
    uids = np.array([f"u{step}-{g}" for g in range(groups) for _ in range(n)][: b], dtype=object)
    lens = torch.randint(1, length + 1, (b,), generator=gen)
    lens[1] = 0
    mask = (torch.arange(length)[None, :] < lens[:, None]).float()
    fmt = (torch.rand(b, generator=gen) < min(0.95, 0.2 + 0.07 * step)).double().numpy()
    acc = (torch.rand(b, generator=gen) < 0.4).double().numpy()
    fmt[3] = np.nan  # a reward function that does not apply to this response (TRL's nansum)
    return uids, mask, lens, {"format_reward": fmt, "accuracy_reward": acc}


def token_rewards(score, lens, length):
    r = torch.zeros(len(lens), length)
    rows = torch.arange(len(lens))
    r[rows, (lens - 1).clamp(min=0)] = torch.as_tensor(score, dtype=torch.float32)
    return r


def legacy_batch(uids, mask, lens, columns, scores=None, penalty=None):
    score = np.nansum(np.stack([columns[k] for k in KEYS], 1), 1) if scores is None else scores
    r = token_rewards(score, lens, mask.shape[1])
    b, length = mask.shape
    prompt = 5
    batch = {"token_level_scores": r.clone(), "token_level_rewards": r - (0 if penalty is None else penalty),
             "response_mask": mask.clone(), "prompts": torch.ones(b, prompt, dtype=torch.long),
             "responses": torch.ones(b, length, dtype=torch.long),
             "attention_mask": torch.cat([torch.ones(b, prompt), mask], 1).long()}
    data = DataProto.from_dict(tensors=batch, non_tensors={"uid": uids, **columns})
    return data


def verl_grpo(uids, mask, lens, score, norm=True, penalty=None):
    r = token_rewards(score, lens, mask.shape[1]) - (0 if penalty is None else penalty)
    data = DataProto.from_dict(tensors={"token_level_rewards": r, "response_mask": mask.clone()},
                               non_tensors={"uid": uids})
    out = ray_trainer.compute_advantage.__wrapped__(data, adv_estimator="grpo", norm_adv_by_std_in_grpo=norm)
    return out.batch["advantages"]


def weighted(columns, lam):
    cols = np.stack([columns[k] for k in KEYS], 1)
    return np.nansum(cols * np.asarray(lam)[None, :], 1)


def means(columns):
    return [float(np.nanmean(columns[k])) for k in KEYS]


def test_installed_by_the_plugin():
    """``import verl`` loads the package's plugin: the estimator is in verl's registry and verl's
    trainer functions are wrapped."""
    assert core_algos.get_adv_estimator_fn("recap") is verl_recap.compute_recap_outcome_advantage
    assert ray_trainer.compute_advantage.__recap_wrapped__
    assert ray_trainer.compute_data_metrics.__recap_wrapped__
    assert trainer_base.PPOTrainer._compute_advantage.__recap_wrapped__
    from verl.trainer.ppo.v1 import utils as v1_utils
    assert v1_utils.compute_advantage is ray_trainer.compute_advantage
    verl_recap.install()  # idempotent
    assert ray_trainer.compute_advantage.__wrapped__.__name__ == "compute_advantage"
    assert not hasattr(ray_trainer.compute_advantage.__wrapped__, "__wrapped__")


def test_a_fresh_process_gets_it_from_the_plugin():
    """As in verl's driver: a process that imports verl, then verl's trainers, finds the estimator
    registered and the trainer functions wrapped; with verl's plugin loading off, neither."""
    code = ("import verl\nfrom verl.trainer.ppo import core_algos, ray_trainer\n"
            "from verl.trainer.ppo.v1 import trainer_base, utils\n"
            "print(['recap' in core_algos.ADV_ESTIMATOR_REGISTRY] + [getattr(f, '__recap_wrapped__', False) for f in "
            "(ray_trainer.compute_advantage, ray_trainer.compute_data_metrics, utils.compute_advantage, "
            "utils.compute_advantage_for_multi_trajectories, trainer_base.compute_advantage_for_multi_trajectories, "
            "trainer_base.PPOTrainer._compute_advantage, trainer_base.PPOTrainer._save_checkpoint, "
            "ray_trainer.RayPPOTrainer._load_checkpoint)])")
    for policy, want in (("auto", True), ("none", False)):
        env = dict(os.environ, VERL_USE_EXTERNAL_PLUGINS=policy)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert eval(out.stdout.strip().splitlines()[-1]) == [want] * 9


@pytest.mark.parametrize("preset,norm", [("paper", True), ("paper", False), ("authors", True)])
def test_legacy_compute_advantage_steps(preset, norm):
    """20 steps through verl's compute_advantage with the composed config (window 3): every step's
    advantages equal verl's GRPO on sum_k lambda_k r_k, the weights move, and compute_data_metrics
    logs them."""
    cfg = verl_config("+algorithm.recap.window=3", f"+algorithm.recap.preset={preset}",
                      f"algorithm.norm_adv_by_std_in_grpo={norm}")
    replica = rk.RecapWeights(["reward", "reward"], preset=preset, window=3)
    gen = torch.Generator().manual_seed(0)
    moved = False
    for step in range(20):
        uids, mask, lens, cols = make_step(gen, step)
        data = legacy_batch(uids, mask, lens, cols)
        out = ray_trainer.compute_advantage(data, adv_estimator=cfg.algorithm.adv_estimator,
                                            gamma=cfg.algorithm.gamma, lam=cfg.algorithm.lam, num_repeat=4,
                                            norm_adv_by_std_in_grpo=cfg.algorithm.norm_adv_by_std_in_grpo,
                                            config=cfg.algorithm)
        replica.observe(means(cols))
        lam = replica.weights()
        moved |= max(abs(w - 1.0) for w in lam) > 1e-3
        want = verl_grpo(uids, mask, lens, weighted(cols, lam), norm=norm)
        torch.testing.assert_close(out.batch["advantages"], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.batch["returns"], want, atol=1e-5, rtol=1e-5)
        metrics = ray_trainer.compute_data_metrics(batch=out, use_critic=False)
        for k, w, m in zip(KEYS, lam, means(cols)):
            assert metrics[f"recap/lambda/{k}"] == pytest.approx(w, abs=1e-12)
            assert metrics[f"recap/monitored/{k}"] == pytest.approx(m, abs=1e-12)
        assert "critic/advantages/mean" in metrics  # verl's own metrics are still there
    assert moved, "the weights never left 1"
    assert verl_recap.recap_state().weights.steps == 20


@pytest.mark.parametrize("replay", [False, True])
def test_verl_validates_the_config(replay):
    """verl's own validate_config accepts the README's lines (with the replay line too), and the
    estimator needs no critic."""
    from verl.trainer.main_ppo import validate_config
    from verl.trainer.ppo.utils import need_critic, need_reference_policy

    extra = ["+algorithm.recap.replay_data=general.jsonl", "+algorithm.recap.replay_batch_size=8"] if replay else []
    cfg = verl_config(*extra, "data.train_batch_size=8", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
                      "actor_rollout_ref.rollout.n=4", "trainer.n_gpus_per_node=1",
                      "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
                      "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
                      "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2")
    assert not need_critic(cfg)
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=False)


def test_warm_up_is_grpo_on_the_sum():
    """Before 2W steps every lambda is 1: verl's GRPO on the sum of the reward keys (the usual score)."""
    cfg = verl_config()
    uids, mask, lens, cols = make_step(torch.Generator().manual_seed(1), 0)
    out = ray_trainer.compute_advantage(legacy_batch(uids, mask, lens, cols), adv_estimator="recap",
                                        config=cfg.algorithm)
    want = verl_grpo(uids, mask, lens, weighted(cols, [1.0, 1.0]))
    torch.testing.assert_close(out.batch["advantages"], want, atol=1e-6, rtol=1e-6)


def test_keeps_kl_in_reward_penalty():
    """With use_kl_in_reward verl subtracts a per-token penalty from the scores before the
    estimator; RECAP replaces the scores only, so the penalty stays in the rewards GRPO sees."""
    cfg = verl_config("algorithm.use_kl_in_reward=true")
    gen = torch.Generator().manual_seed(2)
    uids, mask, lens, cols = make_step(gen, 0)
    penalty = 0.01 * torch.rand(mask.shape, generator=gen) * mask
    data = legacy_batch(uids, mask, lens, cols, scores=np.zeros(len(uids)), penalty=penalty)
    out = ray_trainer.compute_advantage(data, adv_estimator="recap", config=cfg.algorithm)
    want = verl_grpo(uids, mask, lens, weighted(cols, [1.0, 1.0]), penalty=penalty)
    torch.testing.assert_close(out.batch["advantages"], want, atol=1e-5, rtol=1e-5)


def test_other_estimators_unchanged():
    cfg = verl_config()
    uids, mask, lens, cols = make_step(torch.Generator().manual_seed(3), 0)
    for est in ("grpo", "rloo", "reinforce_plus_plus"):
        a = ray_trainer.compute_advantage(legacy_batch(uids, mask, lens, cols), adv_estimator=est,
                                          config=cfg.algorithm)
        b = ray_trainer.compute_advantage.__wrapped__(legacy_batch(uids, mask, lens, cols), adv_estimator=est,
                                                      config=cfg.algorithm)
        assert torch.equal(a.batch["advantages"], b.batch["advantages"])
    assert verl_recap.recap_state() is None


def test_errors_name_the_setting():
    uids, mask, lens, cols = make_step(torch.Generator().manual_seed(4), 0)
    with pytest.raises(RecapError, match=r"algorithm\.recap\.reward_keys"):
        ray_trainer.compute_advantage(legacy_batch(uids, mask, lens, cols), adv_estimator="recap",
                                      config=_without_recap())
    cfg = verl_config()
    with open_dict(cfg):
        cfg.algorithm.recap.reward_keys = ["format_reward", "length_reward"]
    with pytest.raises(RecapError, match="'length_reward' is not in the batch's reward extra info"):
        ray_trainer.compute_advantage(legacy_batch(uids, mask, lens, cols), adv_estimator="recap",
                                      config=cfg.algorithm)
    with pytest.raises(RecapError, match="non_tensor_batch"):  # verl's registry call, without the columns
        core_algos.get_adv_estimator_fn("recap")(token_level_rewards=torch.zeros(2, 3), response_mask=torch.ones(2, 3),
                                                 index=np.array(["a", "a"], dtype=object), config=cfg.algorithm)


def _without_recap():
    cfg = verl_config()
    with open_dict(cfg):
        del cfg.algorithm["recap"]
    return cfg.algorithm


class FakeTQ:
    """An in-memory TransferQueue with the two calls the v1 trainer's _compute_advantage makes:
    per-key fields, returned as TransferQueue returns them (a TensorDict of jagged tensors, and
    non-tensor stacks for per-sample Python values)."""

    def __init__(self):
        self.rows = {}

    def put_rows(self, keys, rows):
        for key, row in zip(keys, rows):
            self.rows.setdefault(key, {}).update(row)

    def kv_batch_get(self, keys, partition_id, select_fields):
        out = {}
        for field in select_fields:
            if not all(field in self.rows[k] for k in keys):
                continue
            values = [self.rows[k][field] for k in keys]
            if isinstance(values[0], torch.Tensor) and values[0].dim() == 1:
                out[field] = torch.nested.as_nested_tensor(values, layout=torch.jagged)
            elif isinstance(values[0], torch.Tensor):
                out[field] = torch.stack(values)
            else:
                out[field] = NonTensorStack(*values)
        return TensorDict(out, batch_size=[len(keys)])

    def kv_batch_put(self, keys, partition_id, fields):
        for i, key in enumerate(keys):
            for name in fields.keys():
                self.rows[key][name] = fields[name][i]
        return Meta(keys, partition_id)


class Meta:
    """KVBatchMeta's part the v1 trainer uses: keys, partition, extra_info."""

    def __init__(self, keys, partition_id="train"):
        self.keys, self.partition_id, self.extra_info = keys, partition_id, {}

    def __len__(self):
        return len(self.keys)


class V1Trainer:
    """What PPOTrainer._compute_advantage reads of its trainer: the config."""

    def __init__(self, config):
        self.config = config


def v1_rows(gen, uids, cols, score, length=12):
    """One step's trajectories as verl's v1 agent loop puts them in the TransferQueue: a session per
    response (keys ``{uid}_{session}_{index}``); every third session also has an earlier output
    (index 0, a turn of its own) that carries the final output's score and reward extra info, as
    the agent loop copies them."""
    keys, rows = [], []
    for i, u in enumerate(uids):
        outputs = 2 if i % 3 == 0 else 1
        for j in range(outputs):
            n = int(torch.randint(1, length + 1, (1,), generator=gen))
            r = torch.zeros(n)
            r[-1] = float(score[i])
            keys.append(f"{u}_{i}_{j}")
            rows.append({"uid": str(u), "response_mask": torch.ones(n, dtype=torch.int64), "rm_scores": r,
                         "extra_fields": {"reward_extra_info": {k: float(cols[k][i]) for k in KEYS}}})
    return keys, rows


def test_v1_trainer_compute_advantage(monkeypatch):
    """verl's v1 trainer (trainer.use_v1, the default): its own _compute_advantage over the stand-in
    TransferQueue, the reward columns fetched from each response's extra_fields, multi-output
    sessions included. Identical trajectories through verl's own ``grpo`` there (the score
    sum_k lambda_k r_k in rm_scores) give the same advantages, written back for every output;
    the metrics land in the step's metrics."""
    cfg = verl_config("+algorithm.recap.window=2", "actor_rollout_ref.rollout.n=4")
    grpo = verl_config("actor_rollout_ref.rollout.n=4", estimator="grpo")
    assert cfg.trainer.use_v1
    replica = rk.RecapWeights(["reward", "reward"], window=2)
    gen = torch.Generator().manual_seed(5)
    for step in range(8):
        uids, _, _, cols = make_step(gen, step)
        state = gen.get_state()
        ours, theirs = FakeTQ(), FakeTQ()
        keys, rows = v1_rows(gen, uids, cols, weighted(cols, [1.0, 1.0]))
        ours.put_rows(keys, rows)
        monkeypatch.setattr(trainer_base, "tq", ours)
        metrics = {}
        out = trainer_base.PPOTrainer._compute_advantage(V1Trainer(cfg), Meta(keys, "train"), metrics)
        assert len(out) == len(keys)
        replica.observe(means(cols))
        lam = replica.weights()
        gen.set_state(state)
        keys2, rows2 = v1_rows(gen, uids, cols, weighted(cols, lam))
        assert keys2 == keys
        theirs.put_rows(keys, rows2)
        monkeypatch.setattr(trainer_base, "tq", theirs)
        trainer_base.PPOTrainer._compute_advantage(V1Trainer(grpo), Meta(keys, "train"), {})
        for k in keys:
            torch.testing.assert_close(ours.rows[k]["advantages"], theirs.rows[k]["advantages"], atol=1e-5, rtol=1e-5)
        for k, w, m in zip(KEYS, lam, means(cols)):
            assert metrics[f"recap/lambda/{k}"] == pytest.approx(w, abs=1e-12)
            assert metrics[f"recap/monitored/{k}"] == pytest.approx(m, abs=1e-12)
    assert lam != [1.0, 1.0]
    assert verl_recap.recap_state().weights.steps == 8


class Loader:
    """The dataloader verl's checkpoint methods save and restore."""

    def __init__(self):
        self.state = {"seen": 0}

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)

    def __len__(self):
        return 1000


class CheckpointTrainer:
    """What verl's _save_checkpoint / _load_checkpoint read of their trainer, the worker groups
    (Ray actors) replaced by recorders."""

    def __init__(self, config):
        self.config, self.global_steps, self.use_critic, self.trainer_mode = config, 0, False, "sync"
        self.calls = []
        self.actor_rollout_wg = types.SimpleNamespace(save_checkpoint=self.recorder("save"),
                                                      load_checkpoint=self.recorder("load"))
        self.train_dataloader = Loader()
        self.checkpoint_callback = types.SimpleNamespace(on_save=lambda **k: None)

    def recorder(self, what):
        def call(*args, **kwargs):
            self.calls.append((what, kwargs.get("local_path", args[0] if args else None)))
        return call


@pytest.mark.parametrize("trainer_cls", ["v1", "legacy"])
@pytest.mark.parametrize("resume_mode", ["auto", "resume_path"])
def test_scheduler_in_verls_checkpoints(tmp_path, trainer_cls, resume_mode):
    """verl's own _save_checkpoint writes the scheduler beside its files (before its tracker file) and
    its _load_checkpoint restores it: the resumed run's next step equals the uninterrupted run's."""
    cls = trainer_base.PPOTrainer if trainer_cls == "v1" else ray_trainer.RayPPOTrainer
    ckpt = tmp_path / "ckpt"
    cfg = verl_config("+algorithm.recap.window=2", f"trainer.default_local_dir={ckpt}")
    replica = rk.RecapWeights(["reward", "reward"], window=2)
    gen = torch.Generator().manual_seed(6)
    steps = [make_step(gen, step) for step in range(9)]
    trainer = CheckpointTrainer(cfg)
    for step, (uids, mask, lens, cols) in enumerate(steps[:6]):
        ray_trainer.compute_advantage(legacy_batch(uids, mask, lens, cols), adv_estimator="recap", config=cfg.algorithm)
        replica.observe(means(cols))
    trainer.global_steps = 6
    cls._save_checkpoint(trainer)
    folder = ckpt / "global_step_6"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "6"
    assert (folder / "data.pt").exists() and (folder / verl_recap.CHECKPOINT_FILE).exists()
    assert not [p for p in folder.iterdir() if ".tmp." in p.name]
    saved = verl_recap.recap_state().weights.weights()
    assert saved == replica.weights() and saved != [1.0, 1.0]

    verl_recap.reset_recap_state()  # a new driver process
    overrides = ["+algorithm.recap.window=2", f"trainer.default_local_dir={ckpt}", f"trainer.resume_mode={resume_mode}"]
    if resume_mode == "resume_path":
        overrides.append(f"trainer.resume_from_path={folder}")
    resumed = CheckpointTrainer(verl_config(*overrides))
    cls._load_checkpoint(resumed)
    assert resumed.global_steps == 6 and ("load", str(folder / "actor")) in resumed.calls
    assert verl_recap.recap_state().weights.weights() == saved
    assert verl_recap.recap_state().weights.steps == 6
    for uids, mask, lens, cols in steps[6:]:
        out = ray_trainer.compute_advantage(legacy_batch(uids, mask, lens, cols), adv_estimator="recap",
                                            config=resumed.config.algorithm)
        replica.observe(means(cols))
        want = verl_grpo(uids, mask, lens, weighted(cols, replica.weights()))
        torch.testing.assert_close(out.batch["advantages"], want, atol=1e-5, rtol=1e-5)


def test_resume_without_the_scheduler_warns(tmp_path):
    """A checkpoint saved without RECAP (or for other reward keys) resumes with a fresh scheduler and says so."""
    ckpt = tmp_path / "ckpt"
    cfg = verl_config(f"trainer.default_local_dir={ckpt}")
    trainer = CheckpointTrainer(cfg)
    trainer.global_steps = 3
    trainer_base.PPOTrainer._save_checkpoint(trainer)  # no recap step yet: nothing to save
    assert not (ckpt / "global_step_3" / verl_recap.CHECKPOINT_FILE).exists()
    with pytest.warns(UserWarning, match="no recap_scheduler.json in the checkpoint resumed"):
        trainer_base.PPOTrainer._load_checkpoint(CheckpointTrainer(cfg))
    uids, mask, lens, cols = make_step(torch.Generator().manual_seed(7), 0)
    ray_trainer.compute_advantage(legacy_batch(uids, mask, lens, cols), adv_estimator="recap", config=cfg.algorithm)
    trainer_base.PPOTrainer._save_checkpoint(trainer)
    verl_recap.reset_recap_state()
    other = verl_config(f"trainer.default_local_dir={ckpt}")
    with open_dict(other):
        other.algorithm.recap.reward_keys = ["accuracy_reward"]
    with pytest.warns(UserWarning, match=r"for reward keys \['format_reward', 'accuracy_reward'\]"):
        trainer_base.PPOTrainer._load_checkpoint(CheckpointTrainer(other))
    assert verl_recap.recap_state().weights.steps == 0
