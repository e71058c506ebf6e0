"""Weights in the field's formats: safetensors files and a folder to hand to a colleague or a model hub.

The export folder follows timm's own local-folder layout (``timm/models/_hub.py``):
``model.safetensors``, ``config.json`` in the form ``timm.models.save_config_for_hf`` writes
(``architecture``, ``num_classes``, ``num_features``, ``pretrained_cfg`` with input size,
mean/std, ...) and a model card ``README.md``. timm loads it offline with its own mechanisms::

    timm.create_model("local-dir:path/to/folder", pretrained=True)
    timm.create_model("resnet50", pretrained=True, num_classes=0,
                      pretrained_cfg_overlay=dict(file="path/to/folder/model.safetensors"))

safetensors holds tensors and string metadata only (no pickled code): loading it runs nothing.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import timm
import torch

from ..errors import CheckpointError, first_line
from ..io import (
    TEMPORARY_SUFFIX,
    PathLike,
    file_sha256,
    remove_stale_temporaries,
    save_safetensors_atomic,
    write_atomic,
)

WEIGHTS_NAME = "model.safetensors"  # the first file timm's load_state_dict_from_path looks for
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"  # written last: a folder with a card is complete


def safetensors_metadata(model_name: str) -> dict[str, str]:
    """``format: pt`` (what timm and Hugging Face write) and the timm architecture."""
    return {"format": "pt", "arch": model_name}


def save_encoder_safetensors(state: dict[str, torch.Tensor], model_name: str, path: PathLike) -> Path:
    """A timm state dict as ``.safetensors``, with the architecture in the file's metadata."""
    return save_safetensors_atomic(state, path, safetensors_metadata(model_name))


def source_commit() -> str:
    """The git commit of the spark-det sources in use ("unknown" outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


@dataclass
class ModelCard:
    """What the card says about where the weights come from."""

    data: str  # the data source the encoder was pretrained on
    recipe: dict[str, Any] = field(default_factory=dict)  # the resolved config
    epochs: Optional[int] = None
    final_loss: Optional[float] = None


def timm_model(state: dict[str, torch.Tensor], model_name: str) -> torch.nn.Module:
    """``timm.create_model(model_name, num_classes=0)`` holding ``state``, loaded strictly."""
    model = timm.create_model(model_name, pretrained=False, num_classes=0)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights do not load into timm's {model_name} (num_classes=0): "
                              f"{first_line(exc)}") from exc
    return model


def write_export_folder(state: dict[str, torch.Tensor], model_name: str, folder: PathLike, card: ModelCard,
                        input_size: tuple[int, int] = (224, 224)) -> Path:
    """``model.safetensors``, ``config.json`` (timm's ``pretrained_cfg`` form) and ``README.md`` in ``folder``.

    The weights are checked to load strictly into timm's model first; the card is written last,
    so a folder with a ``README.md`` is complete. Only one process may write ``folder`` at a time
    (a pretraining run's folder is locked): temporaries found there are a killed write's and go."""
    from timm.models._hub import save_config_for_hf  # timm 1.0 exports it from the private module only

    from .. import __version__
    from ..data.constants import IMAGENET_MEAN, IMAGENET_STD

    folder = Path(folder)
    if folder.is_dir():  # a killed export's temporaries must not travel with the folder
        remove_stale_temporaries(folder)
    model = timm_model(state, model_name)
    weights = save_encoder_safetensors(model.state_dict(), model_name, folder / WEIGHTS_NAME)
    data_config = {"input_size": (3, *input_size), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                   "interpolation": "bicubic", "crop_pct": 1.0}
    tmp = folder / f".{CONFIG_NAME}.writing{TEMPORARY_SUFFIX}"  # timm writes it in place; renamed below
    save_config_for_hf(model, str(tmp), data_config=data_config)
    config = json.loads(tmp.read_text())
    tmp.unlink()
    # the model's default tag, paper and origin describe timm's own weights, not these
    pretrained_cfg = config["pretrained_cfg"]
    for key in ("tag", "origin_url", "paper_ids", "paper_name", "notes", "license", "hf_hub_id"):
        pretrained_cfg.pop(key, None)
    pretrained_cfg.update(tag="spark_det", paper_ids="arXiv:2301.03580", license="apache-2.0")
    text = json.dumps(config, indent=2)
    write_atomic(folder / CONFIG_NAME, lambda f: f.write(text.encode()))
    card_text = model_card(model_name, card, config, file_sha256(weights), __version__, source_commit())
    write_atomic(folder / CARD_NAME, lambda f: f.write(card_text.encode()))
    return folder


def model_card(model_name: str, card: ModelCard, config: dict, digest: str, version: str, commit: str) -> str:
    """The export folder's README.md: provenance, then how to load the weights in each framework."""
    recipe = card.recipe
    loss = f"{card.final_loss:.4f}" if card.final_loss is not None else "not recorded"
    settings = ", ".join(f"{k}={recipe[k]}" for k in ("input_size", "mask_ratio", "batch_size", "optimizer",
                                                       "base_lr", "lr", "warmup_epochs", "weight_decay",
                                                       "weight_decay_end") if k in recipe)
    pcfg = config.get("pretrained_cfg", {})
    family = "resnet" if model_name.startswith("resnet") else "convnext" if model_name.startswith("convnext") else ""
    if family:
        detection = (f"spark-det convert {WEIGHTS_NAME} --to detectron2 --output {model_name}.pkl\n"
                     f"spark-det convert {WEIGHTS_NAME} --to mmdet --output {model_name}_mmdet.pth")
        d2 = f"MODEL.WEIGHTS: {model_name}.pkl"
        mmdet = f"backbone=dict(init_cfg=dict(type='Pretrained', checkpoint='{model_name}_mmdet.pth'))"
    else:
        detection = "# no conversion needed: spark-det's generic timm backbone reads the file as it is"
        d2 = (f"MODEL.BACKBONE.NAME: build_timm_fpn_backbone, MODEL.TIMM.NAME: {model_name}, "
              f"MODEL.TIMM.WEIGHTS: {WEIGHTS_NAME}")
        mmdet = f"backbone=dict(type='SparKTimm', arch='{model_name}', checkpoint='{WEIGHTS_NAME}')"
    return f"""---
library_name: timm
license: apache-2.0
tags: [image-feature-extraction, timm, spark-det, self-supervised]
---
# {model_name}, SparK-pretrained encoder

A `{model_name}` encoder pretrained with SparK masked image modeling (Tian et al., ICLR 2023) by
spark-det {version} (commit {commit}). It is a plain timm model without a classifier
(`num_classes=0`): a backbone to fine-tune, not a classifier.

| | |
|---|---|
| data | {card.data} |
| recipe | {settings} |
| epochs | {card.epochs if card.epochs is not None else "not recorded"} |
| final loss | {loss} (SparK's per-patch normalised reconstruction loss) |
| input size | {pcfg.get("input_size")}, mean {pcfg.get("mean")}, std {pcfg.get("std")} |
| file | `{WEIGHTS_NAME}`, sha256 `{digest}` |

## Load it

timm, offline, from this folder:

```python
import timm
model = timm.create_model("local-dir:path/to/this/folder", pretrained=True)
# or: timm.create_model("{model_name}", pretrained=True, num_classes=0,
#                       pretrained_cfg_overlay=dict(file="path/to/this/folder/{WEIGHTS_NAME}"))
```

Detectron2 and MMDetection:

```bash
{detection}
```

Detectron2: `{d2}`; MMDetection: `{mmdet}`.
"""
