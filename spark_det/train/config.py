"""Pretraining recipes: YAML files with ``_base_`` inheritance and ``key=value`` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Union

import yaml

from ..errors import ConfigError, first_line
from .trackers import logger_names

# Every key a recipe may set, with its default (the paper's ImageNet recipe where it has one).
DEFAULTS: dict[str, Any] = {
    "model": "resnet50",
    "input_size": [224, 224],  # [height, width]; multiples of 32
    "mask_ratio": 0.6,
    "decoder_width": 768,
    "drop_path_rate": None,  # None: the paper's value for the model (spark_det.model.registry)
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
    "compile": False,  # true (inductor) or a torch.compile backend name: compile the training forward/backward
    "num_workers": 8,
    "seed": 0,
    "save_every_iters": 0,  # 0: checkpoint at epoch ends only
    "keep_checkpoints": 2,  # checkpoint-last.pth and the ones before it; resume falls back to them
    "dist_timeout_s": 600,  # bound on the rendezvous and on any collective (a stuck restart fails, not hangs)
    "max_loss": 1.0e+4,  # a finite loss above it is divergence too (the paper's loss is about 1); null: off
    "export_every_epochs": 50,
    "vis_every_epochs": 50,
    "vis_images": 8,
    "log_every": 20,  # iterations between plain log lines when stdout is not a terminal
    "stop_after_iters": 0,  # > 0: stop as if interrupted (after a checkpoint), for testing resume
    "leak_audit": True,  # the leak probe on the live encoder after loading weights and before each checkpoint
    "logger": None,  # experiment trackers beside metrics.jsonl/TensorBoard: wandb, mlflow or [wandb, mlflow]
}


AMP_MODES = ("none", "bf16", "fp16")
OPTIMIZERS = ("lamb", "adamw")
# key -> smallest allowed value, for the integer keys
INTEGER_KEYS = {
    "epochs": 1, "batch_size": 1, "accum_steps": 1, "warmup_epochs": 0, "num_workers": 0, "seed": 0,
    "save_every_iters": 0, "keep_checkpoints": 1, "export_every_epochs": 1, "vis_every_epochs": 1, "vis_images": 0,
    "log_every": 1, "stop_after_iters": 0,
}
NON_NEGATIVE_FLOAT_KEYS = ("base_lr", "weight_decay", "weight_decay_end")
OPTIONAL_NON_NEGATIVE_FLOAT_KEYS = ("lr", "clip_grad", "drop_path_rate", "max_loss")
# Keys that change what a run logs, writes or when it stops, never the weights it trains.
BOOKKEEPING_KEYS = frozenset({
    "num_workers", "dist_timeout_s", "save_every_iters", "keep_checkpoints", "max_loss", "export_every_epochs",
    "vis_every_epochs", "vis_images", "log_every", "stop_after_iters", "leak_audit", "logger",
    # The compiler fuses operations and so changes float rounding, nothing else (a test compares
    # its losses with eager ones): a divergence recorded eagerly repeats when compiled.
    "compile",
})


def load_recipe(path: Union[str, Path]) -> dict[str, Any]:
    """A recipe file with its ``_base_`` chain merged in (the file's own keys win)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {first_line(exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys to values")
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
        try:
            out[key.strip()] = _number_or_yaml(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from exc
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
    """Defaults, then the recipe, then the overrides; every value checked (see :func:`validate`)."""
    cfg = dict(DEFAULTS)
    for source in (recipe, overrides):
        unknown = sorted(set(source) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; valid keys: {sorted(DEFAULTS)}")
        cfg.update(source)
    if isinstance(cfg["input_size"], int) and not isinstance(cfg["input_size"], bool):
        cfg["input_size"] = [cfg["input_size"], cfg["input_size"]]
    validate(cfg)
    return cfg


def load_config(recipe: Union[str, Path], overrides: Union[dict[str, Any], Iterable[str], None] = None
                ) -> dict[str, Any]:
    """The resolved config of a recipe file with overrides (a dict, or ``key=value`` strings)."""
    if overrides is None:
        overrides = {}
    elif not isinstance(overrides, dict):
        overrides = parse_overrides(overrides)
    return resolve(load_recipe(recipe), overrides)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(cfg: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` naming the first key whose value cannot work."""
    def bad(key: str, expected: str) -> ConfigError:
        return ConfigError(f"{key} must be {expected}, got {cfg[key]!r}")

    for key, low in INTEGER_KEYS.items():
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < low:
            raise bad(key, f"an integer >= {low}")
    for key in NON_NEGATIVE_FLOAT_KEYS:
        if not _is_number(cfg[key]) or cfg[key] < 0:
            raise bad(key, "a number >= 0")
    for key in OPTIONAL_NON_NEGATIVE_FLOAT_KEYS:
        if cfg[key] is not None and (not _is_number(cfg[key]) or cfg[key] < 0):
            raise bad(key, "a number >= 0 or null")
    if not _is_number(cfg["dist_timeout_s"]) or cfg["dist_timeout_s"] <= 0:
        raise bad("dist_timeout_s", "a number of seconds > 0")
    if cfg["max_loss"] == 0:
        raise bad("max_loss", "a number > 0 or null")
    if not _is_number(cfg["mask_ratio"]) or not 0 <= cfg["mask_ratio"] < 1:
        raise bad("mask_ratio", "a number in [0, 1)")
    if cfg["drop_path_rate"] is not None and cfg["drop_path_rate"] >= 1:
        raise bad("drop_path_rate", "a number in [0, 1) or null")
    size = cfg["input_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise bad("input_size", "[height, width] (positive integers) or one integer")
    if cfg["betas"] is not None and not (isinstance(cfg["betas"], (list, tuple)) and len(cfg["betas"]) == 2
                                         and all(_is_number(b) and 0 <= b < 1 for b in cfg["betas"])):
        raise bad("betas", "[beta1, beta2] in [0, 1) or null")
    if not isinstance(cfg["decoder_width"], int) or cfg["decoder_width"] < 1:
        raise bad("decoder_width", "a positive integer")
    if cfg["amp"] not in AMP_MODES:
        raise bad("amp", f"one of {', '.join(AMP_MODES)}")
    if cfg["optimizer"] not in OPTIMIZERS:
        raise bad("optimizer", f"one of {', '.join(OPTIMIZERS)}")
    for key in ("channels_last", "leak_audit"):
        if not isinstance(cfg[key], bool):
            raise bad(key, "true or false")
    if not isinstance(cfg["model"], str) or not cfg["model"]:
        raise bad("model", "a timm model name")
    logger_names(cfg["logger"])
    if not isinstance(cfg["compile"], (bool, str)) or cfg["compile"] == "":
        raise bad("compile", "true, false or a torch.compile backend name")


def same_trajectory(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two configs train the same weights (they differ at most in bookkeeping keys)."""
    keys = (set(a) | set(b)) - BOOKKEEPING_KEYS
    return all(a.get(k) == b.get(k) for k in keys)
