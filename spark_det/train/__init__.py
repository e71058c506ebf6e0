"""Pretraining: config, schedules, optimizer, checkpoints, distributed runs, and :class:`Pretrainer`,
the object that owns a whole run (``tools/pretrain.py`` is a thin CLI over it); its data comes
from :mod:`spark_det.data`."""

from .config import DEFAULTS, load_config, load_recipe, parse_overrides, resolve
from .pretrainer import Pretrainer, PretrainResult, pretrain

__all__ = ["DEFAULTS", "PretrainResult", "Pretrainer", "load_config", "load_recipe", "parse_overrides", "pretrain",
           "resolve"]
