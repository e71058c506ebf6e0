"""A pretraining run: config, data and an output folder in; SparK-pretrained timm weights out.

    from spark_det.train import Pretrainer, load_config

    cfg = load_config("pretrain/resnet18_smoke.yaml", ["epochs=2"])
    result = Pretrainer(cfg, data="path/to/images", output="out/r18").run()
    print(result.encoder)  # out/r18/encoder-resnet18.pth, a plain timm state dict

Everything a user can get wrong is checked while the run is built, before any output is
written. Under torchrun every rank builds the same Pretrainer; only the main rank writes.
Outputs: config.yaml, checkpoint-last.pth (resumable), encoder-<model>.pth, metrics.jsonl,
tensorboard/ and reconstruction-epochNNN.png.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import timm
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..errors import CheckpointError, ConfigError
from ..io import PathLike, load_file, save_atomic, write_atomic
from ..model.registry import create_spark, model_defaults
from ..sparse.convert import UnsupportedLayerError
from .checkpoint import LAST_CHECKPOINT, latest_checkpoint, load_init_weights, rng_state, set_rng_state
from .data import UnlabeledImages, collate
from .distributed import barrier, init_distributed, sync_batchnorms
from .engine import train_one_epoch
from .optim import build_optimizer
from .progress import ProgressLog
from .sampler import EpochSampler
from .schedule import Schedule
from .visualize import save_reconstruction_grid

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    skipped_images: int
    last_loss: Optional[float]


class Pretrainer:
    """One SparK pretraining run, single-process or one rank of a torchrun job.

    Args:
        config: a resolved config (:func:`spark_det.train.load_config`).
        data: a folder of images (searched recursively) or a text file listing image paths.
        output: the run directory.
        resume: 'auto' (``checkpoint-last.pth`` in ``output``, if any) or a checkpoint path.
        init_weights: start a new run from a spark-det full/encoder checkpoint or the paper's files.
        device: 'auto', 'cpu' or 'cuda'.
        log: where the main rank's messages go (``print`` by default).
    """

    def __init__(self, config: dict[str, Any], data: PathLike, output: PathLike, resume: Optional[str] = None,
                 init_weights: Optional[PathLike] = None, device: str = "auto",
                 log: Callable[[str], None] = print) -> None:
        self.cfg, self.data, self.output = config, data, Path(output)
        self.dist = init_distributed(device)
        self.device = self.dist.device
        self.log = log if self.dist.is_main else (lambda *_: None)
        cfg, world = config, self.dist.world_size
        if cfg["batch_size"] % (world * cfg["accum_steps"]):
            raise ConfigError(f"batch_size {cfg['batch_size']} must divide by ranks x accum_steps = "
                              f"{world} x {cfg['accum_steps']}")
        self.per_rank_batch = cfg["batch_size"] // world
        self.dataset = UnlabeledImages(data, cfg["input_size"], seed=cfg["seed"])
        self.sampler = EpochSampler(len(self.dataset), self.per_rank_batch, self.dist.rank, world, seed=cfg["seed"])
        self.iters_per_epoch = self.sampler.batches_per_epoch

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

        self.peak_lr = cfg["lr"] or cfg["base_lr"] * cfg["batch_size"] / 256
        betas = cfg["betas"] or model_defaults(cfg["model"])["betas"]
        self.optimizer = build_optimizer(self.spark, cfg["optimizer"], self.peak_lr, cfg["weight_decay"], betas)
        self.amp_dtype = AMP_DTYPES[cfg["amp"]]
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg["amp"] == "fp16" else None
        self.total_iters = cfg["epochs"] * self.iters_per_epoch
        self.schedule = Schedule(self.total_iters, cfg["warmup_epochs"] * self.iters_per_epoch, self.peak_lr,
                                 cfg["weight_decay"], cfg["weight_decay_end"])
        self.start_epoch, self.start_iter = 0, 0
        self._resume(resume)

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

    def _resume(self, resume: Optional[str]) -> None:
        if resume is None:
            return
        path = latest_checkpoint(self.output) if resume == "auto" else Path(resume)
        if path is None:
            self.log(f"[pretrain] no checkpoint in {self.output}: starting from scratch")
            return
        ckpt = load_file(path)
        missing = [k for k in ("model", "optimizer", "epoch", "iter", "rng") if k not in ckpt]
        if missing:
            raise CheckpointError(f"{path} is not a spark-det run checkpoint (no {missing}); "
                                  "use --init-weights to start a new run from weights")
        try:
            self.spark.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"{path} holds another model than {self.cfg['model']}: "
                                  f"{str(exc).splitlines()[0]}") from exc
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch, self.start_iter = ckpt["epoch"], ckpt["iter"]
        rng = ckpt["rng"]
        set_rng_state(rng[self.dist.rank] if isinstance(rng, list) else rng)
        if self.start_iter >= self.iters_per_epoch:
            self.start_epoch, self.start_iter = self.start_epoch + 1, 0
        self.init_note = f"resumed from {path} at epoch {self.start_epoch} iteration {self.start_iter}"

    # ------------------------------------------------------------------------------------------
    # Outputs

    def save_checkpoint(self, epoch: int, next_iter: int) -> None:
        """Everything a resumed run needs, written atomically by the main rank."""
        rngs: list = [None] * self.dist.world_size
        if self.dist.distributed:
            torch.distributed.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if self.dist.is_main:
            save_atomic({
                "model": self.spark.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None, "epoch": epoch, "iter": next_iter,
                "rng": rngs, "config": self.cfg, "arch": self.cfg["model"], "input_size": list(self.cfg["input_size"]),
            }, self.output / LAST_CHECKPOINT)

    def export_encoder(self, tag: str = "") -> Path:
        """The encoder as a plain timm state dict: ``encoder-<model><tag>.pth``."""
        return save_atomic(self.spark.encoder.dense_state_dict(), self.output / f"encoder-{self.cfg['model']}{tag}.pth")

    def _write_config(self) -> None:
        text = yaml.safe_dump({**self.cfg, "data": str(self.data), "world_size": self.dist.world_size})
        write_atomic(self.output / "config.yaml", lambda f: f.write(text.encode()))

    # ------------------------------------------------------------------------------------------
    # The run

    def run(self) -> PretrainResult:
        """Train to the end of the schedule (or to ``stop_after_iters``); raises
        :class:`~spark_det.errors.NonFiniteLossError` if the loss diverges."""
        cfg, is_main = self.cfg, self.dist.is_main
        if is_main:
            self._write_config()
        self.log(f"[pretrain] {cfg['model']} on {len(self.dataset)} images, {self.dist.world_size} process(es) on "
                 f"{self.device}, global batch {cfg['batch_size']} ({self.per_rank_batch}/rank, {cfg['accum_steps']} "
                 f"accumulation step(s)), {self.iters_per_epoch} it/epoch x {cfg['epochs']} epochs, peak lr "
                 f"{self.peak_lr:.3g}; {self.init_note}")
        writer, metrics_file = None, None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.output / "tensorboard"))
            metrics_file = open(self.output / "metrics.jsonl", "a")
        vis_count = min(cfg["vis_images"], len(self.dataset))
        vis_images = torch.stack([self.dataset[(0, i)]["image"] for i in range(vis_count)]) if vis_count else None
        progress = ProgressLog(self.total_iters, self.start_epoch * self.iters_per_epoch + self.start_iter,
                               cfg["log_every"], self.iters_per_epoch, enabled=is_main)
        state = {"skipped": 0, "loss": None, "done": progress.done, "epoch": self.start_epoch}

        def on_iteration(it: int, metrics: dict) -> None:
            epoch, i = metrics["epoch"], metrics["iter"]
            state["skipped"] += metrics["skipped_images"]
            state["loss"], state["done"] = metrics["loss"], it + 1
            metrics["skipped_total"] = state["skipped"]
            progress.update(metrics)
            if is_main:
                metrics_file.write(json.dumps(metrics) + "\n")
                metrics_file.flush()
                for key in ("loss", "lr", "wd", "grad_norm", "images_per_s"):
                    writer.add_scalar(f"train/{key}", metrics[key], it)
            done = it + 1
            if cfg["save_every_iters"] and done % cfg["save_every_iters"] == 0 and i + 1 < self.iters_per_epoch:
                self.save_checkpoint(epoch, i + 1)
            if cfg["stop_after_iters"] and done >= cfg["stop_after_iters"]:
                self.save_checkpoint(epoch, i + 1)
                raise _StopRequested

        encoder, stopped = None, False
        try:
            for epoch in range(self.start_epoch, cfg["epochs"]):
                first = self.start_iter if epoch == self.start_epoch else 0
                self.sampler.set_epoch(epoch, first)
                loader = DataLoader(self.dataset, batch_size=self.per_rank_batch, sampler=self.sampler,
                                    collate_fn=collate, num_workers=cfg["num_workers"],
                                    pin_memory=self.device.type == "cuda", drop_last=True)
                train_one_epoch(self.model, self.spark, loader, self.optimizer, self.schedule, epoch,
                                self.iters_per_epoch, first, self.device, cfg["seed"], cfg["accum_steps"],
                                cfg["clip_grad"], self.amp_dtype, self.scaler, cfg["channels_last"], on_iteration)
                self.save_checkpoint(epoch + 1, 0)
                state["epoch"] = epoch + 1
                last = epoch + 1 == cfg["epochs"]
                if is_main and (last or (epoch + 1) % cfg["export_every_epochs"] == 0):
                    path = self.export_encoder("" if last else f"-epoch{epoch + 1:03d}")
                    encoder = path if last else encoder
                if is_main and vis_images is not None and (last or (epoch + 1) % cfg["vis_every_epochs"] == 0):
                    save_reconstruction_grid(self.spark, vis_images.to(self.device),
                                             self.output / f"reconstruction-epoch{epoch + 1:03d}.png")
                barrier()
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
        self.log(f"[pretrain] done; {state['skipped']} unreadable image(s) skipped; outputs in {self.output}")
        return PretrainResult(self.output, encoder, state["epoch"], state["done"], stopped, state["skipped"],
                              state["loss"])


def pretrain(config: dict[str, Any], data: PathLike, output: PathLike, **kwargs: Any) -> PretrainResult:
    """``Pretrainer(config, data, output, **kwargs).run()``."""
    return Pretrainer(config, data, output, **kwargs).run()
