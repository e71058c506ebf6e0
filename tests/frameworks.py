"""Import a detection framework for a test: skip locally if absent, but never in CI, where a
missing framework means a broken setup that a skip would hide."""

import importlib
import os

import pytest


def require(module: str):
    if os.environ.get("CI") or os.environ.get("SPARK_DET_REQUIRE_FRAMEWORKS"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} not installed (run `make setup`)")


def converted_spark_encoders(folder, target: str, archs=("resnet18", "resnet50", "convnext_atto")) -> dict:
    """Export fresh SparK encoders and convert them with tools/convert_weights.py: {arch: path}."""
    import subprocess
    import sys
    from pathlib import Path

    from spark_det.io import save_atomic
    from spark_det.model.encoder import SparseEncoder

    root = Path(__file__).resolve().parents[1]
    suffix = ".pkl" if target == "detectron2" else f"_{target}.pth"
    paths = {}
    for arch in archs:
        src = save_atomic(SparseEncoder(arch).dense_state_dict(), Path(folder) / f"{arch}.pth")
        paths[arch] = Path(folder) / f"{arch}{suffix}"
        subprocess.run([sys.executable, "tools/convert_weights.py", str(src), str(paths[arch]), "--to", target],
                       cwd=root, check=True, env={**os.environ, "PYTHONPATH": str(root)})
    return paths


def convert_encoder(encoder, folder, target: str):
    """Export ``encoder``'s weights and convert them in-process with tools/convert_weights.py."""
    from pathlib import Path

    from spark_det.cli import convert as convert_weights
    from spark_det.io import save_atomic

    src = save_atomic(encoder.dense_state_dict(), Path(folder) / "encoder.pth")
    dst = Path(folder) / ("converted.pkl" if target == "detectron2" else f"converted_{target}.pth")
    assert convert_weights.main([str(src), str(dst), "--to", target]) == 0
    return dst


def load_into_detectron2(bottom_up, path) -> dict:
    """Load a converted .pkl with Detectron2's own checkpointer, as a GeneralizedRCNN would
    (``backbone.bottom_up.*``); returns the file's tensors."""
    import pickle

    import torch
    from detectron2.checkpoint import DetectionCheckpointer

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Module()
            self.backbone.bottom_up = bottom_up

    DetectionCheckpointer(Holder()).load(str(path))
    with open(path, "rb") as f:
        return pickle.load(f)["model"]


def assert_every_tensor_from_file(loaded: dict, converted: dict) -> None:
    """The backbone's state equals the converted file's, key for key: nothing left at init."""
    import torch

    assert set(loaded) == set(converted), set(loaded) ^ set(converted)
    for name, value in loaded.items():
        assert torch.equal(value, torch.as_tensor(converted[name])), name


def assert_same_features(got, expected) -> None:
    """Backbone features equal the encoder's; fp32 accumulation order differs between
    implementations, so the tolerance is relative to each map's scale."""
    got = list(got)
    assert len(got) == len(expected)
    for g, feat in zip(got, expected):
        assert g.shape == feat.shape
        assert (g - feat).abs().max() <= 1e-5 * feat.abs().max(), (g - feat).abs().max()


def perturbed_encoder(arch: str):
    """A SparseEncoder whose every parameter is moved off its init (ConvNeXt's layer scales start at
    1e-6, which would let a wrongly loaded block pass a feature comparison)."""
    import torch

    from spark_det.model.encoder import SparseEncoder

    encoder = SparseEncoder(arch)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return encoder


# the smallest model of each generic-backbone config's family, and its channels
TIMM_SHRINK = {"efficientnet": ("efficientnet_b0", [24, 40, 112, 320]), "regnety": ("regnety_002", [24, 56, 152, 368])}


def pretrained_exports(folder, archs=("efficientnet_b0", "regnety_002")) -> dict:
    """Encoders pretrained with SparK for 2 iterations (spark-det's Pretrainer) and exported: {arch: path}."""
    from pathlib import Path

    from spark_det.demo.synthetic import SceneConfig, write_unlabeled_images
    from spark_det.train import Pretrainer, load_config

    root = Path(__file__).resolve().parents[1]
    images = write_unlabeled_images(Path(folder) / "images", 8, seed=0, cfg=SceneConfig(image_size=(64, 64)))
    paths = {}
    for arch in archs:
        cfg = load_config(root / "pretrain" / "resnet18_smoke.yaml",
                          [f"model={arch}", "input_size=[64,64]", "decoder_width=32", "batch_size=4", "epochs=1",
                           "vis_images=0", "num_workers=0"])
        result = Pretrainer(cfg, images, Path(folder) / arch, device="cpu", log=lambda _: None).run()
        paths[arch] = result.encoder
    return paths
