"""What the DataLoaders of every data source give the training loop: one batch dict
(:func:`collate`), and the batches as the loop takes them (:func:`batches_from`)."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from ..errors import DataError


def collate(items: list[dict]) -> dict:
    """Stack a batch's images; gather the indices of the files it skipped; keep its (epoch, index) keys."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "skipped": [index for it in items for index in it["skipped"]],
        "key": [it["key"] for it in items],
        "position": items[-1].get("position"),  # a shard stream's point after this batch (shards.py)
    }


def batches_from(loader: Iterable[dict]) -> Iterator[dict]:
    """The batches of ``loader`` (a DataLoader) as the training loop takes them: a DataError raised
    in a data worker (which torch re-raises with the worker's traceback in its message) as its own
    one-line message, and the data workers stopped as soon as the taking ends, an error included."""
    batches = iter(loader)
    try:
        yield from batches
    except DataError as exc:
        lines = str(exc).strip().splitlines()
        if len(lines) == 1:
            raise
        raise DataError(lines[-1].split("DataError: ", 1)[-1]) from None
    finally:
        # Otherwise an error's traceback keeps the iterator alive (its frames hold it) until the
        # garbage collector frees it, possibly at interpreter exit, when its workers (which ignore
        # SIGTERM: the trainer's worker init) can no longer be told to stop, and the process hangs
        # after its error line. torch has no public call for this.
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
