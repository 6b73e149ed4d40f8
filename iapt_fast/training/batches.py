"""An endless, resumable stream of collated batches (the Trainer's data order)."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = ["BatchStream"]


class BatchStream:
    """An endless, resumable stream of collated batches over a list of examples.

    Each epoch is a fresh permutation drawn from (seed, epoch) alone, so the stream's whole
    state is two integers and a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, examples: Sequence[Any], batch_size: int, collator: Callable, seed: int, shuffle: bool = True) -> None:
        if len(examples) == 0:
            raise ValueError("cannot stream an empty dataset")
        self.examples, self.batch_size, self.collator = examples, batch_size, collator
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.examples)))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.examples), generator=gen).tolist()

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.pos >= len(self.examples):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        idx = self._order[self.pos:self.pos + self.batch_size]
        self.pos += len(idx)
        return self.collator([self.examples[i] for i in idx])

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.pos / len(self.examples)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n": len(self.examples)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if state["n"] != len(self.examples) or state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint was written for {state['n']} examples with seed {state['seed']}, "
                f"this run has {len(self.examples)} with seed {self.seed}: resume needs the same data and seed"
            )
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation(self.epoch)
