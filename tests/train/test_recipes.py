"""Every pretraining recipe resolves to the paper's settings for a supported model."""

from pathlib import Path

import pytest

from spark_det.errors import ConfigError
from spark_det.model.registry import SUPPORTED_MODELS
from spark_det.train.config import load_recipe, parse_overrides, resolve

RECIPES = Path(__file__).resolve().parents[2] / "pretrain"


@pytest.mark.parametrize("name", list(SUPPORTED_MODELS))
def test_each_supported_model_has_a_paper_recipe(name):
    cfg = resolve(load_recipe(RECIPES / f"{name}.yaml"), {})
    assert cfg["model"] == name
    assert (cfg["epochs"], cfg["batch_size"], cfg["base_lr"], cfg["warmup_epochs"]) == (1600, 4096, 2e-4, 40)
    assert (cfg["weight_decay"], cfg["weight_decay_end"], cfg["clip_grad"], cfg["mask_ratio"]) == (0.04, 0.2, 5.0, 0.6)
    assert cfg["optimizer"] == "lamb" and cfg["decoder_width"] == 768


def test_overrides_are_typed_and_unknown_keys_rejected():
    cfg = resolve(load_recipe(RECIPES / "resnet50.yaml"),
                  parse_overrides(["lr=2e-3", "input_size=[128,608]", "amp=bf16", "epochs=10"]))
    assert cfg["lr"] == 2e-3 and cfg["input_size"] == [128, 608] and cfg["amp"] == "bf16" and cfg["epochs"] == 10
    with pytest.raises(ConfigError, match="unknown config keys"):
        resolve({}, {"learning_rate": 1})
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])
