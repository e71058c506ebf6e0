"""Which images each rank trains on, and in which order: a pure function of (seed, epoch).

Every image's crop and mask are seeded by (seed, epoch, index) (:func:`sample_seed`), and the
global batch is a contiguous slice of one permutation of the data set, so the stream does not
depend on workers, process state or (for the masks) how the batch is split over ranks.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from ..errors import DataError


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch (numpy's SeedSequence mixes the three)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0]) >> 1


class EpochSampler(Sampler):
    """Shuffled, rank-sharded (epoch, index) keys; the order depends only on (seed, epoch).

    Like DistributedSampler, but it can start mid-epoch (``start_batch``), which is what makes
    resuming restore the data order, and it yields the epoch along with each index.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        # Each rank gets the same number of full batches per epoch (drop_last semantics).
        self.batches_per_epoch = num_samples // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{num_samples} images are fewer than one global batch ({batch_size} x {world_size} ranks)"
            )
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).numpy()
        else:
            order = np.arange(self.num_samples)
        per_rank = self.batches_per_epoch * self.batch_size
        mine = order[self.rank : self.rank + per_rank * self.world_size : self.world_size]
        rest = mine[self.start_batch * self.batch_size :]
        for chunk in range(0, len(rest), 4096):  # an array, not a list: 8 bytes per image, not ~36
            for index in rest[chunk : chunk + 4096].tolist():
                yield (self.epoch, index)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
