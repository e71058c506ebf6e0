"""benchmarks/gpu_check.py: its CPU dry run runs every stage (so the GPU check cannot rot unseen), and
the largest-batch search finds the boundary."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from pretrain_step import largest_batch  # noqa: E402


def test_largest_batch_doubles_then_bisects_to_the_granularity():
    probes = []

    def fits(batch):
        probes.append(batch)
        return batch <= 300

    good, bad = largest_batch(fits, start=128, limit=4096, granularity=32)
    assert good <= 300 < bad and bad - good <= 32
    assert probes[:3] == [128, 256, 512]  # doubling until the first failure
    assert largest_batch(lambda b: True, start=2, limit=8, granularity=1) == (8, None)  # the limit fits
    assert largest_batch(lambda b: False, start=128, limit=4096, granularity=32) == (0, 32)  # none fits


def test_the_cpu_dry_run_runs_every_stage_and_writes_every_figure(tmp_path):
    out = tmp_path / "gpu_check"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--tiny", "--output",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + log[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {name: s["status"] for name, s in summary["stages"].items()} == {
        "tests": "ok", "largest_batch": "ok", "data": "ok", "step": "ok"}

    tests = json.loads((out / "tests.json").read_text())
    names = {t["name"].split("[")[0] for t in tests["tests"]}
    assert tests["counts"]["failed"] == tests["counts"]["error"] == 0 and tests["counts"]["passed"] >= 9
    assert {"test_fast_path_equals_the_reference_in_float64_features_loss_gradients_running_stats",
            "test_twenty_ddp_steps_with_nccl_and_sync_batchnorm_on_one_gpu_match_plain_steps",
            "test_twenty_step_pretraining_on_the_device_in_bf16_eager_and_compiled"} <= names

    (row,) = json.loads((out / "step.json").read_text())["results"]
    assert row["reference_images_per_s"] > 0 and row["fast_images_per_s"] > 0 and row["loss_rel_diff"] < 1e-2
    assert row["compile_backend"] == "eager" and row["fast_compiled_images_per_s"] > 0 and row["compile_s"] > 0
    (search,) = json.loads((out / "largest_batch.json").read_text())["largest_batch"]
    assert (search["largest_batch"], search["smallest_failing_batch"]) == (8, None)  # no OOM on the CPU: the limit
    assert [p["batch"] for p in search["probes"]] == [2, 4, 8]
    data = json.loads((out / "data.json").read_text())
    assert data["loader"]["workers"] == 2
    assert data["loader"]["folder"]["images_per_s"] > 0 and data["loader"]["shards"]["images_per_s"] > 0
    assert list(summary["figures"]["workers_per_gpu"]) == [  # at each measured step rate
        f"test_resnet bf16 {impl} ({row[f'{impl}_images_per_s']:.0f} img/s)" for impl in ("fast", "fast_compiled")]

    report = (out / "summary.md").read_text()
    assert "| test_resnet | bf16 | 2 |" in report and "Largest batch that fits, test_resnet bf16 fast" in report
    assert "The pretraining loader with 2 workers" in report


def test_without_a_gpu_the_full_check_says_so_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the full check would run")
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--output", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: no CUDA GPU is visible (use --device cpu --tiny for the CPU dry run)"]
