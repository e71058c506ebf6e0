"""`spark-det study`: bad input stops before anything runs; the report's numbers are the runs' own; a killed
study resumes without redoing finished runs; the nuclei set is valid COCO."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from frameworks import require

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """12 train / 4 val labeled and 24 unlabeled 64 px synthetic scenes (one class, as the demo's)."""
    from dataclasses import replace

    from spark_det.demo.pipeline import DEMO_SCENE
    from spark_det.demo.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("shapes"), 12, 4, 24, seed=0,
                        scene=replace(DEMO_SCENE, image_size=(64, 64)))


def _study_args(data: dict, out: Path, *extra: str) -> list[str]:
    return ["study", "--train-json", str(data["train_json"]), "--val-json", str(data["val_json"]),
            "--images", str(data["train_images"]), "--val-images", str(data["val_images"]),
            "--unlabeled", str(data["unlabeled"]), "--model", "resnet18", "--output", str(out), *extra]


def _run_cli(args: list[str], capsys) -> tuple[int, str]:
    from spark_det.cli import main

    code = main(args)
    return code, capsys.readouterr().err


def _broken_copy(data: dict, folder: Path, edit) -> dict:
    """``data`` with a train JSON that ``edit`` changed (or replaced, when it returns a string)."""
    coco = json.loads(Path(data["train_json"]).read_text())
    edited = edit(coco)
    path = folder / "train.json"
    path.write_text(edited if isinstance(edited, str) else json.dumps(coco))
    return {**data, "train_json": path}


def _drop(key):
    def edit(coco):
        coco[key] = []
    return edit


def _rename_first_image(coco):
    coco["images"][0]["file_name"] = "not_there.png"


@pytest.mark.parametrize("edit, code, message", [
    (lambda coco: "{ not json", 1, "does not parse"),
    (_drop("categories"), 2, "has no categories"),
    (_drop("annotations"), 2, "has no annotations"),
    (_rename_first_image, 2, "1 of the 12 images"),
])
def test_a_bad_json_stops_the_study_before_anything_is_written(shapes, tmp_path, capsys, edit, code, message):
    data = _broken_copy(shapes, tmp_path, edit)
    out = tmp_path / "study"
    returned, err = _run_cli(_study_args(data, out), capsys)
    assert returned == code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not out.exists()


def test_an_init_file_of_another_model_stops_the_study(shapes, tmp_path, capsys):
    import timm
    import torch

    wrong = tmp_path / "resnet34_supervised.pth"
    torch.save(timm.create_model("resnet34").state_dict(), wrong)
    out = tmp_path / "study"
    returned, err = _run_cli(_study_args(shapes, out, "--init", "scratch", f"timm:{wrong}"), capsys)
    assert returned == 1
    assert err.startswith("error: --init timm:") and "does not fit --model resnet18" in err and err.count("\n") == 1
    assert not out.exists()


def test_a_framework_that_is_not_installed_stops_the_study(shapes, tmp_path, capsys, monkeypatch):
    from spark_det.study import inits

    monkeypatch.setitem(inits.FRAMEWORK_MODULES, "mmdet", "mmdet_is_not_installed_here")
    out = tmp_path / "study"
    returned, err = _run_cli(_study_args(shapes, out, "--frameworks", "mmdet"), capsys)
    assert returned == 2
    assert err == "error: mmdet is not installed in this environment: install it (README, setup) or leave it out " \
                  "of --frameworks\n"
    assert not out.exists()


def test_inits_are_parsed_and_checked():
    from spark_det.errors import ConfigError
    from spark_det.study.inits import parse_init, parse_inits

    assert parse_init("timm:/w/resnet50_a1_in1k.pth").label == "timm-resnet50_a1_in1k"
    assert [i.label for i in parse_inits(["spark", "scratch"])] == ["spark", "scratch"]
    for bad in (["spark"], ["spark", "spark"], ["spark", "imagenet"], ["spark", "timm"], ["scratch", "spark:x.pth"]):
        with pytest.raises(ConfigError):
            parse_inits(bad)


def _row(fw, init, seed, ap, protocol="frozen"):
    return {"framework": fw, "protocol": protocol, "init": init, "seed": seed,
            **{m: ap for m in ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75")}}


def test_every_pair_of_inits_is_compared_seed_by_seed():
    from spark_det.study.report import paired_differences

    results = [_row("mmdet", "spark", 0, 5.0), _row("mmdet", "scratch", 0, 3.0), _row("mmdet", "timm-r", 0, 4.0),
               _row("mmdet", "spark", 1, 2.0), _row("mmdet", "scratch", 1, 3.0), _row("mmdet", "timm-r", 1, 1.0),
               _row("mmdet", "scratch", 2, 9.0)]  # no other init with seed 2: left out of the pairs
    diffs = {(d["a"], d["b"]): d for d in paired_differences(results, ["spark", "scratch", "timm-r"])}
    assert set(diffs) == {("spark", "scratch"), ("spark", "timm-r"), ("scratch", "timm-r")}
    box = diffs["spark", "scratch"]["box_AP"]
    assert diffs["spark", "scratch"]["seeds"] == [0, 1] and box["a_ahead"] == 1
    assert box["mean"] == pytest.approx(0.5) and box["std"] == pytest.approx(math.sqrt(4.5))  # diffs +2, -1
    assert box["beyond_noise"] is False
    assert diffs["spark", "timm-r"]["mask_AP"]["mean"] == pytest.approx(1.0)  # +1, +1: no spread
    assert diffs["spark", "timm-r"]["mask_AP"]["beyond_noise"] is True


def test_the_verdict_says_when_a_difference_is_within_seed_noise():
    from spark_det.study.report import beyond_noise, paired_differences, verdict

    # a paired t-test at 95%: t = mean / (std / sqrt(n)) against 4.30 for three seeds
    assert beyond_noise(3.0, 1.0, 3) is True and beyond_noise(2.0, 1.0, 3) is False  # t = 5.2 and 3.5
    assert beyond_noise(-3.0, 1.0, 3) is True and beyond_noise(5.0, 0.0, 1) is None
    noisy = [_row("d2", "spark", s, ap) for s, ap in enumerate((10.0, 6.0, 12.0))]
    noisy += [_row("d2", "scratch", s, ap) for s, ap in enumerate((9.0, 8.0, 10.0))]
    text = verdict(paired_differences(noisy, ["spark", "scratch"]), masks=True)
    assert "spark minus scratch +0.33 ± 2.08 mask AP, within seed noise (2/3 seeds favour spark)" in text
    clear = [_row("d2", "spark", s, 20.0 + s) for s in range(3)] + [_row("d2", "scratch", s, 10.0) for s in range(3)]
    text = verdict(paired_differences(clear, ["spark", "scratch"]), masks=True)
    assert "spark is ahead beyond seed noise (3/3 seeds favour spark)" in text
    single = verdict(paired_differences(clear[:1] + clear[3:4], ["spark", "scratch"]), masks=False)
    assert "rests on one seed" in single and "box AP" in single


def test_defaults_derived_from_the_data():
    from spark_det.study.pipeline import default_image_size, default_iters

    assert default_iters(28, 2) == 168 and default_iters(4, 2) == 100 and default_iters(300, 2) == 1800
    assert default_image_size(128) == 128 and default_image_size(500) == 512 and default_image_size(3000) == 800
    assert default_image_size(20) == 64


def test_the_nuclei_crops_are_valid_coco_with_the_labels_masks():
    """The real-data set's conversion, on a label image whose instances are known."""
    from pycocotools import mask as mask_utils

    from spark_det.demo.nuclei import coco_annotations

    labels = np.zeros((32, 32), np.uint16)
    labels[2:10, 3:9] = 7  # 8 x 6 = 48 px
    labels[20:30, 20:31] = 9  # 10 x 11 = 110 px
    labels[31, 0:3] = 4  # a 3 px sliver the crop border cut: dropped
    anns = coco_annotations(labels, image_id=5, first_id=11, min_area=16)
    assert [(a["id"], a["area"], a["bbox"]) for a in anns] == [(11, 48, [3.0, 2.0, 6.0, 8.0]),
                                                                (12, 110, [20.0, 20.0, 11.0, 10.0])]
    decoded = mask_utils.decode({**anns[1]["segmentation"], "counts": anns[1]["segmentation"]["counts"].encode()})
    assert (decoded.astype(bool) == (labels == 9)).all()
    json.dumps(anns)  # RLE counts are text, as COCO JSON needs


def _flat_metrics(fw: str, run_dir: Path) -> dict:
    """The final AP a run's own metrics file holds (0-100), read independently of the report code."""
    if fw == "detectron2":
        rows = [json.loads(line) for line in (run_dir / "metrics.json").read_text().splitlines() if line.strip()]
        final = [r for r in rows if "bbox/AP" in r][-1]
        return {"box_AP": final["bbox/AP"], "box_AP75": final["bbox/AP75"], "mask_AP50": final["segm/AP50"]}
    rows = [json.loads(line) for f in run_dir.glob("*/vis_data/scalars.json") for line in f.read_text().splitlines()]
    final = [r for r in rows if "coco/bbox_mAP" in r][-1]
    return {"box_AP": 100 * final["coco/bbox_mAP"], "box_AP75": 100 * final["coco/bbox_mAP_75"],
            "mask_AP50": 100 * final["coco/segm_mAP_50"]}


@pytest.mark.slow
def test_a_killed_study_of_three_inits_resumes_and_reports_the_runs_own_metrics(shapes, tmp_path):
    require("detectron2")
    require("mmdet")
    import timm
    import torch

    supervised = tmp_path / "resnet18_supervised.pth"
    torch.manual_seed(1)
    torch.save(timm.create_model("resnet18").state_dict(), supervised)  # a timm checkpoint "the user has"
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "spark_det", *_study_args(
        shapes, out, "--init", "spark", "scratch", f"timm:{supervised}", "--num-gpus", "0", "--iters", "3",
        "--image-size", "64", "--pretrain-recipe", "pretrain/resnet18_cpu_demo.yaml",
        "--pretrain-set", "epochs=1", "batch_size=8", "input_size=[64,64]", "decoder_width=64")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "first.log"
    with open(log, "w") as f:  # a file, not a pipe: an undrained pipe would block the study
        first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    finished_group = "=== Mask R-CNN detectron2, frozen: spark, scratch, timm-resnet18_supervised (seed 0): "
    try:
        for _ in range(1200):  # kill the whole study (its fine-tunes too) once the Detectron2 runs have finished
            if finished_group in log.read_text() or first.poll() is not None:
                break
            time.sleep(0.5)
        assert first.poll() is None, log.read_text()[-3000:]
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        first.wait()
    assert not (out / "results.md").exists()
    d2_runs = sorted((out / "finetune" / "frozen").glob("detectron2_*/result.json"))
    assert len(d2_runs) == 3
    stamps = {p: p.stat().st_mtime_ns for p in d2_runs}

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert "SparK pretraining: finished before" in second.stdout
    assert "Mask R-CNN detectron2, frozen: spark, scratch, timm-resnet18_supervised (seed 0): every run " \
           "finished before, skipped" in second.stdout
    assert "$ " + sys.executable + " -m spark_det train-det2" not in second.stdout  # not one Detectron2 run redone
    assert second.stdout.count(" -m spark_det train-mmdet ") == 3
    assert {p: p.stat().st_mtime_ns for p in d2_runs} == stamps

    report = json.loads((out / "results.json").read_text())
    rows = {(r["framework"], r["init"]): r for r in report["results"]}
    assert set(rows) == {(fw, init) for fw in ("detectron2", "mmdet")
                         for init in ("spark", "scratch", "timm-resnet18_supervised")}
    for (fw, init), row in rows.items():
        own = _flat_metrics(fw, out / "finetune" / "frozen" / f"{fw}_{init}_seed0")
        for key, value in own.items():
            assert row[key] == pytest.approx(0.0 if math.isnan(value) else value, abs=1e-9), (fw, init, key)
    pairs = {(d["framework"], d["a"], d["b"]) for d in report["paired_differences"]}
    assert len(pairs) == 6  # three pairs in each framework
    for d in report["paired_differences"]:
        expected = rows[d["framework"], d["a"]]["box_AP"] - rows[d["framework"], d["b"]]["box_AP"]
        assert d["box_AP"]["mean"] == pytest.approx(expected)
    md = (out / "results.md").read_text()
    assert "| detectron2 | frozen | spark − timm-resnet18_supervised | 1 |" in md
    assert "rests on one seed" in report["verdict"]
    for name in ("ap.png", "pretrain_loss.png", "reconstruction.png"):
        assert (out / name).stat().st_size > 1000


@pytest.mark.timeout(120)
def test_stages_run_at_most_max_parallel_jobs_at_once_and_return_when_all_are_done(tmp_path):
    from spark_det.study.stages import Job, Stages

    code = ("import sys, time; t0 = time.time(); time.sleep(0.5); "
            "open(sys.argv[1], 'w').write(f'{t0} {time.time()}')")
    jobs = [Job(f"job {i}", [sys.executable, "-c", code, tmp_path / f"{i}.times"], log=tmp_path / f"{i}.log")
            for i in range(5)]
    stages = Stages({"three": 1.0, "five": 1.0})
    stages.run("three", jobs[:3])  # all at once
    stages.run("five", jobs, max_parallel=2)
    spans = [tuple(map(float, (tmp_path / f"{i}.times").read_text().split())) for i in range(5)]
    most = max(sum(start <= t < end for start, end in spans) for t, _ in spans)
    assert most == 2  # two at a time, never three
    assert set(stages.times) == {"three", "five"}


def test_a_json_without_masks_gives_faster_rcnn_in_both_frameworks(shapes, tmp_path):
    """The study's commands for box-only data build detectors without a mask branch, scored on boxes."""
    from spark_det.study.finetune import CocoFiles, Recipe, finetune_command
    from spark_det.study.pipeline import repo_root

    boxes = {}
    for split in ("train", "val"):
        coco = json.loads(Path(shapes[f"{split}_json"]).read_text())
        for ann in coco["annotations"]:
            del ann["segmentation"]
        boxes[split] = tmp_path / f"{split}.json"
        boxes[split].write_text(json.dumps(coco))
    data = CocoFiles(boxes["train"], shapes["train_images"], boxes["val"], shapes["val_images"])
    recipe = Recipe(depth=18, protocol="frozen", iters=10, batch=2, image_size=64, num_classes=1, masks=False)

    def argv(fw):
        return [str(c) for c in finetune_command(fw, None, 0, recipe, data, tmp_path / fw, repo_root())[4:]]

    require("detectron2")
    from detectron2.modeling import build_model

    from spark_det.d2.train_net import build_config as d2_config
    from spark_det.d2.train_net import build_parser as d2_parser

    cfg = d2_config(d2_parser().parse_args(argv("detectron2")))
    assert cfg.MODEL.MASK_ON is False and cfg.INPUT.MIN_SIZE_TEST == 64
    assert not build_model(cfg).roi_heads.mask_on

    require("mmdet")
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from spark_det.mmdet.train import build_config as mm_config
    from spark_det.mmdet.train import build_parser as mm_parser

    register_all_modules()
    cfg = mm_config(mm_parser().parse_args(argv("mmdet")))
    assert cfg.val_evaluator.metric == "bbox" and cfg.test_evaluator.metric == "bbox"
    assert not cfg.train_dataloader.dataset.pipeline[1].with_mask
    model = MODELS.build(cfg.model)
    assert model.with_roi_head and not model.roi_head.with_mask
