"""The whole idea on one CPU: SparK pretraining -> weight conversion -> Mask R-CNN transfer.

    python tools/demo.py --out outputs/demo          # what `make demo` runs (~15 min on 2 cores)
    python tools/demo.py --out outputs/long --num-unlabeled 4000 --pretrain-epochs 2 \
        --finetune-iters 200 --seeds 0 1 2           # the longer benchmark in the README (~90 min)

Stages (each runs the project's own command-line tool, printed before it runs):
1. generate the synthetic COCO-format data set and a pool of unlabeled images;
2. pretrain ResNet-18 with SparK on the unlabeled pool (tools/pretrain.py);
3. convert the encoder for Detectron2 and MMDetection (tools/convert_weights.py);
4. fine-tune Mask R-CNN R18-FPN from SparK weights and from random initialisation with the same
   budget in Detectron2 (tools/train_det2.py) and MMDetection (tools/train_mmdet.py);
5. write results.md / results.json (box AP, mask AP, AP50), ap.png, pretrain_loss.png and
   reconstruction.png to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


class Stages:
    """Prints each stage with its wall time and keeps the times for the summary."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.start = time.time()

    def run(self, name: str, cmd: list[str], log: Path | None = None) -> None:
        print(f"\n=== {name}\n$ {' '.join(map(str, cmd))}", flush=True)
        t0 = time.time()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        if log is None:
            proc = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=env)
        else:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as f:
                proc = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = log.read_text()[-3000:] if log else ""
            raise SystemExit(f"stage '{name}' failed (exit {proc.returncode}){' - log ' + str(log) if log else ''}\n{tail}")
        self.times[name] = time.time() - t0
        print(f"=== {name}: {self.times[name]:.0f}s (total {time.time() - self.start:.0f}s)", flush=True)

    def timed(self, name: str, fn):
        t0 = time.time()
        result = fn()
        self.times[name] = time.time() - t0
        print(f"=== {name}: {self.times[name]:.0f}s (total {time.time() - self.start:.0f}s)", flush=True)
        return result


def _ap(value: float) -> float:
    # Detectron2 reports NaN when a model made no detection at all; COCO AP is 0 then.
    return 0.0 if math.isnan(value) else float(value)


def detectron2_results(output_dir: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines() if line.strip()]
    final = next(r for r in reversed(rows) if "bbox/AP" in r)
    return {"box_AP": _ap(final["bbox/AP"]), "box_AP50": _ap(final["bbox/AP50"]),
            "mask_AP": _ap(final["segm/AP"]), "mask_AP50": _ap(final["segm/AP50"])}


def mmdet_results(work_dir: Path) -> dict[str, float]:
    files = sorted(work_dir.glob("*/vis_data/scalars.json"))
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if "coco/bbox_mAP" in line]
    final = rows[-1]
    return {"box_AP": 100 * final["coco/bbox_mAP"], "box_AP50": 100 * final["coco/bbox_mAP_50"],
            "mask_AP": 100 * final["coco/segm_mAP"], "mask_AP50": 100 * final["coco/segm_mAP_50"]}


METRICS = ("box_AP", "box_AP50", "mask_AP", "mask_AP50")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    import numpy as np

    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)


def paired_differences(results: list[dict]) -> dict[str, dict]:
    """SparK minus scratch per framework, paired by seed: the two runs of a seed see the same images in
    the same order, so their difference is less noisy than the difference of two means."""
    out = {}
    for fw in sorted({r["framework"] for r in results}):
        by_seed = {(r["init"], r["seed"]): r for r in results if r["framework"] == fw}
        seeds = sorted(s for init, s in by_seed if init == "spark" and ("scratch", s) in by_seed)
        if not seeds:
            continue
        out[fw] = {"seeds": seeds}
        for m in METRICS:
            diffs = [by_seed["spark", s][m] - by_seed["scratch", s][m] for s in seeds]
            mu, sd = mean_std(diffs)
            out[fw][m] = {"mean": mu, "std": sd, "spark_ahead": sum(d > 0 for d in diffs)}
    return out


def write_report(out: Path, results: list[dict], times: dict[str, float], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    differences = paired_differences(results)
    (out / "results.json").write_text(json.dumps({"results": results, "paired_differences": differences,
                                                  "stage_seconds": times, "settings": vars(args)},
                                                 indent=2, default=str))
    keys = sorted({(r["framework"], r["init"]) for r in results})
    lines = ["| framework | init | seeds | box AP | box AP50 | mask AP | mask AP50 |", "|---|---|---|---|---|---|---|"]
    summary = {}
    for fw, init in keys:
        runs = [r for r in results if r["framework"] == fw and r["init"] == init]
        stat = {m: mean_std([r[m] for r in runs]) for m in METRICS}
        summary[(fw, init)] = stat
        cells = [f"{mu:.2f}" + (f" ± {sd:.2f}" if len(runs) > 1 else "") for mu, sd in stat.values()]
        lines.append(f"| {fw} | {init} | {len(runs)} | " + " | ".join(cells) + " |")
    lines += ["", "Mean ± sample std over seeds. SparK minus scratch, paired by seed "
              "(mean ± std, seeds where SparK is ahead):", "",
              "| framework | seeds | box AP | box AP50 | mask AP | mask AP50 |", "|---|---|---|---|---|---|"]
    for fw, diff in differences.items():
        n = len(diff["seeds"])
        cells = [f"{d['mean']:+.2f}" + (f" ± {d['std']:.2f}" if n > 1 else "") + f" ({d['spark_ahead']}/{n})"
                 for d in (diff[m] for m in METRICS)]
        lines.append(f"| {fw} | {n} | " + " | ".join(cells) + " |")
    lines += ["", "Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, ("box_AP", "mask_AP")):
        labels = [f"{fw}\n{init}" for fw, init in keys]
        values = [summary[k][metric][0] for k in keys]
        errors = [summary[k][metric][1] for k in keys]
        colors = ["tab:orange" if init == "spark" else "tab:gray" for _, init in keys]
        ax.bar(labels, values, yerr=errors, color=colors)
        ax.set_title(metric.replace("_", " ") + (" (mean ± std over seeds)" if len(results) > len(keys) else ""))
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "ap.png", dpi=100)
    plt.close(fig)


def plot_loss(metrics_file: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["global_iter"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("iteration")
    ax.set_ylabel("SparK loss (masked patches)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def lr_milestones(iters: int) -> list[int]:
    """Steps at 2/3 and 8/9 of the schedule (the paper's), strictly increasing and inside it."""
    steps = []
    for step in (iters * 2 // 3, iters * 8 // 9):
        if (not steps or step > steps[-1]) and 0 < step < iters:
            steps.append(step)
    return steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--num-unlabeled", type=int, default=1200)
    p.add_argument("--num-train", type=int, default=300)
    p.add_argument("--num-val", type=int, default=40)
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--pretrain-batch", type=int, default=32)
    p.add_argument("--finetune-iters", type=int, default=60)
    p.add_argument("--finetune-batch", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--frameworks", nargs="+", default=["detectron2", "mmdet"], choices=["detectron2", "mmdet"])
    args = p.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    py = sys.executable

    from spark_det.synthetic import make_dataset

    data = stages.timed("generate data", lambda: make_dataset(
        out / "data", args.num_train, args.num_val, args.num_unlabeled, (args.image_size, args.image_size), seed=0))
    print(f"data: {args.num_train} train / {args.num_val} val labeled, {args.num_unlabeled} unlabeled images "
          f"under {data['root']}")

    pre_dir = out / "pretrain"
    shutil.rmtree(pre_dir, ignore_errors=True)
    stages.run("SparK pretraining", [
        py, TOOLS / "pretrain.py", "--recipe", ROOT / "pretrain" / "resnet18_cpu_demo.yaml",
        "--data", data["unlabeled"], "--output", pre_dir, f"epochs={args.pretrain_epochs}",
        f"batch_size={args.pretrain_batch}", f"input_size=[{args.image_size},{args.image_size}]"])
    encoder = pre_dir / "encoder-resnet18.pth"
    plot_loss(pre_dir / "metrics.jsonl", out / "pretrain_loss.png")
    shutil.copy(sorted(pre_dir.glob("reconstruction-epoch*.png"))[-1], out / "reconstruction.png")

    weights = {"detectron2": out / "weights" / "r18_spark.pkl", "mmdet": out / "weights" / "r18_spark_mmdet.pth"}
    for fw in args.frameworks:
        stages.run(f"convert for {fw}", [py, TOOLS / "convert_weights.py", encoder, weights[fw], "--to", fw])

    results = []
    steps = lr_milestones(args.finetune_iters)
    for seed in args.seeds:
        for fw in args.frameworks:
            for init in ("spark", "scratch"):
                run_dir = out / "finetune" / f"{fw}_{init}_seed{seed}"
                shutil.rmtree(run_dir, ignore_errors=True)
                if fw == "detectron2":
                    cmd = [py, TOOLS / "train_det2.py", "--config-file",
                           ROOT / "det_configs/detectron2/mask_rcnn_R_18_FPN_cpu_demo.yaml",
                           "--register-coco", "demo_train", data["train_json"], data["train_images"],
                           "--register-coco", "demo_val", data["val_json"], data["val_images"],
                           "DATASETS.TRAIN", '("demo_train",)', "DATASETS.TEST", '("demo_val",)',
                           "MODEL.WEIGHTS", weights[fw] if init == "spark" else "", "SEED", seed,
                           "SOLVER.MAX_ITER", args.finetune_iters, "SOLVER.IMS_PER_BATCH", args.finetune_batch,
                           "SOLVER.STEPS", str(tuple(steps)),
                           "SOLVER.WARMUP_ITERS", max(1, args.finetune_iters // 10), "OUTPUT_DIR", run_dir]
                else:
                    init_opt = (f"model.backbone.init_cfg.checkpoint={weights[fw]}" if init == "spark"
                                else "model.backbone.init_cfg=None")
                    cmd = [py, TOOLS / "train_mmdet.py", ROOT / "det_configs/mmdet/mask-rcnn_r18_fpn_cpu_demo.py",
                           "--work-dir", run_dir, "--coco-train", data["train_json"], data["train_images"],
                           "--coco-val", data["val_json"], data["val_images"], "--cfg-options", init_opt,
                           f"randomness.seed={seed}", f"train_cfg.max_iters={args.finetune_iters}",
                           f"train_cfg.val_interval={args.finetune_iters}",
                           f"train_dataloader.batch_size={args.finetune_batch}",
                           f"param_scheduler.1.milestones={steps}".replace(" ", ""),
                           f"param_scheduler.0.end={max(1, args.finetune_iters // 10)}"]
                stages.run(f"Mask R-CNN {fw} from {init} (seed {seed})", cmd, log=run_dir / "train.log")
                metrics = detectron2_results(run_dir) if fw == "detectron2" else mmdet_results(run_dir)
                results.append({"framework": fw, "init": init, "seed": seed, **metrics})
                print("    " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()), flush=True)

    write_report(out, results, stages.times, args)
    print(f"\ndone in {time.time() - stages.start:.0f}s: results.md, results.json, ap.png, pretrain_loss.png, "
          f"reconstruction.png in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
