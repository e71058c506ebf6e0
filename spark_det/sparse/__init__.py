"""How a dense timm CNN runs on the visible positions of a masked image only.

``masking``: random masks and the scoped holder that carries one forward pass's mask to the
layers; ``norms``: statistics over visible positions; ``layers``: per-layer sparse modules;
``blocks``: the fast path, whole blocks on gathered rows; ``reference``: SparK's own emulation,
the definition of correct; ``convert``: :func:`sparsify`, turning a timm model into all this.
"""

from .convert import (
    IMPLEMENTATIONS,
    UnsupportedLayerError,
    enable_sparse_sync_batchnorm,
    first_layer_fed_masked_values,
    modules_run_by,
    sparsify,
)
from .masking import ActiveMask, masked_fill_pixels, num_visible, random_visible_mask, upsample_mask

__all__ = [
    "IMPLEMENTATIONS", "ActiveMask", "UnsupportedLayerError", "enable_sparse_sync_batchnorm",
    "first_layer_fed_masked_values", "masked_fill_pixels", "modules_run_by", "num_visible",
    "random_visible_mask", "sparsify", "upsample_mask",
]
