"""Progress output that reads well both on a terminal and in a log file.

On a terminal a tqdm bar; anywhere else (torchrun, SLURM, CI, ``| tee``) carriage-return bars
turn into unreadable walls of text, so a plain line is printed every ``every`` iterations:
``[pretrain] it 40/111 epoch 2/3 loss 0.8123 lr 1.20e-03 img/s 15.3 eta 0:03:12``.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Optional, TextIO


def format_eta(seconds: float) -> str:
    return str(timedelta(seconds=max(0, round(seconds))))


class ProgressLog:
    """Reports optimizer steps ``initial + 1 .. total`` of a run.

    Args:
        total: iterations of the whole run.
        initial: iterations already done (resumed runs).
        every: iterations between plain lines (the recipe's ``log_every``).
        iters_per_epoch: to print the epoch next to the iteration.
        enabled: False on every rank but the main one.
        stream: where to write (stdout); a terminal gets a tqdm bar.
    """

    def __init__(self, total: int, initial: int, every: int, iters_per_epoch: int, enabled: bool = True,
                 stream: Optional[TextIO] = None, name: str = "pretrain") -> None:
        self.total, self.done, self.every, self.iters_per_epoch = total, initial, max(1, every), iters_per_epoch
        self.enabled, self.name = enabled, name
        self.stream = stream if stream is not None else sys.stdout
        self.start_time, self.start_done = time.perf_counter(), initial
        self.bar = None
        if enabled and _is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=name, dynamic_ncols=True, file=self.stream)

    def eta_seconds(self) -> float:
        elapsed = time.perf_counter() - self.start_time
        per_iter = elapsed / max(1, self.done - self.start_done)
        return per_iter * (self.total - self.done)

    def update(self, metrics: dict) -> None:
        """Record one finished iteration with its metrics (loss, lr, images_per_s)."""
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
            return
        if self.done % self.every == 0 or self.done == self.total or self.done == self.start_done + 1:
            epochs = -(-self.total // self.iters_per_epoch)
            print(f"[{self.name}] it {self.done}/{self.total} epoch {metrics['epoch'] + 1}/{epochs} "
                  f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} img/s {metrics['images_per_s']:.1f} "
                  f"eta {format_eta(self.eta_seconds())}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
