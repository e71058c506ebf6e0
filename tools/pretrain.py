"""SparK pretraining: a folder of unlabeled images in, SparK-pretrained timm weights out.

    # one CPU smoke run
    python tools/pretrain.py --recipe pretrain/resnet18_smoke.yaml --data path/to/images --output out/r18
    # 8 GPUs, the paper's recipe, any key overridable
    torchrun --nproc_per_node 8 tools/pretrain.py --recipe pretrain/resnet50.yaml \
        --data /data/imagenet/train --output out/r50 amp=bf16 batch_size=2048
    # continue an interrupted run (or: --resume path/to/checkpoint-last.pth)
    python tools/pretrain.py ... --output out/r50 --resume auto

Outputs in --output: config.yaml (resolved), checkpoint-last.pth (full, resumable),
encoder-<model>.pth (timm state dict, loads into timm.create_model(model, num_classes=0)),
metrics.jsonl, tensorboard/, reconstruction-epochNNN.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from spark_det.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_file,
    rng_state,
    save_atomic,
    set_rng_state,
)
from spark_det.config import ConfigError, load_recipe, parse_overrides, resolve
from spark_det.convert import key_mismatch, timm_encoder_state
from spark_det.data import EpochSampler, NoImagesError, UnlabeledImages, collate
from spark_det.distributed import barrier, cleanup, init_distributed, sync_batchnorms
from spark_det.engine import NonFiniteLossError, Schedule, train_one_epoch
from spark_det.models import SUPPORTED_MODELS, create_spark
from spark_det.optim import build_optimizer
from spark_det.visualize import save_reconstruction_grid


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="pretrain/<model>.yaml")
    p.add_argument("--data", required=True, help="folder of images (searched recursively) or a text file of paths")
    p.add_argument("--output", required=True, help="run directory")
    p.add_argument("--resume", default=None, help="'auto' (checkpoint-last.pth in --output) or a checkpoint path")
    p.add_argument("--init-weights", default=None,
                   help="start a new run from weights: a spark-det full/encoder checkpoint or the paper's files")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("overrides", nargs="*", help="recipe overrides key=value, e.g. epochs=10 input_size=[160,256]")
    return p.parse_args(argv)


def load_init_weights(spark, path: str) -> str:
    """Load encoder (and, from a full SparK checkpoint, decoder) weights; returns a summary."""
    obj = load_file(path)
    full = obj.get("model") if isinstance(obj.get("model"), dict) else obj.get("module")
    if isinstance(full, dict) and any(k.startswith("decoder.") for k in full):
        missing, unexpected = spark.load_state_dict(full, strict=False)
        if unexpected or any(k.startswith("encoder.") for k in missing):
            raise CheckpointError(f"{path}: full checkpoint does not match this model "
                                  f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        return f"full SparK model from {path}"
    state = timm_encoder_state(obj)  # unwrapped, timm names (paper's ConvNeXt renamed), no classifier
    target = spark.encoder.model.state_dict()
    missing, unexpected, bad = key_mismatch(state, target)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match encoder {spark.encoder.model_name}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    if bad:
        raise CheckpointError(f"{path}: shape mismatch for {bad[:3]}; is it the same architecture?")
    spark.encoder.model.load_state_dict({k: state[k] for k in target}, strict=True)
    return f"encoder weights ({len(target)} tensors) from {path}"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.output)
    try:
        cfg = resolve(load_recipe(args.recipe), parse_overrides(args.overrides))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dist_info = init_distributed(args.device)
    device = dist_info.device
    log = print if dist_info.is_main else (lambda *a, **k: None)

    world, accum = dist_info.world_size, cfg["accum_steps"]
    if cfg["batch_size"] % (world * accum):
        print(f"error: batch_size {cfg['batch_size']} must divide by ranks x accum_steps = {world * accum}",
              file=sys.stderr)
        return 2
    per_rank_batch = cfg["batch_size"] // world
    try:
        dataset = UnlabeledImages(args.data, cfg["input_size"], seed=cfg["seed"])
        sampler = EpochSampler(len(dataset), per_rank_batch, dist_info.rank, world, seed=cfg["seed"])
    except NoImagesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    iters_per_epoch = sampler.batches_per_epoch

    torch.manual_seed(cfg["seed"])
    model_defaults = SUPPORTED_MODELS.get(cfg["model"], {})
    betas = cfg["betas"] or model_defaults.get("betas") or (0.9, 0.999)
    spark = create_spark(cfg["model"], mask_ratio=cfg["mask_ratio"], decoder_width=cfg["decoder_width"],
                         drop_path_rate=cfg["drop_path_rate"])
    init_note = load_init_weights(spark, args.init_weights) if args.init_weights else "random initialisation"
    spark.to(device)
    if cfg["channels_last"]:
        spark.to(memory_format=torch.channels_last)
    model = spark
    if dist_info.distributed:
        sync_batchnorms(spark, use_torch_sync=device.type == "cuda")
        model = DistributedDataParallel(spark, device_ids=[device.index] if device.type == "cuda" else None)

    peak_lr = cfg["lr"] or cfg["base_lr"] * cfg["batch_size"] / 256
    optimizer = build_optimizer(spark, cfg["optimizer"], peak_lr, cfg["weight_decay"], betas)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["amp"]]
    scaler = torch.amp.GradScaler(device.type) if cfg["amp"] == "fp16" else None
    total_iters = cfg["epochs"] * iters_per_epoch
    schedule = Schedule(total_iters, cfg["warmup_epochs"] * iters_per_epoch, peak_lr,
                        cfg["weight_decay"], cfg["weight_decay_end"])

    start_epoch, start_iter = 0, 0
    resume = latest_checkpoint(out) if args.resume == "auto" else (Path(args.resume) if args.resume else None)
    if args.resume == "auto" and resume is None:
        log(f"[pretrain] no checkpoint in {out}: starting from scratch")
    if resume is not None:
        ckpt = load_file(resume)
        spark.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_iter = ckpt["epoch"], ckpt["iter"]
        set_rng_state(ckpt["rng"][dist_info.rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
        if start_iter >= iters_per_epoch:
            start_epoch, start_iter = start_epoch + 1, 0
        init_note = f"resumed from {resume} at epoch {start_epoch} iteration {start_iter}"

    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump({**cfg, "data": str(args.data), "world_size": world}))
    log(f"[pretrain] {cfg['model']} on {len(dataset)} images, {world} process(es) on {device}, "
        f"global batch {cfg['batch_size']} ({per_rank_batch}/rank, {accum} accumulation step(s)), "
        f"{iters_per_epoch} it/epoch x {cfg['epochs']} epochs, peak lr {peak_lr:.3g}; {init_note}")

    writer = None
    if dist_info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
    metrics_file = open(out / "metrics.jsonl", "a") if dist_info.is_main else None
    vis_images = torch.stack([dataset[(0, i)]["image"] for i in range(min(cfg["vis_images"], len(dataset)))])
    state = {"epoch": start_epoch, "iter": start_iter, "skipped": 0}

    def save_checkpoint(epoch: int, next_iter: int) -> None:
        rngs = [None] * world
        if dist_info.distributed:
            torch.distributed.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if dist_info.is_main:
            save_atomic({
                "model": spark.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler else None, "epoch": epoch, "iter": next_iter,
                "rng": rngs, "config": cfg, "arch": cfg["model"], "input_size": list(cfg["input_size"]),
            }, out / "checkpoint-last.pth")

    def export_encoder(tag: str = "") -> Path:
        path = out / f"encoder-{cfg['model']}{tag}.pth"
        save_atomic(spark.encoder.dense_state_dict(), path)
        return path

    progress = tqdm(total=total_iters, initial=start_epoch * iters_per_epoch + start_iter,
                    disable=not dist_info.is_main, desc="pretrain", dynamic_ncols=True)

    def on_iteration(it: int, metrics: dict) -> None:
        epoch, i = metrics["epoch"], metrics["iter"]
        state["skipped"] += metrics["skipped_images"]
        metrics["skipped_total"] = state["skipped"]
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
        if dist_info.is_main:
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()
            for key in ("loss", "lr", "wd", "grad_norm", "images_per_s"):
                writer.add_scalar(f"train/{key}", metrics[key], it)
        done = it + 1
        if cfg["save_every_iters"] and done % cfg["save_every_iters"] == 0 and i + 1 < iters_per_epoch:
            save_checkpoint(epoch, i + 1)
        if cfg["stop_after_iters"] and done >= cfg["stop_after_iters"]:
            save_checkpoint(epoch, i + 1)
            raise StopIteration

    exit_code = 0
    try:
        for epoch in range(start_epoch, cfg["epochs"]):
            first = start_iter if epoch == start_epoch else 0
            sampler.set_epoch(epoch, first)
            loader = DataLoader(dataset, batch_size=per_rank_batch, sampler=sampler, collate_fn=collate,
                                num_workers=cfg["num_workers"], pin_memory=device.type == "cuda", drop_last=True)
            train_one_epoch(model, spark, loader, optimizer, schedule, epoch, iters_per_epoch, first, device,
                            cfg["seed"], accum, cfg["clip_grad"], amp_dtype, scaler, cfg["channels_last"],
                            on_iteration)
            save_checkpoint(epoch + 1, 0)
            last = epoch + 1 == cfg["epochs"]
            if dist_info.is_main and (last or (epoch + 1) % cfg["export_every_epochs"] == 0):
                export_encoder("" if last else f"-epoch{epoch + 1:03d}")
            if dist_info.is_main and (last or (epoch + 1) % cfg["vis_every_epochs"] == 0):
                save_reconstruction_grid(spark, vis_images.to(device), out / f"reconstruction-epoch{epoch + 1:03d}.png")
            barrier()
    except StopIteration:
        log(f"\n[pretrain] stopped after {cfg['stop_after_iters']} iterations (stop_after_iters); "
            f"resume with --resume auto")
    except NonFiniteLossError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        exit_code = 3
    finally:
        progress.close()
        if metrics_file:
            metrics_file.close()
        if writer:
            writer.close()
    if exit_code == 0 and dist_info.is_main:
        log(f"[pretrain] done; {state['skipped']} unreadable image(s) skipped; outputs in {out}")
    cleanup()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
