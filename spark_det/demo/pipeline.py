"""The whole idea on one CPU: SparK pretraining -> weight conversion -> Mask R-CNN transfer.

Stages (each runs the project's own command, ``python -m spark_det <command>``, printed first):
1. generate the synthetic COCO-format data set and a pool of unlabeled images;
2. pretrain ResNet-18 with SparK on the unlabeled pool (``pretrain``);
3. convert the encoder for Detectron2 and MMDetection (``convert``);
4. train Mask R-CNN R18-FPN from SparK weights and from random initialisation with the same
   config, budget and data order in Detectron2 (``train-det2``) and MMDetection (``train-mmdet``),
   the two runs of a pair side by side; the backbone frozen (default) or fine-tuned (``protocol``);
5. write results.md / results.json (box AP, mask AP, AP50), ap.png, pretrain_loss.png and
   reconstruction.png to the output folder.

The recipes and detection configs are read from the repository checkout (``pretrain/``,
``det_configs/``), so the demo runs from a clone, as the README's ``make demo`` does.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..errors import SparkDetError
from ..train.progress import format_eta
from .report import detectron2_results, mmdet_results, plot_loss, write_report
from .stages import Job, Stages
from .synthetic import SceneConfig

FRAMEWORKS = ("detectron2", "mmdet")
INITS = ("spark", "scratch")


def repo_root() -> Path:
    """The checkout holding ``pretrain/`` and ``det_configs/`` (the package's parent folder)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "det_configs").is_dir() or not (root / "pretrain").is_dir():
        raise SparkDetError(f"the demo reads pretrain/ and det_configs/ from a spark-det checkout; none at {root}")
    return root


PROTOCOLS = ("frozen", "full")

# The demo's scenes: 1-4 objects of 20-50% of the image side, no disc-shaped clutter, every shape
# labelled "object". With the six shape classes, no detector learned to call any region a shape within
# the demo's budget (foreground accuracy 0 at every iteration in both frameworks, every AP below 4,
# the ranking between SparK and scratch decided by noise); with one class it does within 100-200
# iterations and AP is 10-25, where the backbone's features decide the ranking (docs/demo_tuning.md).
DEMO_SCENE = SceneConfig(min_objects=1, max_objects=4, min_scale=0.2, max_scale=0.5, min_visible_fraction=0.5,
                         disc_clutter=False, single_class=True)


@dataclass
class DemoSettings:
    """Sizes of the demo; the defaults are what ``make demo`` runs (about 8 minutes on an idle 2-core machine).

    ``protocol``: ``frozen`` trains Mask R-CNN's FPN and heads on the frozen backbone (the detection
    form of SSL's linear probing: it measures the pretrained features themselves); ``full`` fine-tunes
    every layer, as the paper's COCO protocol does (the longer benchmark).
    """

    output: str = "outputs/demo"
    image_size: int = 128
    num_unlabeled: int = 1200
    num_train: int = 300
    num_val: int = 80
    pretrain_size: int = 96
    pretrain_epochs: int = 5
    pretrain_batch: int = 32
    protocol: str = "frozen"
    finetune_iters: int = 500
    finetune_batch: int = 2
    seeds: list[int] = field(default_factory=lambda: [0])
    pretrain_seed: int = 0
    frameworks: list[str] = field(default_factory=lambda: list(FRAMEWORKS))


def finetune_stage(fw: str, seed: int) -> str:
    return f"Mask R-CNN {fw}, SparK and scratch side by side (seed {seed})"


def plan_seconds(s: DemoSettings) -> dict[str, float]:
    """Each stage's expected seconds on the README's idle 2-core machine (measured there), for the ETA."""
    pretrain_images = s.pretrain_epochs * (s.num_unlabeled // s.pretrain_batch) * s.pretrain_batch
    plan = {"generate data": 0.013 * (s.image_size / 128) ** 2 * (s.num_train + s.num_val + s.num_unlabeled),
            "SparK pretraining": 15 + pretrain_images * (s.pretrain_size / 96) ** 2 / SECONDS["pretrain_images_per_s"],
            "convert weights": 8.0}
    for seed in s.seeds:
        for fw in s.frameworks:
            step = SECONDS[f"{fw}_{s.protocol}_step"] * s.finetune_batch / 2
            plan[finetune_stage(fw, seed)] = SECONDS["finetune_start"] + step * s.finetune_iters + 0.1 * s.num_val
    return plan


# Measured on the README's machine (2 cores, idle; a fine-tune's step with one thread, two fine-tunes at once).
SECONDS = {"pretrain_images_per_s": 24.0, "finetune_start": 25.0, "detectron2_frozen_step": 0.16,
           "detectron2_full_step": 0.27, "mmdet_frozen_step": 0.19, "mmdet_full_step": 0.33}


# MMDetection's heads on the frozen backbone learn better at half its config's AdamW lr (2e-3, kept for full
# fine-tuning): with the six-class demo, 1e-3 raised every metric's mean for SparK and for scratch on four seeds'
# weights (box AP 1.9 -> 2.7 and 1.4 -> 2.2); with the one-class demo, 2e-3 cost SparK 4.2 box AP (seed 0), and
# with decoder width 192 5.9 and 0.1 (seeds 1, 5) while scratch's moved -1.5 and -1.3 (docs/demo_tuning.md).
FROZEN_MMDET_LR = 1e-3
# The frozen random baseline is the whole ResNet-18 with random weights in both frameworks. MMDetection's
# default zero-initialises the last norm of every residual branch (a training aid), which in a frozen random
# network removes all 16 branch convolutions and leaves the stem and three 1x1 shortcut convolutions;
# Detectron2's random ResNet has every branch, and so does every pretrained one (docs/demo_tuning.md has the
# runs against both baselines). Full fine-tuning keeps MMDetection's default: its branches learn.
FROZEN_MMDET_OPTIONS = (f"optim_wrapper.optimizer.lr={FROZEN_MMDET_LR}", "model.backbone.zero_init_residual=False")


def lr_milestones(iters: int) -> list[int]:
    """Steps at 2/3 and 8/9 of the schedule (the paper's), strictly increasing and inside it."""
    steps = []
    for step in (iters * 2 // 3, iters * 8 // 9):
        if (not steps or step > steps[-1]) and 0 < step < iters:
            steps.append(step)
    return steps


def _command(name: str, *args: object) -> list[object]:
    return [sys.executable, "-m", "spark_det", name, *args]


def _finetune_command(fw: str, init: str, seed: int, s: DemoSettings, data: dict, weights: Path,
                      run_dir: Path, root: Path) -> list[object]:
    steps = lr_milestones(s.finetune_iters)
    warmup = max(1, s.finetune_iters // 10)
    frozen = s.protocol == "frozen"
    if fw == "detectron2":  # MMDetection's train command reads the classes from the JSON itself
        classes = len(json.loads(Path(data["train_json"]).read_text())["categories"])
        return _command(
            "train-det2", "--config-file", root / "det_configs/detectron2/mask_rcnn_R_18_FPN_cpu_demo.yaml",
            "--register-coco", "demo_train", data["train_json"], data["train_images"],
            "--register-coco", "demo_val", data["val_json"], data["val_images"], "--output", run_dir,
            "DATASETS.TRAIN", '("demo_train",)', "DATASETS.TEST", '("demo_val",)',
            "MODEL.WEIGHTS", weights if init == "spark" else "", "MODEL.ROI_HEADS.NUM_CLASSES", classes, "SEED", seed,
            "SOLVER.MAX_ITER", s.finetune_iters, "SOLVER.IMS_PER_BATCH", s.finetune_batch,
            "SOLVER.STEPS", str(tuple(steps)), "SOLVER.WARMUP_ITERS", warmup,
            "MODEL.BACKBONE.FREEZE_AT", 5 if frozen else 0)  # 5: stem and res2-res5, FrozenBN
    init_opt = f"model.backbone.init_cfg.checkpoint={weights}" if init == "spark" else "model.backbone.init_cfg=None"
    return _command(
        "train-mmdet", root / "det_configs/mmdet/mask-rcnn_r18_fpn_cpu_demo.py", "--output", run_dir,
        "--coco-train", data["train_json"], data["train_images"], "--coco-val", data["val_json"], data["val_images"],
        "--cfg-options", init_opt, f"randomness.seed={seed}", f"train_cfg.max_iters={s.finetune_iters}",
        f"train_cfg.val_interval={s.finetune_iters}", f"train_dataloader.batch_size={s.finetune_batch}",
        f"param_scheduler.1.milestones={steps}".replace(" ", ""), f"param_scheduler.0.end={warmup}",
        f"model.backbone.frozen_stages={4 if frozen else -1}",  # 4: the stem and all four stages
        f"model.backbone.norm_eval={frozen}",
        *(FROZEN_MMDET_OPTIONS if frozen else []))


def _pair_jobs(fw: str, seed: int, s: DemoSettings, data: dict, weights: Path, out: Path, root: Path) -> list[Job]:
    """The SparK and the scratch fine-tune of one framework and seed: same command but for the weights."""
    jobs = []
    for init in INITS:
        run_dir = out / "finetune" / f"{fw}_{init}_seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        jobs.append(Job(f"{fw} {init}", _finetune_command(fw, init, seed, s, data, weights, run_dir, root),
                        log=run_dir / "train.log", total_iters=s.finetune_iters))
    return jobs


def run_demo(s: DemoSettings) -> Path:
    """Run every stage; returns the output folder holding the report."""
    from .synthetic import make_dataset

    if s.protocol not in PROTOCOLS:
        raise SparkDetError(f"protocol {s.protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    root = repo_root()
    out = Path(s.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {"PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    stages = Stages(plan_seconds(s), env=env, cwd=root)
    # The two fine-tunes of a pair run side by side, each on half the cores: small CPU kernels scale
    # poorly over threads, so two 1-thread runs finish in ~0.45x the time of two 2-thread runs in turn.
    threads = max(1, (os.cpu_count() or 2) // 2)
    scene = replace(DEMO_SCENE, image_size=(s.image_size, s.image_size))
    data = stages.timed("generate data", lambda: make_dataset(
        out / "data", s.num_train, s.num_val, s.num_unlabeled, seed=0, scene=scene))
    print(f"data: {s.num_train} train / {s.num_val} val labeled, {s.num_unlabeled} unlabeled images "
          f"under {data['root']}")

    pre_dir = out / "pretrain"
    shutil.rmtree(pre_dir, ignore_errors=True)
    stages.run("SparK pretraining", [Job("pretrain", _command(
        "pretrain", "--recipe", root / "pretrain" / "resnet18_cpu_demo.yaml", "--data", data["unlabeled"],
        "--output", pre_dir, f"epochs={s.pretrain_epochs}", f"batch_size={s.pretrain_batch}",
        f"input_size=[{s.pretrain_size},{s.pretrain_size}]", f"seed={s.pretrain_seed}"))])
    encoder = pre_dir / "encoder-resnet18.pth"
    plot_loss(pre_dir / "metrics.jsonl", out / "pretrain_loss.png")
    shutil.copy(sorted(pre_dir.glob("reconstruction-epoch*.png"))[-1], out / "reconstruction.png")

    weights = {"detectron2": out / "weights" / "r18_spark.pkl", "mmdet": out / "weights" / "r18_spark_mmdet.pth"}
    stages.run("convert weights", [Job(f"convert for {fw}", _command("convert", encoder, "--output", weights[fw],
                                                                     "--to", fw)) for fw in s.frameworks],
               threads_per_job=threads)

    results = []
    for seed in s.seeds:
        for fw in s.frameworks:
            jobs = _pair_jobs(fw, seed, s, data, weights[fw], out, root)
            stages.run(finetune_stage(fw, seed), jobs, threads_per_job=threads)
            for init, job in zip(INITS, jobs):
                run_dir = job.log.parent
                metrics = detectron2_results(run_dir) if fw == "detectron2" else mmdet_results(run_dir)
                results.append({"framework": fw, "init": init, "seed": seed, **metrics})
                print(f"    {init}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()), flush=True)

    write_report(out, results, stages.times, asdict(s))
    print(f"\ndone in {format_eta(time.time() - stages.start)}: results.md, results.json, ap.png, "
          f"pretrain_loss.png, reconstruction.png in {out}")
    return out
