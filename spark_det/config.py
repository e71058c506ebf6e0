"""Pretraining recipes: YAML files with ``_base_`` inheritance and ``key=value`` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Union

import yaml

# Every key a recipe may set, with its default (the paper's ImageNet recipe where it has one).
DEFAULTS: dict[str, Any] = {
    "model": "resnet50",
    "input_size": [224, 224],  # [height, width]; multiples of 32
    "mask_ratio": 0.6,
    "decoder_width": 768,
    "drop_path_rate": None,  # None: the paper's value for the model (spark_det.models)
    "epochs": 1600,
    "batch_size": 4096,  # global, over all ranks and accumulation steps
    "accum_steps": 1,
    "optimizer": "lamb",
    "base_lr": 2.0e-4,  # lr = base_lr * batch_size / 256 unless lr is set
    "lr": None,
    "betas": None,  # None: (0.9, 0.95) ResNet, (0.9, 0.999) ConvNeXt
    "warmup_epochs": 40,
    "weight_decay": 0.04,
    "weight_decay_end": 0.2,
    "clip_grad": 5.0,
    "amp": "none",  # none | bf16 | fp16
    "channels_last": False,
    "num_workers": 8,
    "seed": 0,
    "save_every_iters": 0,  # 0: checkpoint at epoch ends only
    "export_every_epochs": 50,
    "vis_every_epochs": 50,
    "vis_images": 8,
    "log_every": 20,
    "stop_after_iters": 0,  # > 0: stop as if interrupted (after a checkpoint), for testing resume
}


class ConfigError(ValueError):
    pass


def load_recipe(path: Union[str, Path]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    base = data.pop("_base_", None)
    merged = load_recipe(path.parent / base) if base else {}
    merged.update(data)
    return merged


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are parsed as YAML (``input_size=[128,192]``, ``amp=bf16``)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = _number_or_yaml(value)
    return out


def _number_or_yaml(text: str) -> Any:
    # PyYAML (YAML 1.1) reads "2e-3" as a string; a value that parses as a number is one.
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return yaml.safe_load(text)


def resolve(recipe: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    cfg = dict(DEFAULTS)
    for source in (recipe, overrides):
        unknown = sorted(set(source) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; valid keys: {sorted(DEFAULTS)}")
        cfg.update(source)
    if isinstance(cfg["input_size"], int):
        cfg["input_size"] = [cfg["input_size"], cfg["input_size"]]
    if cfg["amp"] not in ("none", "bf16", "fp16"):
        raise ConfigError(f"amp must be none, bf16 or fp16, got {cfg['amp']!r}")
    return cfg
