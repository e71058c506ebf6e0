"""Every GPU figure in one command: the CUDA tests, the step benchmark, the largest batch, the data loader.

    python benchmarks/gpu_check.py --output outputs/gpu_check             # one GPU: under 8 minutes on an H100
    python benchmarks/gpu_check.py --device cpu --tiny --output /tmp/gc   # every stage at toy size on the CPU

Stages, each a subprocess of the scripts that already measure these things (nothing is re-implemented):
1. ``tests``: ``pytest -m cuda tests/test_cuda.py`` (fast == reference on the device in float64, fp32 and
   bf16; leak-free sparse execution; BatchNorm statistics in fp16/bf16; 20 DDP steps with NCCL and
   SyncBatchNorm on one GPU; 20-step pretraining, eager and with ``compile=true`` where the recipes
   have that key);
2. ``step``: benchmarks/pretrain_step.py, the whole step of reference, fast, fast under torch.compile
   and MMPretrain's SparK (when importable), ResNet-50, ConvNeXt-S and ConvNeXt-B, bf16, batch 128;
3. ``largest_batch``: the same script's search for the largest ResNet-50 bf16 batch whose step fits;
4. ``data``: benchmarks/data_pipeline.py, one worker's decode rate and the pretraining loader with 16
   workers (folder and shards); the summary adds the workers one GPU needs at the measured step rates.

They run in the order tests, largest batch, data, step, within ``--budget-s`` (570 s).

Everything goes under ``--output``: ``summary.json`` (environment, each stage's status, time and
figures), ``summary.md`` (the figures as tables for benchmarks/RESULTS.md), ``tests.json``,
``step.json``, ``largest_batch.json``, ``data.json`` and ``log.txt`` (every stage's output). A stage
that fails is recorded and the next one runs; the exit code is 1 if any stage failed. A stage whose
Python packages are missing is skipped with their names (the data stage needs the ``demo`` extra and
webdataset). ``--device cpu --tiny`` runs the same stages on a tiny model (the CUDA tests on the CPU via
``SPARK_DET_CUDA_TESTS_DEVICE=cpu``, the compiler with its ``eager`` backend): CI runs it so that this
script cannot rot (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

# The measuring stages' arguments: the issue's sizes (bf16, batch 128, 16 workers), and the dry run's
FULL = {
    "step": ["--models", "resnet50", "convnext_small", "convnext_base", "--dtypes", "bf16", "--parts", "step",
             "--batch-size", "128", "--iters", "10", "--warmup", "3", "--peer", "mmpretrain",
             "--compile", "resnet50", "convnext_small"],
    "largest_batch": ["--largest-batch", "--models", "resnet50", "--dtypes", "bf16", "--batch-size", "128",
                      "--batch-limit", "4096"],
    "data": ["--samples", "64", "--rounds", "5", "--loader-workers", "16", "--loader-batch", "128",
             "--loader-batches", "20"],
}
TINY = {
    "step": ["--models", "test_resnet", "--dtypes", "bf16", "--parts", "step", "--batch-size", "2", "--input-size",
             "64", "--iters", "1", "--warmup", "0", "--decoder-width", "32", "--peer", "mmpretrain", "--compile",
             "--compile-backend", "eager"],
    "largest_batch": ["--largest-batch", "--models", "test_resnet", "--dtypes", "bf16", "--batch-size", "2",
                      "--batch-limit", "8", "--input-size", "64", "--decoder-width", "32"],
    "data": ["--samples", "4", "--rounds", "1", "--loader-workers", "2", "--loader-batch", "4",
             "--loader-batches", "3"],
}
# Run order and the longest each stage may take on a GPU (the whole check must end within a 10-minute
# device lease): the step stage, whose compile times are the least known, runs last with what is left,
# and writes its rows model by model, so a stop keeps the models already timed.
STAGE_LIMIT_S = {"tests": 240, "largest_batch": 90, "data": 90, "step": 420}
STAGE_NEEDS = {"tests": ["pytest"], "step": ["timm"], "largest_batch": ["timm"],
               "data": ["pycocotools", "webdataset"]}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", "-o", type=Path, required=True, help="folder for the JSON files and the summary")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the check's own dry run")
    p.add_argument("--tiny", action="store_true", help="toy sizes (a tiny model, 2-image batches)")
    p.add_argument("--budget-s", type=float, default=570.0,
                   help="wall-clock budget: a stage gets at most what is left of it (default: inside 10 minutes)")
    p.add_argument("--stages", nargs="+", default=list(STAGE_LIMIT_S), choices=list(STAGE_LIMIT_S))
    return p.parse_args(argv)


def missing_modules(names: list[str]) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def run_stage(name: str, cmd: list[str], env: dict[str, str], limit_s: float, log) -> dict[str, Any]:
    """Run one stage's command; its output goes to the log. Returns status, seconds and return code."""
    log.write(f"\n===== {name}: {' '.join(cmd)}\n")
    log.flush()
    started = time.perf_counter()
    try:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=limit_s).returncode
        status = "ok" if code == 0 else "failed"
    except subprocess.TimeoutExpired:
        code, status = None, f"failed: stopped after {limit_s:.0f} s"
    seconds = round(time.perf_counter() - started, 1)
    log.write(f"===== {name}: {status} in {seconds} s\n")
    log.flush()
    return {"status": status, "seconds": seconds, "returncode": code, "command": cmd}


def junit_to_json(xml_path: Path) -> dict[str, Any]:
    """pytest's JUnit XML as {counts, tests: [{name, outcome, seconds, message}]}."""
    tests = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (found.get("message") or "").splitlines()[0][:300] if found.get("message") else ""
        tests.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                      "message": message})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "tests": tests}


def stage_commands(args: argparse.Namespace, out: Path, work: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    sizes = TINY if args.tiny else FULL
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "SPARK_DET_CACHE": str(work / "cache")}
    py = sys.executable
    tests_env = {**env, "SPARK_DET_CUDA_TESTS_DEVICE": args.device}
    return {
        "tests": ([py, "-m", "pytest", "tests/test_cuda.py", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                   "--junitxml", str(work / "tests.xml")], tests_env),
        "step": ([py, str(BENCH / "pretrain_step.py"), "--device", args.device, *sizes["step"],
                  "--json", str(out / "step.json")], env),
        "largest_batch": ([py, str(BENCH / "pretrain_step.py"), "--device", args.device, *sizes["largest_batch"],
                           "--json", str(out / "largest_batch.json")], env),
        "data": ([py, str(BENCH / "data_pipeline.py"), "--only-throughput", "--workdir", str(work / "data"),
                  *sizes["data"], "--json", str(out / "data.json")], env),
    }


def workers_per_gpu(step_rows: list[dict], data: dict) -> dict[str, float]:
    """Data workers one GPU needs to feed each measured step rate (fast, and compiled where timed),
    at the slower of one worker's folder and shard rates."""
    per_worker = min(data["images_per_s_per_worker"]["folder"], data["images_per_s_per_worker"]["shards"])
    needs = {}
    for row in step_rows:
        for impl in ("fast", "fast_compiled"):
            rate = row.get(f"{impl}_images_per_s")
            if isinstance(rate, (int, float)):
                needs[f"{row['model']} {row['dtype']} {impl} ({rate:.0f} img/s)"] = round(rate / per_worker, 1)
    return needs


def _cell(row: dict, key: str, spec: str = ".1f") -> str:
    value = row.get(key)
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def summarise(summary: dict[str, Any]) -> str:
    """The figures as markdown tables (what benchmarks/RESULTS.md records)."""
    env = summary["env"]
    lines = [f"# GPU check, {env.get('gpu') or env['device']}", "",
             f"torch {env['torch']}, timm {env['timm']}, Python {env['python']}, {time.strftime('%Y-%m-%d')}, "
             f"{'tiny sizes' if summary['tiny'] else 'full sizes'}, {summary['seconds']:.0f} s in all.", "",
             "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {s['status']} | {s.get('seconds', '')} |" for name, s in summary["stages"].items()]
    tests = summary["figures"].get("tests")
    if tests:
        lines += ["", f"CUDA tests: {tests['counts']}"]
        lines += [f"- {t['outcome']}: {t['name']} {t['message']}" for t in tests["tests"] if t["outcome"] != "passed"]
    rows = summary["figures"].get("step", [])
    if rows:
        lines += ["", "| model | dtype | batch | reference img/s | fast img/s | fast+compile img/s | compile s | "
                  "MMPretrain img/s | fast / reference | peak MiB ref / fast / compiled |", "|---" * 10 + "|"]
        for r in rows:
            compiled = "compile failed (step.json)" if "compile_error" in r else _cell(r, "fast_compiled_images_per_s")
            cells = [r["model"], r["dtype"], str(env["batch_size"]), _cell(r, "reference_images_per_s"),
                     _cell(r, "fast_images_per_s"), compiled, _cell(r, "compile_s", ".0f"),
                     _cell(r, "mmpretrain_images_per_s"), f"{r['speedup']:.2f}x",
                     " / ".join(_cell(r, f"{impl}_peak_mib", ".0f") for impl in ("reference", "fast", "fast_compiled"))]
            lines.append("| " + " | ".join(cells) + " |")
    for r in summary["figures"].get("largest_batch", []):
        lines += ["", f"Largest batch that fits, {r['model']} {r['dtype']} {r['impl']} at {r['input_size']} px: "
                      f"**{r['largest_batch']}** (first failing: {r['smallest_failing_batch']}, "
                      f"limit {r['batch_limit']})"]
    data = summary["figures"].get("data")
    if data:
        lines += ["", f"One data worker (decode + crop at 224 px): {data['images_per_s_per_worker']} img/s; "
                      f"workers one GPU needs at the measured step rates: {summary['figures'].get('workers_per_gpu')}"]
        loader = data.get("loader")
        if loader:
            lines += [f"The pretraining loader with {loader['workers']} workers, batch {loader['batch']}: folder "
                      f"{loader['folder']['images_per_s']} img/s, shards {loader['shards']['images_per_s']} img/s"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    import timm
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU is visible (use --device cpu --tiny for the CPU dry run)", file=sys.stderr)
        return 2
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
           "device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
           "cpus": os.cpu_count(), "batch_size": 2 if args.tiny else 128}
    summary: dict[str, Any] = {"env": env, "tiny": args.tiny, "stages": {}, "figures": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp, open(out / "log.txt", "w") as log:
        work = Path(tmp)
        commands = stage_commands(args, out, work)
        for name in args.stages:
            cmd, stage_env = commands[name]
            missing = missing_modules(STAGE_NEEDS[name])
            left = args.budget_s - (time.perf_counter() - started)
            if missing:
                summary["stages"][name] = {"status": f"skipped: needs {', '.join(missing)} (pip install -e .[demo])"}
            elif left < 10:
                summary["stages"][name] = {"status": f"skipped: the {args.budget_s:.0f} s budget is spent"}
            else:
                limit = min(left, STAGE_LIMIT_S[name] * (3 if args.device == "cpu" else 1))
                summary["stages"][name] = run_stage(name, cmd, stage_env, limit, log)
            print(f"[gpu_check] {name}: {summary['stages'][name]['status']}", flush=True)
        if (work / "tests.xml").is_file():
            summary["figures"]["tests"] = junit_to_json(work / "tests.xml")
            (out / "tests.json").write_text(json.dumps(summary["figures"]["tests"], indent=1))
        for name, key in (("step", "results"), ("largest_batch", "largest_batch"), ("data", None)):
            path = out / f"{name}.json"
            if path.is_file():
                loaded = json.loads(path.read_text())
                summary["figures"][name] = loaded[key] if key else loaded
        if "step" in summary["figures"] and "data" in summary["figures"]:
            summary["figures"]["workers_per_gpu"] = workers_per_gpu(summary["figures"]["step"],
                                                                    summary["figures"]["data"])
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(summarise(summary))
    failed = [name for name, s in summary["stages"].items() if s["status"].startswith("failed")]
    print(f"[gpu_check] wrote {out}/summary.md and summary.json in {summary['seconds']:.0f} s"
          + (f"; FAILED: {', '.join(failed)} (see log.txt)" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
