"""The whole idea on one CPU: ``spark-det study`` on the built-in synthetic data (what ``make demo`` runs).

1. generate the synthetic COCO-format data set and a pool of unlabeled images;
2. then the study (:mod:`spark_det.study.pipeline`) with the demo's sizes: SparK pretraining of ResNet-18 on
   the unlabeled pool (``pretrain/resnet18_cpu_demo.yaml``), conversion for Detectron2 and MMDetection, and
   Mask R-CNN R18-FPN from SparK weights and from random initialisation with the same config, budget and
   data order in both frameworks, the backbone frozen (default) or fine-tuned (``protocol``); the report.

One pipeline: the demo's runs are the study's, so ``make demo`` measures what ``spark-det study`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ..study.finetune import FRAMEWORKS, PROTOCOLS
from ..study.pipeline import SECONDS, Study, StudySettings, finetune_stage, repo_root
from ..study.stages import Stages
from .synthetic import SceneConfig

INITS = ("spark", "scratch")
FINETUNE_SIZE = 96  # the demo fine-tunes its 128 px images at 96 px (3 x 3 pretraining mask grid, CPU cost)

# The demo's scenes: 1-4 objects of 20-50% of the image side, no disc-shaped clutter, every shape
# labelled "object". With the six shape classes, no detector learned to call any region a shape within
# the demo's budget (foreground accuracy 0 at every iteration in both frameworks, every AP below 4,
# the ranking between SparK and scratch decided by noise); with one class it does within 100-200
# iterations and AP is 10-25, where the backbone's features decide the ranking (docs/results/demo-tuning.md).
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


def study_settings(s: DemoSettings, data: dict, root: Path) -> StudySettings:
    """The study the demo runs on its generated ``data`` (make_dataset's paths)."""
    return StudySettings(
        output=s.output, train_json=str(data["train_json"]), val_json=str(data["val_json"]),
        images=str(data["train_images"]), val_images=str(data["val_images"]), unlabeled=str(data["unlabeled"]),
        model="resnet18", inits=list(INITS), frameworks=list(s.frameworks), protocols=[s.protocol],
        seeds=list(s.seeds), pretrain_recipe=str(root / "pretrain" / "resnet18_cpu_demo.yaml"),
        pretrain_overrides=[f"epochs={s.pretrain_epochs}", f"batch_size={s.pretrain_batch}",
                            f"input_size=[{s.pretrain_size},{s.pretrain_size}]"],
        pretrain_seed=s.pretrain_seed, iters=s.finetune_iters, batch=s.finetune_batch, image_size=FINETUNE_SIZE)


def plan_seconds(s: DemoSettings) -> dict[str, float]:
    """Each stage's expected seconds on the README's idle 2-core machine, known before the data exists."""
    pretrain_images = s.pretrain_epochs * (s.num_unlabeled // s.pretrain_batch) * s.pretrain_batch
    plan = {"generate data": 0.013 * (s.image_size / 128) ** 2 * (s.num_train + s.num_val + s.num_unlabeled),
            "SparK pretraining": 15 + pretrain_images * (s.pretrain_size / 96) ** 2 / SECONDS["pretrain_images_per_s"],
            "convert weights": 8.0}
    for seed in s.seeds:
        for fw in s.frameworks:
            step = SECONDS[f"{fw}_{s.protocol}_step"] * s.finetune_batch / 2
            plan[finetune_stage(s.protocol, seed, fw, list(INITS))] = (
                SECONDS["finetune_start"] + step * s.finetune_iters + 0.1 * s.num_val)
    return plan


def run_demo(s: DemoSettings) -> Path:
    """Generate the data, then run the study on it; returns the output folder holding the report."""
    from ..errors import SparkDetError
    from .synthetic import make_dataset

    if s.protocol not in PROTOCOLS:
        raise SparkDetError(f"protocol {s.protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    root = repo_root()
    out = Path(s.output).resolve()
    stages = Stages(plan_seconds(s), cwd=root)
    scene = replace(DEMO_SCENE, image_size=(s.image_size, s.image_size))
    data = stages.timed("generate data", lambda: make_dataset(
        out / "data", s.num_train, s.num_val, s.num_unlabeled, seed=0, scene=scene))
    print(f"data: {s.num_train} train / {s.num_val} val labeled, {s.num_unlabeled} unlabeled images "
          f"under {data['root']}")
    return Study(study_settings(s, data, root), root).run(stages)
