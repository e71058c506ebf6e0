"""The encoders spark-det supports for pretraining, with the paper's per-model settings."""

from __future__ import annotations

from typing import Any

from .encoder import SparseEncoder
from .spark import SparK

# name -> settings from the paper's recipes (stochastic depth, LAMB betas). Any other timm CNN
# with a 4-scale feature pyramid may work too: SparseEncoder refuses layers it cannot run sparsely.
SUPPORTED_MODELS: dict[str, dict[str, Any]] = {
    "resnet18": dict(drop_path_rate=0.0, betas=(0.9, 0.95)),
    "resnet34": dict(drop_path_rate=0.0, betas=(0.9, 0.95)),
    "resnet50": dict(drop_path_rate=0.05, betas=(0.9, 0.95)),
    "resnet101": dict(drop_path_rate=0.08, betas=(0.9, 0.95)),
    "resnet152": dict(drop_path_rate=0.10, betas=(0.9, 0.95)),
    "resnet200": dict(drop_path_rate=0.15, betas=(0.9, 0.95)),
    "convnext_atto": dict(drop_path_rate=0.0, betas=(0.9, 0.999)),
    "convnext_femto": dict(drop_path_rate=0.0, betas=(0.9, 0.999)),
    "convnext_pico": dict(drop_path_rate=0.0, betas=(0.9, 0.999)),
    "convnext_nano": dict(drop_path_rate=0.0, betas=(0.9, 0.999)),
    "convnext_tiny": dict(drop_path_rate=0.1, betas=(0.9, 0.999)),
    "convnext_small": dict(drop_path_rate=0.2, betas=(0.9, 0.999)),
    "convnext_base": dict(drop_path_rate=0.3, betas=(0.9, 0.999)),
    "convnext_large": dict(drop_path_rate=0.4, betas=(0.9, 0.999)),
    "convnextv2_atto": dict(drop_path_rate=0.0, betas=(0.9, 0.999)),
    "convnextv2_tiny": dict(drop_path_rate=0.1, betas=(0.9, 0.999)),
    "seresnet50": dict(drop_path_rate=0.05, betas=(0.9, 0.95)),
    "regnety_040": dict(drop_path_rate=0.05, betas=(0.9, 0.95)),
}


FALLBACK_DEFAULTS: dict[str, Any] = dict(drop_path_rate=0.0, betas=(0.9, 0.999))


def model_defaults(model_name: str) -> dict[str, Any]:
    """The paper's settings for ``model_name`` (no stochastic depth, Adam betas for anything else)."""
    return {**FALLBACK_DEFAULTS, **SUPPORTED_MODELS.get(model_name, {})}


def create_spark(
    model_name: str,
    mask_ratio: float = 0.6,
    decoder_width: int = 768,
    drop_path_rate: float | None = None,
    sparse_impl: str = "fast",
    **timm_kwargs: Any,
) -> SparK:
    """A SparK model around ``timm.create_model(model_name)`` with the paper's drop-path rate.

    ``sparse_impl``: 'fast' or 'reference' sparse execution (same results, see spark_det.sparse).
    """
    if drop_path_rate is None:
        drop_path_rate = model_defaults(model_name)["drop_path_rate"]
    encoder = SparseEncoder(model_name, drop_path_rate=drop_path_rate, impl=sparse_impl, **timm_kwargs)
    return SparK(encoder, mask_ratio=mask_ratio, decoder_width=decoder_width)
