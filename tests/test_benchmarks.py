"""The benchmark scripts run as RESULTS.md runs them (tiny sizes): every figure they print is there."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from frameworks import require

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=600):
    done = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_pretrain_step_times_both_paths_and_counts_their_saved_activations_then_plots(tmp_path):
    results = tmp_path / "b2.json"
    out = run("benchmarks/pretrain_step.py", "--models", "resnet18", "--batch-size", "2", "--input-size", "64",
              "--dtypes", "fp32", "--iters", "1", "--warmup", "0", "--decoder-width", "64",
              "--peer", "mmpretrain", "--json", results)
    assert "# peer skipped for resnet18: MMPretrain has no SparK config for resnet18" in out
    rows = json.loads(results.read_text())["results"]
    assert [(r["part"], r["dtype"]) for r in rows] == [("encoder", "fp32"), ("step", "fp32")]
    for row in rows:
        assert row["speedup"] > 0 and row["loss_rel_diff"] < 1e-5
        assert row["fast_saved_activations_mib"] > 0 and row["reference_saved_activations_mib"] > 0
    plot = tmp_path / "plot.png"
    assert "wrote" in run("benchmarks/plot_throughput.py", results, "-o", plot)
    assert plot.stat().st_size > 10_000


def test_data_pipeline_reports_images_per_worker_and_workers_per_gpu(tmp_path):
    results = tmp_path / "data.json"
    run("benchmarks/data_pipeline.py", "--only-throughput", "--workdir", tmp_path, "--samples", "4", "--rounds", "1",
        "--grain", "26", "--gpu-images-per-s", "800", "--json", results)
    figures = json.loads(results.read_text())
    assert figures["jpeg_kb_median"] > 80  # grain makes photograph-sized files
    slowest = min(figures["images_per_s_per_worker"]["folder"], figures["images_per_s_per_worker"]["shards"])
    assert figures["workers_per_gpu"]["800.0"] == round(800 / slowest, 1)


@pytest.mark.slow
def test_demo_pair_runs_the_demos_two_fine_tunes_with_the_same_overrides_and_reports_both(tmp_path):
    require("detectron2")
    import timm
    import torch

    demo = tmp_path / "demo"
    run("-m", "spark_det", "make-data", "--num-train", "4", "--num-val", "2", "--single-class", demo / "data")
    encoder = tmp_path / "encoder-resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), encoder)
    run("-m", "spark_det", "convert", encoder, "--to", "detectron2",
        "--output", demo / "weights" / "spark_resnet18.pkl")  # the name the study gives the demo's weights
    results = tmp_path / "pairs.jsonl"
    out = run("benchmarks/demo_pair.py", "--demo", demo, "--framework", "detectron2", "--seed", "2", "--iters", "6",
              "--output", tmp_path / "runs", "--json", results, "--", "SOLVER.BASE_LR", "0.001")
    line = json.loads(results.read_text())
    assert json.loads(out.splitlines()[-1]) == line
    assert line["overrides"] == ["SOLVER.BASE_LR", "0.001"] and line["iters"] == 6
    assert line["s_per_iter"] > 0  # Detectron2 times iterations from the fourth on
    for init in ("spark", "scratch"):
        cfg = (tmp_path / "runs" / f"detectron2_{init}_seed2" / "config.yaml").read_text()
        assert "BASE_LR: 0.001" in cfg and "NUM_CLASSES: 1" in cfg and "SEED: 2" in cfg
        assert 0.0 <= line[init]["box_AP"] <= 100.0
    difference = line["spark"]["mask_AP"] - line["scratch"]["mask_AP"]  # of the rounded values
    assert abs(line["spark_minus_scratch"]["mask_AP"] - difference) <= 0.011


def test_leak_audit_benchmark_prints_the_cost_per_checkpoint(tmp_path):
    results = tmp_path / "audit.json"
    out = run("benchmarks/leak_audit.py", "--models", "resnet18", "--repeats", "1", "--json", results)
    row = json.loads(results.read_text())["results"][0]
    assert row["model"] == "resnet18" and row["audit_s"] > 0 and row["probe_s"] > 0
    assert f"| resnet18 | {row['params_m']} |" in out
