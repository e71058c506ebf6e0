"""The benchmark scripts run as RESULTS.md runs them (tiny sizes): every figure they print is there."""

import json
import subprocess
import sys
from pathlib import Path

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
