"""The whole idea on one CPU: SparK pretraining -> weight conversion -> Mask R-CNN transfer.

Stages (each runs the project's own command, ``python -m spark_det <command>``, printed first):
1. generate the synthetic COCO-format data set and a pool of unlabeled images;
2. pretrain ResNet-18 with SparK on the unlabeled pool (``pretrain``);
3. convert the encoder for Detectron2 and MMDetection (``convert``);
4. fine-tune Mask R-CNN R18-FPN from SparK weights and from random initialisation with the same
   budget in Detectron2 (``train-det2``) and MMDetection (``train-mmdet``);
5. write results.md / results.json (box AP, mask AP, AP50), ap.png, pretrain_loss.png and
   reconstruction.png to the output folder.

The recipes and detection configs are read from the repository checkout (``pretrain/``,
``det_configs/``), so the demo runs from a clone, as the README's ``make demo`` does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import SparkDetError
from .report import detectron2_results, mmdet_results, plot_loss, write_report

FRAMEWORKS = ("detectron2", "mmdet")


class DemoStageError(SparkDetError):
    """A stage's command failed; the message carries the tail of its log, the exit code is the stage's."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code if 1 <= exit_code <= 5 else 1


def repo_root() -> Path:
    """The checkout holding ``pretrain/`` and ``det_configs/`` (the package's parent folder)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "det_configs").is_dir() or not (root / "pretrain").is_dir():
        raise SparkDetError(f"the demo reads pretrain/ and det_configs/ from a spark-det checkout; none at {root}")
    return root


@dataclass
class DemoSettings:
    """Sizes of the demo; the defaults are what ``make demo`` runs (about 15 minutes on 2 cores)."""

    output: str = "outputs/demo"
    image_size: int = 128
    num_unlabeled: int = 1200
    num_train: int = 300
    num_val: int = 40
    pretrain_epochs: int = 3
    pretrain_batch: int = 32
    finetune_iters: int = 60
    finetune_batch: int = 4
    seeds: list[int] = field(default_factory=lambda: [0])
    frameworks: list[str] = field(default_factory=lambda: list(FRAMEWORKS))


class Stages:
    """Prints each stage with its wall time and keeps the times for the summary."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.start = time.time()

    def run(self, name: str, cmd: list[str], log: Path | None = None) -> None:
        print(f"\n=== {name}\n$ {' '.join(map(str, cmd))}", flush=True)
        t0 = time.time()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo_root()), os.environ.get("PYTHONPATH", "")])}
        if log is None:
            proc = subprocess.run(list(map(str, cmd)), cwd=repo_root(), env=env)
        else:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as f:
                proc = subprocess.run(list(map(str, cmd)), cwd=repo_root(), env=env, stdout=f,
                                      stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = log.read_text()[-3000:] if log else ""
            raise DemoStageError(f"stage '{name}' failed (exit {proc.returncode})"
                                 f"{' - log ' + str(log) if log else ''}\n{tail}", proc.returncode)
        self.times[name] = time.time() - t0
        print(f"=== {name}: {self.times[name]:.0f}s (total {time.time() - self.start:.0f}s)", flush=True)

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.time()
        result = fn()
        self.times[name] = time.time() - t0
        print(f"=== {name}: {self.times[name]:.0f}s (total {time.time() - self.start:.0f}s)", flush=True)
        return result


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
    if fw == "detectron2":
        return _command(
            "train-det2", "--config-file", root / "det_configs/detectron2/mask_rcnn_R_18_FPN_cpu_demo.yaml",
            "--register-coco", "demo_train", data["train_json"], data["train_images"],
            "--register-coco", "demo_val", data["val_json"], data["val_images"], "--output", run_dir,
            "DATASETS.TRAIN", '("demo_train",)', "DATASETS.TEST", '("demo_val",)',
            "MODEL.WEIGHTS", weights if init == "spark" else "", "SEED", seed,
            "SOLVER.MAX_ITER", s.finetune_iters, "SOLVER.IMS_PER_BATCH", s.finetune_batch,
            "SOLVER.STEPS", str(tuple(steps)), "SOLVER.WARMUP_ITERS", warmup)
    init_opt = f"model.backbone.init_cfg.checkpoint={weights}" if init == "spark" else "model.backbone.init_cfg=None"
    return _command(
        "train-mmdet", root / "det_configs/mmdet/mask-rcnn_r18_fpn_cpu_demo.py", "--output", run_dir,
        "--coco-train", data["train_json"], data["train_images"], "--coco-val", data["val_json"], data["val_images"],
        "--cfg-options", init_opt, f"randomness.seed={seed}", f"train_cfg.max_iters={s.finetune_iters}",
        f"train_cfg.val_interval={s.finetune_iters}", f"train_dataloader.batch_size={s.finetune_batch}",
        f"param_scheduler.1.milestones={steps}".replace(" ", ""), f"param_scheduler.0.end={warmup}")


def run_demo(s: DemoSettings) -> Path:
    """Run every stage; returns the output folder holding the report."""
    from .synthetic import make_dataset

    root = repo_root()
    out = Path(s.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    data = stages.timed("generate data", lambda: make_dataset(
        out / "data", s.num_train, s.num_val, s.num_unlabeled, (s.image_size, s.image_size), seed=0))
    print(f"data: {s.num_train} train / {s.num_val} val labeled, {s.num_unlabeled} unlabeled images "
          f"under {data['root']}")

    pre_dir = out / "pretrain"
    shutil.rmtree(pre_dir, ignore_errors=True)
    stages.run("SparK pretraining", _command(
        "pretrain", "--recipe", root / "pretrain" / "resnet18_cpu_demo.yaml", "--data", data["unlabeled"],
        "--output", pre_dir, f"epochs={s.pretrain_epochs}", f"batch_size={s.pretrain_batch}",
        f"input_size=[{s.image_size},{s.image_size}]"))
    encoder = pre_dir / "encoder-resnet18.pth"
    plot_loss(pre_dir / "metrics.jsonl", out / "pretrain_loss.png")
    shutil.copy(sorted(pre_dir.glob("reconstruction-epoch*.png"))[-1], out / "reconstruction.png")

    weights = {"detectron2": out / "weights" / "r18_spark.pkl", "mmdet": out / "weights" / "r18_spark_mmdet.pth"}
    for fw in s.frameworks:
        stages.run(f"convert for {fw}", _command("convert", encoder, "--output", weights[fw], "--to", fw))

    results = []
    for seed in s.seeds:
        for fw in s.frameworks:
            for init in ("spark", "scratch"):
                run_dir = out / "finetune" / f"{fw}_{init}_seed{seed}"
                shutil.rmtree(run_dir, ignore_errors=True)
                cmd = _finetune_command(fw, init, seed, s, data, weights[fw], run_dir, root)
                stages.run(f"Mask R-CNN {fw} from {init} (seed {seed})", cmd, log=run_dir / "train.log")
                metrics = detectron2_results(run_dir) if fw == "detectron2" else mmdet_results(run_dir)
                results.append({"framework": fw, "init": init, "seed": seed, **metrics})
                print("    " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()), flush=True)

    write_report(out, results, stages.times, asdict(s))
    print(f"\ndone in {time.time() - stages.start:.0f}s: results.md, results.json, ap.png, pretrain_loss.png, "
          f"reconstruction.png in {out}")
    return out
