"""Packing a folder or path list into WebDataset shards (``spark-det pack-shards``): the shards
:mod:`.shards` reads, keyed so that each image gets the crop and mask it gets from the folder, with
their sample counts in ``sizes.json`` beside them."""

from __future__ import annotations

import fcntl
import json
import os
import re
from typing import Any, Iterator, Sequence

from ..errors import DataError
from ..io import write_atomic
from .decode import UNREADABLE
from .folder import find_images
from .index import Progress
from .shards import COUNTS_FILES, count_samples


def shard_pattern(prefix: str, count: int) -> str:
    """The ``--data`` pattern of the shards :func:`pack_shards` wrote."""
    return f"{prefix}-{{{0:06d}..{count - 1:06d}}}.tar" if count > 1 else f"{prefix}-000000.tar"


def owned_shards(prefix: str) -> list[str]:
    """The shards a packing to ``prefix`` writes that exist: ``<prefix>-`` six digits ``.tar``,
    nothing else (``coco-extra-000002.tar`` is not a shard of ``coco``), in number order."""
    folder, stem = os.path.split(prefix)
    mine = re.compile(re.escape(stem) + r"-[0-9]{6}\.tar")
    return sorted(n for n in (os.listdir(folder) if os.path.isdir(folder) else []) if mine.fullmatch(n))


def _recorded_shards(folder: str) -> set[str]:
    """The shard names the folder's ``sizes.json`` records (those pack-shards wrote there)."""
    try:
        with open(os.path.join(folder, COUNTS_FILES[0]), encoding="utf-8") as f:
            sizes = json.load(f)
    except (OSError, ValueError):
        return set()
    return set(sizes) if isinstance(sizes, dict) else set()


def _update_sizes_json(folder: str, counts: dict[str, int], removed: Sequence[str], mode: int, log: Any) -> None:
    """Record a packing's shard counts in the folder's ``sizes.json`` (OpenCLIP's format, read by
    :func:`~spark_det.data.shards.shard_counts`), keeping the entries of every other packing there."""
    path = os.path.join(folder, COUNTS_FILES[0])
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # two packings into one folder at once: one merge after the other
        try:
            with open(path, encoding="utf-8") as f:
                sizes = json.load(f)
        except FileNotFoundError:
            sizes = {}
        except (OSError, ValueError) as exc:
            log(f"[pack-shards] warning: {path} is not a sizes.json this tool can update ({exc}); left as it is")
            return
        if not isinstance(sizes, dict):
            log(f"[pack-shards] warning: {path} is not a sizes.json ({{\"shard.tar\": count}}); left as it is")
            return
        for name in removed:
            sizes.pop(name, None)
        sizes.update(counts)
        text = json.dumps(dict(sorted(sizes.items())), indent=1) + "\n"
        write_atomic(path, lambda f: f.write(text.encode()))
        os.chmod(path, mode)  # readable wherever the shards are
    finally:
        os.close(fd)


def pack_shards(data: str, prefix: str, shard_size: int = 1000, overwrite: bool = False,
                log: Any = print) -> list[str]:
    """Pack a folder or path list into WebDataset shards ``<prefix>-000000.tar``, ... of
    ``shard_size`` samples each, and check them by reading them back.

    Each sample is the file's bytes as they are (no re-encoding: the same decode as the folder)
    under the key of its folder index (``000000123.jpg``) and its relative path (``.path``), so
    training from the shards gives every image the crop and mask it gets from the folder. Files
    whose header is not an image are left out and reported; each shard is written atomically.
    The shards' sample counts go to ``sizes.json`` beside them. With ``overwrite``, the packing
    replaces its own earlier shards (:func:`owned_shards`) and nothing else.
    """
    from PIL import Image
    from webdataset import TarWriter

    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {shard_size}")
    prefix = os.path.abspath(os.path.expanduser(prefix))
    folder = os.path.dirname(prefix)
    existing = owned_shards(prefix)
    if existing and not overwrite:
        raise DataError(f"{folder} already holds shards {existing[0]}, ...; choose another --output or add "
                        "--overwrite")
    images = find_images(data, log=log)
    # --overwrite replaces only what an earlier packing wrote (its sizes.json says so): a file merely
    # named like a shard this packing may write stops it before anything is written.
    most = -(-len(images) // shard_size)
    recorded = _recorded_shards(folder)
    foreign = [n for n in existing if n not in recorded and int(n[-10:-4]) < most]
    if foreign:
        raise DataError(f"{os.path.join(folder, foreign[0])} is named like a shard this packing writes, but no "
                        "packing recorded writing it (sizes.json): move it away or choose another --output")
    written: list[str] = []
    left_out: list[str] = []

    def readable() -> Iterator[tuple[int, bytes]]:
        """(folder index, bytes) of each file whose header parses as an image, in index order."""
        for i, path in enumerate(images):
            try:
                with Image.open(path) as img:
                    img.size  # noqa: B018 (parses the header)
                yield i, path.read_bytes()
            except UNREADABLE as exc:
                left_out.append(f"{path}: {exc}")

    # Shards are filled with readable files only: a left-out file shortens no shard (one of size 1
    # would be empty, and an empty shard is dealt to no worker).
    samples = readable()
    pending = next(samples, None)

    def write_shard(f: Any) -> None:
        nonlocal pending
        with TarWriter(f, encoder=False, mtime=0) as tar:  # mtime=0: the same files give the same bytes
            for _ in range(shard_size):
                if pending is None:
                    break
                i, payload = pending
                ext = images[i].suffix.lower().lstrip(".")
                tar.write({"__key__": f"{i:09d}", ext: payload, "path": os.fsencode(images.names[i])})
                pending = next(samples, None)

    progress = Progress(log, data)
    umask = os.umask(0)
    os.umask(umask)
    while pending is not None:
        path = f"{prefix}-{len(written):06d}.tar"
        write_atomic(path, write_shard)
        os.chmod(path, 0o666 & ~umask)  # readable like any file the user writes (temporaries are private)
        written.append(path)
        progress.tick(len(images) if pending is None else pending[0], "images packed")
    if not written:
        raise DataError(f"none of the {len(images)} file(s) in {data} is an image (e.g. {left_out[0]})")
    # An earlier, longer packing under the same prefix: its shards are those its sizes.json records
    # (written by pack-shards); a file that only matches the name pattern was not, and stays.
    rewritten = {os.path.basename(p) for p in written}
    stale = [n for n in existing if n not in rewritten and n in recorded]
    for name in stale:
        os.remove(os.path.join(folder, name))
    for name in (n for n in existing if n not in rewritten and n not in recorded):
        log(f"[pack-shards] warning: left {os.path.join(folder, name)} in place: named like a shard of this "
            "packing, but no packing recorded writing it (sizes.json)")
    counts = {os.path.basename(p): count_samples(p) for p in written}
    packed = sum(counts.values())
    if packed != len(images) - len(left_out):
        raise DataError(f"the shards hold {packed} samples, {len(images) - len(left_out)} were written: "
                        "is the disk failing?")
    _update_sizes_json(folder, counts, stale, 0o666 & ~umask, log)
    for line in left_out[:10]:
        log(f"[pack-shards] left out {line}")
    log(f"[pack-shards] {packed:,} images in {len(written)} shard(s) of up to {shard_size}"
        + (f"; {len(left_out)} file(s) left out (not images)" if left_out else "")
        + f"; train with --data '{shard_pattern(prefix, len(written))}'")
    return written
