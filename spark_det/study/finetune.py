"""The fine-tune commands of a study: one Mask R-CNN (or Faster R-CNN) recipe per framework and protocol,
the same command for every initialisation but for the weights (same budget, seed, and so the same images
in the same order: tests/test_demo.py checks the batches).

The configs are ``det_configs/*/..._cpu_demo.*``: a small ResNet-FPN Mask R-CNN (64-channel FPN and heads,
GroupNorm in FPN and mask head, small head budgets) that trains in minutes on a CPU and works with small
data sets and batches; the model's depth, the image size, the class count, masks and devices are set from
the study. See det_configs/README.md for why each setting is what it is.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

FRAMEWORKS = ("detectron2", "mmdet")
PROTOCOLS = ("frozen", "full")

DETECTRON2_CONFIG = "det_configs/detectron2/mask_rcnn_R_18_FPN_cpu_demo.yaml"
MMDET_CONFIG = "det_configs/mmdet/mask-rcnn_r18_fpn_cpu_demo.py"

# MMDetection's heads on the frozen backbone learn better at half its config's AdamW lr (2e-3, kept for full
# fine-tuning): with the six-class demo, 1e-3 raised every metric's mean for SparK and for scratch on four seeds'
# weights (box AP 1.9 -> 2.7 and 1.4 -> 2.2); with the one-class demo, 2e-3 cost SparK 4.2 box AP (seed 0), and
# with decoder width 192 5.9 and 0.1 (seeds 1, 5) while scratch's moved -1.5 and -1.3 (docs/results/demo-tuning.md).
FROZEN_MMDET_LR = 1e-3
# The frozen random baseline is the whole ResNet with random weights in both frameworks. MMDetection's
# default zero-initialises the last norm of every residual branch (a training aid), which in a frozen random
# network removes all branch convolutions and leaves the stem and the 1x1 shortcut convolutions;
# Detectron2's random ResNet has every branch, and so does every pretrained one (docs/results/demo-tuning.md has the
# runs against both baselines). Full fine-tuning keeps MMDetection's default: its branches learn.
FROZEN_MMDET_OPTIONS = (f"optim_wrapper.optimizer.lr={FROZEN_MMDET_LR}", "model.backbone.zero_init_residual=False")

# Stage widths of the ResNets (BasicBlock for 18/34, Bottleneck x4 for the rest): the FPN's inputs.
_STAGE_CHANNELS = {18: [64, 128, 256, 512], 34: [64, 128, 256, 512]}
_BOTTLENECK_CHANNELS = [256, 512, 1024, 2048]


@dataclass(frozen=True)
class Recipe:
    """What every fine-tune of one protocol shares; only the weights differ between initialisations.

    ``image_size``: the test-time short side; training samples 5/6, 1 and 7/6 of it, the long side at
    most 3/2 of it (96 px: 80/96/112, at most 144, the demo's sizes). ``num_gpus`` 0 trains on the CPU.
    """

    depth: int
    protocol: str
    iters: int
    batch: int
    image_size: int
    num_classes: int
    masks: bool = True
    num_gpus: int = 0

    def train_sizes(self) -> tuple[int, int, int]:
        return round(self.image_size * 5 / 6), self.image_size, round(self.image_size * 7 / 6)

    def max_size(self) -> int:
        return round(self.image_size * 3 / 2)


def lr_milestones(iters: int) -> list[int]:
    """Steps at 2/3 and 8/9 of the schedule (the paper's), strictly increasing and inside it."""
    steps = []
    for step in (iters * 2 // 3, iters * 8 // 9):
        if (not steps or step > steps[-1]) and 0 < step < iters:
            steps.append(step)
    return steps


def spark_det_command(name: str, *args: object, num_gpus: int = 0) -> list[object]:
    """``python -m spark_det NAME ARGS``; through torchrun with one process per GPU when there are several."""
    if num_gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_gpus}",
                "-m", "spark_det", name, *args]
    return [sys.executable, "-m", "spark_det", name, *args]


@dataclass(frozen=True)
class CocoFiles:
    train_json: Path
    train_images: Path
    val_json: Path
    val_images: Path


def finetune_command(fw: str, weights: Optional[Path], seed: int, recipe: Recipe, data: CocoFiles, run_dir: Path,
                     root: Path) -> list[object]:
    """The command of one fine-tune; ``weights`` None is random initialisation (scratch)."""
    if fw == "detectron2":
        return _detectron2_command(weights, seed, recipe, data, run_dir, root)
    if fw == "mmdet":
        return _mmdet_command(weights, seed, recipe, data, run_dir, root)
    raise ValueError(f"unknown framework {fw!r}: use one of {FRAMEWORKS}")


def _detectron2_command(weights: Optional[Path], seed: int, r: Recipe, data: CocoFiles, run_dir: Path,
                        root: Path) -> list[object]:
    steps = lr_milestones(r.iters)
    cmd = ["train-det2", "--config-file", root / DETECTRON2_CONFIG,
           "--register-coco", "demo_train", data.train_json, data.train_images,
           "--register-coco", "demo_val", data.val_json, data.val_images, "--output", run_dir]
    if r.num_gpus:
        cmd += ["--num-gpus", r.num_gpus]  # Detectron2's own launcher: one process per GPU
    cmd += ["DATASETS.TRAIN", '("demo_train",)', "DATASETS.TEST", '("demo_val",)',
            "MODEL.WEIGHTS", weights or "", "MODEL.ROI_HEADS.NUM_CLASSES", r.num_classes, "SEED", seed,
            "SOLVER.MAX_ITER", r.iters, "SOLVER.IMS_PER_BATCH", r.batch,
            "SOLVER.STEPS", str(tuple(steps)), "SOLVER.WARMUP_ITERS", max(1, r.iters // 10),
            "MODEL.BACKBONE.FREEZE_AT", 5 if r.protocol == "frozen" else 0,  # 5: stem and res2-res5, FrozenBN
            "INPUT.MIN_SIZE_TRAIN", str(r.train_sizes()), "INPUT.MAX_SIZE_TRAIN", r.max_size(),
            "INPUT.MIN_SIZE_TEST", r.image_size, "INPUT.MAX_SIZE_TEST", r.max_size()]
    if r.depth != 18:
        cmd += ["MODEL.RESNETS.DEPTH", r.depth, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64 if r.depth == 34 else 256]
    if not r.masks:
        cmd += ["MODEL.MASK_ON", False]  # Faster R-CNN; the evaluator then scores boxes only
    if r.num_gpus:
        cmd += ["MODEL.DEVICE", "cuda"]
    return [sys.executable, "-m", "spark_det", *cmd]


def _mmdet_command(weights: Optional[Path], seed: int, r: Recipe, data: CocoFiles, run_dir: Path,
                   root: Path) -> list[object]:
    # MMDetection's train command reads the classes from the JSON itself; its batch size is per process.
    steps = lr_milestones(r.iters)
    frozen = r.protocol == "frozen"
    largest = r.max_size()
    options = [
        f"model.backbone.init_cfg.checkpoint={weights}" if weights else "model.backbone.init_cfg=None",
        f"randomness.seed={seed}", f"train_cfg.max_iters={r.iters}", f"train_cfg.val_interval={r.iters}",
        f"train_dataloader.batch_size={r.batch // max(1, r.num_gpus)}",
        f"param_scheduler.1.milestones={steps}".replace(" ", ""), f"param_scheduler.0.end={max(1, r.iters // 10)}",
        f"model.backbone.frozen_stages={4 if frozen else -1}",  # 4: the stem and all four stages
        f"model.backbone.norm_eval={frozen}",
        *(FROZEN_MMDET_OPTIONS if frozen else []),
        # the pipelines' resize steps (indices in the config's train_pipeline / test_pipeline)
        "train_dataloader.dataset.pipeline.2.scales=[" + ",".join(f"({largest},{s})" for s in r.train_sizes()) + "]",
        *(f"{loader}_dataloader.dataset.pipeline.1.scale=({largest},{r.image_size})" for loader in ("val", "test"))]
    if r.depth != 18:
        channels = _STAGE_CHANNELS.get(r.depth, _BOTTLENECK_CHANNELS)
        options += [f"model.backbone.depth={r.depth}", f"model.neck.in_channels={channels}".replace(" ", "")]
    if not r.masks:  # Faster R-CNN: no mask branch, no masks loaded, boxes scored
        options += ["model.roi_head.mask_roi_extractor=None", "model.roi_head.mask_head=None",
                    "train_dataloader.dataset.pipeline.1.with_mask=False",
                    "val_dataloader.dataset.pipeline.2.with_mask=False",
                    "test_dataloader.dataset.pipeline.2.with_mask=False",
                    "val_evaluator.metric=bbox", "test_evaluator.metric=bbox"]
    return spark_det_command(
        "train-mmdet", root / MMDET_CONFIG, "--output", run_dir,
        "--coco-train", data.train_json, data.train_images, "--coco-val", data.val_json, data.val_images,
        "--cfg-options", *options, *(["--launcher", "pytorch"] if r.num_gpus > 1 else []), num_gpus=r.num_gpus)
