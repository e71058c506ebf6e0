"""The demo's SparK-vs-scratch fine-tune pair on given weights and data, with config overrides: how the
demo's detection settings were chosen (docs/results/demo-seeds.md, docs/results/demo-tuning.md).

    # a finished demo's weights and data; the demo's own pair, then one with Detectron2's lr halved
    python benchmarks/demo_pair.py --demo outputs/demo --framework detectron2 --seed 0
    python benchmarks/demo_pair.py --demo outputs/demo --framework detectron2 --seed 0 -- SOLVER.BASE_LR 0.001
    # MMDetection overrides are --cfg-options items
    python benchmarks/demo_pair.py --demo outputs/demo --framework mmdet --seed 1 -- optim_wrapper.optimizer.lr=0.002

The two runs are exactly the demo's commands (``spark_det.study.finetune``), the same overrides appended
to both, side by side on one core each. Prints one JSON line (AP of each run, SparK minus scratch, the
median seconds per iteration) and appends it to ``--json``. The classes come from the data (``--data``:
a folder as ``spark-det make-data`` writes it), as in the demo.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spark_det.demo.pipeline import FINETUNE_SIZE, INITS, DemoSettings  # noqa: E402
from spark_det.study.finetune import CocoFiles, Recipe, finetune_command  # noqa: E402
from spark_det.study.report import METRICS, detectron2_results, mmdet_results  # noqa: E402
from spark_det.study.stages import Job, Stages  # noqa: E402

WEIGHTS = {"detectron2": "spark_resnet18.pkl", "mmdet": "spark_resnet18_mmdet.pth"}  # the study's names


def seconds_per_iteration(run_dir: Path, framework: str) -> float:
    """Median training step time the framework logged (Detectron2 metrics.json, MMEngine's log)."""
    if framework == "detectron2":
        rows = [json.loads(line) for line in (run_dir / "metrics.json").read_text().splitlines() if line.strip()]
        times = [r["time"] for r in rows if "time" in r]
    else:
        log = "\n".join(p.read_text() for p in run_dir.glob("*/*.log"))
        times = [float(t) for t in re.findall(r"Iter\(train\).*?\s time: ([0-9.]+)", log)]
    return statistics.median(times) if times else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", type=Path, required=True, help="a demo's output folder (its data/ and weights/)")
    p.add_argument("--data", type=Path, help="labeled data folder instead of the demo's data/")
    p.add_argument("--weights", type=Path,
                   help="folder with spark_resnet18.pkl / spark_resnet18_mmdet.pth instead of the demo's")
    p.add_argument("--framework", choices=sorted(WEIGHTS), required=True)
    p.add_argument("--seed", type=int, default=0, help="fine-tuning seed (both runs)")
    p.add_argument("--iters", type=int, default=DemoSettings.finetune_iters)
    p.add_argument("--batch", type=int, default=DemoSettings.finetune_batch)
    p.add_argument("--protocol", default=DemoSettings.protocol)
    p.add_argument("--output", type=Path, default=ROOT / "outputs" / "demo_pair", help="run folders go under it")
    p.add_argument("--json", type=Path, help="append the result line to this file")
    p.add_argument("overrides", nargs="*", help="after --: config overrides appended to both commands")
    a = p.parse_args()

    data_root = (a.data or a.demo / "data").resolve()
    data = CocoFiles(data_root / "annotations" / "instances_train.json", data_root / "train",
                     data_root / "annotations" / "instances_val.json", data_root / "val")
    weights = ((a.weights or a.demo / "weights") / WEIGHTS[a.framework]).resolve()
    classes = len(json.loads(data.train_json.read_text())["categories"])
    recipe = Recipe(depth=18, protocol=a.protocol, iters=a.iters, batch=a.batch, image_size=FINETUNE_SIZE,
                    num_classes=classes)
    jobs = []
    for init in INITS:
        run_dir = (a.output / f"{a.framework}_{init}_seed{a.seed}").resolve()
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = finetune_command(a.framework, weights if init == "spark" else None, a.seed, recipe, data, run_dir,
                               ROOT) + a.overrides
        jobs.append(Job(f"{a.framework} {init}", cmd, log=run_dir / "train.log", total_iters=a.iters))
    stages = Stages({"pair": 0.0}, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
    stages.run("pair", jobs, threads_per_job=max(1, (os.cpu_count() or 2) // 2))

    read = detectron2_results if a.framework == "detectron2" else mmdet_results
    runs = {init: read(job.log.parent) for init, job in zip(INITS, jobs)}
    line = {"framework": a.framework, "seed": a.seed, "iters": a.iters, "batch": a.batch, "protocol": a.protocol,
            "data": str(data_root), "weights": str(weights), "overrides": a.overrides,
            **{init: {k: round(v, 2) for k, v in m.items()} for init, m in runs.items()},
            "spark_minus_scratch": {k: round(runs["spark"][k] - runs["scratch"][k], 2) for k in METRICS},
            "s_per_iter": round(seconds_per_iteration(jobs[0].log.parent, a.framework), 3)}
    print(json.dumps(line))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
