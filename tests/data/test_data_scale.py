"""Data at scale: one cached, memory-mapped index per source, and WebDataset shards.

The spec: rank 0 walks a source once; later starts map the cached index until the source
changes; forked data workers read it without copying it; shards packed from a folder give every
image the folder's crop and mask; a run from shards stops and resumes on the same stream; bad
shards are skipped and counted or refused in one line.
"""

import io
import json
import multiprocessing
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from spark_det.cli import pack_shards as pack_cli
from spark_det.data.folder import UnlabeledImages, find_images
from spark_det.data.index import IndexCache, encode_names
from spark_det.data.packing import pack_shards
from spark_det.data.shards import ShardStream, deal_shards, index_shards, sample_key
from spark_det.demo.synthetic import SceneConfig, write_unlabeled_images
from spark_det.train import load_config
from spark_det.train.pretrainer import Pretrainer

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "pretrain" / "resnet18_smoke.yaml")
TINY = ["model=test_resnet", "input_size=[64,64]", "decoder_width=32", "batch_size=8", "epochs=2", "vis_images=2",
        "warmup_epochs=1", "drop_path_rate=0", "save_every_iters=1"]


@pytest.fixture(scope="module")
def images(unlabeled_images):
    return unlabeled_images(32)


@pytest.fixture(scope="module")
def shards(images, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("shards") / "train"
    written = pack_shards(str(images), str(prefix), shard_size=4, log=lambda _: None)
    return f"{prefix}-{{000000..{len(written) - 1:06d}}}.tar"


def logged():
    lines = []
    return lines, lines.append


# --------------------------------------------------------------------------------------------
# The index


def test_the_index_lists_the_images_of_the_old_walk_in_the_same_order(images):
    index = find_images(images, log=lambda _: None)
    walked = sorted(p for p in Path(images).rglob("*") if p.suffix == ".png")
    assert list(index) == walked and index[-1] == walked[-1]


def test_a_second_start_reuses_the_index_and_a_changed_folder_rebuilds_it(tmp_path):
    tree = tmp_path / "tree"
    first_folder = write_unlabeled_images(tree, 3, seed=0, cfg=SceneConfig(image_size=(32, 32)))
    lines, log = logged()
    assert len(find_images(tree, log=log)) == 3 and "building the index (no index yet)" in lines[-2]
    find_images(tree, log=log)
    assert "reusing the index of 3 entries" in lines[-1]

    deeper = write_unlabeled_images(first_folder, 2, seed=1, cfg=SceneConfig(image_size=(32, 32)))  # new subfolder
    assert len(find_images(tree, log=log)) == 5 and "the source changed" in lines[-2]
    first = sorted(first_folder.glob("*.png"))[0]
    first.rename(first.with_name("renamed.png"))
    assert any(p.name == "renamed.png" for p in find_images(tree, log=log)) and "the source changed" in lines[-2]
    sorted(deeper.glob("*.png"))[0].unlink()
    assert len(find_images(tree, log=log)) == 4
    find_images(tree, log=log, reindex=True)
    assert "building the index (--reindex)" in lines[-2]


def test_a_path_list_is_reindexed_when_the_list_changes(images, tmp_path):
    listing = tmp_path / "list.txt"
    names = sorted(p.name for p in Path(images).glob("*.png"))
    listing.write_text("\n".join(str(Path(images) / n) for n in names[:5]))
    lines, log = logged()
    assert len(find_images(listing, log=log)) == 5
    listing.write_text("# fewer\n" + "\n".join(str(Path(images) / n) for n in names[:3]))
    assert len(find_images(listing, log=log)) == 3 and "the source changed" in lines[-2]


def _private_anonymous_kb():
    """Private dirty pages of anonymous mappings (heap): what copy-on-write duplicates. File-backed
    mappings are left out, so the mapped index's page-cache pages do not count."""
    total, anonymous = 0, False
    with open("/proc/self/smaps") as smaps:  # line by line: reading it must not grow the heap itself
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping: range perms offset dev inode [path]
                anonymous = len(fields) < 6 or fields[5].startswith("[")
            elif fields[0] == "Private_Dirty:" and anonymous:
                total += int(fields[1])
    return total


def _touch_every_entry(entries, queue):
    _private_anonymous_kb()  # the first reading's own allocations (a process with torch maps thousands of files)
    before = _private_anonymous_kb()
    total = 0
    for i in range(len(entries)):
        total += len(entries[i])
    queue.put((_private_anonymous_kb() - before, total))


def _growth_of_a_forked_worker(entries):
    ctx = multiprocessing.get_context("fork")  # how DataLoader starts its workers on Linux
    queue = ctx.Queue()
    worker = ctx.Process(target=_touch_every_entry, args=(entries, queue))
    worker.start()
    growth_kb, total = queue.get(timeout=60)
    worker.join()
    return growth_kb / 1024, total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_forked_workers_read_the_index_without_copying_it(tmp_path):
    names = [f"n{i // 1000:08d}/n{i // 1000:08d}_{i:06d}.JPEG" for i in range(500_000)]
    cache = IndexCache("list", "synthetic", root=tmp_path)
    data, offsets = encode_names(names)
    index = cache.open(cache.write(data, offsets, None, {}))
    mapped_mb, mapped_total = _growth_of_a_forked_worker(index)
    # the control the index replaces: a Python list, whose reference counts a worker writes to
    listed_mb, listed_total = _growth_of_a_forked_worker(names)
    assert mapped_total == listed_total == sum(len(n) for n in names)
    assert listed_mb > 20, f"the measurement cannot see copy-on-write growth ({listed_mb:.1f} MB)"
    assert mapped_mb < 2 and listed_mb > 10 * mapped_mb, (
        f"touching every entry: index +{mapped_mb:.1f} MB, list +{listed_mb:.1f} MB")


# --------------------------------------------------------------------------------------------
# Shards


def test_shards_packed_from_a_folder_give_each_image_its_crop_from_the_folder(images, shards):
    folder = UnlabeledImages(find_images(images, log=lambda _: None), (64, 64), seed=3)
    index = index_shards(shards, log=lambda _: None)
    assert list(index.counts) == [4] * 8
    stream = ShardStream(index, index.counts, (64, 64), seed=3, batch_size=4, iters_per_epoch=8)
    for epoch in (0, 1):
        stream.configure(epoch, 0, 1, {})
        items = list(stream)
        assert sorted(key for _, key in (it["key"] for it in items)) == list(range(32))  # each image once
        for item in items[:6]:
            epoch_of, key = item["key"]
            assert torch.equal(item["image"], folder[(epoch_of, key)]["image"])


def test_pipe_urls_stream_the_same_samples_as_local_shards(shards):
    local = index_shards(shards, log=lambda _: None)
    piped = index_shards(f"pipe:cat {shards}", log=lambda _: None)  # how object stores are read (aws s3 cp ... -)
    assert list(piped.counts) == list(local.counts) and piped[0] == f"pipe:cat {local[0]}"
    streams = [ShardStream(index, index.counts, (64, 64), seed=0, batch_size=4, iters_per_epoch=8)
               for index in (local, piped)]
    keys = []
    for stream in streams:
        stream.configure(0, 0, 1, {})
        keys.append([it["key"] for it in stream])
    assert keys[0] == keys[1] and len(keys[0]) == 32


def test_every_sample_is_read_once_per_epoch_over_ranks_and_workers(shards):
    index = index_shards(shards, log=lambda _: None)
    keys = []
    for rank in (0, 1):
        stream = ShardStream(index, index.counts, (64, 64), seed=0, batch_size=4, iters_per_epoch=4, rank=rank,
                             world_size=2)
        for worker in (0, 1):
            stream.configure(5, 0, 2, {})
            mine = stream.shard_lists()[worker]
            keys += [key for it in stream._read(worker, mine, 8, (0, 0)) for key in [it["key"][1]]]
    assert sorted(keys) == list(range(32))
    assert deal_shards(index.counts, 0, 5, 4) != deal_shards(index.counts, 0, 6, 4)  # shuffled per epoch


def _run(data, out, *overrides, resume="auto", num_workers=2):
    cfg = load_config(RECIPE, [*TINY, f"num_workers={num_workers}", *overrides])
    return Pretrainer(cfg, data, out, resume=resume, device="cpu", log=lambda _: None).run()


def _losses(out):
    return [(r["epoch"], r["iter"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().split("\n")
                                                             [:-1])]


def test_a_run_from_shards_stopped_and_resumed_continues_the_same_stream(shards, tmp_path):
    straight = _run(shards, tmp_path / "straight", resume=None)
    assert straight.iteration == 8 and straight.encoder.is_file()
    out = tmp_path / "resumed"
    stopped = _run(shards, out, "stop_after_iters=3", resume=None)
    assert stopped.stopped_early
    _run(shards, out)
    assert _losses(out) == _losses(tmp_path / "straight")  # exactly: same workers, same positions


def test_resuming_shards_with_other_workers_is_approximate_and_says_so(shards, tmp_path):
    out = tmp_path / "run"
    _run(shards, out, "stop_after_iters=2", resume=None)
    lines, log = logged()
    cfg = load_config(RECIPE, [*TINY, "num_workers=0"])
    result = Pretrainer(cfg, shards, out, resume="auto", device="cpu", log=log).run()
    assert result.iteration == 8 and result.encoder.is_file()
    assert any("continues approximately" in line for line in lines)
    assert [(e, i) for e, i, _ in _losses(out)] == [(e, i) for e in (0, 1) for i in range(4)]


def _shard_with_a_corrupt_member(images, path):
    with tarfile.open(path, "w") as tar:
        for i, source in enumerate(sorted(Path(images).glob("*.png"))[:8]):
            data = source.read_bytes() if i != 5 else b"\x89PNG\r\n\x1a\n but not really"
            info = tarfile.TarInfo(f"{1000 + i:09d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_corrupt_member_is_skipped_and_counted(images, tmp_path):
    for n in range(2):
        _shard_with_a_corrupt_member(images, tmp_path / f"bad-{n:02d}.tar")
    with pytest.warns(UserWarning, match="skipping unreadable image 000001005.png"):
        result = _run(str(tmp_path / "bad-{00..01}.tar"), tmp_path / "run", "epochs=1", resume=None,
                      num_workers=0)
    assert result.skipped_images == 1 and result.iteration == 2
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["skipped_total"] == 1


def tool(*args, module="pretrain"):
    return subprocess.run([sys.executable, "-m", "spark_det", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_missing_shard_is_one_line_and_writes_nothing(shards, tmp_path):
    pattern = shards.replace("000007}", "000009}")
    proc = tool("--recipe", RECIPE, "--data", pattern, "--output", str(tmp_path / "run"), "--device", "cpu", *TINY)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert "2 of the 10 shards of" in proc.stderr and "train-000008.tar" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_data_worker_with_nothing_readable_stops_the_run_at_once_with_one_line(images, tmp_path):
    """The error comes from a data worker; the run must end with it (exit 2), not wait forever for
    workers that ignore SIGTERM (seen hanging, with the error printed, when an error's traceback
    kept the DataLoader iterator alive until interpreter exit)."""
    folder = tmp_path / "two"
    folder.mkdir()
    good = sorted(Path(images).glob("*.png"))[0].read_bytes()
    (folder / "a.png").write_bytes(good)
    (folder / "b.png").write_bytes(good[: len(good) // 2])  # truncated past its header: packed, unreadable
    assert tool("--data", str(folder), "--output", str(tmp_path / "s" / "t"), "--shard-size", "1",
                module="pack-shards").returncode == 0
    proc = tool("--recipe", RECIPE, "--data", str(tmp_path / "s" / "t-{000000..000001}.tar"), "--output",
                str(tmp_path / "run"), "--device", "cpu", *TINY, "batch_size=1", "num_workers=2", "vis_images=0")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [errors[0]] and "can be read" in errors[0] and "Traceback" not in proc.stderr


def test_too_few_shards_for_the_workers_is_one_line(shards, tmp_path):
    two = shards.replace("000007}", "000001}")
    proc = tool("--recipe", RECIPE, "--data", two, "--output", str(tmp_path / "run"), "--device", "cpu", *TINY,
                "num_workers=4")
    assert proc.returncode == 2 and "2 shard(s) cannot feed 1 rank(s) x 4 data worker(s)" in proc.stderr


def test_pack_shards_leaves_out_non_images_refuses_to_overwrite_and_prints_the_pattern(images, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for source in sorted(Path(images).glob("*.png"))[:5]:
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "notes.jpg").write_text("not an image")
    assert pack_cli.main(["--data", str(folder), "--output", str(tmp_path / "s" / "x"), "--shard-size", "2"]) == 0
    out = capsys.readouterr().out
    assert f"train with --data '{tmp_path / 's' / 'x'}-{{000000..000002}}.tar'" in out and "1 file(s) left out" in out
    assert sorted(os.listdir(tmp_path / "s")) == ["sizes.json", "x-000000.tar", "x-000001.tar", "x-000002.tar"]
    assert json.loads((tmp_path / "s" / "sizes.json").read_text()) == {"x-000000.tar": 2, "x-000001.tar": 2,
                                                                       "x-000002.tar": 1}
    assert pack_cli.main(["--data", str(folder), "--output", str(tmp_path / "s" / "x")]) == 2
    assert "already holds shards" in capsys.readouterr().err
    assert pack_cli.main(["--data", str(folder), "--output", str(tmp_path / "s" / "x"), "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path / "s")) == ["sizes.json", "x-000000.tar"]  # one shard of 1000 now
    assert json.loads((tmp_path / "s" / "sizes.json").read_text()) == {"x-000000.tar": 5}  # stale entries gone
    with tarfile.open(tmp_path / "s" / "x-000000.tar") as tar:
        members = tar.getnames()
    assert members[:2] == ["000000000.path", "000000000.png"]


def test_sample_keys_seed_like_folder_indices():
    assert sample_key("000000123") == 123
    assert sample_key("n01440764/n01440764_10026") == sample_key("n01440764/n01440764_10026") > 2**32
    assert np.int64(sample_key("x")) >= 0
