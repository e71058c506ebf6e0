"""A pretraining run: config, data and an output folder in; SparK-pretrained timm weights out.

    from spark_det.train import Pretrainer, load_config

    cfg = load_config("pretrain/resnet18_smoke.yaml", ["epochs=2"])
    result = Pretrainer(cfg, data="path/to/images", output="out/r18").run()
    print(result.encoder)  # out/r18/encoder-resnet18.pth, a plain timm state dict

Everything a user can get wrong is checked while the run is built, before any output is
written. Under torchrun every rank builds the same Pretrainer; only the main rank writes.
Outputs: config.yaml, checkpoint-last.pth (resumable) and the checkpoints before it,
encoder-<model>.pth and .safetensors, export-<model>/ (:mod:`spark_det.transfer.export`),
metrics.jsonl, summary.csv, tensorboard/ and reconstruction-epochNNN.png (:mod:`.run_dir`
describes the folder); W&B and MLflow runs with ``logger=`` (:mod:`.trackers`).

Faults lose nothing: the folder is locked to one run; checkpoints are written atomically and
only when every weight is finite (and are advised for resuming only once a loss computed from
them was finite and under ``max_loss``); a resume falls back to an older checkpoint when the newest
cannot be read, drops temporaries and metric lines a kill left behind, and writes the outputs
a killed run had not written yet (so resuming a finished run completes it).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import timm
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel

from ..data.source import open_source
from ..distributed import all_true, gather_from_every_rank, init_distributed, on_main_rank, require_same_on_every_rank
from ..errors import (
    CheckpointError,
    ConfigError,
    LeakError,
    NonFiniteLossError,
    PreemptedError,
    SparkDetError,
    first_line,
    format_data_warning,
)
from ..io import PathLike, file_sha256, save_atomic, write_atomic
from ..model.leak_probe import find_leak
from ..model.registry import create_spark, model_defaults
from ..sparse.convert import UnsupportedLayerError
from ..transfer.export import ModelCard, save_encoder_safetensors, write_export_folder
from .checkpoint import derive_rng_state, load_init_weights, rng_state, set_rng_state
from .compiled import compile_backend, compile_for_training
from .config import same_trajectory
from .engine import train_one_epoch
from .optim import build_optimizer
from .progress import ProgressLog
from .run_dir import METRICS, Position, RunDirectory, RunLock, load_run_checkpoint
from .schedule import Schedule
from .summary import rewind_summary, write_epoch_summary
from .sync_batchnorm import sync_batchnorms, unsynchronised_copy
from .trackers import Trackers, logger_names, require_trackers
from .visualize import save_reconstruction_grid

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _prepare_data_worker(worker_id: int) -> None:
    # A scheduler signals every process of a job: a data worker that died of it would end the
    # step the trainer wants to finish; the trainer stops its workers itself.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A worker started by spawn or forkserver (macOS; Linux from Python 3.14) does not inherit the
    # command's one-line display of skipped samples; the worker is the trainer's own process.
    warnings.formatwarning = format_data_warning


class _StopRequested(Exception):
    """``stop_after_iters`` was reached (the run stops as if interrupted, after a checkpoint)."""


@dataclass
class PretrainResult:
    """Where a run ended and what it left."""

    output: Path
    encoder: Optional[Path]  # the exported timm weights; None when the run stopped early
    epoch: int  # epochs completed
    iteration: int  # optimizer steps completed in all
    stopped_early: bool
    skipped_images: int  # distinct unreadable files met
    last_loss: Optional[float]


class Pretrainer:
    """One SparK pretraining run, single-process or one rank of a torchrun job.

    Args:
        config: a resolved config (:func:`spark_det.train.load_config`).
        data: a folder of images (searched recursively), a text file listing image paths, or
            WebDataset shards (a pattern such as ``shards/train-{000000..000127}.tar``, or URLs).
        output: the run directory; owned by this run (locked) from construction to the end of :meth:`run`.
        resume: 'auto' (the newest readable checkpoint in ``output``, if any) or a checkpoint path.
        init_weights: start a new run from a spark-det full/encoder checkpoint or the paper's files.
        device: 'auto', 'cpu' or 'cuda'.
        log: where the main rank's messages go (``print`` by default).
        reindex: rebuild the data source's cached index (:mod:`spark_det.data.index`) even if it looks fresh.
        shard_counts: a file of the shards' sample counts (OpenCLIP's sizes.json or a wids index).
    """

    def __init__(self, config: dict[str, Any], data: PathLike, output: PathLike, resume: Optional[str] = None,
                 init_weights: Optional[PathLike] = None, device: str = "auto",
                 log: Callable[[str], None] = print, reindex: bool = False, shard_counts: Optional[str] = None) -> None:
        self.cfg, self.data, self.output = config, data, Path(output)
        self.dist = init_distributed(device, config["dist_timeout_s"])
        self.device = self.dist.device
        self.log = log if self.dist.is_main else (lambda *_: None)
        cfg, world = config, self.dist.world_size
        if cfg["batch_size"] % (world * cfg["accum_steps"]):
            raise ConfigError(f"batch_size {cfg['batch_size']} must divide by ranks x accum_steps = "
                              f"{world} x {cfg['accum_steps']}")
        self.per_rank_batch = cfg["batch_size"] // world
        backend = compile_backend(cfg["compile"])
        self.source = open_source(data, cfg["input_size"], cfg["seed"], self.per_rank_batch, cfg["num_workers"],
                                  self.dist, self.log, reindex, shard_counts)
        self.source.require_readable()
        self.tracker_names = logger_names(cfg["logger"])
        if self.dist.is_main:
            require_trackers(self.tracker_names)
        self.trackers = Trackers([], Path(output), cfg, resume=False)  # opened by run() on the main rank
        require_same_on_every_rank({"config": {k: v for k, v in cfg.items() if k != "num_workers"},
                                    "data": self.source.identity()}, self.dist)
        self.iters_per_epoch = self.source.iters_per_epoch

        torch.manual_seed(cfg["seed"])
        self.spark = self._build_model()
        self.init_note = load_init_weights(self.spark, init_weights) if init_weights else "random initialisation"
        self.spark.to(self.device)
        if cfg["channels_last"]:
            self.spark.to(memory_format=torch.channels_last)
        self.model: torch.nn.Module = self.spark
        if self.dist.distributed:
            sync_batchnorms(self.spark, use_torch_sync=self.device.type == "cuda")
            self.model = DistributedDataParallel(
                self.spark, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if backend is not None:  # the training call only: self.spark stays eager (see .compiled)
            self.model = compile_for_training(self.model, backend)

        self.peak_lr = cfg["lr"] or cfg["base_lr"] * cfg["batch_size"] / 256
        betas = cfg["betas"] or model_defaults(cfg["model"])["betas"]
        self.optimizer = build_optimizer(self.spark, cfg["optimizer"], self.peak_lr, cfg["weight_decay"], betas)
        self.amp_dtype = AMP_DTYPES[cfg["amp"]]
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg["amp"] == "fp16" else None
        self.total_iters = cfg["epochs"] * self.iters_per_epoch
        self.schedule = Schedule(self.total_iters, cfg["warmup_epochs"] * self.iters_per_epoch, self.peak_lr,
                                 cfg["weight_decay"], cfg["weight_decay_end"])
        self.start_epoch, self.start_iter = 0, 0
        self.skipped: set[int] = set()  # indices of the distinct unreadable files met so far
        self._sigterm = False  # set by the SIGTERM handler while training

        # Everything above only read; from here on the folder is this run's.
        self.run_dir = RunDirectory(self.output, cfg["keep_checkpoints"], self.log)
        self._lock = RunLock(self.output)
        try:
            on_main_rank(lambda: self._take_folder(resume), self.dist)
            self._resume(resume)
            on_main_rank(self._tidy_folder, self.dist)
            if init_weights or self.start_epoch or self.start_iter:
                self.audit_leaks("the loaded weights")
        except BaseException:
            self.close()
            raise

    def _build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        if not timm.is_model(cfg["model"]):
            raise ConfigError(f"unknown model {cfg['model']!r}: not a timm model name (see timm.list_models())")
        try:
            spark = create_spark(cfg["model"], mask_ratio=cfg["mask_ratio"], decoder_width=cfg["decoder_width"],
                                 drop_path_rate=cfg["drop_path_rate"])
            spark.encoder.grid_size(tuple(cfg["input_size"]))
        except (UnsupportedLayerError, ValueError, TypeError) as exc:
            raise ConfigError(f"{cfg['model']}: {exc}") from exc
        return spark

    def _take_folder(self, resume: Optional[str]) -> None:
        previous = self._lock.acquire()
        if previous:
            self.log(f"[pretrain] took over the lock of a run that is no longer alive ({previous})")
        if resume is None and self.run_dir.checkpoints():
            raise ConfigError(f"{self.output} already holds a run ({self.run_dir.describe()}); continue it with "
                              "--resume auto, or choose another --output")

    def _choose_checkpoint(self, resume: str) -> Optional[tuple[Path, dict[str, Any]]]:
        if resume == "auto":
            return self.run_dir.load_latest()
        path = Path(resume).expanduser()
        return path, load_run_checkpoint(path)

    def _agree_on_checkpoint(self, resume: str) -> Optional[tuple[Path, dict[str, Any]]]:
        """This rank's checkpoint, once every rank has chosen the same: the same position and the
        same bytes. Each rank reads its own view of the folder (and may fall back on its own), and
        DDP does not compare weights: ranks resumed from different checkpoints would silently train
        different models. Otherwise every rank stops with one line before the first step."""
        found, mine = None, ("none",)
        try:
            found = self._choose_checkpoint(resume)
        except CheckpointError as exc:
            if not self.dist.distributed:
                raise
            mine = ("error", str(exc))
        if found is not None:
            path, ckpt = found
            digest = file_sha256(path) if self.dist.distributed else ""
            mine = ("checkpoint", (int(ckpt["epoch"]), int(ckpt["iter"])), digest, str(path))
        everyone = gather_from_every_rank(mine, self.dist)
        failed = [(rank, theirs[1]) for rank, theirs in enumerate(everyone) if theirs[0] == "error"]
        if failed:
            rank, message = failed[0]
            raise self._said_once(CheckpointError(message if rank == 0 else f"rank {rank}: {message}"))
        choices: dict[tuple, list[int]] = {}
        for rank, theirs in enumerate(everyone):
            choices.setdefault(theirs[:3], []).append(rank)
        if len(choices) > 1:
            listed = "; ".join(_describe_choice(choice, ranks, everyone[ranks[0]]) for choice, ranks in choices.items())
            raise self._said_once(ConfigError(
                f"the ranks would resume from different checkpoints ({listed}): give every node the same --output "
                "on a shared file system, or the same --resume file"))
        return found

    def _resume(self, resume: Optional[str]) -> None:
        if resume is None:
            return
        found = self._agree_on_checkpoint(resume)
        if found is None:
            self.log(f"[pretrain] no checkpoint in {self.output}: starting from scratch")
            return
        path, ckpt = found
        saved_batch = (ckpt.get("config") or {}).get("batch_size", self.cfg["batch_size"])
        if saved_batch != self.cfg["batch_size"]:
            raise ConfigError(f"{path} was trained with batch_size={saved_batch}, this run has "
                              f"{self.cfg['batch_size']}: keep batch_size={saved_batch} (any process count and "
                              "accum_steps that divide it)")
        try:
            self.spark.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"{path} holds another model than {self.cfg['model']}: "
                                  f"{first_line(exc)}") from exc
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: its optimizer state does not fit optimizer={self.cfg['optimizer']} "
                                  f"({exc})") from exc
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch, self.start_iter = ckpt["epoch"], ckpt["iter"]
        self.skipped = set(ckpt.get("skipped_files", []))
        self._restore_rng(ckpt["rng"], (self.start_epoch, self.start_iter))
        note = self.source.restore(ckpt.get("data"), self.start_epoch, self.start_iter)
        if note:
            self.log(f"[pretrain] {note}")
        if self.start_iter >= self.iters_per_epoch:
            self.start_epoch, self.start_iter = self.start_epoch + 1, 0
        if resume != "auto":
            on_main_rank(lambda: self._set_aside_later_checkpoints(path, (ckpt["epoch"], ckpt["iter"])), self.dist)
        self.init_note = f"resumed from {path} at epoch {self.start_epoch} iteration {self.start_iter}"

    def _restore_rng(self, saved: Any, position: Position) -> None:
        """Each rank's RNG state as saved when the process count is the same; otherwise derived
        from (seed, position, rank). Data order, crops and masks never depend on it (they are
        keyed by (seed, epoch, index)); only drop path draws do."""
        saved = saved if isinstance(saved, list) else [saved]
        if len(saved) == self.dist.world_size:
            set_rng_state(saved[self.dist.rank])
            return
        set_rng_state(derive_rng_state(self.cfg["seed"], position, self.dist.rank))
        self.log(f"[pretrain] the checkpoint was written by {len(saved)} process(es), this run has "
                 f"{self.dist.world_size}: same data order and masks; per-rank RNG states (drop path) re-derived")

    def _set_aside_later_checkpoints(self, resumed: Path, position: Position) -> None:
        """Resuming from an earlier checkpoint abandons the folder's later ones; they are moved
        into a subfolder, not deleted, and never mistaken for this run's newest."""
        later = self.run_dir.later_than(position, keep=resumed)
        if later:
            moved = self.run_dir.set_aside(later)
            self.log(f"[pretrain] resuming from an earlier point: moved {len(later)} later checkpoint(s) to {moved}")

    def _tidy_folder(self) -> None:
        position = (self.start_epoch, self.start_iter)
        self.run_dir.refuse_repeating_divergence(self.cfg, position, same_trajectory)
        self.run_dir.clean_temporaries()
        self.run_dir.rewind_metrics(position)
        rewind_summary(self.output, position[0])

    def close(self) -> None:
        """Release the run folder (done by :meth:`run` when it ends)."""
        if self.dist.is_main:
            try:
                self.trackers.close()
            finally:
                self._lock.release()

    # ------------------------------------------------------------------------------------------
    # Outputs

    def save_checkpoint(self, epoch: int, next_iter: int) -> None:
        """Everything a resumed run needs, written atomically by the main rank, and only if every
        weight, statistic and optimizer moment is finite (otherwise training has diverged)."""
        mine = (rng_state(), sorted(self.skipped), self.source.state())
        gathered: list = [None] * self.dist.world_size
        if self.dist.distributed:
            torch.distributed.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        self.skipped = set().union(*(set(files) for _, files, _ in gathered))
        if not all_true(self._state_is_finite()):
            raise NonFiniteLossError(f"weights or BatchNorm statistics are not finite at epoch {epoch} iteration "
                                     f"{next_iter} (no checkpoint written)", position=(epoch, next_iter))

        def write() -> None:  # the state is gathered on the main rank only, which alone writes it
            self.run_dir.save({
                "model": self.spark.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None, "epoch": epoch, "iter": next_iter,
                "rng": [rng for rng, _, _ in gathered], "skipped_files": sorted(self.skipped), "config": self.cfg,
                "data": [data for _, _, data in gathered],
                "arch": self.cfg["model"], "input_size": list(self.cfg["input_size"]),
            }, (epoch, next_iter))

        on_main_rank(write, self.dist)

    def audit_leaks(self, what: str) -> Optional[float]:
        """The leak probe (:func:`~spark_det.model.leak_probe.find_leak`) on a float64 copy of the
        live encoder with its weights as they are: trained weights can open a leak the construction
        probe could not see, and a swapped-in module can too. Every rank checks its own copy (the
        weights are the same under DDP); a finding on any rank stops all of them with
        :class:`~spark_det.errors.LeakError` naming the layer. Returns the seconds it took, or None
        when ``leak_audit`` is off."""
        if not self.cfg["leak_audit"]:
            return None
        start = time.perf_counter()
        finding = find_leak(unsynchronised_copy(self.spark.encoder), randomise=False, copy_first=False)
        if not all_true(finding is None):
            raise self._said_once(LeakError(f"leak audit of {what} failed: "
                                            f"{finding or 'on another rank'}; no checkpoint of these weights is kept"))
        seconds = time.perf_counter() - start
        self.log(f"[pretrain] leak audit of {what}: passed ({seconds:.1f} s)")
        return seconds

    def _state_is_finite(self) -> bool:
        tensors = [t for t in self.spark.state_dict().values() if t.is_floating_point()]
        tensors += [t for moments in self.optimizer.state.values() for t in moments.values()
                    if torch.is_tensor(t) and t.is_floating_point()]
        return all(bool(torch.isfinite(t).all()) for t in tensors)

    def encoder_path(self, epochs_done: Optional[int] = None) -> Path:
        """``encoder-<model>.pth`` (the final export) or ``encoder-<model>-epochNNN.pth``."""
        tag = f"-epoch{epochs_done:03d}" if epochs_done is not None else ""
        return self.output / f"encoder-{self.cfg['model']}{tag}.pth"

    def export_encoder(self, path: Optional[Path] = None) -> Path:
        """The encoder as a plain timm state dict (``timm.create_model(model, num_classes=0)`` loads it),
        as ``.pth`` and, beside it, ``.safetensors`` (written first: the ``.pth`` marks both complete)."""
        path = path or self.encoder_path()
        state = self.spark.encoder.dense_state_dict()
        save_encoder_safetensors(state, self.cfg["model"], path.with_suffix(".safetensors"))
        return save_atomic(state, path)

    def export_folder(self, card_path: Path) -> Path:
        """``export-<model>/``: weights, timm ``config.json`` and model card (:mod:`spark_det.transfer.export`)."""
        last = None
        with contextlib.suppress(OSError):
            for line in (self.output / METRICS).read_text().splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    last = float(json.loads(line)["loss"])
        card = ModelCard(data=f"{self.data} ({self.source.describe()})", recipe=self.cfg, epochs=self.cfg["epochs"],
                         final_loss=last)
        return write_export_folder(self.spark.encoder.dense_state_dict(), self.cfg["model"], card_path.parent, card,
                                   tuple(self.cfg["input_size"]))

    def _write_epoch_outputs(self, epochs_done: int, preview: Optional[torch.Tensor],
                             only_missing: bool = False) -> list[Path]:
        """The exports and reconstruction grid due after ``epochs_done`` epochs; with
        ``only_missing`` just those a killed run had not written (the files are atomic: one that
        exists is complete)."""
        cfg, final = self.cfg, epochs_done == self.cfg["epochs"]
        write_epoch_summary(self.output, self.output / METRICS, epochs_done - 1)  # idempotent: rewrites its row
        due: list[tuple[Path, Callable[[Path], Any]]] = []
        if final or epochs_done % cfg["export_every_epochs"] == 0:
            due.append((self.encoder_path(None if final else epochs_done), self.export_encoder))
        if final:
            due.append((self.output / f"export-{cfg['model']}" / "README.md", self.export_folder))
        if preview is not None and (final or epochs_done % cfg["vis_every_epochs"] == 0):
            due.append((self.output / f"reconstruction-epoch{epochs_done:03d}.png",
                        lambda path: save_reconstruction_grid(self.spark, preview.to(self.device), path)))
        written = []
        for path, write in due:
            if not (only_missing and path.exists()):
                written.append(write(path))
                if path.suffix == ".png":
                    self.trackers.log_image("reconstruction", path, epochs_done * self.iters_per_epoch - 1)
        return written

    def _write_config(self) -> None:
        text = yaml.safe_dump({**self.cfg, "data": str(self.data), "world_size": self.dist.world_size})
        write_atomic(self.output / "config.yaml", lambda f: f.write(text.encode()))

    def _divergence_message(self, exc: NonFiniteLossError) -> str:
        """The way out, which works when followed literally: resume from the newest checkpoint
        confirmed good (:meth:`RunDirectory.confirmed`), or start again when there is none."""
        lower = f"lr={self.peak_lr / 10:.3g} warmup_epochs={max(1, self.cfg['warmup_epochs'] * 2)}"
        kept = self.run_dir.checkpoints()
        confirmed = self.run_dir.confirmed(self.cfg["max_loss"], self.iters_per_epoch)
        if confirmed:
            (epoch, i), path = confirmed[0]
            advice = (f"kept checkpoints: {self.run_dir.describe()}; resume from the newest confirmed good (epoch "
                      f"{epoch} iteration {i}) with a smaller lr or a longer warm-up, e.g. --resume {path} {lower}")
        elif kept:
            advice = (f"no kept checkpoint is confirmed good (a loss computed from its weights was never finite and "
                      f"under max_loss: {self.run_dir.describe()}): start a new run in another folder with a smaller "
                      f"lr or a longer warm-up, e.g. --output {self._restart_folder()} {lower}")
        else:
            advice = f"no checkpoint was written yet: start again with a smaller lr or a longer warm-up, e.g. {lower}"
        return f"training diverged: {exc}; {advice}"

    def _restart_folder(self) -> Path:
        """A folder beside this one that holds nothing yet: ``<name>-restart``, ``<name>-restart2``, ..."""
        stem = re.sub(r"-restart\d*$", "", self.output.name)
        candidates = (self.output.with_name(f"{stem}-restart{n if n > 1 else ''}") for n in itertools.count(1))
        return next(path for path in candidates if not path.exists())

    # ------------------------------------------------------------------------------------------
    # The run

    def run(self) -> PretrainResult:
        """Train to the end of the schedule (or to ``stop_after_iters``) and write every output;
        raises :class:`~spark_det.errors.NonFiniteLossError` if training diverges."""
        try:
            return self._run()
        except NonFiniteLossError as exc:
            message, position = self._divergence_message(exc), exc.position
            on_main_rank(lambda: self.run_dir.record_divergence(self.cfg, position, message), self.dist)
            raise self._said_once(NonFiniteLossError(message, position)) from None
        except SparkDetError as exc:  # raised on every rank together (preemption, a full disk, ...)
            self._said_once(exc)
            raise
        finally:
            self.close()

    def _said_once(self, error: SparkDetError) -> SparkDetError:
        """Every rank stops with the same error; only the main rank prints it."""
        if not self.dist.is_main:
            error.reported_by_main = True
        return error

    @contextlib.contextmanager
    def _stop_on_sigterm(self) -> Iterator[None]:
        """While training, SIGTERM (a scheduler's preemption notice) lets the current step finish,
        writes a checkpoint and stops; outside the main thread signals cannot be caught, so none is."""
        self._sigterm = False

        def note(signum: int, frame: Any) -> None:
            self._sigterm = True

        try:
            previous = signal.signal(signal.SIGTERM, note)
        except ValueError:  # not the main thread
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _run(self) -> PretrainResult:
        cfg, is_main = self.cfg, self.dist.is_main
        on_main_rank(self._write_config, self.dist)
        if is_main:  # closed by close()
            self.trackers = Trackers(self.tracker_names, self.output,
                                     {**cfg, "data": str(self.data), "world_size": self.dist.world_size},
                                     resume=bool(self.start_epoch or self.start_iter))
        self.log(f"[pretrain] {cfg['model']} on {self.source.describe()}, {self.dist.world_size} process(es) on "
                 f"{self.device}, global batch {cfg['batch_size']} ({self.per_rank_batch}/rank, {cfg['accum_steps']} "
                 f"accumulation step(s)), {self.iters_per_epoch} it/epoch x {cfg['epochs']} epochs, peak lr "
                 f"{self.peak_lr:.3g}; {self.init_note}")
        preview = self.source.preview(cfg["vis_images"])
        if self.start_epoch > 0 and self.start_iter == 0:  # resumed at an epoch end: finish what a kill cut short
            written = on_main_rank(lambda: self._write_epoch_outputs(self.start_epoch, preview, only_missing=True),
                                   self.dist)
            if written:
                # missing after a kill, or due only now (a finished run resumed with more epochs)
                self.log(f"[pretrain] wrote the outputs due after epoch {self.start_epoch} that were missing from "
                         f"the folder: {', '.join(p.name for p in written)}")
        start = self.start_epoch * self.iters_per_epoch + self.start_iter
        if start >= self.total_iters:
            self.log(f"[pretrain] training was already complete ({cfg['epochs']} epochs)")
        writer, metrics_file = None, None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run logged after its checkpoint (as rewind_metrics does)
            writer = SummaryWriter(str(self.output / "tensorboard"), purge_step=start or None)
            metrics_file = open(self.output / METRICS, "a")
        progress = ProgressLog(self.total_iters, start, cfg["log_every"], self.iters_per_epoch, enabled=is_main)
        state = {"loss": None, "done": progress.done, "epoch": self.start_epoch}

        def on_iteration(it: int, metrics: dict) -> None:
            epoch, i = metrics["epoch"], metrics["iter"]
            batch_skipped = metrics.pop("skipped_files")
            self.skipped.update(batch_skipped)
            metrics["skipped_images"], metrics["skipped_total"] = len(batch_skipped), len(self.skipped)
            state["loss"], state["done"] = metrics["loss"], it + 1
            progress.update(metrics)
            done = it + 1
            checkpoint_due = (i + 1 == self.iters_per_epoch or metrics["stop_requested"]
                              or (cfg["save_every_iters"] and done % cfg["save_every_iters"] == 0)
                              or (cfg["stop_after_iters"] and done >= cfg["stop_after_iters"]))
            if checkpoint_due:  # these weights are about to be kept: audit them first
                seconds = self.audit_leaks(f"the weights after iteration {done}")
                if seconds is not None:
                    metrics["leak_audit_s"] = round(seconds, 3)  # present: the audit passed on this step's weights
            if is_main:
                metrics_file.write(json.dumps(metrics) + "\n")
                metrics_file.flush()
                scalars = {f"train/{key}": metrics[key] for key in ("loss", "lr", "wd", "grad_norm", "images_per_s")}
                for key, value in scalars.items():
                    writer.add_scalar(key, value, it)
                self.trackers.log_scalars(scalars, it)
            if cfg["save_every_iters"] and done % cfg["save_every_iters"] == 0 and i + 1 < self.iters_per_epoch:
                self.save_checkpoint(epoch, i + 1)
            if metrics.pop("stop_requested"):
                self.save_checkpoint(epoch, i + 1)
                raise PreemptedError(f"SIGTERM: stopped after epoch {epoch} iteration {i} with a checkpoint "
                                     f"in {self.output}; continue with --resume auto")
            if cfg["stop_after_iters"] and done >= cfg["stop_after_iters"]:
                self.save_checkpoint(epoch, i + 1)
                raise _StopRequested

        stopped = False
        try:
            with self._stop_on_sigterm():
                for epoch in range(self.start_epoch, cfg["epochs"]):
                    first = self.start_iter if epoch == self.start_epoch else 0
                    loader = self.source.loader(epoch, first, pin_memory=self.device.type == "cuda",
                                                worker_init_fn=_prepare_data_worker)
                    train_one_epoch(self.model, self.spark, loader, self.optimizer, self.schedule, epoch,
                                    self.iters_per_epoch, first, self.device, cfg["seed"], cfg["accum_steps"],
                                    cfg["clip_grad"], self.amp_dtype, self.scaler, cfg["channels_last"], on_iteration,
                                    max_loss=cfg["max_loss"], stop_requested=lambda: self._sigterm)
                    self.save_checkpoint(epoch + 1, 0)
                    state["epoch"] = epoch + 1
                    on_main_rank(lambda done=epoch + 1: self._write_epoch_outputs(done, preview), self.dist)
        except _StopRequested:
            stopped = True
            self.log(f"[pretrain] stopped after {cfg['stop_after_iters']} iterations (stop_after_iters); "
                     "resume with --resume auto")
        finally:
            progress.close()
            if metrics_file:
                metrics_file.close()
            if writer:
                writer.close()
        encoder = None
        if not stopped:
            encoder = self.encoder_path()
            on_main_rank(self.run_dir.clear_divergence, self.dist)
        self.log(f"[pretrain] done; {len(self.skipped)} unreadable image file(s) skipped; outputs in {self.output}")
        return PretrainResult(self.output, encoder, state["epoch"], state["done"], stopped, len(self.skipped),
                              state["loss"])


def _describe_choice(choice: tuple, ranks: list[int], first: tuple) -> str:
    """'ranks 0,1 from PATH (epoch E iteration I, sha256 ...)' for the checkpoint-agreement error."""
    who = ("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, ranks[:8])) + ("..." if len(ranks) > 8 else "")
    if choice[0] == "none":
        return f"{who} from scratch (no checkpoint)"
    (epoch, i), digest = choice[1], choice[2]
    return f"{who} from {first[3]} (epoch {epoch} iteration {i}, sha256 {digest[:12]})"


def pretrain(config: dict[str, Any], data: PathLike, output: PathLike, **kwargs: Any) -> PretrainResult:
    """``Pretrainer(config, data, output, **kwargs).run()``."""
    return Pretrainer(config, data, output, **kwargs).run()
