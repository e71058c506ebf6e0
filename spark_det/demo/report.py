"""The demo's report: AP read from each framework's own logs, mean ± std over seeds, SparK
minus scratch paired by seed, as results.md / results.json and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import SparkDetError

# What MMDetection's CocoMetric logs (and no AP row) when a model made no detection at all.
_MMDET_NO_DETECTIONS = "The testing results of the whole dataset is empty"


def _ap(value: float) -> float:
    # Detectron2 reports NaN when a model made no detection at all; COCO AP is 0 then.
    return 0.0 if math.isnan(value) else float(value)


def detectron2_results(output_dir: Path) -> dict[str, float]:
    """Final COCO AP (0-100) from a Detectron2 run's metrics.json."""
    rows = [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines() if line.strip()]
    final = next(r for r in reversed(rows) if "bbox/AP" in r)
    return {"box_AP": _ap(final["bbox/AP"]), "box_AP50": _ap(final["bbox/AP50"]),
            "mask_AP": _ap(final["segm/AP"]), "mask_AP50": _ap(final["segm/AP50"])}


def mmdet_results(work_dir: Path) -> dict[str, float]:
    """Final COCO AP (0-100) from an MMDetection run's scalars.json (mmdet logs 0-1)."""
    files = sorted(work_dir.glob("*/vis_data/scalars.json"))
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if "coco/bbox_mAP" in line]
    if not rows:
        if any(_MMDET_NO_DETECTIONS in log.read_text() for log in work_dir.glob("*/*.log")):
            return dict.fromkeys(METRICS, 0.0)  # COCO AP of no detections, as for Detectron2's NaN
        raise SparkDetError(f"no COCO evaluation in the MMDetection run {work_dir}; see its log there")
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


def write_report(out: Path, results: list[dict], times: dict[str, float], settings: dict) -> None:
    """results.json (every run, the paired differences, stage times, settings), results.md and ap.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    differences = paired_differences(results)
    (out / "results.json").write_text(json.dumps({"results": results, "paired_differences": differences,
                                                  "stage_seconds": times, "settings": settings},
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
    """The pretraining loss per iteration, from metrics.jsonl."""
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
