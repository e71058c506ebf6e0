"""A shrunk `make demo` (the study on the built-in data) runs end to end and leaves every artifact with sane
content; the demo's SparK and scratch runs get the same config, budget and images in the same order."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from frameworks import require

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_shrunk_demo_produces_the_table_and_the_plots(tmp_path):
    require("detectron2")
    require("mmdet")
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "tools/demo.py", "--out", str(out), "--num-unlabeled", "64", "--num-train", "16",
         "--num-val", "8", "--pretrain-epochs", "2", "--finetune-iters", "3"],
        cwd=ROOT, capture_output=True, timeout=1200, env={**os.environ, "PYTHONPATH": str(ROOT)})
    stdout = proc.stdout.decode()  # bytes: text mode would turn carriage returns into newlines
    assert proc.returncode == 0, (stdout + proc.stderr.decode())[-4000:]
    assert "=== SparK pretraining:" in stdout and "done in" in stdout
    # readable in a log file: plain lines only, each stage with its wall time and the time left
    assert "\r" not in stdout
    ends = [line for line in stdout.splitlines() if line.startswith("=== ") and " s (study " in line]
    assert len(ends) == 5 and all(" left)" in line for line in ends), ends  # data, pretrain, convert, 2 pairs
    assert ends[-1].endswith("about 0:00:00 left)")
    report = json.loads((out / "results.json").read_text())
    combos = {(r["framework"], r["init"]) for r in report["results"]}
    assert combos == {(fw, init) for fw in ("detectron2", "mmdet") for init in ("spark", "scratch")}
    for row in report["results"]:
        for key in ("box_AP", "box_AP50", "mask_AP", "mask_AP50"):
            assert 0.0 <= row[key] <= 100.0 and not math.isnan(row[key])
    assert [(d["framework"], d["a"], d["b"]) for d in report["paired_differences"]] == [
        ("detectron2", "spark", "scratch"), ("mmdet", "spark", "scratch")]
    means, differences = _markdown_tables((out / "results.md").read_text())
    assert len(means) == 4
    for cells in means:  # framework, protocol, init, seeds, then six numbers
        assert cells[1] == "frozen" and len(cells) == 10 and all(float(c) >= 0 for c in cells[4:])
    assert [cells[0] for cells in differences] == ["detectron2", "mmdet"]
    for cells in differences:  # framework, protocol, pair, seeds, then "SparK - scratch (seeds ahead/seeds)" per metric
        assert cells[2] == "spark − scratch"
        assert all(c.endswith("/1)") and math.isfinite(float(c.split()[0])) for c in cells[4:])
    for name in ("ap.png", "pretrain_loss.png", "reconstruction.png"):
        with Image.open(out / name) as img:
            assert img.size[0] > 100 and img.size[1] > 100


def _mmdet_run(tmp_path: Path, log: str) -> Path:
    """An MMDetection work dir as its runner leaves it after a validation without COCO AP rows."""
    stamp = tmp_path / "20261202_012936"
    (stamp / "vis_data").mkdir(parents=True)
    (stamp / "vis_data" / "scalars.json").write_text(json.dumps({"loss": 2.1, "iter": 400, "step": 400}) + "\n")
    (stamp / "20261202_012936.log").write_text(log)
    return tmp_path


def test_an_mmdet_run_without_detections_scores_zero_ap(tmp_path):
    from spark_det.study.report import METRICS, mmdet_results

    work_dir = _mmdet_run(tmp_path, "mmengine - ERROR - coco_metric.py - compute_metrics - 465 - The testing "
                                    "results of the whole dataset is empty.\n")
    assert mmdet_results(work_dir) == dict.fromkeys(METRICS, 0.0)
    assert mmdet_results(work_dir, masks=False) == {"box_AP": 0.0, "box_AP50": 0.0, "box_AP75": 0.0}


def test_an_mmdet_run_that_never_evaluated_is_an_error_not_a_zero(tmp_path):
    from spark_det.errors import SparkDetError
    from spark_det.study.report import mmdet_results

    with pytest.raises(SparkDetError, match="no COCO evaluation"):
        mmdet_results(_mmdet_run(tmp_path, "mmengine - INFO - Iter(train) [10/400]\n"))


def _markdown_tables(text: str) -> list[list[list[str]]]:
    """Body rows (cells stripped) of each markdown table in `text`, in order."""
    tables, rows = [], None
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if rows is None:
                rows = []  # header row
            elif not line.startswith("|---"):
                rows.append([c.strip() for c in line.split("|")[1:-1]])
        elif rows is not None:
            tables.append(rows)
            rows = None
    return tables


@pytest.fixture(scope="module")
def demo_pairs(tmp_path_factory):
    """The demo's SparK and scratch fine-tune commands for each framework (the study's, with the demo's
    settings), on a tiny data set."""
    require("detectron2")
    require("mmdet")
    from spark_det.demo.pipeline import DemoSettings, study_settings
    from spark_det.demo.synthetic import make_dataset
    from spark_det.study.pipeline import Study, repo_root

    folder = tmp_path_factory.mktemp("pairs")
    data = make_dataset(folder / "data", num_train=12, num_val=2, num_unlabeled=4, image_size=(64, 64), seed=0)
    settings = DemoSettings(output=str(folder / "demo"), finetune_iters=30, finetune_batch=4, seeds=[3])
    study = Study(study_settings(settings, data, repo_root()))
    weights = {("spark", "detectron2"): folder / "r18_spark.pkl", ("spark", "mmdet"): folder / "r18_spark_mmdet.pth",
               ("scratch", "detectron2"): None, ("scratch", "mmdet"): None}
    return {fw: [cmd[4:] for _, cmd in study.commands("frozen", 3, fw, weights)] for fw in ("detectron2", "mmdet")}


def test_only_the_frozen_protocol_changes_mmdetections_lr_and_residual_init(tmp_path):
    """The longer benchmark (full fine-tuning) keeps the config's lr and init, as it was measured with."""
    from spark_det.study.finetune import FROZEN_MMDET_LR, CocoFiles, Recipe, finetune_command

    data = CocoFiles(*(tmp_path / k for k in ("train_json", "train_images", "val_json", "val_images")))
    frozen = [f"optim_wrapper.optimizer.lr={FROZEN_MMDET_LR}", "model.backbone.zero_init_residual=False"]
    for protocol, expected in (("frozen", frozen), ("full", [])):
        recipe = Recipe(depth=18, protocol=protocol, iters=500, batch=2, image_size=96, num_classes=1)
        for weights in (tmp_path / "w.pth", None):
            cmd = finetune_command("mmdet", weights, 0, recipe, data, tmp_path / "run", tmp_path)
            assert [c for c in map(str, cmd) if c.startswith(("optim_wrapper.", "model.backbone.zero"))] == expected


def _detectron2_batches(cfg, batches=3):
    from itertools import islice

    from detectron2.data import build_detection_train_loader
    from detectron2.utils.env import seed_all_rng

    seed_all_rng(cfg.SEED)  # what default_setup does before the trainer builds its loader
    loader = build_detection_train_loader(cfg)
    return [[(d["image_id"], d["image"]) for d in batch] for batch in islice(loader, batches)]


def _same_batches(a, b) -> bool:
    return all(len(x) == len(y) and all(i == j and _torch_equal(u, v) for (i, u), (j, v) in zip(x, y))
               for x, y in zip(a, b))


def _torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


def test_detectron2_spark_and_scratch_get_the_same_budget_and_the_same_images_in_the_same_order(demo_pairs):
    require("detectron2")
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    from spark_det.d2.train_net import build_config, build_parser

    args = [build_parser().parse_args(list(map(str, argv))) for argv in demo_pairs["detectron2"]]
    for name, json_file, image_root in args[0].register_coco:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        register_coco_instances(name, {}, json_file, image_root)
    spark, scratch = (build_config(a) for a in args)
    assert spark.MODEL.WEIGHTS.endswith("r18_spark.pkl") and scratch.MODEL.WEIGHTS == ""
    a, b = _flat(spark), _flat(scratch)
    differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert differ == {"MODEL.WEIGHTS"}, differ  # iterations, batch, lr schedule, seed, augmentation: all equal
    assert spark.SOLVER.MAX_ITER == 30 and spark.SEED == 3
    assert spark.MODEL.ROI_HEADS.NUM_CLASSES == 6  # the data's own classes (the fixture's six shapes), not the file's
    first = _detectron2_batches(spark)
    assert _same_batches(first, _detectron2_batches(scratch))
    assert not _same_batches(first, _detectron2_batches(_reseeded(scratch, 4)))  # the comparison can fail


def _reseeded(cfg, seed):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SEED = seed
    return cfg


def _flat(node, prefix=""):
    out = {}
    for key, value in node.items():
        if hasattr(value, "items"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_mmdet_spark_and_scratch_get_the_same_budget_and_the_same_images_in_the_same_order(demo_pairs):
    require("mmdet")
    from mmdet.utils import register_all_modules
    from mmengine.runner import Runner, set_random_seed

    from spark_det.mmdet.train import build_config, build_parser
    from spark_det.study.finetune import FROZEN_MMDET_LR

    register_all_modules()
    spark, scratch = (build_config(build_parser().parse_args(list(map(str, argv)))) for argv in demo_pairs["mmdet"])
    assert spark.model.backbone.init_cfg.checkpoint.endswith("r18_spark_mmdet.pth")
    assert scratch.model.backbone.init_cfg is None
    a, b = _flat(spark.to_dict()), _flat(scratch.to_dict())
    differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert differ <= {"work_dir", "model.backbone.init_cfg", "model.backbone.init_cfg.type",
                      "model.backbone.init_cfg.checkpoint"}, differ
    assert spark.train_cfg.max_iters == 30 and spark.randomness.seed == 3
    assert spark.optim_wrapper.optimizer.lr == scratch.optim_wrapper.optimizer.lr == FROZEN_MMDET_LR

    def batches(cfg, seed, n=3):
        set_random_seed(seed)  # what the Runner does with cfg.randomness.seed before building its loaders
        loader = Runner.build_dataloader(cfg.train_dataloader, seed=seed)
        out = []
        for batch, _ in zip(loader, range(n)):
            out.append([(s.img_id, x) for s, x in zip(batch["data_samples"], batch["inputs"])])
        return out

    first = batches(spark, spark.randomness.seed)
    assert _same_batches(first, batches(scratch, scratch.randomness.seed))
    assert not _same_batches(first, batches(scratch, 4))  # the comparison can fail


def test_mmdets_frozen_random_baseline_is_the_whole_resnet_as_in_detectron2(demo_pairs):
    """MMDetection's default zero-initialises the last norm of every residual branch; frozen, that random
    network would be its stem and shortcut convolutions only. The demo's scratch backbone keeps every branch."""
    require("mmdet")
    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from spark_det.mmdet.train import build_config, build_parser

    register_all_modules()
    scratch = build_config(build_parser().parse_args(list(map(str, demo_pairs["mmdet"][1]))))

    def branch_end_norms(backbone_cfg):
        torch.manual_seed(0)
        backbone = MODELS.build(backbone_cfg)
        backbone.init_weights()
        return [block.norm2.weight for name in backbone.res_layers for block in getattr(backbone, name)]

    assert all(bool((w != 0).all()) for w in branch_end_norms(scratch.model.backbone))
    default = {**scratch.model.backbone, "zero_init_residual": True}  # MMDetection's own default
    assert all(bool((w == 0).all()) for w in branch_end_norms(default))  # the check can fail
