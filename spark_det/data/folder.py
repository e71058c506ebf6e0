"""Unlabeled images in a folder (ImageNet's train/<class>/ layout included) or listed in a text
file, as a pretraining data source (:class:`FolderSource`), read robustly.

Reproducibility: each sample's augmentation is drawn from a seed derived from (seed, epoch,
index), and the sampler (:mod:`.sampler`) hands (epoch, index) pairs to the dataset. So the data
stream depends only on the run's seed, not on workers or process state, and a resumed run sees
exactly the images and crops the uninterrupted run would have seen.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError, DataWarning
from .batches import batches_from, collate
from .decode import IMAGE_EXTENSIONS, UNREADABLE, load_rgb, require_readable
from .index import IndexCache, Progress, shared_index
from .sampler import EpochSampler, sample_seed
from .transforms import pretrain_transform


class ImageIndex(Sequence[Path]):
    """The image files of a data source, in a fixed order: paths decoded on demand from the
    memory-mapped :class:`~spark_det.data.index.NameIndex` (nothing per file in Python memory)."""

    def __init__(self, root: Path, names: Sequence[str], source: object) -> None:
        self.root, self.names, self.source = root, names, source

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> Path:  # type: ignore[override]
        return self.root / self.names[i]


def _folder_stamp(path: str) -> Optional[list[int]]:
    """What a folder's entry in the fingerprint holds: its mtime and ctime (None if it cannot be
    stat-ed). Extracting an archive over a folder, ``rsync -a`` and ``git archive`` set the mtime
    back; setting it changes the ctime, which no tool can set back (only the clock does)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_ctime_ns]


def _is(entry: os.DirEntry, kind: str) -> bool:
    try:  # an entry whose type needs a stat that fails (permissions, a vanished file) is neither
        return entry.is_dir() if kind == "dir" else entry.is_file()
    except OSError:
        return False


def _walk_images(root: Path, progress: Progress) -> tuple[list[str], list[list], list[tuple[str, str]]]:
    """Image files under ``root`` (relative names, sorted as path parts), every folder walked with
    its stamp (the fingerprint), and the folders that could not be read with the reason.

    os.scandir reads file types from the directory itself, so unlike ``Path.rglob`` + ``is_file``
    it costs no stat per file; symlinked folders are followed once each. A folder that cannot be
    listed (``lost+found``, no read permission) is skipped, and stays in the fingerprint, so the
    index is rebuilt once its permissions change (a chmod changes its ctime)."""
    names: list[str] = []
    folders: list[list] = []
    unreadable: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()
    pending = [""]
    while pending:
        rel = pending.pop()
        folder = os.path.join(root, rel) if rel else str(root)
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            folders.append([rel, [st.st_mtime_ns, st.st_ctime_ns]])
            with os.scandir(folder) as entries:
                for entry in entries:
                    name = f"{rel}/{entry.name}" if rel else entry.name
                    if _is(entry, "dir"):
                        pending.append(name)
                    elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and _is(entry, "file"):
                        names.append(name)
                        if len(names) % 8192 == 0:
                            progress.tick(len(names), "images")
        except OSError as exc:
            unreadable.append((folder, exc.strerror or str(exc)))
            if not folders or folders[-1][0] != rel:
                folders.append([rel, _folder_stamp(folder)])
    names.sort(key=lambda n: n.replace("/", "\0"))  # the order of sorted(Path) objects: by path parts
    return names, folders, unreadable


def _folders_unchanged(root: Path, meta: dict) -> bool:
    return all(_folder_stamp(os.path.join(root, rel) if rel else str(root)) == stamp
               for rel, stamp in meta["folders"])


def _file_stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def find_images(source: Union[str, Path], info: object = None, log: Callable[[str], None] = print,
                reindex: bool = False) -> ImageIndex:
    """All image files under a folder (recursively, so ImageNet's train/<class>/ works too), or
    the paths listed in a text file (one per line, relative to the file's folder; # comments).

    The list comes from the source's cached index (:mod:`.index`: built by global rank 0 when
    missing or stale, then mapped by every process); ``info`` is the run's DistInfo, if any.
    """
    source = Path(source).expanduser().absolute()
    if not source.exists():
        raise DataError(f"data path {source} does not exist")
    progress = Progress(log, str(source))
    if source.is_file():
        base = source.parent
        cache = IndexCache("list", str(source))

        def build() -> tuple[list[str], None, dict]:
            lines = [ln.strip() for ln in source.read_text().splitlines()]
            listed = [ln for ln in lines if ln and not ln.startswith("#")]
            missing = [ln for ln in listed if not (base / ln).is_file()]
            if missing:
                raise DataError(f"{len(missing)} paths listed in {source} do not exist, e.g. {base / missing[0]}")
            return _some(listed, source), None, {"list_file": _file_stamp(source)}

        def fresh(meta: dict) -> bool:
            return meta.get("list_file") == _file_stamp(source)
    else:
        base = source
        cache = IndexCache("folder", str(source))

        def build() -> tuple[list[str], None, dict]:
            names, folders, unreadable = _walk_images(source, progress)
            return _some(names, source, unreadable), None, {"folders": folders, "unreadable": unreadable}

        def fresh(meta: dict) -> bool:
            return _folders_unchanged(source, meta)

    index = shared_index(cache, fresh, build, info, log, reindex)
    unreadable = index.meta.get("unreadable") or []
    if unreadable:  # said at every start, not only when the index is built
        shown = ", ".join(f"{path} ({why})" for path, why in unreadable[:5])
        more = f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
        log(f"[data] warning: skipping {len(unreadable)} folder(s) of {source} that cannot be read: {shown}{more}")
    return ImageIndex(base, index, source)


def _some(names: list[str], source: Path, unreadable: Sequence[tuple[str, str]] = ()) -> list[str]:
    if not names:
        skipped = f"; {len(unreadable)} folder(s) could not be read, e.g. {unreadable[0][0]} ({unreadable[0][1]})" \
            if unreadable else ""
        raise DataError(
            f"no images found in {source} (looked for {', '.join(IMAGE_EXTENSIONS)} recursively, "
            f"or a text file listing image paths){skipped}"
        )
    return names


class UnlabeledImages(Dataset):
    """Images for pretraining. Items are keyed by (epoch, index); see the module docstring.

    A file that cannot be read (corrupt, truncated, not an image) is skipped with a warning and
    replaced by the next readable one, so batches keep their size; ``item["skipped"]`` lists the
    skipped files' indices so the training loop can count distinct unreadable files.
    """

    def __init__(self, source: Union[str, Path, Sequence[Path]], input_size: Sequence[int],
                 seed: int = 0, scale: tuple[float, float] = (0.67, 1.0)) -> None:
        self.paths = source if isinstance(source, (list, tuple, ImageIndex)) else find_images(source)
        if not len(self.paths):
            raise DataError("no images given")
        self.source = self.paths.source if isinstance(self.paths, ImageIndex) else (
            source if not isinstance(source, (list, tuple)) else "the given paths")
        self.transform = pretrain_transform(input_size, scale)
        self.seed = seed

    def require_readable(self, sample: int = 16) -> None:
        require_readable(self.paths, self.source, sample)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        attempts = min(len(self.paths), 100)
        skipped: list[int] = []
        for offset in range(attempts):
            position = (index + offset) % len(self.paths)
            try:
                image = load_rgb(self.paths[position])
            except UNREADABLE as exc:
                warnings.warn(f"skipping unreadable image {self.paths[position]}: {exc}", DataWarning, stacklevel=2)
                skipped.append(position)
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, epoch, index))
                tensor = self.transform(image)
            return {"image": tensor, "skipped": skipped, "key": (epoch, index)}
        raise DataError(f"{attempts} consecutive images from {self.paths[index]} on cannot be read: is the data "
                        "corrupt?")


class FolderSource:
    """Pretraining data from a folder or a path list: a :class:`~spark_det.data.source.DataSource`
    (the other one is :class:`~spark_det.data.shards.ShardSource`)."""

    def __init__(self, data: Union[str, Path], input_size: Sequence[int], seed: int, per_rank_batch: int,
                 num_workers: int, info: Any, log: Callable[[str], None] = print, reindex: bool = False) -> None:
        self.dataset = UnlabeledImages(find_images(data, info, log, reindex), input_size, seed=seed)
        self.sampler = EpochSampler(len(self.dataset), per_rank_batch, info.rank, info.world_size, seed=seed)
        self.iters_per_epoch = self.sampler.batches_per_epoch
        self.per_rank_batch, self.num_workers = per_rank_batch, num_workers

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self) -> str:
        return f"{len(self.dataset):,} images"

    def identity(self) -> dict:
        paths = self.dataset.paths
        digest = paths.names.meta["digest"] if isinstance(paths, ImageIndex) else None
        return {"images": len(paths), "index": digest, "first": str(paths[0]), "last": str(paths[-1])}

    def require_readable(self) -> None:
        self.dataset.require_readable()

    def preview(self, count: int) -> Optional[torch.Tensor]:
        count = min(count, len(self.dataset))
        return torch.stack([self.dataset[(0, i)]["image"] for i in range(count)]) if count else None

    def loader(self, epoch: int, first: int, **kwargs: Any) -> Iterator[dict]:
        self.sampler.set_epoch(epoch, first)
        return batches_from(DataLoader(self.dataset, batch_size=self.per_rank_batch, sampler=self.sampler,
                                          collate_fn=collate, num_workers=self.num_workers, drop_last=True, **kwargs))

    def state(self) -> None:
        return None  # the order is a pure function of (seed, epoch): nothing to keep

    def restore(self, saved: Optional[list], epoch: int, first: int) -> str:
        return ""
