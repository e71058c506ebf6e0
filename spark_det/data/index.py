"""A data set's list of files (or shards) as one memory-mapped index: built once, shared, reused.

Walking a tree of millions of files on every rank at every start costs minutes on a shared
filesystem, and a Python list of paths costs every process (and, by copy-on-write of reference
counts, every data worker) ~70 bytes per file. So global rank 0 walks the source once and writes
two flat arrays: the encoded names back to back (``names.bin``) and their offsets
(``offsets.npy``), plus an optional int64 column (``counts.npy``, samples per shard). Every
process maps them read-only: the pages are shared by all processes of a node through the page
cache, and reading a name writes nothing, so forked workers do not grow.

Where: ``$SPARK_DET_CACHE/data-index`` (default ``~/.cache/spark-det/data-index``), one folder
per source (keyed by its absolute path), one subfolder per build; ``current`` names the live one.

When it is rebuilt (the *fingerprint* rule): a folder's index is reused while every folder it
walked has the same modification *and* status-change time (adding, removing or renaming an entry
changes its parent's mtime and ctime; tar, ``rsync -a`` and ``git archive`` extractions set the
mtime back afterwards, but setting it changes the ctime, which no tool can set back; editing a
file's contents changes neither, and need not: only names are indexed); a path list's while the
list file has the same size and mtime; a shard set's while every local shard (and the counts file
its counts came from) has the same size and mtime (remote shards are trusted). ``--reindex``
forces a rebuild.

Superseded builds: every process that maps a build holds a shared ``flock`` on its ``meta.json``
(spawned data workers take their own), and a build is removed only when no process holds it and
a day has passed since it was *replaced*. A cache folder that cannot be written (a read-only
``$SPARK_DET_CACHE``) is not an error: the run keeps its index in a private temporary folder,
removed when the process exits.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import mmap
import os
import shutil
import tempfile
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from ..distributed import on_main_rank
from ..io import write_atomic

INDEX_VERSION = 1
BUILD_FILES = ("meta.json", "names.bin", "offsets.npy", "counts.npy")
SUPERSEDED = "superseded"  # a file in a replaced build; its mtime is when the build was replaced
Log = Callable[[str], None]


def cache_root() -> Path:
    """Where indexes live: ``$SPARK_DET_CACHE/data-index`` or ``~/.cache/spark-det/data-index``."""
    base = os.environ.get("SPARK_DET_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "spark-det")
    return Path(base) / "data-index"


class NameIndex(Sequence[str]):
    """Read-only, memory-mapped strings (and an optional integer per string) of one index build."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        # A shared lock held while this object lives (forked workers share it, spawned ones take
        # their own): a build in use is never removed (IndexCache._remove_old_builds).
        lock = open(folder / "meta.json", "rb")  # noqa: SIM115 - open for the object's lifetime
        self._release = weakref.finalize(self, lock.close)
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_SH)
        except OSError:  # a file system without flock: the grace period alone protects the build
            pass
        try:
            self.meta = json.loads(lock.read())
        except BaseException:
            self._release()
            raise
        # mmap slices are bytes: reading a name creates no GC-tracked object, so a worker's garbage
        # collections stay small (numpy memmap views would be tracked objects)
        self._names: Any = b""
        if self.meta["bytes"]:
            with open(folder / "names.bin", "rb") as f:
                self._names = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._offsets = np.load(folder / "offsets.npy", mmap_mode="r")
        self.counts = np.load(folder / "counts.npy", mmap_mode="r") if (folder / "counts.npy").exists() else None

    def __reduce__(self) -> tuple:
        return NameIndex, (self.folder,)  # a spawned worker maps the files (and takes the lock) itself

    def close(self) -> None:
        """Release the build (its lock); the mapped files stay readable until this object is gone."""
        self._release()

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        return os.fsdecode(self._names[start:end])

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))


def _digest(names: bytes, offsets: np.ndarray, counts: Optional[np.ndarray]) -> str:
    h = hashlib.sha256(names)
    h.update(offsets.tobytes())
    if counts is not None:
        h.update(counts.tobytes())
    return h.hexdigest()[:32]


class IndexCache:
    """The cached index of one data source.

    Args:
        kind: what the source is ('folder', 'list', 'shards'); part of the key.
        source: the source's absolute path or URL pattern; the other part of the key.
        label: how messages name the source (default: ``source``).
        root: where the cache lives (:func:`cache_root` by default).
    """

    def __init__(self, kind: str, source: str, label: Optional[str] = None, root: Optional[Path] = None) -> None:
        self.kind, self.source, self.label = kind, source, label or source
        key = hashlib.sha256(f"{INDEX_VERSION}\0{kind}\0{source}".encode()).hexdigest()[:16]
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(self.label.rstrip("/")).name)[:40]
        self.folder = (root or cache_root()) / f"{stem}-{key}"

    def current(self) -> Optional[str]:
        """The live build's id, if any."""
        try:
            return (self.folder / "current").read_text().strip() or None
        except OSError:
            return None

    def open(self, build: str, digest: Optional[str] = None) -> Optional[NameIndex]:
        """The build ``build`` if present, complete and (when given) of that digest; else None."""
        try:
            index = NameIndex(self.folder / build)
        except (OSError, ValueError, KeyError):
            return None
        if digest is not None and index.meta.get("digest") != digest:
            return None
        return index

    def write(self, names: bytes, offsets: np.ndarray, counts: Optional[np.ndarray], meta: dict[str, Any],
              build: Optional[str] = None) -> str:
        """Write a build (into a temporary folder, renamed into place) and make it current; builds
        it supersedes are removed once unused and replaced a day ago (see the module docstring)."""
        build = build or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = self.folder / f".{build}.{uuid.uuid4().hex[:8]}.tmp"
        staging.mkdir()
        try:
            (staging / "names.bin").write_bytes(names)
            np.save(staging / "offsets.npy", offsets)
            if counts is not None:
                np.save(staging / "counts.npy", counts)
            meta = {**meta, "version": INDEX_VERSION, "kind": self.kind, "source": self.source,
                    "bytes": len(names), "digest": meta.get("digest") or _digest(names, offsets, counts)}
            (staging / "meta.json").write_text(json.dumps(meta))
            try:
                os.rename(staging, self.folder / build)
            except OSError:  # another process of this node wrote the same build first
                if self.open(build, meta["digest"]) is None:
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        write_atomic(self.folder / "current", lambda f: f.write(build.encode()))
        self._remove_old_builds(keep=build)
        return build

    def _remove_old_builds(self, keep: str, grace_s: float = 86400.0) -> None:
        # A run started before the rebuild still maps its build, and its spawned data workers open
        # it by name at each epoch: a build is removed only when no process holds its lock, and a
        # day after it was replaced (the lock's back-up where flock does not work).
        now = time.time()
        for old in self.folder.iterdir():
            if not old.is_dir() or old.name == keep or old.name.startswith("."):
                continue
            try:
                replaced = (old / SUPERSEDED).stat().st_mtime
            except OSError:
                try:
                    (old / SUPERSEDED).touch()  # replaced now: the day starts counting
                except OSError:
                    pass
                continue
            if now - replaced > grace_s:
                _remove_unless_in_use(old)

    def files(self, build: str) -> dict[str, bytes]:
        """A build's files, to send to a rank whose node cannot see this cache."""
        folder = self.folder / build
        return {name: (folder / name).read_bytes() for name in BUILD_FILES if (folder / name).is_file()}

    def use_private_folder(self) -> Path:
        """Keep this source's index in a new private temporary folder (removed at exit), for a
        cache root that cannot be written; returns the root that could not be written."""
        unwritable = self.folder.parent
        private = Path(tempfile.mkdtemp(prefix="spark-det-index-"))
        atexit.register(shutil.rmtree, private, True)
        self.folder = private / self.folder.name
        return unwritable

    def receive(self, build: str, files: dict[str, bytes]) -> NameIndex:
        """Store a build received from rank 0 in this node's cache and open it."""
        meta = json.loads(files["meta.json"])
        if self.open(build, meta["digest"]) is None:
            try:
                self._store(build, files)
            except OSError:  # this node's cache cannot be written: a private folder, like rank 0's
                self.use_private_folder()
                self._store(build, files)
        index = self.open(build, meta["digest"])
        assert index is not None, self.folder / build
        return index

    def _store(self, build: str, files: dict[str, bytes]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = self.folder / f".{build}.{uuid.uuid4().hex[:8]}.tmp"
        staging.mkdir()
        try:
            for name, data in files.items():
                (staging / name).write_bytes(data)
            try:
                os.rename(staging, self.folder / build)
            except OSError:  # another rank of this node stored it first
                if not (self.folder / build).is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        write_atomic(self.folder / "current", lambda f: f.write(build.encode()))


def _remove_unless_in_use(build: Path) -> None:
    """Remove a build folder unless a process maps it (holds the shared lock on its meta.json)."""
    try:
        fd = os.open(build / "meta.json", os.O_RDONLY)
    except FileNotFoundError:  # an incomplete build: nobody can map it
        shutil.rmtree(build, ignore_errors=True)
        return
    except OSError:  # e.g. another user's build: not ours to judge
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # in use
    except OSError:
        pass  # no flock on this file system: the grace period decides
    try:
        shutil.rmtree(build, ignore_errors=True)  # holding the lock: a reader waits, then finds it gone
    finally:
        os.close(fd)


def encode_names(names: Sequence[str]) -> tuple[bytes, np.ndarray]:
    """Names (file-system strings, any bytes) as one buffer and int64 offsets (len(names) + 1)."""
    encoded = [os.fsencode(n) for n in names]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return b"".join(encoded), offsets


class Progress:
    """A line every few seconds while something big is indexed (silent for small sources)."""

    def __init__(self, log: Log, what: str, every_s: float = 2.0) -> None:
        self.log, self.what, self.every_s = log, what, every_s
        self.start = self.last = time.perf_counter()

    def tick(self, count: int, unit: str) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self.log(f"[data] indexing {self.what}: {count:,} {unit} so far ({now - self.start:.0f} s)")


def shared_index(cache: IndexCache, is_fresh: Callable[[dict], bool],
                 build: Callable[[], tuple[Sequence[str], Optional[np.ndarray], dict[str, Any]]],
                 info: Any = None, log: Log = print, reindex: bool = False) -> NameIndex:
    """The index of ``cache``'s source, built by global rank 0 only and mapped by every rank.

    Rank 0 reuses the current build when ``is_fresh(meta)`` (the fingerprint rule) and
    ``reindex`` is not set, else calls ``build()`` -> (names, counts or None, meta) and writes
    it. Every rank then maps that build from its own cache folder; a rank whose node cannot see
    rank 0's cache (a node-local ``$SPARK_DET_CACHE``) receives the files over the process group
    and stores them, so no rank ever walks the source itself.
    """

    def find_or_build() -> tuple[str, str]:
        live = None if reindex else cache.current()
        index = cache.open(live) if live else None
        if index is not None and is_fresh(index.meta):
            log(f"[data] {cache.label}: reusing the index of {len(index):,} entries built {index.meta['built']} "
                f"({index.folder})")
            return index.folder.name, index.meta["digest"]
        why = "--reindex" if reindex else ("the source changed" if index is not None else "no index yet")
        log(f"[data] {cache.label}: building the index ({why})")
        started = time.perf_counter()
        names, counts, meta = build()
        data, offsets = encode_names(names)
        meta = {**meta, "entries": len(names), "built": time.strftime("%Y-%m-%d %H:%M:%S"),
                "built_by": f"pid {os.getpid()} on {os.uname().nodename}",
                "build_s": round(time.perf_counter() - started, 2)}
        try:
            build_id = cache.write(data, offsets, counts, meta)
        except OSError as exc:  # the index is a cache: a read-only one must not stop the run
            unwritable = cache.use_private_folder()
            log(f"[data] warning: cannot write the index cache {unwritable} ({exc.strerror or exc}); this run "
                f"keeps its index in {cache.folder} (removed at exit; set SPARK_DET_CACHE to a writable folder "
                "to reuse it)")
            build_id = cache.write(data, offsets, counts, meta)
        log(f"[data] {cache.label}: indexed {len(names):,} entries in {meta['build_s']:.1f} s ({cache.folder})")
        built = cache.open(build_id)
        assert built is not None
        return build_id, built.meta["digest"]

    found = on_main_rank(find_or_build, info) if info is not None else find_or_build()
    if info is None or not info.distributed:
        index = cache.open(*found)
        assert index is not None
        return index
    import torch.distributed as dist

    box = [found]
    dist.broadcast_object_list(box, src=0)
    build_id, digest = box[0]
    index = cache.open(build_id, digest)
    seen: list = [None] * info.world_size
    dist.all_gather_object(seen, index is not None)
    if all(seen):
        return index  # type: ignore[return-value]
    parcel = [cache.files(build_id) if info.is_main else None]
    dist.broadcast_object_list(parcel, src=0)  # our own process group, not a file
    if index is None:
        index = cache.receive(build_id, parcel[0])
    if info.is_main:
        log(f"[data] sent the index to {seen.count(False)} rank(s) that cannot see {cache.folder}")
    return index
