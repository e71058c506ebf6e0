"""The SparK method: sparse encoder, light decoder, densify + loss, and the supported models."""

from ..data.constants import IMAGENET_MEAN, IMAGENET_STD
from .decoder import LightDecoder
from .encoder import SparseEncoder
from .registry import SUPPORTED_MODELS, create_spark, model_defaults
from .spark import SparK, patchify, unpatchify

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SUPPORTED_MODELS", "LightDecoder", "SparK", "SparseEncoder",
           "create_spark", "model_defaults", "patchify", "unpatchify"]
