"""What the leak audit costs at each checkpoint: the probe on a float64 CPU copy of the live encoder.

    python benchmarks/leak_audit.py                                   # ResNet-50 and ConvNeXt-B
    python benchmarks/leak_audit.py --models resnet18 --repeats 1 --json out.json

The audit (``Pretrainer.audit_leaks``) copies the encoder without its cross-rank synchronisation,
converts the copy to float64 and runs the leak probe (:func:`spark_det.model.leak_probe.find_leak`,
five forward passes at twice the model's downsample ratio, 64 px for ResNet and ConvNeXt): its cost
does not depend on the training input size (224 px) or batch. Printed per model: the seconds of the
copy and of the probe, and the peak resident memory the process reached.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spark_det.model import create_spark  # noqa: E402
from spark_det.model.leak_probe import find_leak  # noqa: E402
from spark_det.train.sync_batchnorm import unsynchronised_copy  # noqa: E402


def measure(model: str, repeats: int) -> dict:
    spark = create_spark(model, mask_ratio=0.6, decoder_width=512)
    copies, probes = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        copy = unsynchronised_copy(spark.encoder)
        copied = time.perf_counter()
        finding = find_leak(copy, randomise=False, copy_first=False)
        probes.append(time.perf_counter() - copied)
        copies.append(copied - start)
        if finding is not None:
            raise SystemExit(f"{model}: the audit failed: {finding}")
    return {"model": model, "params_m": round(sum(p.numel() for p in spark.encoder.parameters()) / 1e6, 1),
            "copy_s": round(statistics.median(copies), 2), "probe_s": round(statistics.median(probes), 2),
            "audit_s": round(statistics.median(c + p for c, p in zip(copies, probes)), 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "convnext_base"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    machine = platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {machine}")
    print("| model | params (M) | copy (s) | probe (s) | audit per checkpoint (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for model in args.models:
        row = measure(model, args.repeats)
        rows.append(row)
        print(f"| {model} | {row['params_m']} | {row['copy_s']} | {row['probe_s']} | {row['audit_s']} | "
              f"{row['peak_rss_mib']} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                         "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
