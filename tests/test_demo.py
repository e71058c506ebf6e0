"""A shrunk `make demo` runs end to end and leaves every artifact with sane content."""

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
        cwd=ROOT, capture_output=True, text=True, timeout=1200, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "=== SparK pretraining:" in proc.stdout and "done in" in proc.stdout
    report = json.loads((out / "results.json").read_text())
    combos = {(r["framework"], r["init"]) for r in report["results"]}
    assert combos == {(fw, init) for fw in ("detectron2", "mmdet") for init in ("spark", "scratch")}
    for row in report["results"]:
        for key in ("box_AP", "box_AP50", "mask_AP", "mask_AP50"):
            assert 0.0 <= row[key] <= 100.0 and not math.isnan(row[key])
    assert set(report["paired_differences"]) == {"detectron2", "mmdet"}
    means, differences = _markdown_tables((out / "results.md").read_text())
    assert len(means) == 4
    for cells in means:  # framework, init, seeds, then four numbers
        assert all(float(c) >= 0 for c in cells[3:])
    assert [cells[0] for cells in differences] == ["detectron2", "mmdet"]
    for cells in differences:  # framework, seeds, then "SparK - scratch (seeds ahead/seeds)" per metric
        assert all(c.endswith("/1)") and math.isfinite(float(c.split()[0])) for c in cells[2:])
    for name in ("ap.png", "pretrain_loss.png", "reconstruction.png"):
        with Image.open(out / name) as img:
            assert img.size[0] > 100 and img.size[1] > 100


def test_spark_is_compared_with_scratch_seed_by_seed():
    from spark_det.demo.report import paired_differences

    def run(fw, init, seed, ap):
        return {"framework": fw, "init": init, "seed": seed, "box_AP": ap, "box_AP50": ap, "mask_AP": ap,
                "mask_AP50": ap}

    results = [run("mmdet", "spark", 0, 5.0), run("mmdet", "scratch", 0, 3.0),
               run("mmdet", "spark", 1, 2.0), run("mmdet", "scratch", 1, 3.0),
               run("mmdet", "scratch", 2, 9.0),  # no SparK run with seed 2: left out of the pairs
               run("detectron2", "spark", 0, 1.0)]  # no pair at all: no entry
    differences = paired_differences(results)
    assert set(differences) == {"mmdet"}
    box = differences["mmdet"]["box_AP"]
    assert differences["mmdet"]["seeds"] == [0, 1] and box["spark_ahead"] == 1
    assert box["mean"] == pytest.approx(0.5) and box["std"] == pytest.approx(math.sqrt(4.5))  # diffs +2, -1


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
