"""Weight layouts users bring, read into timm names: what a file holds, and whether it covers a model.

Sources: spark-det full/encoder checkpoints, the paper's released files, plain timm/torchvision
state dicts. The paper's releases, as its code writes them:

* ``<model>_1kpretrained_timm_style.pth``: the encoder alone. ResNets in timm names; ConvNeXts in
  the original ConvNeXt names (``downsample_layers.{0-3}.{0,1}.*``,
  ``stages.{s}.{b}.{dwconv,norm,pwconv1,pwconv2,gamma}``) and, since the encoder was built with
  ``num_classes=0`` (an ``nn.Identity`` final norm), with no ``norm.*`` and no ``head.*`` keys;
* ``<model>_withdecoder_1kpretrained_spark_style.pth``: ``{'module': state, 'optimizer', 'epoch',
  'arch', 'input_size', ...}`` whose state holds ``sparse_encoder.sp_cnn.*`` (the encoder, named as
  above), ``dense_decoder.dec.{i}.up_sample.*``, ``dense_decoder.dec.{i}.conv.*``,
  ``dense_decoder.proj.*``, ``densify_norms.{i}.*``, ``densify_projs.{i}.*``, ``mask_tokens.{i}``
  and three tensors its code never reads (``imn_m``, ``imn_s``, ``norm_black``);

either possibly wrapped in 'module' / 'state_dict' / 'model', or with MoCo / DDP prefixes.
"""

from __future__ import annotations

import re

import torch

from ..errors import CheckpointError

WRAPPER_KEYS = ("module", "state_dict", "model")
OFFICIAL_ENCODER = "sparse_encoder.sp_cnn."  # the encoder inside the paper's with-decoder checkpoints
FULL_ENCODER_PREFIXES = ("encoder.model.", "module.encoder.model.", OFFICIAL_ENCODER, "module." + OFFICIAL_ENCODER)
PREFIXES = ("module.encoder_q.", "module.encoder.", "module.", "encoder_q.", "encoder.model.", "encoder.", "model.",
            OFFICIAL_ENCODER)
# The official with-decoder names -> spark-det's SparK names (prefix renames); and what its code never reads.
OFFICIAL_RENAMES = (("dense_decoder.dec.", "decoder.blocks."), ("dense_decoder.proj.", "decoder.proj."),
                    ("densify_norms.", "densify_norms."), ("densify_projs.", "densify_projs."),
                    ("mask_tokens.", "mask_tokens."))
OFFICIAL_UNUSED = ("imn_m", "imn_s", "norm_black")
# Encoder tensors no backbone feature depends on: timm ConvNeXt's final norm (the paper's files have none).
NOT_BACKBONE = ("head.",)
RESNET_DEPTHS = {
    ("basic", (2, 2, 2, 2)): 18, ("basic", (3, 4, 6, 3)): 34, ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101, ("bottleneck", (3, 8, 36, 3)): 152, ("bottleneck", (3, 24, 36, 3)): 200,
}
CONVNEXT_SIZES = {
    ((2, 2, 6, 2), 40): "atto", ((2, 2, 6, 2), 48): "femto", ((2, 2, 6, 2), 64): "pico", ((2, 2, 8, 2), 80): "nano",
    ((3, 3, 9, 3), 96): "tiny", ((3, 3, 27, 3), 96): "small", ((3, 3, 27, 3), 128): "base",
    ((3, 3, 27, 3), 192): "large",
}
HEAD_PREFIXES = ("fc.", "head.fc.", "head.weight", "head.bias")


def unwrap_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    """The tensor dict inside common wrappers ('module' / 'state_dict' / 'model', possibly nested)."""
    for _ in range(3):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = inner
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"no tensors found in checkpoint (top-level keys: {sorted(obj)[:10]})")
    return tensors


def strip_prefix(state: dict[str, torch.Tensor], prefixes: tuple[str, ...] = PREFIXES) -> dict[str, torch.Tensor]:
    """Remove the first prefix that every key of a group shares (DDP's 'module.', MoCo's 'encoder_q.')."""
    for prefix in prefixes:
        if all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def encoder_state_from_checkpoint(obj: dict) -> dict[str, torch.Tensor]:
    """Encoder weights from a spark-det full checkpoint, an exported encoder or a released file."""
    state = unwrap_state_dict(obj)
    encoder_keys = {k: v for k, v in state.items() if k.startswith(FULL_ENCODER_PREFIXES)}
    if encoder_keys:  # a full SparK state (spark-det's or the paper's): keep the encoder only
        state = encoder_keys
    return strip_prefix(state)


def backbone_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors a backbone's features depend on (everything but ``head.*``)."""
    return {k: v for k, v in state.items() if not k.startswith(NOT_BACKBONE)}


def is_official_full_checkpoint(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(OFFICIAL_ENCODER) for k in state) and any(k.startswith("dense_decoder.") for k in state)


def official_full_to_spark_det(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The paper's with-decoder state -> spark-det's SparK state names; returns (state, ignored keys).

    The encoder is renamed to timm names (and loses its classifier, if any); the decoder's
    ``dec.{i}.up_sample`` / ``dec.{i}.conv`` are spark-det's ``blocks.{i}.up`` / ``blocks.{i}.conv``
    (the same layers); densify norms and projections and the mask tokens keep their names.
    A key that is none of these is refused, so no tensor goes unaccounted for.
    """
    encoder = timm_encoder_state({k: v for k, v in state.items() if k.startswith(OFFICIAL_ENCODER)})
    out = {f"encoder.model.{k}": v for k, v in encoder.items()}
    ignored, unknown = [], []
    for key, value in state.items():
        if key.startswith(OFFICIAL_ENCODER):
            continue
        if key in OFFICIAL_UNUSED:
            ignored.append(key)
            continue
        new = next((to + key[len(frm):] for frm, to in OFFICIAL_RENAMES if key.startswith(frm)), None)
        if new is None:
            unknown.append(key)
            continue
        out[new.replace(".up_sample.", ".up.")] = value
    if unknown:
        raise CheckpointError(f"unknown tensors in a SparK with-decoder checkpoint: {unknown[:5]}")
    return out, ignored


def _count_blocks(keys, pattern: str) -> tuple[int, ...]:
    found: dict[int, set[int]] = {}
    for k in keys:
        m = re.match(pattern, k)
        if m:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return tuple(len(found[i]) for i in sorted(found))


def original_convnext_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The paper's ConvNeXt files (facebookresearch naming) -> timm's convnext_* names."""
    out = {}
    for k, v in state.items():
        m = re.match(r"downsample_layers\.(\d)\.(\d)\.(.*)", k)
        if m:
            stage, idx, rest = int(m.group(1)), m.group(2), m.group(3)
            out[f"stem.{idx}.{rest}" if stage == 0 else f"stages.{stage}.downsample.{idx}.{rest}"] = v
            continue
        m = re.match(r"stages\.(\d)\.(\d+)\.(.*)", k)
        if m:
            rest = m.group(3)
            for old, new in (("dwconv", "conv_dw"), ("pwconv1", "mlp.fc1"), ("pwconv2", "mlp.fc2")):
                rest = rest.replace(old, new)
            out[f"stages.{m.group(1)}.blocks.{m.group(2)}.{rest}"] = v
            continue
        if k.startswith("norm."):
            out["head.norm." + k[len("norm."):]] = v
        elif not k.startswith("head."):
            out[k] = v
    return out


def identify(state: dict[str, torch.Tensor]) -> str:
    """timm model name of a (timm-named) encoder state dict, e.g. 'resnet50', 'convnext_base'."""
    keys = list(state)
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in keys):
        kind = "bottleneck" if any(k.endswith(".conv3.weight") for k in keys) else "basic"
        blocks = _count_blocks(keys, r"layer(\d)\.(\d+)\.conv1\.weight")
        depth = RESNET_DEPTHS.get((kind, blocks))
        if depth is None:
            raise CheckpointError(f"ResNet-like checkpoint with {kind} blocks {blocks} matches no known depth "
                                  "(a truncated or partial state dict?)")
        squeeze = any(".se." in k for k in keys)  # timm's SE-ResNets: layerN.M.se.fc1/fc2
        return f"{'se' if squeeze else ''}resnet{depth}"
    if "stem.0.weight" in state and any(".blocks." in k for k in keys):
        depths = _count_blocks(keys, r"stages\.(\d)\.blocks\.(\d+)\.conv_dw\.weight")
        size = CONVNEXT_SIZES.get((depths, int(state["stem.0.weight"].shape[0])))
        if size is None:
            raise CheckpointError(f"ConvNeXt-like checkpoint with depths {depths} matches no known size "
                                  "(a truncated or partial state dict?)")
        version = "v2" if any(".grn." in k for k in keys) else ""  # ConvNeXt-V2's GlobalResponseNorm
        return f"convnext{version}_{size}"
    raise CheckpointError(
        f"cannot infer the architecture: keys look like neither a ResNet nor a ConvNeXt (first keys: {keys[:5]}); "
        "other timm CNNs need no conversion: the generic timm backbone loads a spark-det export directly "
        "(Detectron2 MODEL.TIMM.WEIGHTS, MMDetection SparKTimm checkpoint=)"
    )


def timm_encoder_state(obj: dict) -> dict[str, torch.Tensor]:
    """Any supported source -> encoder state dict with timm names and no classifier."""
    state = encoder_state_from_checkpoint(obj)
    if any(k.startswith("downsample_layers.") for k in state):
        state = original_convnext_to_timm(state)
    return {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}


def to_timm(obj: dict) -> tuple[str, dict[str, torch.Tensor]]:
    """Any supported source -> (timm model name, :func:`timm_encoder_state`)."""
    state = timm_encoder_state(obj)
    return identify(state), state


def key_mismatch(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
                 ) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, shape-mismatched) keys of ``state`` against ``reference``, sorted."""
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    bad = sorted(k for k in set(reference) & set(state) if tuple(reference[k].shape) != tuple(state[k].shape))
    return missing, unexpected, bad


def check_covers(state: dict[str, torch.Tensor], model_name: str) -> None:
    """Refuse a state dict that does not fill every backbone tensor of ``timm.create_model(model_name)``
    (``head.*``, which no feature uses and the paper's ConvNeXt files lack, may be absent)."""
    import timm

    with torch.device("meta"):
        reference = timm.create_model(model_name, num_classes=0).state_dict()
    subject = f"checkpoint does not cover {model_name}"
    require_same_tensors(backbone_tensors(state), backbone_tensors(reference), subject)


def require_same_tensors(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], subject: str) -> None:
    """Raise :class:`CheckpointError` (message starting with ``subject``) unless ``state`` has
    exactly ``reference``'s keys with the same shapes."""
    missing, unexpected, bad = key_mismatch(state, reference)
    if missing or unexpected:
        raise CheckpointError(
            f"{subject}: {len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:3]}); the file may be truncated or hold another model"
        )
    if bad:
        raise CheckpointError(f"{subject}: shape mismatch at {bad[:3]}: {tuple(state[bad[0]].shape)} vs "
                              f"{tuple(reference[bad[0]].shape)}; is it the same architecture?")
