"""RECAP's replay objective inside verl's actor update (the v1 trainer; ``recap_kernels.verl_recap``
sends the sequences, this module trains on them in each actor worker).

    +algorithm.recap.replay_data=general.jsonl     # or .parquet: a "text" column of general-domain text
    +algorithm.recap.replay_batch_size=8           # replay sequences per PPO mini-batch (all ranks), a multiple of the dp size
    +algorithm.recap.replay_max_length=256         # tokens per sequence at most

The driver draws ``replay_batch_size`` sequences per PPO mini-batch (``Replay``, seeded order,
cycling) and hands them, with the replay objective's weight lambda, to ``update_actor`` in the
batch's ``extra_info`` (``recap_replay``). On each actor rank, before verl's mini-batch loop, the
rank's share of each mini-batch's sequences is spliced in after that mini-batch's rollouts (so
each of verl's mini-batches holds exactly the rollouts it holds without replay): a replay row is a
sequence whose first token is the prompt and the rest the response, with ``response_mask`` and
``loss_mask`` 0 (verl's policy, entropy and KL terms and its token count ``batch_num_tokens``
ignore it) and the field ``recap_replay`` carrying, on each response token, ``1 / N``: N the
mini-batch's replay tokens over all ranks. verl's ``ppo_loss`` is wrapped: its loss, plus
``lambda * dp_size * sum(-log p * recap_replay)``, which after verl's gradient mean over the
ranks and sum over micro-batches is ``lambda`` times the mini-batch's token-mean replay NLL, the
NLL at verl's log-probs (the rollout temperature, as its policy term). The metric
``recap/replay_nll`` (verl logs it as ``actor/recap/replay_nll``) is that NLL, averaged over the
step's mini-batches; the driver gives it to the scheduler after the update.

Requirements, checked with a clear error: ``actor_rollout_ref.actor.shuffle`` false (verl's
default; shuffled rows would mix replay rows into other mini-batches), a text-only model (1-D
position ids), verl's ``ppo_loss`` (not its distillation loss)."""
from typing import List, Optional

import torch

from ._native import RecapError

__all__ = ["FIELD", "EXTRA", "LAMBDA", "METRIC", "load_texts", "splice", "replay_loss", "wrap_ppo_loss",
           "wrap_train_mini_batch"]

FIELD = "recap_replay"  # the per-token weight 1/N of the replay rows (0 on rollouts)
EXTRA = "recap_replay"  # the batch's extra_info entry: {"rows", "per_mini_batch", "lambda"}
LAMBDA = "recap_replay_lambda"
METRIC = "recap/replay_nll"

_SEQUENCE = ("input_ids", "position_ids", "attention_mask")


def load_texts(path: str):
    """The replay file: ``.jsonl`` / ``.json`` (one object per line) or ``.parquet``, with a
    "text" column, as a ``datasets.Dataset`` (verl's dependency)."""
    import os

    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    kind = kinds.get(os.path.splitext(str(path))[1].lower())
    if kind is None:
        raise RecapError(f"invalid argument `algorithm.recap.replay_data`: expected a .jsonl, .json or .parquet "
                         f"file with a 'text' column, got {path!r}")
    if not os.path.isfile(path):
        raise RecapError(f"invalid argument `algorithm.recap.replay_data`: no file {path!r}")
    import datasets

    return datasets.load_dataset(kind, data_files=str(path), split="train")


def _rows_of_rank(replay: dict, mini_batches: int, dp_size: int, dp_rank: int):
    """Per mini-batch: this rank's sequences and N, the mini-batch's replay tokens over all ranks."""
    rows, r = replay["rows"], int(replay["per_mini_batch"])
    if r % dp_size:
        raise RecapError(f"invalid argument `algorithm.recap.replay_batch_size`: expected a multiple of the "
                         f"actor's data-parallel size {dp_size}, got {r}")
    if len(rows) != r * mini_batches:
        raise RecapError(f"invalid argument `{EXTRA}`: expected {r} sequences per mini-batch for {mini_batches} "
                         f"mini-batches, got {len(rows)}")
    k = r // dp_size
    out = []
    for m in range(mini_batches):
        group = rows[m * r:(m + 1) * r]
        tokens = sum(len(s) - 1 for s in group)
        out.append((group[dp_rank * k:(dp_rank + 1) * k], tokens))
    return out


def _replay_value(key: str, like: torch.Tensor, seq: List[int], weight: float, kind: str) -> torch.Tensor:
    """One replay row's value of a nested field (the rollout row ``like`` shows its dtype)."""
    n = len(seq)
    if key == "input_ids":
        return torch.tensor(seq, dtype=like.dtype)
    if key == "position_ids":
        return torch.arange(n, dtype=like.dtype)
    if key == "prompts":
        return torch.tensor(seq[:1], dtype=like.dtype)
    if key == "responses":
        return torch.tensor(seq[1:], dtype=like.dtype)
    if key == FIELD:
        return torch.full((n - 1,), weight, dtype=torch.float32)
    if key == "attention_mask":
        return torch.ones(n, dtype=like.dtype)
    length = {"sequence": n, "prompt": 1, "response": n - 1}[kind]
    return torch.zeros((length,) + tuple(like.shape[1:]), dtype=like.dtype)


def _kind(key: str, row: dict) -> str:
    """Which length a nested field's rows have: the sequence's, the prompt's or the response's."""
    if key in _SEQUENCE:
        return "sequence"
    if key == "prompts":
        return "prompt"
    n = row[key].shape[0]
    if n == row["responses"].shape[0]:
        return "response"
    if n == row["input_ids"].shape[0]:
        return "sequence"
    if n == row["prompts"].shape[0]:
        return "prompt"
    raise RecapError(f"invalid argument `{key}`: RECAP's replay cannot build a replay row for this field "
                     f"(rows of length {n}: not the prompt's, the response's or the sequence's)")


def splice(data, replay: dict, dp_size: int, dp_rank: int, micro_batch_size: Optional[int] = None):
    """This rank's batch (verl's TensorDict, nested rows) with its replay rows after each PPO
    mini-batch's rollouts, ``mini_batch_size`` raised by the replay rows (module docstring).
    ``micro_batch_size``: the engine's micro-batch rows per rank (without dynamic batch size), which
    must split each mini-batch with its replay rows."""
    from tensordict import NonTensorData, NonTensorStack, TensorDict
    from verl.utils import tensordict_utils as tu

    mini_batch_size = tu.get_non_tensor_data(data, "mini_batch_size", None)
    if mini_batch_size is None:
        raise RecapError("invalid argument `mini_batch_size`: RECAP's replay splices its rows per PPO mini-batch; "
                         "verl's update_actor sets it")
    b = data.batch_size[0]
    if b == 0:
        raise RecapError("invalid argument `data`: RECAP's replay joins the rank's rollouts, and this rank has none")
    per_rank = int(mini_batch_size) // dp_size
    if per_rank < 1 or b % per_rank:
        raise RecapError(f"invalid argument `mini_batch_size`: expected it to split this rank's {b} rows, got "
                         f"{mini_batch_size} over {dp_size} ranks")
    mini_batches = b // per_rank
    share = _rows_of_rank(replay, mini_batches, dp_size, dp_rank)
    k = int(replay["per_mini_batch"]) // dp_size
    if micro_batch_size and (per_rank + k) % int(micro_batch_size):
        raise RecapError(f"invalid argument `algorithm.recap.replay_batch_size`: each rank's mini-batch of {per_rank} "
                         f"rollouts and {k} replay rows must split into micro-batches of "
                         f"ppo_micro_batch_size_per_gpu = {micro_batch_size} (or use dynamic batch size)")
    for key in ("input_ids", "prompts", "responses"):
        if key not in data.keys() or not data[key].is_nested:
            raise RecapError(f"invalid argument `{key}`: RECAP's replay needs verl's nested (no-padding) rows")
    if "position_ids" in data.keys() and data["position_ids"].dim() != 2:
        raise RecapError("invalid argument `position_ids`: RECAP's replay supports text-only models (1-D position "
                         "ids per row)")
    first = {name: v[0] for name, v in data.items() if isinstance(v, torch.Tensor) and v.is_nested}
    lam = float(replay["lambda"])
    out, replay_rows = {}, [(seq, 1.0 / tokens) for group, tokens in share for seq in group]
    order = []  # (source, index): rollout rows of each mini-batch, then its replay rows
    start = 0
    for m, (group, _) in enumerate(share):
        order += [(0, i) for i in range(m * per_rank, (m + 1) * per_rank)]
        order += [(1, start + j) for j in range(len(group))]
        start += len(group)
    keys = list(data.keys())
    if FIELD not in keys:
        keys.append(FIELD)
    scalars = {}  # verl's non-tensor settings (temperature, global_batch_size, ...): kept as they are
    for key in keys:
        value = data.get(key) if key != FIELD else None
        if isinstance(value, NonTensorData):
            scalars[key] = value
        elif key == FIELD or (isinstance(value, torch.Tensor) and value.is_nested):
            if key == FIELD:
                rollout = [torch.zeros(r.shape[0], dtype=torch.float32) for r in data["responses"].unbind()]
                kind, like = "response", None
            else:
                if value.dim() != 2:
                    raise RecapError(f"invalid argument `{key}`: RECAP's replay supports nested fields of one value "
                                     f"per token, got {value.dim() - 1} dimensions per row")
                rollout, kind, like = list(value.unbind()), _kind(key, first), first[key]
            extra = [_replay_value(key, like, seq, w, kind) for seq, w in replay_rows]
            rows = [rollout[i] if src == 0 else extra[i] for src, i in order]
            out[key] = tu.nested_tensor_from_tensor_list(rows, ragged_idx=getattr(value, "_ragged_idx", 1))
        elif isinstance(value, torch.Tensor):  # one value per row
            extra = torch.zeros((len(replay_rows),) + tuple(value.shape[1:]), dtype=value.dtype)
            both = torch.cat([value, extra])
            out[key] = both[torch.tensor([i if src == 0 else b + i for src, i in order])]
        elif isinstance(value, NonTensorStack):
            items = value.tolist()
            extra = [{} if isinstance(items[0], dict) else None for _ in replay_rows]
            out[key] = NonTensorStack(*[items[i] if src == 0 else extra[i] for src, i in order])
    spliced = TensorDict(out, batch_size=[len(order)])
    for key, value in scalars.items():
        spliced[key] = value
    tu.assign_non_tensor(spliced, mini_batch_size=int(mini_batch_size) + int(replay["per_mini_batch"]))
    tu.assign_non_tensor(spliced, **{LAMBDA: lam})
    return spliced


def replay_loss(config, model_output, data, original, dp_group=None):
    """verl's ``ppo_loss`` (``original``) plus the replay term when the batch has replay rows."""
    if FIELD not in data.keys():
        return original(config, model_output, data, dp_group=dp_group)
    from verl.utils import tensordict_utils as tu
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.padding import no_padding_2_padding

    loss, metrics = original(config, model_output, data, dp_group=dp_group)
    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    weight = data[FIELD]
    weight = weight.to_padded_tensor(0.0) if weight.is_nested else weight
    weight = weight.to(log_prob.device, log_prob.dtype)
    if weight.shape != log_prob.shape:
        weight = torch.nn.functional.pad(weight, (0, log_prob.shape[1] - weight.shape[1]))
    nll = -(log_prob * weight).sum() * float(data["dp_size"])
    lam = float(tu.get_non_tensor_data(data, LAMBDA, 1.0))
    # verl sums a SUM metric over a mini-batch's micro-batches (after the mean over ranks): each
    # mini-batch's replay NLL; the trainer's reduce_metrics averages the mini-batches
    metrics[METRIC] = Metric(value=nll.detach().item(), aggregation=AggregationType.SUM)
    return loss + lam * nll, metrics


def wrap_ppo_loss(original):
    def ppo_loss(config, model_output, data, dp_group=None):
        return replay_loss(config, model_output, data, original, dp_group=dp_group)

    return ppo_loss


def wrap_train_mini_batch(original):
    def train_mini_batch(self, data):
        from verl.utils import tensordict_utils as tu

        replay: Optional[dict] = tu.pop(data, EXTRA, None)
        if replay is None:
            return original(self, data)
        func = getattr(self.loss_fn, "func", self.loss_fn)
        if not getattr(func, "__recap_wrapped__", False):
            raise RecapError("invalid argument `loss_fn`: RECAP's replay is trained by verl's ppo_loss (wrapped by "
                             f"recap_kernels); this actor's loss is {getattr(func, '__name__', func)!r} "
                             "(distillation is not supported with replay)")
        engine, cfg = self.engine, getattr(self, "engine_config", None)
        micro = None if cfg is None or getattr(cfg, "use_dynamic_bsz", False) else getattr(cfg, "micro_batch_size_per_gpu",
                                                                                           None)
        data = splice(data, replay, engine.get_data_parallel_size(), engine.get_data_parallel_rank(), micro)
        return original(self, data)

    return train_mini_batch
