"""RECAP's dynamic objective weights (the crate's scheduler, in Rust)."""
import json
from typing import Sequence

import torch

from . import _args as A
from . import _native


class RecapWeights:
    """RECAP's objective weights: ``observe([...])`` one monitored value per objective once per
    step (an RL objective's mean reward, orientation "reward"; a replay objective's NLL, "loss"),
    ``weights()`` gives the K weights (all 1 until 2W steps exist; they average 1), ``tensor()`` the
    same as a CPU float32 tensor for ``lambda_=`` (no recompilation under ``torch.compile``).
    ``preset``: "paper" (its equations, the default) or "authors" (its authors' code: the mixture
    of softmaxes with alpha 1, the population std over the mean, no warm-up, c > 1 when getting
    worse); ``options``: the scheduler's fields (``window`` W = 10, ``temperature`` T = 5,
    ``alpha``, ...), over the preset's.
    ``state_dict()`` / ``load_state_dict()`` checkpoint it exactly."""

    def __init__(self, orientations: Sequence[str], preset: str = "paper", **options):
        if not isinstance(preset, str):
            A.fail("preset", f"expected 'paper' or 'authors', got {preset!r}", True)
        if isinstance(orientations, (str, bytes)) or not hasattr(orientations, "__iter__"):
            A.fail("orientations", f"expected a list of 'reward' / 'loss', got {orientations!r}", True)
        orientations = list(orientations)
        for o in orientations:
            if not isinstance(o, str):
                A.fail("orientations", f"expected 'reward' or 'loss' per objective, got {o!r}", True)
        self._s = A.guarded("RecapScheduler", _native.RecapScheduler)(orientations, json.dumps(A.options(options)),
                                                                    preset)

    @property
    def num_objectives(self) -> int:
        return self._s.num_objectives

    @property
    def steps(self) -> int:
        return self._s.steps

    def observe(self, values) -> None:
        """Records one step's monitored values (K floats, or a tensor of K values; a tensor on a
        GPU is read back, which synchronizes)."""
        if isinstance(values, torch.Tensor):
            values = A.tensor("values", values).detach().double().cpu().reshape(-1).tolist()
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            A.fail("values", f"expected K = {self.num_objectives} numbers, got {values!r}", True)
        A.guarded("RecapScheduler.observe", self._s.observe)([A.number(f"values[{i}]", v)
                                                           for i, v in enumerate(values)])

    def weights(self):
        """The current weights, K floats."""
        return self._s.weights()

    def tensor(self) -> torch.Tensor:
        """The current weights as a CPU float32 tensor, as ``lambda_`` takes them."""
        return torch.tensor(self._s.weights(), dtype=torch.float32)

    def state_dict(self) -> dict:
        return {"recap_scheduler": json.loads(self._s.to_json())}

    def load_state_dict(self, state: dict) -> None:
        self._s = A.guarded("RecapScheduler.from_json", _native.RecapScheduler.from_json)(
            json.dumps(state["recap_scheduler"]))
