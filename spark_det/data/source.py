"""What the Pretrainer needs of a data source (:class:`DataSource`), and the source ``--data``
names (:func:`open_source`): WebDataset shards, or a folder (ImageNet layouts included) or path list."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence, Union, runtime_checkable

import torch

from ..errors import DataError
from .folder import FolderSource
from .shards import ShardSource, is_shard_source


@runtime_checkable
class DataSource(Protocol):
    """One rank's view of a pretraining data set: :class:`~spark_det.data.folder.FolderSource`
    (a folder or a path list) and :class:`~spark_det.data.shards.ShardSource` (WebDataset shards).

    The contract, in the order a run uses it:

    - ``iters_per_epoch``: the batches every rank trains per epoch (the same on every rank:
      ``len(self) // global batch``, drop-last).
    - ``len(source)``: the images (samples) of the whole data set.
    - :meth:`require_readable`: raise :class:`~spark_det.errors.DataError` when nothing can be
      read, before the run writes anything.
    - :meth:`identity`: a small JSON-able dict that is equal on every rank exactly when the ranks
      see the same data (the Pretrainer compares it across ranks).
    - :meth:`describe`: the data set in a few words, for the log and the model card.
    - :meth:`preview`: the first ``count`` images as the model sees them in epoch 0 (the
      reconstruction figures), or None for none.
    - :meth:`loader`: this rank's batches ``first..iters_per_epoch-1`` of ``epoch``, each a dict
      with ``image`` (a float tensor [B, 3, H, W]), ``key`` (one (epoch, sample index) per image,
      which seeds its mask), ``skipped`` (the index or shard key of each unreadable file met) and
      ``position`` (a shard stream's point after the batch, else None); ``kwargs`` go to the
      DataLoader (``pin_memory``, ``worker_init_fn``). The stream is a pure function of the run's
      seed, the epoch and ``first``.
    - :meth:`state`: what this rank's stream needs to resume exactly, for the checkpoint (None
      when the order is a pure function of seed and epoch).
    - :meth:`restore`: take the states of every rank from a checkpoint resumed at
      (``epoch``, ``first``); returns a note for the log when the resume is approximate, else "".
    """

    iters_per_epoch: int

    def __len__(self) -> int: ...

    def require_readable(self) -> None: ...

    def identity(self) -> dict: ...

    def describe(self) -> str: ...

    def preview(self, count: int) -> Optional[torch.Tensor]: ...

    def loader(self, epoch: int, first: int, **kwargs: Any) -> Iterator[dict]: ...

    def state(self) -> Optional[dict]: ...

    def restore(self, saved: Optional[list], epoch: int, first: int) -> str: ...


def open_source(data: Union[str, Path], input_size: Sequence[int], seed: int, per_rank_batch: int,
                num_workers: int, info: Any, log: Callable[[str], None] = print,
                reindex: bool = False, shard_counts: Optional[str] = None) -> DataSource:
    """The data source ``--data`` names: WebDataset shards (a pattern or URL), a folder or a path
    list; ``shard_counts`` is a file of the shards' sample counts (sizes.json or a wids index)."""
    if is_shard_source(data):
        return ShardSource(str(data), input_size, seed, per_rank_batch, num_workers, info, log, reindex, shard_counts)
    if shard_counts:
        raise DataError(f"--shard-counts applies to WebDataset shards, and --data {data} is a folder or path list")
    return FolderSource(str(data), input_size, seed, per_rank_batch, num_workers, info, log, reindex)
