"""Pretraining data: where images come from and how they reach the model, one concept a module.

- ``source``: :class:`DataSource`, what a run needs of a data source, and :func:`open_source`,
  the source ``--data`` names;
- ``folder``: a folder (ImageNet's ``train/<class>/`` layout included) or a path list;
- ``shards``: WebDataset tar shards, streamed; ``packing``: a folder packed into shards;
- ``index``: a source's file (or shard) list, cached as one memory-mapped index;
- ``sampler``: which images each rank trains on, in which order, and each sample's seed;
- ``decode``: image files as RGB and what counts as unreadable; ``transforms``: the augmentation;
  ``constants``: ImageNet's normalisation; ``batches``: collation and worker errors.

Nothing here imports :mod:`spark_det.train` or :mod:`spark_det.model` at module level.
"""

from .constants import IMAGENET_MEAN, IMAGENET_STD
from .decode import load_rgb
from .folder import find_images
from .packing import pack_shards
from .source import DataSource, open_source

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DataSource", "find_images", "load_rgb", "open_source", "pack_shards"]
