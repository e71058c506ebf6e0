"""WebDataset tar shards as a pretraining data source: data beyond a folder, streamed.

``--data`` may be a shard pattern (``shards/train-{000000..000127}.tar``), several joined by
``::``, or any URL the ``webdataset`` library opens (``pipe:aws s3 cp s3://b/x.tar -``,
``https://...``). Each sample's image is its first member with an image extension
(``000000123.jpg``); its key (``__key__``) seeds its crop and mask exactly as a folder's index
does: a decimal key is the number itself (``spark-det pack-shards`` writes the folder index, so
a folder and the shards packed from it give every image the same crop and mask), any other key
its 63-bit hash.

How an epoch is read (a pure function of seed, epoch, process count and ``num_workers``):

- A shard's sample count is the number of its samples with an image member (what the stream
  yields), read from a counts file when there is one (``--shard-counts FILE``, else OpenCLIP's
  ``sizes.json`` or webdataset's wids index ``shardindex.json`` beside the shards; ``pack-shards``
  writes ``sizes.json``), else from a local shard's tar headers, else by streaming the shard.
- An epoch is ``total samples // global batch`` iterations, like a folder's.
- The shards holding samples are shuffled per epoch and dealt to the ``ranks x workers`` data
  workers, each next shard to the worker with the fewest samples so far; every worker reads
  whole shards. Empty shards are left out.
- DataLoader takes batches from its workers round robin, so batch ``j`` of a rank comes from
  worker ``j % workers``; each worker produces exactly its share of the epoch's batches. When
  shard sizes are equal (pack-shards makes them so) every sample is read at most once per
  epoch; otherwise a worker whose shards run out reads its first ones again, and one with more
  leaves the rest for the next epoch's shuffle: at most one shard per worker and epoch.

Resume: every batch carries its worker's stream position (shard and member after it), and
checkpoints keep the position of every worker's last trained batch, so a run resumed with the
same process count and ``num_workers`` continues exactly. With another layout the epoch is
continued approximately: each new worker starts at the shard the same fraction through its
list as the epoch is through its iterations (at most about one shard per worker read twice or
skipped in that epoch); from the next epoch on the stream is exact for the new layout.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import os
import re
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from ..errors import EXIT_BAD_FILE, DataError, DataWarning
from .batches import batches_from, collate
from .decode import IMAGE_EXTENSIONS, UNREADABLE, load_rgb
from .index import IndexCache, NameIndex, Progress, shared_index
from .sampler import sample_seed
from .transforms import pretrain_transform

IMAGE_MEMBERS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://", "ais://", "hf://")
Position = tuple[int, int]  # (place in the worker's shard list, next member of that shard)
# Files beside shards that hold their sample counts: OpenCLIP's {"name.tar": count} (which
# pack-shards writes too) and webdataset's wids index (the name `widsindex create` writes).
COUNTS_FILES = ("sizes.json", "shardindex.json")
SHARD_SUFFIX = re.compile(r"\.(tar|tar\.gz|tgz)$")


class CountsFileError(DataError):
    """A shard-counts file (``--shard-counts``) that is missing, unreadable or of another layout."""

    exit_code = EXIT_BAD_FILE


def is_shard_source(data: object) -> bool:
    """Whether ``--data`` names WebDataset shards rather than a folder or a path list."""
    text = str(data)
    if text.startswith(REMOTE_PREFIXES) or "::" in text:
        return True
    if "{" in text and ".." in text and "}" in text:
        return True
    return text.endswith((".tar", ".tar.gz", ".tgz")) and os.path.isfile(text)


def _is_local(url: str) -> bool:
    return not url.startswith(REMOTE_PREFIXES) and "://" not in url


def expand_shards(spec: str) -> list[str]:
    """The shard URLs of a pattern (``::`` lists, brace ranges), via webdataset."""
    from webdataset.shardlists import expand_urls

    urls = [os.path.abspath(os.path.expanduser(u)) if _is_local(u) else u for u in expand_urls(spec)]
    if not urls:
        raise DataError(f"{spec} names no shards")
    return urls


def sample_key(key: str) -> int:
    """The integer that seeds a sample's crop and mask: a decimal key itself, else a 63-bit hash."""
    if key.isdigit():
        return int(key)
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def read_samples(url: str, images_only: bool = True) -> Iterator[dict]:
    """The samples of one shard, as webdataset groups them (``{"__key__": ..., "jpg": bytes, ...}``).
    The pipeline of ``webdataset.tarfile_samples``, with a 1 MiB read buffer and (``images_only``)
    the bytes of members that are not images left unread."""
    from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

    select = (lambda name: name.rsplit(".", 1)[-1].lower() in IMAGE_MEMBERS) if images_only else None
    return group_by_keys(tar_file_expander(url_opener([{"url": url}], bufsize=1 << 20), select_files=select))


def _member_key(name: str) -> Optional[str]:
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(name)[0]


def count_samples(url: str) -> int:
    """How many samples with an image member (those the stream yields) a shard holds. A local tar
    is read header by header (tarfile seeks over the contents); a remote one is streamed once."""
    try:
        if _is_local(url):
            with tarfile.open(url, mode="r:*") as tar:
                return _count_image_samples(m.name for m in tar if m.isreg())
        from webdataset.gopen import gopen

        with gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            return _count_image_samples(m.name for m in tar if m.isreg())
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise DataError(f"cannot read shard {url}: {exc}") from exc


def _count_image_samples(names: Iterator[str]) -> int:
    # as read_samples groups them: image members only, a new sample wherever the key changes
    count, last = 0, None
    for name in names:
        if os.path.basename(name).startswith("__") or name.rsplit(".", 1)[-1].lower() not in IMAGE_MEMBERS:
            continue
        key = _member_key(name)
        if key is not None and key != last:
            count, last = count + 1, key
    return count


def _stamp(url: str) -> list[int]:
    st = os.stat(url)
    return [st.st_size, st.st_mtime_ns]


def shard_name(url: str) -> str:
    """The file name a shard goes by in a counts file: its basename (of the path a ``pipe:``
    command reads: its last word ending in .tar)."""
    if url.startswith("pipe:"):
        words = [w.strip("'\"") for w in url[5:].split()]
        url = next((w for w in reversed(words) if SHARD_SUFFIX.search(w.split("?")[0])), url)
    return os.path.basename(url.split("?")[0].rstrip("/"))


def beside(url: str, name: str) -> Optional[str]:
    """The URL of the file ``name`` in the same folder (or bucket prefix) as shard ``url``."""
    if _is_local(url):
        return os.path.join(os.path.dirname(url), name)
    base = shard_name(url)
    if url.startswith("pipe:"):  # the same command, reading the other file
        at = url.rfind(base)
        return url[:at] + name + url[at + len(base):] if base and at >= 0 else None
    return url.split("?")[0].rsplit("/", 1)[0] + "/" + name


def parse_shard_counts(text: str, where: str) -> dict[str, int]:
    """Shard name -> sample count from OpenCLIP's ``sizes.json`` (``{"name.tar": count}``) or a
    webdataset wids index (``{"__kind__": "wids-shard-index-v1", "shardlist": [{"url", "nsamples"}]}``)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise CountsFileError(f"{where} is not JSON ({exc})") from None
    if isinstance(data, dict) and "shardlist" in data:
        entries = data["shardlist"]
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "url" in e and "nsamples" in e
                                                    for e in entries):
            raise CountsFileError(f"{where}: a wids index's shardlist must be a list of {{'url', 'nsamples'}}")
        pairs = [(shard_name(str(e["url"])), e["nsamples"]) for e in entries]
    elif isinstance(data, dict):
        pairs = [(os.path.basename(str(k)), v) for k, v in data.items()]
    else:
        raise CountsFileError(f"{where} is neither a sizes.json ({{\"shard.tar\": count}}) nor a wids index")
    counts: dict[str, int] = {}
    for name, value in pairs:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
            raise CountsFileError(f"{where}: the count of {name} is {value!r}, not a number of samples")
        counts[name] = int(value)
    return counts


def _read_text(url: str) -> str:
    if _is_local(url):
        with open(url, encoding="utf-8") as f:
            return f.read()
    from webdataset.gopen import gopen

    with gopen(url, "rb") as stream:
        return stream.read().decode("utf-8")


def _counts_beside(urls: Sequence[str]) -> dict[str, tuple[int, str]]:
    """Shard URL -> (count, counts file) from the counts files found beside the shards (in each
    folder the first of COUNTS_FILES; a file speaks only for the shards of its own folder)."""
    folders: dict[Optional[str], list[str]] = {}
    for url in urls:
        folders.setdefault(beside(url, ""), []).append(url)
    counts: dict[str, tuple[int, str]] = {}
    for folder, members in folders.items():
        for name in COUNTS_FILES if folder is not None else ():
            where = beside(members[0], name)
            if where is None or (_is_local(where) and not os.path.isfile(where)):
                continue
            try:
                text = _read_text(where)
            except Exception:  # noqa: BLE001 - absent or unreadable remote file (curl/pipe exit codes)
                continue
            try:
                listed = parse_shard_counts(text, where)
            except CountsFileError as exc:
                warnings.warn(f"ignoring {exc}", DataWarning, stacklevel=3)
                continue
            counts.update((u, (listed[n], where)) for u in members for n in [shard_name(u)] if n in listed)
            break
    return counts


def _newer(url: str, than: str) -> bool:
    """Whether local shard ``url`` was written after the local counts file ``than`` (replaced since)."""
    return _is_local(url) and _is_local(than) and os.stat(url).st_mtime_ns > os.stat(than).st_mtime_ns


def shard_counts(urls: Sequence[str], counts_file: Optional[str] = None, log: Any = print,
                 label: str = "", threads: int = 8) -> tuple[np.ndarray, dict]:
    """The sample count of every shard and where they came from: ``counts_file``, else the counts
    files beside the shards (a local shard written after its counts file is not taken from it),
    else each local shard's tar headers, and only where none of these has a shard, streaming it
    (announced, with a progress line; ``threads`` shards at a time)."""
    if counts_file:
        try:
            text = _read_text(counts_file)
        except OSError as exc:
            raise CountsFileError(f"cannot read the shard counts {counts_file}: {exc.strerror or exc}") from exc
        listed = parse_shard_counts(text, counts_file)
        known = {u: (listed[n], counts_file) for u in urls for n in [shard_name(u)] if n in listed}
    else:
        known = _counts_beside(urls)
    missing = [u for u in urls if u not in known or _newer(u, known[u][1])]
    remote = [u for u in missing if not _is_local(u)]
    if remote:
        log(f"[data] counting the samples of {len(remote):,} remote shard(s) of {label} by streaming them: "
            f"{'no count for them in ' + counts_file if counts_file else 'no ' + ' or '.join(COUNTS_FILES)} "
            "beside them (spark-det pack-shards writes sizes.json; or pass --shard-counts FILE)")
    progress = Progress(log, label)
    counted: dict[str, int] = {}
    with ThreadPoolExecutor(max(1, min(threads, len(missing)))) as pool:  # I/O-bound: reads and pipes
        for url, count in zip(missing, pool.map(count_samples, missing)):
            counted[url] = count
            progress.tick(len(counted), "shards counted")
    counts = np.asarray([counted[u] if u in counted else known[u][0] for u in urls], dtype=np.int64)
    sources = sorted({known[u][1] for u in urls if u not in counted})
    return counts, {"counts_from": sources, "counts_stamps": [_stamp(f) for f in sources if _is_local(f)],
                    "counted": len(missing)}


def index_shards(spec: str, info: Any = None, log: Any = print, reindex: bool = False,
                 counts_file: Optional[str] = None) -> NameIndex:
    """The shard URLs of ``spec`` with their sample counts (``.counts``, see :func:`shard_counts`),
    from the cached index (counted once by rank 0; redone when a local shard's or counts file's
    size or mtime changes)."""
    urls = expand_shards(spec)
    local = [u for u in urls if _is_local(u)]
    if counts_file:
        counts_file = os.path.abspath(os.path.expanduser(counts_file)) if _is_local(counts_file) else counts_file

    def build() -> tuple[list[str], np.ndarray, dict]:
        missing = [u for u in local if not os.path.isfile(u)]
        if missing:
            raise DataError(f"{len(missing)} of the {len(urls)} shards of {spec} do not exist, e.g. {missing[0]}")
        counts, meta = shard_counts(urls, counts_file, log, spec)
        return urls, counts, {**meta, "stamps": [_stamp(u) for u in local], "counts_file": counts_file}

    def fresh(meta: dict) -> bool:
        try:
            return (meta.get("stamps") == [_stamp(u) for u in local] and meta.get("counts_file") == counts_file
                    and meta.get("counts_stamps") == [_stamp(f) for f in meta.get("counts_from", []) if _is_local(f)])
        except OSError:
            return False

    index = shared_index(IndexCache("shards", "::".join(urls), label=spec), fresh, build, info, log, reindex)
    if index.counts is None or int(np.sum(index.counts)) == 0:
        raise DataError(f"the shards of {spec} hold no samples with an image")
    return index


def deal_shards(counts: Sequence[int], seed: int, epoch: int, workers: int) -> list[list[int]]:
    """Each data worker's shards for an epoch: shuffled by (seed, epoch), each next shard to the
    worker with the fewest samples so far (ties: the lowest worker)."""
    order = np.random.default_rng([seed, epoch, 0x5AAD]).permutation(len(counts))
    load = [(0, w) for w in range(workers)]
    dealt: list[list[int]] = [[] for _ in range(workers)]
    for shard in order.tolist():
        samples, worker = heapq.heappop(load)
        dealt[worker].append(shard)
        heapq.heappush(load, (samples + int(counts[shard]), worker))
    return dealt


def batches_of_worker(worker: int, workers: int, first: int, iters: int) -> int:
    """How many of a rank's batches ``first..iters-1`` worker ``worker`` produces (batch j comes from j % workers)."""
    return len(range(first + (worker - first) % workers, iters, workers))


class ShardStream(IterableDataset):
    """The samples of one rank's share of the shards, for one epoch (see the module docstring).

    Items are dicts like :class:`~spark_det.data.folder.UnlabeledImages`'s, plus ``position``:
    (worker, place in its shard list, next member), the point its stream has reached.
    """

    def __init__(self, urls: Sequence[str], counts: Sequence[int], input_size: Sequence[int], seed: int,
                 batch_size: int, iters_per_epoch: int, rank: int = 0, world_size: int = 1,
                 scale: tuple[float, float] = (0.67, 1.0)) -> None:
        self.urls, self.counts = urls, counts
        self.transform = pretrain_transform(input_size, scale)
        self.seed, self.batch_size, self.iters = seed, batch_size, iters_per_epoch
        self.rank, self.world_size = rank, world_size
        self.epoch, self.first, self.workers = 0, 0, 1
        self.starts: dict[int, Position] = {}

    def configure(self, epoch: int, first: int, workers: int, starts: dict[int, Position]) -> None:
        """Read epoch ``epoch`` from the rank's batch ``first`` with ``workers`` workers, each
        logical worker from ``starts[worker]`` (default: the start of its list)."""
        self.epoch, self.first, self.workers, self.starts = epoch, first, max(workers, 1), starts

    def shard_lists(self) -> list[list[int]]:
        """This rank's workers' shard lists for the configured epoch."""
        dealt = deal_shards(self.counts, self.seed, self.epoch, self.world_size * self.workers)
        return dealt[self.rank * self.workers:(self.rank + 1) * self.workers]

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        loader_worker = info.id if info is not None else 0
        # DataLoader starts at its worker 0; after a resume at batch `first`, worker 0 plays the
        # logical worker that would have produced batch `first`, so the order is unchanged.
        worker = (loader_worker + self.first) % self.workers
        mine = self.shard_lists()[worker]
        wanted = batches_of_worker(worker, self.workers, self.first, self.iters) * self.batch_size
        if wanted and not mine:
            raise DataError(f"data worker {worker} of rank {self.rank} has no shard")
        yield from self._read(worker, mine, wanted, self.starts.get(worker, (0, 0)))

    def _read(self, worker: int, mine: list[int], wanted: int, start: Position) -> Iterator[dict]:
        produced, place, skip = 0, start[0], start[1]
        skipped: list[int] = []
        while produced < wanted:
            url = self.urls[mine[place % len(mine)]]
            member = 0
            try:
                for sample in read_samples(url):  # samples without an image member are not in the stream
                    member += 1
                    if member <= skip:
                        continue
                    key = sample_key(sample["__key__"])
                    image = self._image(sample, url)
                    if image is None:
                        skipped.append(key)
                        continue
                    produced += 1
                    yield {"image": image, "skipped": skipped, "key": (self.epoch, key),
                           "position": (worker, place, member)}
                    skipped = []
                    if produced == wanted:
                        return
            except (OSError, ValueError, tarfile.TarError, EOFError) as exc:
                warnings.warn(f"skipping the rest of shard {url} after {member} samples: {exc}", DataWarning,
                              stacklevel=2)
            place, skip = place + 1, 0
            if produced == 0 and place - start[0] >= len(mine):
                raise DataError(f"no sample of the {len(mine)} shard(s) of data worker {worker} can be read "
                                f"(e.g. {url}): are the shards corrupt?")

    def _image(self, sample: dict, url: str) -> Optional[torch.Tensor]:
        member = next((ext for ext in sample if ext.rsplit(".", 1)[-1] in IMAGE_MEMBERS), None)
        if member is None:
            warnings.warn(f"skipping sample {sample['__key__']} of {url}: no image member "
                          f"({', '.join(k for k in sample if not k.startswith('__'))})", DataWarning, stacklevel=3)
            return None
        try:
            image = load_rgb(io.BytesIO(sample[member]))
        except UNREADABLE as exc:
            warnings.warn(f"skipping unreadable image {sample['__key__']}.{member} of {url}: {exc}", DataWarning,
                          stacklevel=3)
            return None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, sample_key(sample["__key__"])))
            return self.transform(image)

    def first_images(self, count: int) -> list[dict]:
        """The first ``count`` readable samples of the first shards (URL order), keyed as epoch 0."""
        found: list[dict] = []
        epoch, self.epoch = self.epoch, 0
        try:
            for url in self.urls:
                for sample in read_samples(url, images_only=False):  # names what a sample holds instead
                    image = self._image(sample, url)
                    if image is not None:
                        found.append({"image": image, "key": (0, sample_key(sample["__key__"]))})
                    if len(found) == count:
                        return found
        except (OSError, ValueError, tarfile.TarError, EOFError) as exc:
            raise DataError(f"cannot read shard {url}: {exc}") from exc
        finally:
            self.epoch = epoch
        return found


class ShardSource:
    """Pretraining data from WebDataset shards: a :class:`~spark_det.data.source.DataSource` (the
    other one is :class:`~spark_det.data.folder.FolderSource`)."""

    def __init__(self, spec: str, input_size: Sequence[int], seed: int, per_rank_batch: int, num_workers: int,
                 info: Any, log: Any = print, reindex: bool = False, counts_file: Optional[str] = None) -> None:
        self.spec, self.info = spec, info
        self.index = index_shards(spec, info, log, reindex, counts_file)
        self.total = int(np.sum(self.index.counts))
        # shards without an image sample feed no worker: they are not dealt (nor counted as shards)
        held = np.flatnonzero(np.asarray(self.index.counts) > 0)
        self.urls: Sequence[str] = self.index
        self.counts: np.ndarray = np.asarray(self.index.counts)
        if len(held) < len(self.index):
            log(f"[data] {len(self.index) - len(held)} of the {len(self.index)} shards of {spec} hold no sample "
                f"with an image and are left out (e.g. {self.index[int(np.flatnonzero(self.counts == 0)[0])]})")
            self.urls, self.counts = [self.index[int(i)] for i in held], self.counts[held]
        workers = info.world_size * max(num_workers, 1)
        if len(self.urls) < workers:
            empties = len(self.index) - len(held)
            empty = f" (the {empties} empty ones do not count)" if empties else ""
            raise DataError(f"{len(self.urls)} shard(s){empty} cannot feed {info.world_size} rank(s) x "
                            f"{max(num_workers, 1)} data worker(s): each worker reads whole shards; pack more, "
                            f"smaller shards (spark-det pack-shards --shard-size) or lower num_workers")
        global_batch = per_rank_batch * info.world_size
        self.iters_per_epoch = self.total // global_batch
        if self.iters_per_epoch == 0:
            raise DataError(f"{self.total} samples are fewer than one global batch ({per_rank_batch} x "
                            f"{info.world_size} ranks)")
        self.stream = ShardStream(self.urls, self.counts, input_size, seed, per_rank_batch,
                                  self.iters_per_epoch, info.rank, info.world_size)
        self.num_workers, self.per_rank_batch = num_workers, per_rank_batch
        self.positions: dict[int, Position] = {}
        self.saved: Optional[tuple[int, int, dict]] = None  # (epoch, first, starts) restored from a checkpoint

    def __len__(self) -> int:
        return self.total

    def describe(self) -> str:
        return f"{self.total:,} samples in {len(self.urls):,} shards"

    def identity(self) -> dict:
        return {"samples": self.total, "index": self.index.meta["digest"]}

    def require_readable(self) -> None:
        if not self.stream.first_images(1):
            raise DataError(f"no sample of {self.spec} can be read: are the shards corrupt, or not images?")

    def preview(self, count: int) -> Optional[torch.Tensor]:
        items = self.stream.first_images(count) if count else []
        return torch.stack([it["image"] for it in items]) if items else None

    def loader(self, epoch: int, first: int, **kwargs: Any) -> Iterator[dict]:
        """Batches ``first..`` of ``epoch``; remembers each worker's position as batches are taken."""
        workers = max(self.num_workers, 1)
        starts: dict[int, Position] = {}
        if first:
            starts = self._starts(epoch, first, workers)
        self.positions = dict(starts)
        self.stream.configure(epoch, first, workers, starts)
        loader = DataLoader(self.stream, batch_size=self.per_rank_batch, collate_fn=collate,
                            num_workers=self.num_workers, drop_last=True, **kwargs)
        for batch in batches_from(loader):
            worker, place, member = batch["position"]
            self.positions[worker] = (place, member)
            yield batch

    def _starts(self, epoch: int, first: int, workers: int) -> dict[int, Position]:
        if self.saved is not None and self.saved[:2] == (epoch, first):
            return self.saved[2]
        # another layout: each worker starts the same fraction through its shard list
        lists = deal_shards(self.counts, self.stream.seed, epoch, self.info.world_size * workers)
        mine = lists[self.info.rank * workers:(self.info.rank + 1) * workers]
        return {w: (len(shards) * first // self.iters_per_epoch, 0) for w, shards in enumerate(mine)}

    def state(self) -> dict:
        """This rank's stream state, for a checkpoint."""
        return {"layout": [self.info.world_size, max(self.num_workers, 1)],
                "positions": {int(w): list(p) for w, p in self.positions.items()}}

    def restore(self, saved: Optional[list], epoch: int, first: int) -> str:
        """Take the stream positions of a checkpoint (one state per rank) resumed at (epoch, first);
        returns a note for the log when the resume is approximate."""
        layout = [self.info.world_size, max(self.num_workers, 1)]
        if first == 0:
            return ""
        if saved and len(saved) == self.info.world_size and all(s and s.get("layout") == layout for s in saved):
            mine = saved[self.info.rank]["positions"]
            self.saved = (epoch, first, {int(w): (int(p[0]), int(p[1])) for w, p in mine.items()})
            return ""
        was = saved[0].get("layout") if saved and saved[0] else "unknown"
        return (f"the checkpoint's shard streams were read by {was} (ranks, workers), this run has {layout}: "
                f"epoch {epoch} continues approximately (each worker from the shard as far through its list as "
                f"the epoch is through its iterations); exact from epoch {epoch + 1} on")
