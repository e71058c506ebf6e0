"""Images/s against batch size, one panel per model, from benchmarks/pretrain_step.py JSON files.

    python benchmarks/plot_throughput.py benchmarks/results/cpu_peer_b*.json -o benchmarks/results/cpu_throughput.png

Each JSON file is one run at one batch size (``--batch-size``); rows of the chosen part and dtype
give one line per implementation (reference, fast and, where measured, MMPretrain's).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

IMPLS = ("reference", "fast", "mmpretrain")


def collect(paths: list[Path], part: str, dtype: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """model -> implementation -> sorted (batch size, images/s)."""
    points: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for path in paths:
        run = json.loads(path.read_text())
        batch = run["env"]["batch_size"]
        for row in run["results"]:
            if row["part"] != part or row["dtype"] != dtype:
                continue
            for impl in IMPLS:
                if f"{impl}_images_per_s" in row:
                    points[row["model"]][impl].append((batch, row[f"{impl}_images_per_s"]))
    return {model: {impl: sorted(p) for impl, p in by_impl.items()} for model, by_impl in points.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--part", default="step", choices=["encoder", "step"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = collect(args.results, args.part, args.dtype)
    if not points:
        raise SystemExit(f"no {args.part} rows in {args.dtype} in the given files")
    env = json.loads(args.results[0].read_text())["env"]
    fig, axes = plt.subplots(1, len(points), figsize=(4.5 * len(points), 3.6), squeeze=False)
    for ax, (model, by_impl) in zip(axes[0], sorted(points.items())):
        for impl, series in by_impl.items():
            ax.plot([b for b, _ in series], [v for _, v in series], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        batches = sorted({b for series in by_impl.values() for b, _ in series})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_title(model)
        ax.set_xlabel("batch size")
        ax.set_ylabel("images/s")
        ax.grid(alpha=0.3)
        ax.legend()
    where = env.get("gpu") or f"CPU, {env['threads']} threads"
    fig.suptitle(f"SparK pretraining {args.part}, {args.dtype}, {env['input_size']} px ({where}, torch {env['torch']})")
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
