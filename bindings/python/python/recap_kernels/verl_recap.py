"""RECAP's reward-level weights in verl: the advantage estimator ``recap``.

    algorithm.adv_estimator=recap
    +algorithm.recap.reward_keys=[format_reward,accuracy_reward]   # keys of compute_score's dict
    +algorithm.recap.preset=authors                                 # optional: "paper" (default) or "authors"

Each step, each reward key's mean over the batch's responses (the finite values; ``compute_score``
returns a dict with ``score`` and these keys, which verl keeps as the responses' reward extra info)
goes to RECAP's scheduler (``recap_kernels.RecapWeights``, orientation "reward"); each response's
score becomes ``sum_k lambda_k r_k`` (NaN components skipped, as TRL's ``nansum``) and the
advantages are GRPO's on it (``norm_adv_by_std_in_grpo``, verl's epsilon 1e-6 and its groups of
one: mean 0, std 1), exactly what verl's ``grpo`` estimator computes on that score. What verl
added to the scores before the estimator (the KL penalty of ``use_kl_in_reward``) is kept: the
score replaced is ``token_level_scores``' sum. Until the scheduler has 2W steps every lambda is 1:
GRPO on the sum of the keys. The other fields of ``algorithm.recap`` are the scheduler's options
(``window``, ``temperature``, ``alpha``, ...; docs/recap.md).

Metrics, logged with verl's own each step: ``recap/lambda/<key>`` and ``recap/monitored/<key>``
(the observed mean; NaN for a key without a finite value in the step, which observes nothing).

verl hands a registered estimator only ``token_level_rewards``, ``response_mask``, ``index`` and
``config`` (its ``gdpo`` alone gets the reward extra info), so installing this package (verl's
plugin entry point, ``recap_kernels.verl_plugin``) also wraps, where verl defines them:
``verl.trainer.ppo.ray_trainer.compute_advantage`` (for ``adv_estimator=recap`` only: it calls the
estimator with the batch's reward extra info; any other estimator goes to verl's unchanged),
``ray_trainer.compute_data_metrics`` (adds the step's RECAP metrics) and, in the v1 trainer
(``trainer.use_v1``, verl 0.9's default), ``PPOTrainer._compute_advantage`` (fetches the responses'
``extra_fields`` from the TransferQueue beside its own fields; adds the metrics) and
``compute_advantage_for_multi_trajectories`` (a recap step takes verl's GRPO path there: each
session's final output normalized within its group, the advantage spread over the session's
outputs, as verl's ``grpo`` in that trainer). Each wrap is
applied when verl imports the module (a post-import hook), so nothing of verl's trainer is imported
before verl does.

The scheduler lives in the process that computes the advantages (verl's driver); the trainers'
``_save_checkpoint`` / ``_load_checkpoint`` are wrapped too, so it is saved in each checkpoint
folder (``recap_scheduler.json``, written atomically before verl's own files) and restored on
resume (a checkpoint without it, or for other reward keys, warns and starts it again).

With ``+algorithm.recap.replay_data=<file>`` (v1 trainer only) the scheduler also weighs RECAP's
replay objective (``replay``, orientation "loss"): ``PPOTrainer._update_actor`` is wrapped to send
each step's replay sequences and ``lambda_replay`` to the actor workers (``verl_replay`` trains
them), and the step is observed after the update, the reward means with the update's replay NLL
(``actor/recap/replay_nll``); the checkpoint keeps the replay's position too."""
import functools
import importlib.abc
import inspect
import json
import math
import os
import sys
import threading
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import _args as A
from . import functional as F
from ._native import RecapError
from . import verl_replay
from ._replay import Replay
from .verl import _get
from .weights import RecapWeights

__all__ = ["NAME", "CHECKPOINT_FILE", "compute_recap_outcome_advantage", "recap_state", "reset_recap_state",
           "install"]

NAME = "recap"


class _State:
    """The scheduler of one configuration (reward keys, preset, options, replay) and the last
    step's metrics; with replay, the reward means waiting for the actor update's replay NLL."""

    def __init__(self, key: Tuple[Tuple[str, ...], str, tuple, Optional[tuple]]):
        keys, self.preset, options, replay = key
        self.key = key
        self.rewards = list(keys)
        self.names = self.rewards + (["replay"] if replay is not None else [])
        self.weights = RecapWeights(["reward"] * len(keys) + (["loss"] if replay is not None else []),
                                    preset=self.preset, **dict(options))
        self.replay_settings = dict(replay) if replay is not None else None
        self.replay: Optional[Replay] = None  # built with the trainer's tokenizer at the first update
        self.replay_position = 0
        self.pending: Optional[List[float]] = None
        self.metrics: Dict[str, float] = {}

    def take_metrics(self) -> Dict[str, float]:
        metrics, self.metrics = self.metrics, {}
        return metrics

    def replay_source(self, tokenizer) -> Replay:
        if self.replay is None:
            r = self.replay_settings
            self.replay = Replay(verl_replay.load_texts(r["replay_data"]), tokenizer, r["replay_batch_size"],
                                 r["replay_max_length"], r["replay_seed"])
            self.replay.position = self.replay_position
        return self.replay

    def observe_update(self, nll) -> Dict[str, float]:
        """After the actor update: the step's reward means and replay NLL go to the scheduler
        (nothing when one is not finite)."""
        means, self.pending = self.pending, None
        nll = float("nan") if nll is None else float(nll)
        if means is not None and all(math.isfinite(v) for v in means + [nll]):
            self.weights.observe(means + [nll])
        return {"recap/monitored/replay": nll}

    def checkpoint(self) -> dict:
        out = {"reward_keys": self.names, "preset": self.preset, "scheduler": self.weights.state_dict()}
        if self.replay_settings is not None:
            out["replay_position"] = self.replay.position if self.replay is not None else self.replay_position
        return out


_LOCK = threading.Lock()
_STATE: List[_State] = []
# a v1 trainer's recap step in progress: the reward columns it fetched (``columns``), and whether
# verl's multi-trajectory GRPO path is running for it (``as_grpo``)
_PENDING = threading.local()


def recap_state() -> Optional[_State]:
    """This process's RECAP scheduler for verl (``.weights``: a ``RecapWeights``; ``.names``: the
    reward keys, then ``replay`` with replay), or None before the first ``recap`` step."""
    return _STATE[0] if _STATE else None


def reset_recap_state() -> None:
    """Forgets the scheduler: the next ``recap`` step starts a new one."""
    with _LOCK:
        _STATE.clear()


_REPLAY = {"replay_data": None, "replay_batch_size": 8, "replay_max_length": 256, "replay_seed": 0}


def _settings(config) -> Tuple[Tuple[str, ...], str, tuple, Optional[tuple]]:
    """``algorithm.recap``: the reward keys, the preset, the scheduler's options (sorted pairs)
    and the replay settings (sorted pairs; None without ``replay_data``)."""
    recap = _get(config, "recap")
    keys = _get(recap, "reward_keys")
    if keys is None or isinstance(keys, (str, bytes)) or not hasattr(keys, "__iter__") or len(list(keys)) == 0:
        raise RecapError("invalid argument `algorithm.recap.reward_keys`: adv_estimator=recap needs the list of "
                         "reward keys (the keys of compute_score's dict, e.g. "
                         "+algorithm.recap.reward_keys=[format_reward,accuracy_reward]), got "
                         f"{keys!r}")
    keys = tuple(str(k) for k in keys)
    if len(set(keys)) != len(keys):
        raise RecapError(f"invalid argument `algorithm.recap.reward_keys`: a key appears twice in {list(keys)}")
    if "replay" in keys:
        raise RecapError("invalid argument `algorithm.recap.reward_keys`: 'replay' names the replay objective")
    preset = str(_get(recap, "preset", "paper"))
    items = recap.items() if hasattr(recap, "items") else vars(recap).items()
    options = tuple(sorted((str(k), v) for k, v in items if k not in ("reward_keys", "preset") and k not in _REPLAY))
    replay = None
    if _get(recap, "replay_data") is not None:
        replay = {k: _get(recap, k, d) for k, d in _REPLAY.items()}
        replay["replay_data"] = str(replay["replay_data"])
        for k in ("replay_batch_size", "replay_max_length", "replay_seed"):
            v = replay[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "replay_seed" else 1):
                raise RecapError(f"invalid argument `algorithm.recap.{k}`: expected an integer >= "
                                 f"{0 if k == 'replay_seed' else 1}, got {v!r}")
        replay = tuple(sorted(replay.items()))
    else:
        stray = [k for k in _REPLAY if _get(recap, k) is not None]
        if stray:
            raise RecapError(f"invalid argument `algorithm.recap.{stray[0]}`: replay needs "
                             "algorithm.recap.replay_data (a .jsonl or .parquet file with a 'text' column)")
    return keys, preset, options, replay


def _state(config) -> _State:
    key = _settings(config)
    with _LOCK:
        if not _STATE or _STATE[0].key != key:
            _STATE[:] = [_State(key)]
        return _STATE[0]


def _column(non_tensor_batch, key: str, b: int) -> Tensor:
    if key not in non_tensor_batch:
        raise RecapError(f"invalid argument `algorithm.recap.reward_keys`: reward key {key!r} is not in the batch's "
                         f"reward extra info (it has {sorted(str(k) for k in non_tensor_batch.keys())}); "
                         "compute_score must return a dict with 'score' and this key")
    values = non_tensor_batch[key]
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    if len(values) != b:
        raise RecapError(f"invalid argument `{key}`: expected B = {b} values (one per response), got {len(values)}")
    try:
        column = torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float64)
    except (TypeError, ValueError):
        raise RecapError(f"invalid argument `{key}`: expected a number per response (compute_score's "
                         f"dict), got {[v for v in values if not isinstance(v, (int, float))][:1]!r}") from None
    infinite = torch.isinf(column).nonzero()
    if infinite.numel():
        i = int(infinite[0])
        raise RecapError(f"invalid argument `{key}`: expected finite rewards (NaN or None where the reward does "
                         f"not apply), got {values[i]} for response {i}")
    return column


def compute_recap_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index, epsilon: float = 1e-6,
                                    norm_adv_by_std_in_grpo: bool = True, config=None,
                                    non_tensor_batch: Optional[dict] = None, batch=None,
                                    **kwargs) -> Tuple[Tensor, Tensor]:
    """The ``recap`` estimator (module docstring): ``(advantages, returns)`` ``[B, L]`` float32,
    equal. ``non_tensor_batch``: the per-response reward columns (verl's reward extra info);
    ``batch``: read for ``token_level_scores`` (the KL penalty kept is the rewards minus them).
    Observes the step's means: one call per training step."""
    if non_tensor_batch is None:
        raise RecapError("invalid argument `non_tensor_batch`: adv_estimator=recap reads each response's reward "
                         "columns; verl's compute_advantage passes them once recap_kernels is installed (its verl "
                         "plugin wraps it), a direct call must pass non_tensor_batch")
    rewards = A.floats("token_level_rewards", token_level_rewards)
    response_mask = A.tensor("response_mask", response_mask)
    epsilon = A.number("epsilon", epsilon)
    norm_adv_by_std_in_grpo = A.boolean("norm_adv_by_std_in_grpo", norm_adv_by_std_in_grpo)
    if rewards.dim() != 2:
        raise RecapError(f"invalid argument `token_level_rewards`: expected [B, L], got {list(rewards.shape)}")
    b = rewards.shape[0]
    if response_mask.shape != rewards.shape:
        raise RecapError(f"invalid argument `response_mask`: expected [B, L] = {list(rewards.shape)}, got "
                         f"{list(response_mask.shape)}")
    if response_mask.is_complex():
        A.fail("response_mask", f"expected a bool, integer or float mask, got {response_mask.dtype}", True)
    if not 0.0 < epsilon < math.inf:
        A.fail("epsilon", f"expected a positive finite number, got {epsilon}")
    if index is None or isinstance(index, (str, bytes)) or not hasattr(index, "__len__") or len(index) != b:
        A.fail("index", f"expected B = {b} group ids (verl's uids, one per response), got "
                        f"{len(index) if hasattr(index, '__len__') else type(index).__name__}")
    groups = F._group_ids(index, b)
    penalty = torch.zeros(b, dtype=torch.float64)
    scores = batch.get("token_level_scores", None) if batch is not None and hasattr(batch, "get") else None
    if scores is not None:  # keep what verl added to the scores (use_kl_in_reward's penalty)
        scores = A.floats("token_level_scores", scores)
        if scores.shape != rewards.shape:
            A.fail("token_level_scores", f"expected [B, L] = {list(rewards.shape)}, got {list(scores.shape)}")
        penalty = (rewards.double() - scores.double().to(rewards.device)).sum(-1).cpu()
        bad = (~torch.isfinite(penalty)).nonzero()
        if bad.numel():
            raise RecapError(f"invalid argument `token_level_rewards`: not finite, less token_level_scores (the KL "
                             f"penalty verl subtracted), for response {int(bad[0])}")
    state = _state(config)
    if state.replay_settings is not None and getattr(_PENDING, "columns", None) is None:
        raise RecapError("invalid argument `algorithm.recap.replay_data`: RECAP's replay trains in verl's v1 trainer "
                         "(trainer.use_v1=True, verl's default); this step is not one of its steps")
    columns = torch.stack([_column(non_tensor_batch, k, b) for k in state.rewards], 1)  # [B, K] float64
    # every argument checked: now the step is observed (once)
    finite = torch.isfinite(columns)
    counts = finite.sum(0)
    means = torch.where(counts > 0, torch.where(finite, columns, torch.zeros_like(columns)).sum(0) / counts.clamp(min=1),
                        torch.full_like(counts, float("nan"), dtype=torch.float64)).tolist()
    if state.replay_settings is not None:  # observed with the replay NLL, after the actor update
        state.pending = means
    elif bool((counts > 0).all()):  # a key without a finite value this step: nothing observed
        state.weights.observe(means)
    lam_all = state.weights.weights()
    lam = torch.tensor(lam_all[:len(state.rewards)], dtype=torch.float64)
    score = torch.where(finite, columns * lam, torch.zeros_like(columns)).sum(1) + penalty
    if b == 0:
        adv = torch.zeros_like(rewards)
    else:  # on the host, where verl's driver holds the batch (B values)
        per_seq = F.group_advantages(score.to(torch.float32), group_ids=groups,
                                     mode="grpo" if norm_adv_by_std_in_grpo else "dr_grpo", eps=epsilon,
                                     singletons="verl")
        adv = per_seq.to(rewards.device).unsqueeze(-1) * response_mask.to(torch.float32)
    metrics = {}
    for name, w, m in zip(state.names, lam_all, means):
        metrics[f"recap/lambda/{name}"] = w
        metrics[f"recap/monitored/{name}"] = m
    if state.replay_settings is not None:
        metrics["recap/lambda/replay"] = lam_all[-1]
    state.metrics = metrics
    return adv, adv


def _is_recap(adv_estimator) -> bool:
    return str(getattr(adv_estimator, "value", adv_estimator)) == NAME


def _wrapping(make):
    """``make(original)`` as a wrap of verl's ``original`` (its name, docstring and ``__wrapped__``),
    applied once."""

    def wrap(original):
        if getattr(original, "__recap_wrapped__", False):
            return original
        wrapper = functools.wraps(original)(make(original))
        wrapper.__recap_wrapped__ = True
        return wrapper

    return wrap


def _log_metrics(metrics: dict) -> dict:
    """Adds the last ``recap`` step's metrics (once) to verl's step metrics."""
    state = recap_state()
    if state is not None:
        metrics.update(state.take_metrics())
    return metrics


@_wrapping
def _wrap_compute_advantage(original):
    signature = inspect.signature(original)

    def compute_advantage(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if not (_is_recap(a["adv_estimator"]) or getattr(_PENDING, "as_grpo", False)):
            return original(*args, **kwargs)
        data = a["data"]
        if "response_mask" not in data.batch.keys():
            data.batch["response_mask"] = sys.modules[original.__module__].compute_response_mask(data)
        columns = data.non_tensor_batch
        adv, ret = compute_recap_outcome_advantage(
            token_level_rewards=data.batch["token_level_rewards"], response_mask=data.batch["response_mask"],
            index=data.non_tensor_batch["uid"], norm_adv_by_std_in_grpo=a.get("norm_adv_by_std_in_grpo", True),
            config=a.get("config"), non_tensor_batch=columns, batch=data.batch)
        data.batch["advantages"] = adv
        data.batch["returns"] = ret
        return data

    return compute_advantage


@_wrapping
def _wrap_compute_data_metrics(original):
    def compute_data_metrics(*args, **kwargs):
        return _log_metrics(original(*args, **kwargs))

    return compute_data_metrics


def _reward_columns(extra_fields) -> Dict[str, list]:
    """The reward extra info of each response (v1 trainer: ``extra_fields["reward_extra_info"]``) as
    columns; a response without a key gets None there."""
    infos = []
    for value in extra_fields:
        fields = getattr(value, "data", value)
        info = fields.get("reward_extra_info", {}) if isinstance(fields, dict) else {}
        infos.append(info if isinstance(info, dict) else {})
    keys = sorted({k for info in infos for k in info})
    return {k: [info.get(k) for info in infos] for k in keys}


@_wrapping
def _wrap_multi_trajectories(original):
    """verl's v1 ``compute_advantage_for_multi_trajectories`` runs its GRPO path (each session's
    final output normalized within its group, the advantage spread over the session's outputs)
    for a recap step too: the reward columns join the batch's non-tensor data (so its row
    selection keeps them aligned) and the GRPO call it makes computes recap's advantages."""
    signature = inspect.signature(original)

    def compute_advantage_for_multi_trajectories(*args, **kwargs):
        columns = getattr(_PENDING, "columns", None)
        if columns is None:
            return original(*args, **kwargs)
        import numpy as np  # verl's dependency (not the package's)

        bound = signature.bind(*args, **kwargs)
        data = bound.arguments["data"]
        b = len(data.non_tensor_batch["uid"])
        for key, values in columns.items():
            if key not in data.non_tensor_batch and len(values) == b:
                data.non_tensor_batch[key] = np.array(values, dtype=object)
        bound.arguments["adv_estimator"] = sys.modules[original.__module__].core_algos.AdvantageEstimator.GRPO
        _PENDING.as_grpo = True
        try:
            return original(*bound.args, **bound.kwargs)
        finally:
            _PENDING.as_grpo = False

    return compute_advantage_for_multi_trajectories


@_wrapping
def _wrap_v1_compute_advantage(original):
    def _compute_advantage(self, batch, metrics):
        if not _is_recap(self.config.algorithm.adv_estimator):
            return original(self, batch, metrics)
        tq = sys.modules[original.__module__].tq
        got = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
        _PENDING.columns = _reward_columns(got["extra_fields"])
        try:
            out = original(self, batch, metrics)
        finally:
            _PENDING.columns = None
        _log_metrics(metrics)
        return out

    return _compute_advantage


@_wrapping
def _wrap_v1_update_actor(original):
    """With replay: the step's replay sequences (``replay_batch_size`` per PPO mini-batch) and the
    replay weight go to the actor workers in the batch's ``extra_info`` (``verl_replay``); after
    the update the reward means and the update's replay NLL go to the scheduler."""

    def _update_actor(self, batch, metrics):
        state = recap_state()
        if (not _is_recap(self.config.algorithm.adv_estimator) or state is None
                or state.replay_settings is None or state.pending is None):
            return original(self, batch, metrics)
        actor = self.config.actor_rollout_ref.actor
        if bool(_get(actor, "shuffle", False)):
            raise RecapError("invalid argument `actor_rollout_ref.actor.shuffle`: RECAP's replay rows join each PPO "
                             "mini-batch in order; set it to false (verl's default)")
        mini_batch = int(actor.ppo_mini_batch_size) * int(self.config.actor_rollout_ref.rollout.n)
        mini_batches = len(batch) // mini_batch if mini_batch > 0 else 0
        if mini_batches < 1 or len(batch) % mini_batch:
            raise RecapError(f"invalid argument `actor_rollout_ref.actor.ppo_mini_batch_size`: expected the step's "
                             f"{len(batch)} rows to split into mini-batches of {mini_batch} (times rollout.n)")
        r = int(state.replay_settings["replay_batch_size"])
        source = state.replay_source(self.tokenizer)
        batch.extra_info[verl_replay.EXTRA] = {"rows": source.take(r * mini_batches), "per_mini_batch": r,
                                               "lambda": float(state.weights.weights()[-1])}
        try:
            out = original(self, batch, metrics)
        finally:
            batch.extra_info.pop(verl_replay.EXTRA, None)
        metrics.update(state.observe_update(metrics.get(f"actor/{verl_replay.METRIC}")))
        return out

    return _update_actor


CHECKPOINT_FILE = "recap_scheduler.json"


def _checkpoint_file(trainer, resuming: bool) -> str:
    """``recap_scheduler.json`` in the step's checkpoint folder, where verl puts its own
    (``trainer.default_local_dir``/global_step_N, or ``trainer.resume_from_path`` when resuming
    from it; relative to the working directory as verl's)."""
    cfg = trainer.config.trainer
    if resuming and _get(cfg, "resume_mode") == "resume_path":
        folder = str(cfg.resume_from_path)
    else:
        folder = os.path.join(str(cfg.default_local_dir), f"global_step_{trainer.global_steps}")
    return os.path.join(os.path.abspath(folder), CHECKPOINT_FILE)


def _write_atomically(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@_wrapping
def _wrap_save_checkpoint(original):
    def _save_checkpoint(self, *args, **kwargs):
        # first, so verl's tracker file (written last) never names a step without it
        state = recap_state()
        if state is not None and _is_recap(self.config.algorithm.adv_estimator):
            _write_atomically(_checkpoint_file(self, False), json.dumps(state.checkpoint()))
        return original(self, *args, **kwargs)

    return _save_checkpoint


@_wrapping
def _wrap_load_checkpoint(original):
    def _load_checkpoint(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if not _is_recap(self.config.algorithm.adv_estimator) or not getattr(self, "global_steps", 0):
            return out
        path = _checkpoint_file(self, True)
        if not os.path.exists(path):
            warnings.warn(f"recap: no {CHECKPOINT_FILE} in the checkpoint resumed ({os.path.dirname(path)}); RECAP's "
                          "scheduler starts again (weights 1 for 2W steps)")
            return out
        with open(path) as f:
            saved = json.load(f)
        state = _state(self.config.algorithm)
        if saved.get("reward_keys") != state.names or saved.get("preset") != state.preset:
            warnings.warn(f"recap: the checkpoint's scheduler is for reward keys {saved.get('reward_keys')} and preset "
                          f"{saved.get('preset')!r}, this run has {state.names} and {state.preset!r}; it starts again")
            return out
        state.weights.load_state_dict(saved["scheduler"])
        state.replay_position = int(saved.get("replay_position", 0))
        if state.replay is not None:
            state.replay.position = state.replay_position
        return out

    return _load_checkpoint


def _patch_trainer_class(cls) -> None:
    if cls is None:
        return
    for name, wrap in (("_save_checkpoint", _wrap_save_checkpoint), ("_load_checkpoint", _wrap_load_checkpoint)):
        if name in vars(cls):
            setattr(cls, name, wrap(vars(cls)[name]))


def _patch_ray_trainer(module) -> None:
    module.compute_advantage = _wrap_compute_advantage(module.compute_advantage)
    module.compute_data_metrics = _wrap_compute_data_metrics(module.compute_data_metrics)
    _patch_trainer_class(getattr(module, "RayPPOTrainer", None))
    utils = sys.modules.get("verl.trainer.ppo.v1.utils")  # imported verl's before the wrap
    if utils is not None and hasattr(utils, "compute_advantage"):
        utils.compute_advantage = _wrap_compute_advantage(utils.compute_advantage)


def _patch_v1_utils(module) -> None:
    if hasattr(module, "compute_advantage"):
        module.compute_advantage = _wrap_compute_advantage(module.compute_advantage)
    if hasattr(module, "compute_advantage_for_multi_trajectories"):
        module.compute_advantage_for_multi_trajectories = _wrap_multi_trajectories(
            module.compute_advantage_for_multi_trajectories)


def _patch_v1_trainer(module) -> None:
    if hasattr(module, "compute_advantage_for_multi_trajectories"):  # imported by name from v1.utils
        module.compute_advantage_for_multi_trajectories = _wrap_multi_trajectories(
            module.compute_advantage_for_multi_trajectories)
    cls = getattr(module, "PPOTrainer", None)
    if cls is not None and "_compute_advantage" in vars(cls):
        cls._compute_advantage = _wrap_v1_compute_advantage(cls._compute_advantage)
    if cls is not None and "_update_actor" in vars(cls):
        cls._update_actor = _wrap_v1_update_actor(cls._update_actor)
    _patch_trainer_class(cls)


def _patch_engine_workers(module) -> None:
    """The actor workers: verl's ``ppo_loss`` (as the worker module names it when it builds the
    actor's loss) and ``TrainingWorker.train_mini_batch`` learn the replay rows (``verl_replay``)."""
    if hasattr(module, "ppo_loss"):
        module.ppo_loss = _wrapping(verl_replay.wrap_ppo_loss)(module.ppo_loss)
    cls = getattr(module, "TrainingWorker", None)
    if cls is not None and "train_mini_batch" in vars(cls):
        cls.train_mini_batch = _wrapping(verl_replay.wrap_train_mini_batch)(cls.train_mini_batch)


_PATCHES = {
    "verl.trainer.ppo.ray_trainer": _patch_ray_trainer,
    "verl.trainer.ppo.v1.utils": _patch_v1_utils,
    "verl.trainer.ppo.v1.trainer_base": _patch_v1_trainer,
    "verl.workers.engine_workers": _patch_engine_workers,
}


class _Loader(importlib.abc.Loader):
    """The module's own loader, then the patch."""

    def __init__(self, loader, patch):
        self._loader, self._patch = loader, patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Applies ``_PATCHES`` to a module right after Python executes it."""

    def find_spec(self, fullname, path, target=None):
        patch = _PATCHES.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, patch)
                return spec
        return None


def install() -> None:
    """Registers the ``recap`` estimator in verl's registry and wraps verl's trainer functions
    (module docstring), now for modules already imported, on import for the others. Called by the
    package's verl plugin; idempotent. Raises ImportError when verl is not installed."""
    from verl.trainer.ppo import core_algos

    registry = getattr(core_algos, "ADV_ESTIMATOR_REGISTRY", {})
    if NAME not in registry:
        core_algos.register_adv_est(NAME)(compute_recap_outcome_advantage)
    for name, patch in _PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())

