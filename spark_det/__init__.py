"""spark-det: SparK masked image modeling for any timm CNN, with Detectron2 and MMDetection transfer.

Subpackages: ``sparse`` (masking and sparse execution of a dense CNN), ``model`` (encoder,
decoder, SparK, supported models), ``data`` (the pretraining data sources), ``train`` (the
pretraining run), ``transfer`` (weight layouts and converters), and the framework adapters ``d2``
and ``mmdet``, which the core never imports.
"""

from importlib.metadata import PackageNotFoundError, version

from .model import SparK, SparseEncoder, create_spark
from .train import Pretrainer, load_config

try:
    __version__ = version("spark-det")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["Pretrainer", "SparK", "SparseEncoder", "__version__", "create_spark", "load_config"]
