"""What a study compares: the backbone's initialisations, and the checks that they fit the model.

    spark              SparK pretraining on the study's unlabeled images (or --spark-weights FILE)
    scratch            random initialisation (each framework's own)
    timm:FILE          a supervised timm ResNet state dict the user has (nothing is downloaded)
    torchvision:FILE   a torchvision ResNet state dict (same names as timm's)
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError, ConfigError

KINDS = ("spark", "scratch", "timm", "torchvision")
FILE_KINDS = ("timm", "torchvision")

# The study's detection configs (det_configs/*/..._cpu_demo.*) build each framework's own ResNet-FPN.
RESNET = re.compile(r"resnet(18|34|50|101|152)")

# The module each framework's training command imports first.
FRAMEWORK_MODULES = {"detectron2": "detectron2", "mmdet": "mmdet"}


@dataclass(frozen=True)
class Init:
    """One initialisation of the backbone: ``kind`` and, for supervised checkpoints, the file."""

    kind: str
    path: Optional[Path] = None

    @property
    def label(self) -> str:
        """The name in run folders and reports: ``spark``, ``scratch`` or ``timm-<file stem>``."""
        return self.kind if self.path is None else f"{self.kind}-{self.path.stem}"

    @property
    def needs_weights(self) -> bool:
        return self.kind != "scratch"


def parse_init(text: str) -> Init:
    """``spark``, ``scratch``, ``timm:FILE`` or ``torchvision:FILE``."""
    kind, _, path = text.partition(":")
    if kind not in KINDS or (kind in FILE_KINDS) != bool(path):
        raise ConfigError(f"--init {text!r}: use spark, scratch, timm:FILE or torchvision:FILE")
    return Init(kind, Path(path).expanduser().resolve() if path else None)


def parse_inits(texts: list[str]) -> list[Init]:
    inits = [parse_init(t) for t in texts]
    labels = [i.label for i in inits]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--init names one initialisation twice: {labels}")
    if len(inits) < 2:
        raise ConfigError("--init needs at least two initialisations to compare, e.g. --init spark scratch")
    return inits


def resnet_depth(model: str) -> int:
    """The ResNet depth of a model the study supports, or a one-line error."""
    found = RESNET.fullmatch(model)
    if not found:
        raise ConfigError(f"--model {model}: the study's Mask R-CNN configs are for the frameworks' own ResNet-FPN "
                          "(resnet18, resnet34, resnet50, resnet101, resnet152)")
    return int(found.group(1))


def check_weights(path: Path, model: str, what: str) -> None:
    """Refuse a checkpoint that does not hold ``model``'s whole backbone (before any training); ``what``
    names the file as the user gave it."""
    from ..io import load_file
    from ..transfer.convert import convert

    try:
        convert(load_file(path), "timm", model)
    except CheckpointError as exc:
        raise CheckpointError(f"{what} does not fit --model {model}: {exc}") from exc


def check_frameworks(frameworks: list[str]) -> None:
    """Every framework asked for must be importable (found without importing it: the core stays framework-free)."""
    for fw in frameworks:
        if importlib.util.find_spec(FRAMEWORK_MODULES[fw]) is None:
            raise ConfigError(f"{fw} is not installed in this environment: install it (README, setup) or leave it "
                              "out of --frameworks")
