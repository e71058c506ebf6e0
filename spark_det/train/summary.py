"""``summary.csv``: one row per epoch, as timm's train.py writes it, for people who plot with a spreadsheet.

The rows are derived from ``metrics.jsonl`` (already rewound to the checkpoint on resume), with
timm's own helpers: :func:`timm.utils.summary.trim_summary` drops the rows at or after an epoch,
:func:`timm.utils.summary.update_summary` appends one (``epoch,train_loss,...,lr``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from timm.utils.summary import trim_summary, update_summary

from ..io import PathLike

SUMMARY = "summary.csv"
_MEANS = ("loss", "grad_norm", "images_per_s")  # averaged over the epoch's iterations


def epoch_metrics(metrics_file: PathLike, epoch: int) -> Optional[tuple[dict[str, float], float]]:
    """(train metrics, last lr) of ``epoch`` from ``metrics.jsonl``; None if it has no line of that epoch."""
    records = []
    path = Path(metrics_file)
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("epoch") == epoch:
                records.append(record)
    if not records:
        return None
    train = {key: sum(r[key] for r in records) / len(records) for key in _MEANS if all(key in r for r in records)}
    train["skipped_images"] = sum(r.get("skipped_images", 0) for r in records)
    return train, records[-1]["lr"]


def rewind_summary(folder: PathLike, epoch: int) -> None:
    """Drop the rows of ``epoch`` and later (a resume redoes them)."""
    trim_summary(str(Path(folder) / SUMMARY), epoch)


def write_epoch_summary(folder: PathLike, metrics_file: PathLike, epoch: int) -> bool:
    """The row of (0-based) ``epoch``, replacing any row of it or a later epoch already there;
    False when ``metrics.jsonl`` has nothing of that epoch."""
    found = epoch_metrics(metrics_file, epoch)
    if found is None:
        return False
    rewind_summary(folder, epoch)
    train, lr = found
    update_summary(epoch, train, None, str(Path(folder) / SUMMARY), lr=lr)
    return True
