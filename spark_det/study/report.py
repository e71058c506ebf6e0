"""A study's report: AP read from each framework's own metrics files, mean ± std over seeds per
initialisation, framework and protocol, every pair of initialisations compared seed by seed, and a
verdict that says which differences are beyond seed-to-seed noise; as results.md / results.json / ap.png."""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path
from typing import Any, Optional

from ..errors import SparkDetError
from ..io import write_atomic

METRICS = ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75")

# What MMDetection's CocoMetric logs (and no AP row) when a model made no detection at all.
_MMDET_NO_DETECTIONS = "The testing results of the whole dataset is empty"

# Two-sided 95% quantiles of Student's t for n-1 degrees of freedom (n = 2..10 paired seeds); written out
# because scipy is not a dependency. Beyond 10 seeds 2.2 (the normal quantile is 1.96).
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def _ap(value: float) -> float:
    # Detectron2 reports NaN when a model made no detection at all; COCO AP is 0 then.
    return 0.0 if math.isnan(value) else float(value)


def detectron2_results(output_dir: Path) -> dict[str, float]:
    """Final COCO AP (0-100) from a Detectron2 run's metrics.json (mask AP only when the model has masks)."""
    rows = [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines() if line.strip()]
    final = next((r for r in reversed(rows) if "bbox/AP" in r), None)
    if final is None:
        raise SparkDetError(f"no COCO evaluation in the Detectron2 run {output_dir}; see its log there")
    out = {}
    for prefix, task in (("box", "bbox"), ("mask", "segm")):
        if f"{task}/AP" in final:
            out.update({f"{prefix}_{k}": _ap(final[f"{task}/{k}"]) for k in ("AP", "AP50", "AP75")})
    return out


def mmdet_results(work_dir: Path, masks: bool = True) -> dict[str, float]:
    """Final COCO AP (0-100) from an MMDetection run's scalars.json (mmdet logs 0-1)."""
    files = sorted(work_dir.glob("*/vis_data/scalars.json"))
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if "coco/bbox_mAP" in line]
    tasks = (("box", "bbox"), ("mask", "segm")) if masks else (("box", "bbox"),)
    if not rows:
        if any(_MMDET_NO_DETECTIONS in log.read_text() for log in work_dir.glob("*/*.log")):
            # COCO AP of no detections, as for Detectron2's NaN
            return {f"{prefix}_{k}": 0.0 for prefix, _ in tasks for k in ("AP", "AP50", "AP75")}
        raise SparkDetError(f"no COCO evaluation in the MMDetection run {work_dir}; see its log there")
    final = rows[-1]
    suffixes = {"AP": "", "AP50": "_50", "AP75": "_75"}
    return {f"{prefix}_{k}": 100 * final[f"coco/{task}_mAP{s}"] for prefix, task in tasks for k, s in suffixes.items()}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    import numpy as np

    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)


def _metrics_of(results: list[dict]) -> list[str]:
    return [m for m in METRICS if all(m in r for r in results)]


def _groups(results: list[dict]) -> list[tuple[str, str]]:
    """(framework, protocol) in the order the results came."""
    return list(dict.fromkeys((r["framework"], r["protocol"]) for r in results))


def summarise(results: list[dict], inits: list[str]) -> list[dict]:
    """Mean ± std over seeds per framework, protocol and initialisation (in ``inits``' order)."""
    out = []
    for fw, protocol in _groups(results):
        for init in inits:
            runs = [r for r in results if (r["framework"], r["protocol"], r["init"]) == (fw, protocol, init)]
            if runs:
                out.append({"framework": fw, "protocol": protocol, "init": init, "seeds": [r["seed"] for r in runs],
                            **{m: dict(zip(("mean", "std"), mean_std([r[m] for r in runs])))
                               for m in _metrics_of(runs)}})
    return out


def paired_differences(results: list[dict], inits: list[str]) -> list[dict]:
    """``a`` minus ``b`` for every pair of initialisations (``a`` listed first), per framework and protocol,
    paired by seed: the runs of a seed see the same images in the same order, so their difference is less
    noisy than the difference of two means. ``beyond_noise``: a paired t-test at 95% (None with one seed)."""
    out = []
    for fw, protocol in _groups(results):
        by = {(r["init"], r["seed"]): r for r in results if (r["framework"], r["protocol"]) == (fw, protocol)}
        for a, b in combinations(inits, 2):
            seeds = sorted(s for init, s in by if init == a and (b, s) in by)
            if not seeds:
                continue
            entry: dict[str, Any] = {"framework": fw, "protocol": protocol, "a": a, "b": b, "seeds": seeds}
            for m in _metrics_of([by[a, s] for s in seeds] + [by[b, s] for s in seeds]):
                diffs = [by[a, s][m] - by[b, s][m] for s in seeds]
                mu, sd = mean_std(diffs)
                entry[m] = {"mean": mu, "std": sd, "a_ahead": sum(d > 0 for d in diffs),
                            "beyond_noise": beyond_noise(mu, sd, len(diffs))}
            out.append(entry)
    return out


def beyond_noise(mean: float, std: float, n: int) -> Optional[bool]:
    """Whether a mean paired difference is beyond seed noise (paired t-test, two-sided 95%); None for n < 2."""
    if n < 2:
        return None
    if std == 0:
        return mean != 0
    return abs(mean) / (std / math.sqrt(n)) > _T95.get(n - 1, 2.2)


def verdict(differences: list[dict], masks: bool) -> str:
    """One paragraph: for the headline metric (mask AP with masks, else box AP), each pair's difference
    and whether it is within seed noise."""
    metric = "mask_AP" if masks else "box_AP"
    name = metric.replace("_", " ")
    if not differences:
        return "No pair of initialisations was run with the same seed: nothing to compare."
    seeds = max(len(d["seeds"]) for d in differences)
    sentences = []
    for d in differences:
        m = d[metric]
        where = f"{d['framework']} ({d['protocol']})"
        change = f"{m['mean']:+.2f}" + (f" ± {m['std']:.2f}" if len(d["seeds"]) > 1 else "")
        if m["beyond_noise"] is None:
            judged = "one seed, so seed noise cannot be told apart"
        elif m["beyond_noise"]:
            judged = (f"{d['a'] if m['mean'] > 0 else d['b']} is ahead beyond seed noise "
                      f"({m['a_ahead']}/{len(d['seeds'])} seeds favour {d['a']})")
        else:
            judged = f"within seed noise ({m['a_ahead']}/{len(d['seeds'])} seeds favour {d['a']})"
        sentences.append(f"{where}: {d['a']} minus {d['b']} {change} {name}, {judged}.")
    head = (f"Verdict on {name} (paired by seed; beyond noise means a paired t-test rejects no difference at 95%). "
            if seeds > 1 else f"Verdict on {name}: every comparison rests on one seed; rerun with --seeds 0 1 2 to "
            "tell a difference from seed-to-seed noise. ")
    return head + " ".join(sentences)


def _cell(stat: Optional[dict], with_std: bool, fmt: str = "{:.2f}") -> str:
    if stat is None:
        return "—"
    return fmt.format(stat["mean"]) + (f" ± {stat['std']:.2f}" if with_std else "")


def markdown(summary: list[dict], differences: list[dict], text: str, times: dict[str, float]) -> str:
    metrics = [m for m in METRICS if any(m in s for s in summary)]
    header = " | ".join(m.replace("_", " ") for m in metrics)
    lines = [f"| framework | protocol | init | seeds | {header} |", "|---|---|---|---|" + "---|" * len(metrics)]
    for s in summary:
        lines.append(f"| {s['framework']} | {s['protocol']} | {s['init']} | {len(s['seeds'])} | "
                     + " | ".join(_cell(s.get(m), len(s["seeds"]) > 1) for m in metrics) + " |")
    lines += ["", "Mean ± sample std over seeds. Paired differences (first minus second init, same seed; mean ± "
              "std, seeds where the first is ahead; * beyond seed noise, paired t-test at 95%):", "",
              f"| framework | protocol | difference | seeds | {header} |", "|---|---|---|---|" + "---|" * len(metrics)]
    for d in differences:
        n = len(d["seeds"])
        cells = [(f"{d[m]['mean']:+.2f}" + (f" ± {d[m]['std']:.2f}" if n > 1 else "") + f" ({d[m]['a_ahead']}/{n})"
                  + ("*" if d[m]["beyond_noise"] else "")) if m in d else "—" for m in metrics]
        lines.append(f"| {d['framework']} | {d['protocol']} | {d['a']} − {d['b']} | {n} | " + " | ".join(cells) + " |")
    lines += ["", text, "", "Stage wall times of this run, in s (stages finished by an earlier run are not listed): "
              + ", ".join(f"{k} {v:.0f}" for k, v in times.items())]
    return "\n".join(lines) + "\n"


def write_report(out: Path, results: list[dict], inits: list[str], times: dict[str, float],
                 settings: dict) -> str:
    """results.json (every run, the summary, the paired differences, the verdict, stage times, settings),
    results.md and ap.png, each written whole or not at all. Returns the markdown."""
    masks = all("mask_AP" in r for r in results)
    summary = summarise(results, inits)
    differences = paired_differences(results, inits)
    text = verdict(differences, masks)
    report = {"results": results, "summary": summary, "paired_differences": differences, "verdict": text,
              "stage_seconds": times, "settings": settings}
    md = markdown(summary, differences, text, times)
    write_atomic(out / "ap.png", lambda f: plot_ap(summary, f))
    write_atomic(out / "results.json", lambda f: f.write(json.dumps(report, indent=2, default=str).encode()))
    write_atomic(out / "results.md", lambda f: f.write(md.encode()))
    return md


def plot_ap(summary: list[dict], file) -> None:
    """Box and mask AP, mean with std over seeds as error bars, grouped by framework and protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("box_AP", "mask_AP") if any(m in s for s in summary)]
    inits = list(dict.fromkeys(s["init"] for s in summary))
    groups = list(dict.fromkeys((s["framework"], s["protocol"]) for s in summary))
    width = 0.8 / len(inits)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, init in enumerate(inits):
            stats = {(s["framework"], s["protocol"]): s[metric] for s in summary if s["init"] == init and metric in s}
            xs = [g + (i - (len(inits) - 1) / 2) * width for g, key in enumerate(groups) if key in stats]
            ax.bar(xs, [stats[k]["mean"] for k in groups if k in stats], width,
                   yerr=[stats[k]["std"] for k in groups if k in stats], label=init)
        ax.set_xticks(range(len(groups)), [f"{fw}\n{protocol}" for fw, protocol in groups], fontsize=8)
        ax.set_title(metric.replace("_", " ") + " (mean ± std over seeds)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(inits), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(file, format="png", dpi=100)
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
