"""The data pipeline at scale: indexing 1,000,000 files, start-up, memory, and images/s per worker.

    python benchmarks/data_pipeline.py                      # 1,000,000 files under /tmp/spark-det-data-bench
    python benchmarks/data_pipeline.py --files 200000 --json benchmarks/results/data_cpu.json

What it builds (once; reused by later runs): a few dozen real JPEGs (the demo's scenes at
500x375, ImageNet's typical size, quality 90) and a tree of ``--files`` hard links to them in
ImageNet's ``train/<class>/`` layout (1000 files per folder), plus a 64-file folder.

What it measures:
* ``walk``: the previous version's indexing (``sorted(Path.rglob)`` + ``is_file``), in-process;
* ``index build``: spark-det's index built from nothing (``--reindex``), in a fresh process;
* start-up: ``spark-det pretrain`` for 2 iterations with 2 data workers (tiny model, so the data
  side dominates) on the 64-file folder and on the big tree, first (index built) and with the
  index reused; wall time and peak memory (PSS summed over the main process and its workers,
  sampled every 50 ms);
* the index's memory: its file sizes, and the private memory a forked worker gains by reading
  every entry (heap pages copied on write; the mapped file pages are shared);
* images/s of one worker (one process, CPU time) for decode + RandomResizedCrop(224) + flip +
  normalise, folder vs WebDataset shards of the same JPEGs; alone with ``--only-throughput``,
  on photograph-sized files with ``--grain 26``, and with ``--gpu-images-per-s`` the workers one
  GPU needs at those step rates;
* with ``--loader-workers N``: images/s the pretraining loader itself delivers (the Pretrainer's
  folder and shard sources, N data workers, batches of ``--loader-batch``) once its first batch
  is out, on a folder of hard links to those JPEGs and on shards packed from it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
PER_FOLDER = 1000


def make_jpegs(folder: Path, count: int, grain: float = 0.0) -> list[Path]:
    """The demo's scenes as JPEGs; ``grain`` (a pixel std) adds sensor-like noise, which makes the
    files as large as photographs (ImageNet's average ~110 KB) and as costly to decode."""
    import numpy as np
    from PIL import Image

    from spark_det.demo.synthetic import SceneConfig, _image_rng, render_scene

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"scene{i:03d}.JPEG"
        if not path.exists():
            rng = _image_rng(1000 + i, "unlabeled", i)
            image, _ = render_scene(rng, SceneConfig(image_size=(375, 500)))
            if grain:
                image = np.clip(image + rng.normal(0.0, grain, image.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(path, quality=90)
        paths.append(path)
    return paths


def make_tree(root: Path, files: int, jpegs: list[Path]) -> Path:
    """``files`` hard links in ``root/n<class>/n<class>_<i>.JPEG``; reused when already complete."""
    done = root / ".complete"
    if done.exists() and done.read_text() == str(files):
        return root
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    for i in range(files):
        folder = root / f"n{i // PER_FOLDER:08d}"
        if i % PER_FOLDER == 0:
            folder.mkdir(parents=True)
        os.link(jpegs[i % len(jpegs)], folder / f"n{i // PER_FOLDER:08d}_{i:07d}.JPEG")
    done.write_text(str(files))
    print(f"# built a tree of {files:,} hard links in {time.perf_counter() - started:.0f} s: {root}", flush=True)
    return root


def old_walk(root: Path) -> tuple[float, int]:
    extensions = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
    started = time.perf_counter()
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in extensions and p.is_file())
    return time.perf_counter() - started, len(paths)


def _pss_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("Pss:")), 0)


def _tree_pids(pid: int) -> list[int]:
    pids, pending = [], [pid]
    while pending:
        current = pending.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
                pending += [int(c) for c in children]
        except OSError:
            pass
    return pids


def timed_command(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Wall time and peak summed PSS of a command and all its descendants."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], sum(_pss_kb(p) for p in _tree_pids(proc.pid)))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    wall = time.perf_counter() - started
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
    result = {"wall_s": round(wall, 2), "peak_pss_mb": round(peak[0] / 1024, 1)}
    built = re.search(r"indexed ([\d,]+) entries in ([\d.]+) s", output)
    if built:
        result["index_build_s"] = float(built.group(2))
    return result


def pretrain_command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "spark_det", "pretrain", "--recipe", "pretrain/resnet18_smoke.yaml", "--data",
            str(data), "--output", str(out), "--device", "cpu", "model=test_resnet", "input_size=[64,64]",
            "decoder_width=32", "batch_size=8", "vis_images=0", "stop_after_iters=2", "num_workers=2", *extra]


def _private_anonymous_kb() -> int:
    """Private dirty pages of anonymous mappings: what copy-on-write duplicated (file pages excluded)."""
    total, anonymous = 0, False
    with open("/proc/self/smaps") as smaps:  # line by line: reading it must not grow the heap itself
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                anonymous = len(fields) < 6 or fields[5].startswith("[")
            elif fields[0] == "Private_Dirty:" and anonymous:
                total += int(fields[1])
    return total


def _read_all(index: Any, queue: Any) -> None:
    _private_anonymous_kb()  # the first reading's own allocations
    before = _private_anonymous_kb()
    count = sum(1 for i in range(len(index)) if index[i])
    queue.put(((_private_anonymous_kb() - before) / 1024, count))


def index_memory(tree: Path) -> dict[str, Any]:
    from spark_det.data.folder import find_images

    images = find_images(tree, log=lambda _: None)
    folder = images.names.folder
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    ctx = multiprocessing.get_context("fork")  # how DataLoader starts workers on Linux
    queue = ctx.Queue()
    worker = ctx.Process(target=_read_all, args=(images.names, queue))
    worker.start()
    growth_mb, count = queue.get(timeout=600)
    worker.join()
    return {"index_files_mb": round(sum(sizes.values()) / 2**20, 1), "entries": count,
            "worker_growth_after_full_pass_mb": round(growth_mb, 1)}


def throughput(folder: Path, shard_prefix: Path, samples: int, rounds: int) -> dict[str, Any]:
    """Images/s of one worker (this process): folder reader vs shard stream, same JPEGs, alternated."""
    import torch

    from spark_det.data.folder import UnlabeledImages, find_images
    from spark_det.data.packing import pack_shards
    from spark_det.data.shards import ShardStream, index_shards

    torch.set_num_threads(1)  # one data worker is one single-threaded process
    images = find_images(folder, log=lambda _: None)
    written = pack_shards(str(folder), str(shard_prefix), shard_size=128, overwrite=True, log=lambda _: None)
    pattern = f"{shard_prefix}-{{000000..{len(written) - 1:06d}}}.tar"
    index = index_shards(pattern, log=lambda _: None)
    dataset = UnlabeledImages(images, (224, 224))
    stream = ShardStream(index, index.counts, (224, 224), seed=0, batch_size=1, iters_per_epoch=samples)
    rates: dict[str, list[float]] = {"folder": [], "shards": []}
    # CPU time of this process (a worker's cost per image; other processes on the machine do not
    # count), alternating the two readers block by block so that clock changes hit both alike
    for r in range(rounds):
        started = time.process_time()
        for i in range(samples):
            dataset[(r, i % len(dataset))]
        rates["folder"].append(samples / (time.process_time() - started))
        stream.configure(r, 0, 1, {})
        started = time.process_time()
        for count, _ in enumerate(stream, start=1):
            if count == samples:
                break
        rates["shards"].append(samples / (time.process_time() - started))
    result = {kind: round(sorted(values)[len(values) // 2], 1) for kind, values in rates.items()}
    # the readers alone (bytes of every image, no decode), in microseconds of CPU per image
    from spark_det.data.shards import read_samples

    started = time.process_time()
    for _ in range(rounds):
        for i in range(len(images)):
            images[i].read_bytes()
    result["folder_read_us"] = round((time.process_time() - started) / (rounds * len(images)) * 1e6, 1)
    started = time.process_time()
    for _ in range(rounds):
        for url in index:
            for _sample in read_samples(url):
                pass
    result["shards_read_us"] = round((time.process_time() - started) / (rounds * len(images)) * 1e6, 1)
    return result


def loader_throughput(work: Path, jpegs: list[Path], workers: int, batch: int, batches: int) -> dict[str, Any]:
    """Images/s of the pretraining loader with ``workers`` data workers, folder and shards, measured
    from its first batch to its last (the first batch's wait, worker start-up included, apart)."""
    from spark_det.data.packing import pack_shards
    from spark_det.data.source import open_source
    from spark_det.distributed import DistInfo

    files = batch * (batches + 1)
    folder = make_tree(work / f"loader{files}", files, jpegs)
    shard_size = max(1, files // (2 * max(workers, 1)))  # two shards per worker: each reads whole shards
    written = pack_shards(str(folder), str(work / "loader_shards" / f"n{files}"), shard_size=shard_size,
                          overwrite=True, log=lambda _: None)
    pattern = f"{work / 'loader_shards' / f'n{files}'}-{{000000..{len(written) - 1:06d}}}.tar"
    result: dict[str, Any] = {"workers": workers, "batch": batch, "timed_batches": batches}
    for kind, data in (("folder", str(folder)), ("shards", pattern)):
        source = open_source(data, (224, 224), 0, batch, workers, DistInfo(), log=lambda _: None)
        started = time.perf_counter()
        images = 0
        for i, out in enumerate(source.loader(0, 0)):
            if i == 0:
                first = time.perf_counter()
            else:
                images += out["image"].shape[0]
            if i == batches:
                break
        result[kind] = {"images_per_s": round(images / (time.perf_counter() - first), 1),
                        "first_batch_s": round(first - started, 2)}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=1_000_000, help="files in the big tree")
    p.add_argument("--workdir", default="/tmp/spark-det-data-bench", help="where the trees, shards and cache go")
    p.add_argument("--samples", type=int, default=64, help="images per throughput round and reader")
    p.add_argument("--rounds", type=int, default=15, help="throughput rounds (median reported)")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--only-throughput", action="store_true",
                   help="only the images/s per worker (no 1M-file tree, no start-up runs)")
    p.add_argument("--grain", type=float, default=0.0,
                   help="noise std added to the JPEGs (26: photograph-sized files, ~110 KB, as ImageNet's average)")
    p.add_argument("--gpu-images-per-s", type=float, nargs="*", default=[],
                   help="training step rates of one GPU: print the workers each needs at each")
    p.add_argument("--loader-workers", type=int, default=0,
                   help="with --only-throughput: also time the pretraining loader with this many data workers")
    p.add_argument("--loader-batch", type=int, default=128, help="batch size of the loader measurement")
    p.add_argument("--loader-batches", type=int, default=20, help="batches timed after the loader's first")
    args = p.parse_args()
    if args.only_throughput:
        return throughput_only(args)

    work = Path(args.workdir)
    cache = work / "cache"
    env = {**os.environ, "SPARK_DET_CACHE": str(cache), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    os.environ["SPARK_DET_CACHE"] = str(cache)
    jpegs = make_jpegs(work / "jpegs", 64)
    tree = make_tree(work / "tree", args.files, jpegs)
    small = make_tree(work / "small", 64, jpegs)
    import torch

    results: dict[str, Any] = {
        "machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "python": platform.python_version(), "torch": torch.__version__, "files": args.files,
    }
    walk_s, walked = old_walk(tree)
    results["old_walk_s"] = round(walk_s, 2)
    print(f"old walk (rglob + is_file): {walked:,} files in {walk_s:.1f} s", flush=True)

    shutil.rmtree(cache, ignore_errors=True)
    build = timed_command([sys.executable, "-c", "import sys; from spark_det.data.folder import find_images; "
                           "find_images(sys.argv[1], reindex=True)", str(tree)], env)
    results["index_build"] = build
    print(f"index build from nothing ('indexed ... in X s'; wall includes Python start-up and imports): {build}",
          flush=True)

    runs = {}
    for name, data, reset in (("small_first", small, True), ("small_reused", small, False),
                              ("big_first", tree, True), ("big_reused", tree, False)):
        if reset:
            shutil.rmtree(cache / "data-index", ignore_errors=True)
        out = work / "runs" / name
        shutil.rmtree(out, ignore_errors=True)
        runs[name] = timed_command(pretrain_command(data, out), env)
        print(f"pretrain 2 iterations, 2 workers, {name}: {runs[name]}", flush=True)
    results["pretrain"] = runs
    results["startup_extra_s"] = {"first": round(runs["big_first"]["wall_s"] - runs["small_first"]["wall_s"], 2),
                                  "reused": round(runs["big_reused"]["wall_s"] - runs["small_reused"]["wall_s"], 2)}
    results["peak_extra_mb"] = round(runs["big_reused"]["peak_pss_mb"] - runs["small_reused"]["peak_pss_mb"], 1)
    results["index_memory"] = index_memory(tree)
    print(f"index memory: {results['index_memory']}", flush=True)

    few = work / "jpeg_folder"
    few.mkdir(exist_ok=True)
    for path in jpegs:
        if not (few / path.name).exists():
            os.link(path, few / path.name)
    results["images_per_s_per_worker"] = throughput(few, work / "shards" / "bench", args.samples, args.rounds)
    print(f"images/s per worker (224 px JPEG decode + crop + flip): {results['images_per_s_per_worker']}")
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


def throughput_only(args: argparse.Namespace) -> None:
    work = Path(args.workdir) / f"grain{args.grain:g}"
    os.environ["SPARK_DET_CACHE"] = str(work / "cache")
    jpegs = make_jpegs(work / "jpegs", 64, args.grain)
    sizes = sorted(path.stat().st_size for path in jpegs)
    rates = throughput(work / "jpegs", work / "shards" / "bench", args.samples, args.rounds)
    results = {"machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}",
               "python": platform.python_version(), "grain": args.grain,
               "jpeg_kb_median": round(sizes[len(sizes) // 2] / 1024, 1), "images_per_s_per_worker": rates}
    slowest = min(rates["folder"], rates["shards"])
    results["workers_per_gpu"] = {str(rate): round(rate / slowest, 1) for rate in args.gpu_images_per_s}
    if args.loader_workers:
        results["loader"] = loader_throughput(work, jpegs, args.loader_workers, args.loader_batch, args.loader_batches)
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
