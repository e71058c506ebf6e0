"""Any timm CNN SparK supports as a 4-level feature pyramid (strides 4-32) for detection.

The generic counterpart of :mod:`.convnext_pyramid`: the timm model itself, built as the SparK
encoder builds it (``num_classes=0, global_pool=''``) and pruned after its last feature level
(``prune_intermediate_layers``), run with ``forward_intermediates``. Parameter names are timm's,
so a spark-det encoder export (``encoder-<model>.pth``) loads without renaming, and the features
are the encoder's with every patch visible. Detectron2 and MMDetection backbones
(``spark_det.d2.timm_backbone``, ``spark_det.mmdet.timm_backbone``) are this module plus their
framework's base class, and load the export themselves (:meth:`TimmPyramid.load_export`) so that
every backbone tensor is known to come from the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import timm
import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError
from ..io import load_file
from .layouts import key_mismatch, timm_encoder_state

NUM_LEVELS = 4


class TimmPyramid(nn.Module):
    """timm model ``name`` returning its last 4 feature maps, strides 4, 8, 16, 32.

    Args:
        name: a timm model name (any model SparK pretrains: ``SparseEncoder`` builds the same).
        drop_path_rate: stochastic depth, passed to timm.
    """

    def __init__(self, name: str, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if not timm.is_model(name):
            raise ConfigError(f"unknown timm model {name!r}")
        kwargs = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
        self.model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="", **kwargs)
        self.arch = name
        info = self.model.feature_info[-NUM_LEVELS:]
        self.channels: list[int] = [int(i["num_chs"]) for i in info]
        self.strides: list[int] = [int(i["reduction"]) for i in info]
        if self.strides != [4, 8, 16, 32]:
            raise ConfigError(f"{name}: its last 4 feature levels have strides {self.strides}, detection with "
                              "an FPN needs 4, 8, 16, 32")
        self.unused = self._prune()

    def _prune(self) -> list[str]:
        """Drop the layers after the last feature level (classifier-side convs, final norms): no
        feature reads them. Returns their parameter names (an export holds them; they are left out)."""
        before = set(self.model.state_dict())
        self.model.prune_intermediate_layers(NUM_LEVELS, prune_norm=False, prune_head=True)
        return sorted(before - set(self.model.state_dict()))

    def parameter_depths(self) -> dict[str, int]:
        """Each parameter's depth, for layer-wise lr decay: 0 for the stem (everything before the
        first pyramid level's module), k = 1..4 for the parameters up to the end of level k's module
        (strides 4, 8, 16, 32), the modules named by timm's ``feature_info``. Names are this
        module's (``model.`` + timm's); parameters are in registration order, which timm keeps
        in forward order."""
        modules = [str(i["module"]) for i in self.model.feature_info[-NUM_LEVELS:]]
        names = [name for name, _ in self.model.named_parameters()]
        ends, end = [], -1  # index of the last parameter of each level's module
        for module in modules:
            inside = [i for i, name in enumerate(names) if name.startswith(module + ".")]
            end = max(inside, default=end)
            ends.append(end)
        first = min((i for i, name in enumerate(names) if name.startswith(modules[0] + ".")), default=0)
        depths = {}
        for i, name in enumerate(names):
            level = next((k + 1 for k, last in enumerate(ends) if i <= last), NUM_LEVELS)
            depths[f"model.{name}"] = 0 if i < first else level
        return depths

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=NUM_LEVELS, intermediates_only=True)

    def load_export(self, path: Union[str, Path]) -> list[str]:
        """Load a spark-det encoder export (or any file spark-det reads as timm weights): every
        tensor of this backbone must come from the file; returns the file's keys left out (the
        pruned layers after the last feature level). Raises :class:`CheckpointError` otherwise."""
        state = timm_encoder_state(load_file(path))
        target = self.model.state_dict()
        missing, unexpected, bad = key_mismatch(state, target)
        ignorable = set(self.unused)
        unexpected = [k for k in unexpected if k not in ignorable]
        if missing or unexpected or bad:
            raise CheckpointError(
                f"{path} does not fit the {self.arch} backbone: {len(missing)} tensors missing (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(bad)} of another shape (e.g. {bad[:3]}); "
                "is it an export of this model?")
        self.model.load_state_dict({k: v for k, v in state.items() if k in target}, strict=True)
        return sorted(set(state) - set(target))
