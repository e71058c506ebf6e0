"""Data at the edges: what shard packing, the cached index and shard counts must never get wrong.

The spec (issue 35): a packing owns exactly the shards it wrote; an index sees a change even when
folder times are restored; a build in use is never removed; a shard's count is its samples with
an image, and empty shards feed no worker; counts come from the files beside the shards before
anything is streamed; an unreadable subfolder is skipped with a warning; a cache that cannot be
written does not stop a run.
"""

import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from spark_det.cli import pack_shards as pack_cli
from spark_det.data.folder import find_images
from spark_det.data.index import SUPERSEDED, IndexCache, encode_names
from spark_det.data.packing import pack_shards
from spark_det.data.shards import CountsFileError, ShardSource, index_shards
from spark_det.demo.synthetic import SceneConfig, write_unlabeled_images
from spark_det.distributed import DistInfo
from spark_det.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
SMALL = SceneConfig(image_size=(32, 32))
quiet = lambda _: None  # noqa: E731


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    """Eight small images: their bytes, by name."""
    folder = write_unlabeled_images(tmp_path_factory.mktemp("pngs"), 8, seed=0, cfg=SMALL)
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def logged():
    lines = []
    return lines, lines.append


# --------------------------------------------------------------------------------------------
# 1. pack-shards --overwrite replaces its own shards and nothing else


def test_overwrite_replaces_only_the_packings_own_shards(tmp_path, pngs, capsys):
    for name, count in (("extra", 6), ("main", 4)):
        (tmp_path / name).mkdir()
        for png in list(pngs)[:count]:
            (tmp_path / name / png).write_bytes(pngs[png])
    shards = tmp_path / "shards"
    assert pack_cli.main(["--data", str(tmp_path / "extra"), "--output", str(shards / "coco-extra"),
                          "--shard-size", "2"]) == 0
    extra = {p.name: p.read_bytes() for p in shards.glob("coco-extra-*.tar")}
    assert len(extra) == 3
    # coco-extra-*.tar are not shards of coco: packing coco next to them is no overwrite
    assert pack_cli.main(["--data", str(tmp_path / "main"), "--output", str(shards / "coco"),
                          "--shard-size", "2"]) == 0, capsys.readouterr().err
    assert pack_cli.main(["--data", str(tmp_path / "main"), "--output", str(shards / "coco"),
                          "--shard-size", "4", "--overwrite"]) == 0
    assert sorted(p.name for p in shards.glob("coco-*.tar")) == ["coco-000000.tar", *sorted(extra)]
    assert {name: (shards / name).read_bytes() for name in extra} == extra  # untouched
    assert (shards / "sizes.json").stat().st_mode == (shards / "coco-000000.tar").stat().st_mode  # not private
    sizes = json.loads((shards / "sizes.json").read_text())
    assert sizes == {"coco-000000.tar": 4, "coco-extra-000000.tar": 2, "coco-extra-000001.tar": 2,
                     "coco-extra-000002.tar": 2}


def test_overwrite_leaves_a_file_only_named_like_a_shard_that_no_packing_wrote(tmp_path, pngs, capsys):
    (tmp_path / "main").mkdir()
    for png in list(pngs)[:6]:
        (tmp_path / "main" / png).write_bytes(pngs[png])
    shards = tmp_path / "shards"
    assert pack_cli.main(["--data", str(tmp_path / "main"), "--output", str(shards / "demo"),
                          "--shard-size", "2"]) == 0
    (shards / "demo-000099.tar").write_bytes(b"mine")  # the user's, named like a shard
    assert pack_cli.main(["--data", str(tmp_path / "main"), "--output", str(shards / "demo"),
                          "--shard-size", "4", "--overwrite"]) == 0
    assert sorted(p.name for p in shards.glob("demo-*.tar")) == ["demo-000000.tar", "demo-000001.tar",
                                                                 "demo-000099.tar"]
    assert (shards / "demo-000099.tar").read_bytes() == b"mine"
    said = capsys.readouterr()
    assert "left" in said.out + said.err and "demo-000099.tar" in said.out + said.err


def test_files_left_out_shorten_no_shard_and_a_folder_of_no_images_is_one_line(tmp_path, pngs, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for png in list(pngs)[:4]:
        (folder / png).write_bytes(pngs[png])
    (folder / "000000000-corrupt.png").write_bytes(b"\x89PNG garbage")  # sorts first
    assert pack_cli.main(["--data", str(folder), "--output", str(tmp_path / "s" / "x"), "--shard-size", "1"]) == 0
    assert json.loads((tmp_path / "s" / "sizes.json").read_text()) == {f"x-00000{n}.tar": 1 for n in range(4)}
    assert "4 images in 4 shard(s)" in capsys.readouterr().out
    for png in list(pngs)[:4]:
        (folder / png).write_bytes(b"not an image either")
    assert pack_cli.main(["--data", str(folder), "--output", str(tmp_path / "t" / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: none of the 5 file(s) in") and len(err.splitlines()) == 1
    assert not (tmp_path / "t").exists()  # nothing written, not even the folder


def test_overwrite_refuses_to_replace_a_file_only_named_like_one_of_its_shards(tmp_path, pngs, capsys):
    (tmp_path / "main").mkdir()
    for png in list(pngs)[:4]:
        (tmp_path / "main" / png).write_bytes(pngs[png])
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "u-000001.tar").write_bytes(b"mine")  # the user's, where shard 1 of 2 would go
    assert pack_cli.main(["--data", str(tmp_path / "main"), "--output", str(shards / "u"), "--shard-size", "2",
                          "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "u-000001.tar is named like a shard this packing writes, but no packing recorded" in err
    assert sorted(os.listdir(shards)) == ["u-000001.tar"] and (shards / "u-000001.tar").read_bytes() == b"mine"
    # beyond what the packing writes it is left in place (with a warning), as before
    assert pack_cli.main(["--data", str(tmp_path / "main"), "--output", str(shards / "u"), "--shard-size", "4",
                          "--overwrite"]) == 0
    assert (shards / "u-000001.tar").read_bytes() == b"mine"


# --------------------------------------------------------------------------------------------
# 2. the index sees an archive extracted over the folder with its times restored


def _archive(path, files, mtime):
    """A reproducible archive (fixed times, as `tar --mtime`, `git archive` of one commit or
    SOURCE_DATE_EPOCH builds make them) of folder ``data/`` holding ``files``."""
    with tarfile.open(path, "w") as tar:
        folder = tarfile.TarInfo("data")
        folder.type, folder.mode, folder.mtime = tarfile.DIRTYPE, 0o755, mtime
        tar.addfile(folder)
        for name, payload in files.items():
            info = tarfile.TarInfo(f"data/{name}")
            info.size, info.mtime = len(payload), mtime
            tar.addfile(info, io.BytesIO(payload))


def _extract(archive, where):
    """Like ``tar -x``: the folder's mtime is set to the archive's (after its files are written)."""
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.9.17 / 3.10.12 / 3.11.4
    with tarfile.open(archive) as tar:
        tar.extractall(where, **safe)


def test_an_archive_extracted_over_the_folder_with_restored_times_is_seen(tmp_path, pngs):
    three = dict(list(pngs.items())[:3])
    _archive(tmp_path / "v1.tar", three, mtime=1_700_000_000)
    _archive(tmp_path / "v2.tar", {**three, **dict(list(pngs.items())[3:6])}, mtime=1_700_000_000)
    tree = tmp_path / "tree"
    _extract(tmp_path / "v1.tar", tree)
    lines, log = logged()
    assert len(find_images(tree / "data", log=log)) == 3
    mtime = os.stat(tree / "data").st_mtime_ns
    time.sleep(0.05)  # file-system times advance in clock ticks (a few ms): let the extraction fall in a later one
    _extract(tmp_path / "v2.tar", tree)
    assert os.stat(tree / "data").st_mtime_ns == mtime  # the folder's mtime says nothing changed
    assert len(find_images(tree / "data", log=log)) == 6 and "the source changed" in lines[-2]
    find_images(tree / "data", log=log)
    assert "reusing the index of 6 entries" in lines[-1]


# --------------------------------------------------------------------------------------------
# 3. a build in use is never removed; an unused one a day after it was replaced


def _names_in_spawned_process(index, queue):
    queue.put(list(index))  # the index arrived pickled: the worker mapped the build by its name


def _spawned_worker_reads(index):
    ctx = multiprocessing.get_context("spawn")  # the default start method on macOS and Python >= 3.14
    queue = ctx.Queue()
    worker = ctx.Process(target=_names_in_spawned_process, args=(index, queue))
    worker.start()
    try:
        return queue.get(timeout=120)
    finally:
        worker.join()


def _age(path, days):
    then = time.time() - days * 86400
    os.utime(path, (then, then))


def test_a_build_in_use_is_kept_whatever_its_age_and_an_unused_one_a_day_after_its_replacement(tmp_path):
    cache = IndexCache("list", "source", root=tmp_path)
    first = cache.write(*encode_names(["a.png", "b.png"]), None, {})
    _age(cache.folder / first / "meta.json", days=3)  # built three days ago
    running = cache.open(first)  # a run started today maps it
    cache.write(*encode_names(["a.png", "b.png", "c.png"]), None, {})  # another run re-indexes
    assert (cache.folder / first).is_dir()
    _age(cache.folder / first / SUPERSEDED, days=2)  # and two days later a third one
    third = cache.write(*encode_names(["a.png"]), None, {})
    assert _spawned_worker_reads(running) == ["a.png", "b.png"]  # the running job's next worker

    running.close()  # the job ended
    second = sorted(p.name for p in cache.folder.iterdir() if p.is_dir() and p.name not in (first, third))[0]
    cache.write(*encode_names(["b.png"]), None, {})
    assert not (cache.folder / first).exists()  # unused, replaced two days ago: removed
    assert (cache.folder / second).is_dir() and (cache.folder / third).is_dir()  # replaced less than a day ago


# --------------------------------------------------------------------------------------------
# 4. a shard's count is its samples with an image; empty shards feed no worker


def _shard(path, pngs, images, others):
    """A shard of ``images`` image samples and ``others`` samples without an image (a caption only)."""
    with tarfile.open(path, "w") as tar:
        members = [(f"{i:04d}.png", pngs[name]) for i, name in enumerate(list(pngs)[:images])]
        members += [(f"{100 + i:04d}.txt", b"a caption") for i in range(others)]
        for name, payload in members:
            info = tarfile.TarInfo(f"{path.stem}-{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_counts_are_of_samples_with_an_image_and_empty_shards_are_left_out(tmp_path, pngs):
    _shard(tmp_path / "s-0.tar", pngs, images=4, others=2)
    _shard(tmp_path / "s-1.tar", pngs, images=0, others=3)
    _shard(tmp_path / "s-2.tar", pngs, images=4, others=0)
    spec = str(tmp_path / "s-{0..2}.tar")
    assert list(index_shards(spec, log=quiet).counts) == [4, 0, 4]

    lines, log = logged()
    source = ShardSource(spec, (32, 32), seed=0, per_rank_batch=2, num_workers=2, info=DistInfo(), log=log)
    assert source.iters_per_epoch == 4 and source.describe() == "8 samples in 2 shards"
    assert any("1 of the 3 shards" in line and "s-1.tar" in line for line in lines)
    for epoch in (0, 1):  # two forked data workers: each image exactly once per epoch
        keys = [key for batch in source.loader(epoch, 0) for key in batch["key"]]
        assert len(keys) == 8 and len(set(keys)) == 8

    with pytest.raises(DataError, match=r"2 shard\(s\) \(the 1 empty ones do not count\) cannot feed 1 rank"):
        ShardSource(spec, (32, 32), seed=0, per_rank_batch=2, num_workers=3, info=DistInfo(), log=quiet)


# --------------------------------------------------------------------------------------------
# 5. counts come from the files beside the shards (or --shard-counts) before anything is streamed


@pytest.fixture()
def remote(tmp_path, pngs):
    """Four shards behind a `pipe:` command that records what it fetches (like `aws s3 cp URL -`)."""
    images = tmp_path / "images"
    images.mkdir()
    for name, payload in pngs.items():
        (images / name).write_bytes(payload)
    folder = tmp_path / "bucket"
    pack_shards(str(images), str(folder / "train"), shard_size=2, log=quiet)
    fetch = tmp_path / "fetch.sh"
    fetch.write_text(f'echo "$1" >> {tmp_path / "fetched.log"}\nexec cat "$1"\n')
    spec = f"pipe:sh {fetch} {tmp_path / 'bucket' / 'train'}-{{000000..000003}}.tar"
    return spec, folder, tmp_path / "fetched.log"


def _fetched(log):
    return [Path(line).name for line in log.read_text().split()] if log.exists() else []


def _shards_fetched(log):
    return [name for name in _fetched(log) if name.endswith(".tar")]


def test_remote_shards_are_counted_from_sizes_json_beside_them_without_streaming(remote):
    spec, folder, fetched = remote
    lines, log = logged()
    assert list(index_shards(spec, log=log).counts) == [2, 2, 2, 2]
    assert _fetched(fetched) == ["sizes.json"] and not any("streaming" in line for line in lines)


def test_a_wids_index_beside_the_shards_or_given_as_shard_counts_is_read(remote, tmp_path):
    spec, folder, fetched = remote
    (folder / "sizes.json").unlink(missing_ok=True)
    wids = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "train",
            "shardlist": [{"url": f"train-{i:06d}.tar", "nsamples": 2, "filesize": 1, "md5sum": "0"}
                          for i in range(4)]}
    (folder / "shardindex.json").write_text(json.dumps(wids))
    assert list(index_shards(spec, log=quiet).counts) == [2, 2, 2, 2]
    assert _fetched(fetched)[-1] == "shardindex.json" and _shards_fetched(fetched) == []

    (folder / "shardindex.json").unlink()
    given = tmp_path / "counts.json"  # a sizes.json kept elsewhere
    given.write_text(json.dumps({f"train-{i:06d}.tar": 2 for i in range(4)}))
    fetches = len(_fetched(fetched))
    assert list(index_shards(spec, log=quiet, counts_file=str(given)).counts) == [2, 2, 2, 2]
    assert len(_fetched(fetched)) == fetches  # nothing more was fetched


def test_without_a_counts_file_remote_shards_are_streamed_and_the_log_says_so(remote):
    spec, folder, fetched = remote
    (folder / "sizes.json").unlink(missing_ok=True)
    lines, log = logged()
    assert list(index_shards(spec, log=log).counts) == [2, 2, 2, 2]
    assert "counting the samples of 4 remote shard(s)" in "\n".join(lines) and "--shard-counts" in "\n".join(lines)
    assert sorted(_shards_fetched(fetched)) == [f"train-{i:06d}.tar" for i in range(4)]  # each once


def test_each_folders_counts_file_speaks_for_its_own_shards(tmp_path, pngs):
    for name, count, size in (("a", 8, 4), ("b", 4, 2)):  # the same shard names, other counts
        (tmp_path / name).mkdir()
        for png in list(pngs)[:count]:
            (tmp_path / name / png).write_bytes(pngs[png])
        pack_shards(str(tmp_path / name), str(tmp_path / "shards" / name / "train"), shard_size=size, log=quiet)
    spec = "::".join(str(tmp_path / "shards" / name / "train-{000000..000001}.tar") for name in "ab")
    assert list(index_shards(spec, log=quiet).counts) == [4, 4, 2, 2]


def test_a_local_shard_replaced_after_its_counts_file_is_counted_from_its_headers(remote, pngs):
    spec, folder, _ = remote
    time.sleep(0.05)  # file times advance in clock ticks: the replacement is later than sizes.json
    _shard(folder / "train-000001.tar", pngs, images=3, others=1)
    assert list(index_shards(str(folder / "train-{000000..000003}.tar"), log=quiet).counts) == [2, 3, 2, 2]


def test_a_shard_counts_file_that_cannot_be_read_is_one_line_exit_1(remote, tmp_path):
    spec, _, _ = remote
    proc = subprocess.run([sys.executable, "-m", "spark_det", "pretrain", "--recipe",
                           str(ROOT / "pretrain" / "resnet18_smoke.yaml"), "--data", spec, "--shard-counts",
                           str(tmp_path / "missing.json"), "--output", str(tmp_path / "run"), "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "cannot read the shard counts" in proc.stderr and not (tmp_path / "run").exists()
    for text, message in (("{not json", "is not JSON"), ('{"train-000000.tar": "two"}', "not a number of samples"),
                          ('{"wids_version": 1, "shardlist": [{"url": "a.tar"}]}', "shardlist must be a list")):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(CountsFileError, match=message) as raised:
            index_shards(spec, log=quiet, counts_file=str(tmp_path / "bad.json"))
        assert raised.value.exit_code == 1


# --------------------------------------------------------------------------------------------
# 9, 10. unreadable folders and an unwritable cache, as a user without privileges meets them


def _unprivileged() -> list:
    """The command prefix that runs a process to which file permissions apply: none for a normal
    user. Root reads and writes any folder (capabilities DAC_OVERRIDE and DAC_READ_SEARCH), so
    as root the process keeps its uid (and so its access to this checkout) without those two."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux): no folder is unreadable to this process")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]


@pytest.fixture()
def world(tmp_path):
    """A folder for data, outputs and temporaries; permissions restored afterwards for cleanup."""
    for name in ("out", "cache", "tmp"):
        (tmp_path / name).mkdir()
    yield tmp_path
    for folder in tmp_path.rglob("*"):
        if folder.is_dir():
            folder.chmod(0o755)


def _images_in(folder, pngs, count, mode=0o755):
    folder.mkdir(parents=True)
    for name in list(pngs)[:count]:
        (folder / name).write_bytes(pngs[name])
    folder.chmod(mode)


def _pack_as_user(world, data, cache):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(world / "tmp"), "SPARK_DET_CACHE": str(cache)}
    return subprocess.run([*_unprivileged(), sys.executable, "-m", "spark_det", "pack-shards", "--data", str(data),
                           "--output", str(world / "out" / data.name)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def test_an_unreadable_subfolder_is_skipped_with_a_warning_and_nothing_readable_is_exit_2(world, pngs,
                                                                                           monkeypatch):
    _images_in(world / "data" / "train", pngs, 3)
    _images_in(world / "data" / "lost+found", pngs, 2, mode=0o000)
    proc = _pack_as_user(world, world / "data", world / "cache")
    assert proc.returncode == 0, proc.stderr
    assert "[data] warning: skipping 1 folder(s)" in proc.stdout and "lost+found (Permission denied)" in proc.stdout
    assert json.loads((world / "out" / "sizes.json").read_text()) == {"data-000000.tar": 3}
    monkeypatch.setenv("SPARK_DET_CACHE", str(world / "cache"))
    lines, log = logged()
    assert len(find_images(world / "data", log=log)) == 3  # the index is reused, and the warning said again
    assert "reusing the index of 3 entries" in lines[0] and "lost+found (Permission denied)" in lines[1]

    _images_in(world / "closed" / "lost+found", pngs, 2, mode=0o000)
    proc = _pack_as_user(world, world / "closed", world / "cache")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "no images found" in proc.stderr and "lost+found (Permission denied)" in proc.stderr


def test_an_index_cache_that_cannot_be_created_is_replaced_by_a_private_folder(tmp_path, pngs, monkeypatch):
    _images_in(tmp_path / "data", pngs, 3)
    (tmp_path / "file").write_text("a file where the cache folder should be")
    monkeypatch.setenv("SPARK_DET_CACHE", str(tmp_path / "file" / "cache"))  # refused for every user (ENOTDIR)
    lines, log = logged()
    index = find_images(tmp_path / "data", log=log)
    assert len(index) == 3 and sum("warning" in line for line in lines) == 1
    assert "cannot write the index cache" in lines[1] and index.names.folder.exists()
    # a rank that receives the index from rank 0 stores it in a private folder the same way
    sent = {name: (index.names.folder / name).read_bytes() for name in ("meta.json", "names.bin", "offsets.npy")}
    received = IndexCache("folder", "elsewhere", root=tmp_path / "file" / "cache").receive(index.names.folder.name,
                                                                                          sent)
    assert list(received) == list(index.names) and received.folder.exists()


def test_a_cache_folder_that_cannot_be_written_falls_back_to_a_private_one(world, pngs):
    _images_in(world / "data", pngs, 3)
    read_only = world / "read-only-cache"
    read_only.mkdir(mode=0o555)
    proc = _pack_as_user(world, world / "data", read_only)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stdout.splitlines() if "warning" in line]
    assert len(warnings) == 1 and f"cannot write the index cache {read_only}" in warnings[0], proc.stdout
    assert json.loads((world / "out" / "sizes.json").read_text()) == {"data-000000.tar": 3}
    assert list((world / "tmp").iterdir()) == [] and list(read_only.iterdir()) == []  # the private copy is gone
