"""The data source protocol: both sources implement all of it, ``open_source`` gives the one
``--data`` names, and the Pretrainer asks a source for nothing the protocol does not name."""

import ast
import inspect
from pathlib import Path

import pytest

from spark_det.data.folder import FolderSource
from spark_det.data.packing import pack_shards
from spark_det.data.shards import ShardSource
from spark_det.data.source import DataSource, open_source
from spark_det.distributed import DistInfo
from spark_det.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
METHODS = [name for name, member in vars(DataSource).items()
           if callable(member) and (not name.startswith("_") or name == "__len__")]
quiet = lambda _: None  # noqa: E731


@pytest.fixture(scope="module")
def folder(unlabeled_images):
    return unlabeled_images(8, size=32)


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("shards") / "train"
    written = pack_shards(str(folder), str(prefix), shard_size=4, log=quiet)
    return f"{prefix}-{{000000..{len(written) - 1:06d}}}.tar"


def test_the_protocol_names_what_a_run_needs():
    assert sorted(METHODS) == ["__len__", "describe", "identity", "loader", "preview", "require_readable", "restore",
                               "state"]
    assert "iters_per_epoch" in DataSource.__annotations__


@pytest.mark.parametrize("cls", [FolderSource, ShardSource])
def test_each_source_defines_every_method_of_the_protocol_with_its_parameters(cls):
    for name in METHODS:
        assert name in vars(cls), f"{cls.__name__} lacks {name}"
        mine = list(inspect.signature(getattr(cls, name)).parameters)
        assert mine == list(inspect.signature(getattr(DataSource, name)).parameters), (cls.__name__, name)


def test_open_source_gives_a_folder_source_or_a_shard_source_and_both_are_data_sources(folder, shards):
    for data, cls in ((folder, FolderSource), (shards, ShardSource)):
        source = open_source(data, (32, 32), seed=0, per_rank_batch=2, num_workers=0, info=DistInfo(), log=quiet)
        assert type(source) is cls and isinstance(source, DataSource)
        assert source.iters_per_epoch == 4 and len(source) == 8
        source.require_readable()
        batch = next(iter(source.loader(0, 0)))
        assert batch["image"].shape == (2, 3, 32, 32) and len(batch["key"]) == 2
    with pytest.raises(DataError, match="--shard-counts applies to WebDataset shards"):
        open_source(folder, (32, 32), 0, 2, 0, DistInfo(), quiet, shard_counts="sizes.json")


def test_the_pretrainer_uses_only_what_the_protocol_names():
    tree = ast.parse((ROOT / "spark_det" / "train" / "pretrainer.py").read_text())
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute) and node.value.attr == "source"
            and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    assert used and used <= set(METHODS) | {"iters_per_epoch"}, used - set(METHODS)
