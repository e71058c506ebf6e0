"""Stand-ins for the SparK paper's released files, built as the official code builds them.

The layouts (see also spark_det/transfer/layouts.py):

* ``<model>_1kpretrained_timm_style.pth`` -- the encoder alone, a flat state dict.
  ResNet: timm's own names (``conv1.*``, ``bn1.*``, ``layer{1-4}.*``). ConvNeXt: the official code
  builds its own ConvNeXt (original facebookresearch names) with ``num_classes=0``, so its final
  ``norm`` and ``head`` are ``nn.Identity``: keys ``downsample_layers.{0-3}.{0,1}.*`` and
  ``stages.{s}.{b}.{dwconv,norm,pwconv1,pwconv2,gamma}*`` only -- no ``norm.*``, no ``head.*``.
* ``<model>_withdecoder_1kpretrained_spark_style.pth`` -- ``{'module': state, 'optimizer': ...,
  'epoch', 'arch', 'input_size', 'args', 'performance_desc', 'is_pretrain'}`` with, in ``state``:
  ``sparse_encoder.sp_cnn.<encoder keys as above>``,
  ``dense_decoder.dec.{i}.up_sample.{weight,bias}`` (ConvTranspose2d(c, c, 4, 2, 1)),
  ``dense_decoder.dec.{i}.conv.{0,1,3,4}.*`` (Conv3x3 c->c, BN, ReLU6, Conv3x3 c->c/2, BN),
  ``dense_decoder.proj.{weight,bias}`` (Conv1x1 -> 3), ``densify_norms.{i}.*`` (BatchNorm for
  ResNet, channels-first LayerNorm weight/bias for ConvNeXt), ``densify_projs.{i}.*`` (Identity when
  i == 0 and the widths agree, else Conv 1x1 (i == 0) / 3x3), ``mask_tokens.{i}`` ([1, C_i, 1, 1],
  coarsest scale first) and the legacy ``imn_m``, ``imn_s`` ([1, 3, 1, 1]), ``norm_black``.

Only the module structure of the official code is reproduced here (plain torch layers); the
tensors are random, so a loader that maps a name wrongly is caught by value comparisons.
"""

import math

import timm
import torch
import torch.nn as nn


def original_convnext_names(timm_state: dict) -> dict:
    """timm ConvNeXt names -> the original ConvNeXt names the official files use."""
    out = {}
    for k, v in timm_state.items():
        k = k.replace("stem.", "downsample_layers.0.")
        for s in range(1, 4):
            k = k.replace(f"stages.{s}.downsample.", f"downsample_layers.{s}.")
        k = k.replace(".blocks.", ".").replace("conv_dw", "dwconv").replace("mlp.fc1", "pwconv1")
        k = k.replace("mlp.fc2", "pwconv2").replace("head.norm.", "norm.").replace("head.fc.", "head.")
        out[k] = v
    return out


def _randomised(module: nn.Module, seed: int) -> dict:
    """``module``'s state dict with random values (positive running variances)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in module.state_dict().items():
        if not value.is_floating_point():
            out[key] = value.clone()
        elif key.endswith("running_var"):
            out[key] = torch.rand(value.shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(value.shape, generator=g) * 0.1
    return out


def official_encoder(arch: str, seed: int = 0) -> dict:
    """The encoder-only release of ``arch`` (random values, official names and key set)."""
    model = timm.create_model(arch, num_classes=0)
    state = _randomised(model, seed)
    if arch.startswith("convnext"):
        state = {k: v for k, v in original_convnext_names(state).items() if not k.startswith(("norm.", "head."))}
    return state


class _OfficialUNetBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up_sample = nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(nn.Conv2d(cin, cin, 3, 1, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(True),
                                  nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))


class _OfficialSparKHead(nn.Module):
    """dense_decoder + densify_norms + densify_projs + mask_tokens, as the official SparK builds them."""

    def __init__(self, encoder_channels: list, width: int, layer_norm: bool, downsample_ratio: int = 32) -> None:
        super().__init__()
        steps = round(math.log2(downsample_ratio))
        widths = [width // 2**i for i in range(steps + 1)]
        self.dense_decoder = nn.Module()
        self.dense_decoder.dec = nn.ModuleList(_OfficialUNetBlock(a, b) for a, b in zip(widths, widths[1:]))
        self.dense_decoder.proj = nn.Conv2d(widths[-1], 3, kernel_size=1, stride=1, bias=True)
        coarse_first = encoder_channels[::-1]
        # their channels-first LayerNorm is an nn.LayerNorm((C,)): weight and bias only
        self.densify_norms = nn.ModuleList(nn.LayerNorm(c) if layer_norm else nn.BatchNorm2d(c) for c in coarse_first)
        self.densify_projs = nn.ModuleList(
            nn.Identity() if i == 0 and e == d else nn.Conv2d(e, d, kernel_size=1 if i == 0 else 3, stride=1,
                                                               padding=0 if i == 0 else 1, bias=True)
            for i, (e, d) in enumerate(zip(coarse_first, widths)))
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(1, c, 1, 1)) for c in coarse_first)


def official_with_decoder(arch: str, decoder_width: int = 64, seed: int = 0) -> dict:
    """The with-decoder release of ``arch`` (random values, official names, key set and wrapper)."""
    channels = [int(i["num_chs"]) for i in timm.create_model(arch, num_classes=0).feature_info[-4:]]
    head = _OfficialSparKHead(channels, decoder_width, layer_norm=arch.startswith("convnext"))
    state = {f"sparse_encoder.sp_cnn.{k}": v for k, v in official_encoder(arch, seed).items()}
    state.update(_randomised(head, seed + 1))
    state.update({"imn_m": torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
                  "imn_s": torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), "norm_black": torch.zeros(1, 3, 1, 1)})
    return {"module": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 1599, "arch": arch,
            "input_size": 224, "args": {"model": arch, "dp": 0.0}, "performance_desc": "[ep1599] Lm: 0.5",
            "is_pretrain": True}
