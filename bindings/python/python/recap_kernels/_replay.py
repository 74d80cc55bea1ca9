"""RECAP's replay sequences, shared by the TRL callback and the verl integration: general-domain
texts tokenized once by the trainer's tokenizer (``add_special_tokens`` False, at most
``max_length`` tokens, sequences of fewer than 2 tokens dropped), drawn in a seeded random order,
cycling."""
from typing import List

import torch

from ._native import RecapError


class Replay:
    """``take(n)``: the next n sequences (token id lists); ``next(device)``: the next
    ``batch_size`` as a right-padded batch. ``position`` is where the next draw starts (a
    checkpoint keeps it)."""

    def __init__(self, data, tokenizer, batch_size: int, max_length: int, seed: int):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise RecapError(f"invalid argument `replay_batch_size`: expected an integer >= 1, got {batch_size!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise RecapError(f"invalid argument `replay_max_length`: expected an integer >= 2, got {max_length!r}")
        if hasattr(data, "column_names"):  # a datasets.Dataset: its "text" column
            if "text" not in data.column_names:
                raise RecapError(f"invalid argument `replay`: a dataset needs a 'text' column, it has "
                                 f"{data.column_names}")
            data = data["text"]
        if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
            raise RecapError(f"invalid argument `replay`: expected texts (a list of str or a dataset with a "
                             f"'text' column) or token id lists, got {type(data).__name__}")
        seqs = []
        for i, item in enumerate(data):
            if isinstance(item, str):
                ids = tokenizer(item, add_special_tokens=False)["input_ids"]
            elif isinstance(item, (list, tuple)) and all(isinstance(t, int) for t in item):
                ids = list(item)
            else:
                raise RecapError(f"invalid argument `replay[{i}]`: expected a str or a list of token ids, got "
                                 f"{type(item).__name__}")
            if len(ids) >= 2:
                seqs.append([int(t) for t in ids[:max_length]])
        if not seqs:
            raise RecapError("invalid argument `replay`: no sequence of 2 or more tokens")
        self.seqs, self.batch_size = seqs, batch_size
        self.pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
        self.order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed)).tolist()
        self.position = 0

    def take(self, n: int) -> List[List[int]]:
        """The next ``n`` sequences."""
        rows = [self.seqs[self.order[(self.position + i) % len(self.order)]] for i in range(n)]
        self.position += n
        return rows

    def next(self, device):
        """The next ``batch_size`` sequences: ``input_ids`` and ``attention_mask`` ``[batch_size, L]``,
        right-padded."""
        rows = self.take(self.batch_size)
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return ids.to(device), mask.to(device)
