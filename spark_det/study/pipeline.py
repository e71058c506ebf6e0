"""A study: does SparK pretraining on my unlabeled images give a better detector than what I would
otherwise start from?

Stages (each runs the project's own command, ``python -m spark_det <command>``, printed first):
1. SparK pretraining on the unlabeled images with the model's recipe (``pretrain``), unless the study
   has no ``spark`` init or is given ``--spark-weights``;
2. conversion of every initialisation's weights for each framework (``convert``);
3. per protocol, seed and framework, one fine-tune per initialisation, all with the same command but for
   the weights (``train-det2`` / ``train-mmdet``): side by side on the CPU, one after another on GPUs;
4. results.md / results.json / ap.png (and pretrain_loss.png, reconstruction.png after a pretraining).

Everything is checked before the first stage. A study is resumable: run the same command again and it
continues where it stopped; a finished fine-tune (its command and inputs recorded in its ``result.json``)
and a finished pretraining are not redone, an unfinished pretraining resumes from its checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import ConfigError, DataError, SparkDetError
from ..io import file_sha256, write_atomic
from ..train.progress import format_eta
from .coco import check_coco, check_splits
from .finetune import FRAMEWORKS, PROTOCOLS, CocoFiles, Recipe, finetune_command, spark_det_command
from .inits import check_frameworks, check_weights, parse_inits, resnet_depth
from .report import detectron2_results, mmdet_results, plot_loss, write_report
from .stages import Job, Stages

# Measured on the README's machine (2 cores, idle; a fine-tune's step with one thread, two fine-tunes at once):
# ResNet-18 Mask R-CNN at 96 px, batch 2. Other sizes scale with pixels, batch and depth (rough).
SECONDS = {"pretrain_images_per_s": 24.0, "finetune_start": 25.0, "detectron2_frozen_step": 0.16,
           "detectron2_full_step": 0.27, "mmdet_frozen_step": 0.19, "mmdet_full_step": 0.33}
_DEPTH_COST = {18: 1.0, 34: 1.4, 50: 2.0, 101: 3.0, 152: 4.0}


def repo_root() -> Path:
    """The checkout holding ``pretrain/`` and ``det_configs/`` (the package's parent folder)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "det_configs").is_dir() or not (root / "pretrain").is_dir():
        raise SparkDetError(f"a study reads pretrain/ and det_configs/ from a spark-det checkout; none at {root}")
    return root


@dataclass
class StudySettings:
    """A study's arguments (``spark-det study --help`` describes each). None: derived from the data."""

    output: str
    train_json: str
    val_json: str
    images: str
    val_images: Optional[str] = None  # default: images
    unlabeled: Optional[str] = None
    model: str = "resnet50"
    inits: list[str] = field(default_factory=lambda: ["spark", "scratch"])
    frameworks: list[str] = field(default_factory=lambda: list(FRAMEWORKS))
    protocols: list[str] = field(default_factory=lambda: ["frozen"])
    seeds: list[int] = field(default_factory=lambda: [0])
    spark_weights: Optional[str] = None
    init_weights: Optional[str] = None
    pretrain_recipe: Optional[str] = None  # default: pretrain/<model>.yaml
    pretrain_overrides: list[str] = field(default_factory=list)
    pretrain_seed: int = 0
    iters: Optional[int] = None
    batch: Optional[int] = None
    image_size: Optional[int] = None
    num_gpus: Optional[int] = None  # None: every visible GPU, 0 on a machine without


def default_iters(num_train: int, batch: int) -> int:
    """About 12 epochs over the labeled images (COCO's 1x schedule is 12 epochs), at least 100 iterations."""
    return max(100, 12 * math.ceil(num_train / batch))


def default_image_size(median_short_side: int) -> int:
    """The images' median short side, in multiples of 32, between 64 and 800 (COCO's test size)."""
    return min(800, max(64, 32 * round(median_short_side / 32)))


def finetune_stage(protocol: str, seed: int, fw: str, labels: list[str]) -> str:
    """The name of the stage that fine-tunes every initialisation with one framework, protocol and seed."""
    return f"Mask R-CNN {fw}, {protocol}: {', '.join(labels)} (seed {seed})"


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: dict) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


class Study:
    """A checked study: every input validated at construction, nothing written until :meth:`run`."""

    def __init__(self, s: StudySettings, root: Optional[Path] = None) -> None:
        self.s = s
        self.root = root or repo_root()
        for name, values, allowed in (("--frameworks", s.frameworks, FRAMEWORKS),
                                      ("--protocol", s.protocols, PROTOCOLS)):
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ConfigError(f"{name} {' '.join(bad)}: choose from {', '.join(allowed)}")
        if not s.seeds or len(set(s.seeds)) != len(s.seeds):
            raise ConfigError(f"--seeds {s.seeds}: give distinct seeds")
        self.depth = resnet_depth(s.model)
        self.inits = parse_inits(s.inits)
        self.train = check_coco(s.train_json, s.images, "train")
        self.val = check_coco(s.val_json, s.val_images or s.images, "val")
        check_splits(self.train, self.val)
        for init in self.inits:
            if init.path is not None:
                check_weights(init.path, s.model, f"--init {init.kind}:{init.path}")
        self.pretrains = any(i.kind == "spark" for i in self.inits) and not s.spark_weights
        self.pretrain_cfg = self._check_pretraining() if self.pretrains else None
        if s.spark_weights:
            check_weights(Path(s.spark_weights).expanduser(), s.model, f"--spark-weights {s.spark_weights}")
        check_frameworks(s.frameworks)
        self.num_gpus = s.num_gpus if s.num_gpus is not None else _visible_gpus()
        batch = s.batch or 2 * max(1, self.num_gpus)
        if self.num_gpus > 1 and batch % self.num_gpus:
            raise ConfigError(f"--batch {batch} must divide by --num-gpus {self.num_gpus}")
        iters = s.iters or default_iters(self.train.num_images, batch)
        size = s.image_size or default_image_size(self.train.median_short_side)
        self.recipes = {p: Recipe(depth=self.depth, protocol=p, iters=iters, batch=batch, image_size=size,
                                  num_classes=len(self.train.categories), masks=self.train.has_masks,
                                  num_gpus=self.num_gpus) for p in s.protocols}
        self.out = Path(s.output).expanduser().resolve()
        self.data = CocoFiles(self.train.json, self.train.images, self.val.json, self.val.images)

    def _check_pretraining(self) -> dict:
        from ..train.config import load_config

        s = self.s
        if not s.unlabeled:
            raise ConfigError("--init spark pretrains on --unlabeled IMAGES (or give --spark-weights FILE)")
        recipe = Path(s.pretrain_recipe or self.root / "pretrain" / f"{s.model}.yaml").expanduser()
        if not recipe.is_file():
            raise ConfigError(f"pretraining recipe {recipe} does not exist (see pretrain/)")
        if s.init_weights:
            check_weights(Path(s.init_weights).expanduser(), s.model, f"--init-weights {s.init_weights}")
        cfg = load_config(recipe, [*s.pretrain_overrides, f"seed={s.pretrain_seed}"])
        if cfg["model"] != s.model:
            raise ConfigError(f"the pretraining recipe {recipe} is for {cfg['model']}; the study's --model is "
                              f"{s.model}")
        self.pretrain_recipe = recipe.resolve()
        self.num_unlabeled, self.unlabeled = _count_unlabeled(s.unlabeled)
        return cfg

    # -- planning ---------------------------------------------------------------------------------------------
    def finetune_stage(self, protocol: str, seed: int, fw: str) -> str:
        return finetune_stage(protocol, seed, fw, [i.label for i in self.inits])

    def plan_seconds(self) -> dict[str, float]:
        """Each stage's expected seconds on the README's idle 2-core machine (measured there), for the ETA."""
        plan = {}
        if self.pretrains:
            cfg = self.pretrain_cfg
            images = cfg["epochs"] * (self.num_unlabeled // cfg["batch_size"]) * cfg["batch_size"]
            plan["SparK pretraining"] = 15 + images * (cfg["input_size"][0] / 96) ** 2 * _DEPTH_COST[self.depth] / (
                SECONDS["pretrain_images_per_s"])
        if any(i.needs_weights for i in self.inits):
            plan["convert weights"] = 8.0
        parallel = self._parallel()
        for protocol, r in self.recipes.items():
            for seed in self.s.seeds:
                for fw in self.s.frameworks:
                    step = SECONDS[f"{fw}_{protocol}_step"] * r.batch / 2 * (r.image_size / 96) ** 2 * _DEPTH_COST[
                        self.depth]
                    waves = math.ceil(len(self.inits) / parallel)
                    plan[self.finetune_stage(protocol, seed, fw)] = waves * (
                        SECONDS["finetune_start"] + step * r.iters + 0.1 * self.val.num_images)
        return plan

    def _parallel(self) -> int:
        """Fine-tunes at once: one per core on the CPU, up to one per initialisation; one at a time on GPUs."""
        return 1 if self.num_gpus else max(1, min(len(self.inits), os.cpu_count() or 1))

    # -- running ----------------------------------------------------------------------------------------------
    def run(self, stages: Optional[Stages] = None) -> Path:
        """Run (or continue) every stage; returns the output folder holding the report."""
        out = self.out
        out.mkdir(parents=True, exist_ok=True)
        if stages is None:
            stages = Stages({})  # the commands run where the study was started: relative paths stay valid
        stages.env.setdefault("PYTHONPATH", os.pathsep.join([str(self.root), os.environ.get("PYTHONPATH", "")]))
        stages.add(self.plan_seconds())
        print(f"study: {self.s.model}, inits {', '.join(i.label for i in self.inits)}; "
              f"{self.train.num_images} train / {self.val.num_images} val images, "
              f"{len(self.train.categories)} classes, {'Mask' if self.train.has_masks else 'Faster'} R-CNN; "
              + "; ".join(f"{p}: {r.iters} iterations of batch {r.batch} at {r.image_size} px"
                          for p, r in self.recipes.items())
              + f"; {f'{self.num_gpus} GPU(s)' if self.num_gpus else 'CPU'}; output {out}", flush=True)
        _write_json(out / "study.json", {"settings": asdict(self.s), "recipes": {p: asdict(r) for p, r in
                                                                                  self.recipes.items()}})
        encoder = self._pretrain(stages) if self.pretrains else (
            Path(self.s.spark_weights).expanduser().resolve() if self.s.spark_weights else None)
        weights = self._convert(stages, encoder)
        results = []
        for protocol, recipe in self.recipes.items():
            for seed in self.s.seeds:
                for fw in self.s.frameworks:
                    results += self._finetune_group(stages, protocol, seed, fw, recipe, weights)
        md = write_report(out, results, [i.label for i in self.inits], stages.times, asdict(self.s))
        print("\n" + md)
        print(f"done in {format_eta(time.time() - stages.start)}: results.md, results.json, ap.png"
              + (", pretrain_loss.png, reconstruction.png" if self.pretrains else "") + f" in {out}", flush=True)
        return out

    def _pretrain(self, stages: Stages) -> Path:
        s, out = self.s, self.out
        pre_dir = out / "pretrain"
        cmd = spark_det_command(
            "pretrain", "--recipe", self.pretrain_recipe, "--data", self.unlabeled, "--output", pre_dir,
            *(["--init-weights", Path(s.init_weights).expanduser().resolve()] if s.init_weights else []),
            "--resume", "auto", *s.pretrain_overrides, f"seed={s.pretrain_seed}", num_gpus=self.num_gpus)
        encoder = pre_dir / f"encoder-{s.model}.pth"
        marker = pre_dir / "study-pretrain.json"
        key = [str(c) for c in cmd[1:]]
        found = _read_json(marker)
        if found is not None and found["command"] != key:
            raise ConfigError(f"{pre_dir} holds a pretraining with other settings ({' '.join(found['command'])}); "
                              "use another --output, or delete that folder to pretrain again")
        if found and found.get("finished") and encoder.is_file():
            stages.skip("SparK pretraining", f"finished before ({encoder})")
        else:
            _write_json(marker, {"command": key, "finished": False})
            stages.run("SparK pretraining", [Job("pretrain", cmd)])
            _write_json(marker, {"command": key, "finished": True})
        plot_loss(pre_dir / "metrics.jsonl", out / "pretrain_loss.png")
        previews = sorted(pre_dir.glob("reconstruction-epoch*.png"))
        if previews:
            shutil.copy(previews[-1], out / "reconstruction.png")
        return encoder

    def _convert(self, stages: Stages, encoder: Optional[Path]) -> dict[tuple[str, str], Optional[Path]]:
        """Each initialisation's weights per framework ((label, framework) -> file; None for scratch)."""
        weights: dict[tuple[str, str], Optional[Path]] = {}
        jobs = []
        for init in self.inits:
            source = encoder if init.kind == "spark" else init.path
            for fw in self.s.frameworks:
                if source is None:
                    weights[init.label, fw] = None
                    continue
                name = f"{init.label}_{self.s.model}" + (".pkl" if fw == "detectron2" else "_mmdet.pth")
                dst = self.out / "weights" / name
                weights[init.label, fw] = dst
                if not dst.is_file() or dst.stat().st_mtime < source.stat().st_mtime:
                    jobs.append(Job(f"convert {init.label} for {fw}", spark_det_command(
                        "convert", source, "--output", dst, "--to", fw, "--arch", self.s.model)))
        if "convert weights" in stages.plan:
            if jobs:
                stages.run("convert weights", jobs, threads_per_job=max(1, (os.cpu_count() or 2) // 2),
                           max_parallel=max(1, min(2, os.cpu_count() or 1)))
            else:
                stages.skip("convert weights", "every file converted before")
        return weights

    def commands(self, protocol: str, seed: int, fw: str, weights: dict) -> list[tuple[Path, list]]:
        """(run folder, command) of each initialisation's fine-tune: the same command but for the weights."""
        out = []
        for init in self.inits:
            run_dir = self.out / "finetune" / protocol / f"{fw}_{init.label}_seed{seed}"
            out.append((run_dir, finetune_command(fw, weights[init.label, fw], seed, self.recipes[protocol], self.data,
                                                  run_dir, self.root)))
        return out

    def _finetune_group(self, stages: Stages, protocol: str, seed: int, fw: str, recipe: Recipe,
                        weights: dict) -> list[dict]:
        """The fine-tunes of every initialisation with one framework, protocol and seed."""
        name = self.finetune_stage(protocol, seed, fw)
        runs, jobs = {}, []
        for init, (run_dir, cmd) in zip(self.inits, self.commands(protocol, seed, fw, weights)):
            w = weights[init.label, fw]
            key = {"command": [str(c) for c in cmd[1:]], "train_json": self.train.digest,
                   "val_json": self.val.digest, "weights": file_sha256(w) if w else None}
            runs[init.label] = (run_dir, key)
            done = _read_json(run_dir / "result.json")
            if done is not None and done.get("key") == key:
                continue
            shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished or outdated run of this study
            jobs.append(Job(f"{fw} {init.label}", cmd, log=run_dir / "train.log", total_iters=recipe.iters))
        if jobs:
            parallel = self._parallel()
            threads = None if self.num_gpus else max(1, (os.cpu_count() or 2) // min(parallel, len(jobs)))
            stages.run(name, jobs, threads_per_job=threads, max_parallel=parallel)
        else:
            stages.skip(name, "every run finished before")
        results = []
        for init in self.inits:
            run_dir, key = runs[init.label]
            result = _read_json(run_dir / "result.json")
            if result is None or result.get("key") != key:
                metrics = (detectron2_results(run_dir) if fw == "detectron2"
                           else mmdet_results(run_dir, masks=recipe.masks))
                result = {"key": key, "metrics": metrics}
                _write_json(run_dir / "result.json", result)
            row = {"framework": fw, "protocol": protocol, "init": init.label, "seed": seed, **result["metrics"],
                   "run_dir": str(run_dir)}
            results.append(row)
            print(f"    {init.label}: " + ", ".join(f"{k} {v:.2f}" for k, v in result["metrics"].items()), flush=True)
        return results


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _count_unlabeled(source: str) -> tuple[int, str]:
    """How many unlabeled images (for the plan; 0 for WebDataset shards, whose count is known only once read),
    and the source as the pretraining (started in the checkout) must name it. A missing or empty folder stops
    the study here, before anything runs."""
    from ..data.folder import find_images
    from ..data.shards import is_shard_source

    if is_shard_source(source):
        return 0, source
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise DataError(f"--unlabeled {source} does not exist")
    images = find_images(path, log=lambda _: None)
    if not len(images):
        raise DataError(f"--unlabeled {source} holds no images")
    return len(images), str(path)


def run_study(s: StudySettings) -> Path:
    """Check everything, then run (or continue) the study; returns the output folder."""
    return Study(s).run()
