"""What the DataLoaders of every data source give the training loop: one batch dict
(:func:`collate`), and a data worker's DataError as its own one line (:func:`one_line_errors`)."""

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


def one_line_errors(batches: Iterable[dict]) -> Iterator[dict]:
    """``batches``, with a DataError raised in a DataLoader worker (which torch re-raises with the
    worker's traceback in its message) turned back into its own one-line message."""
    try:
        yield from batches
    except DataError as exc:
        lines = str(exc).strip().splitlines()
        if len(lines) == 1:
            raise
        raise DataError(lines[-1].split("DataError: ", 1)[-1]) from None
