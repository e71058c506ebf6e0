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

    from spark_det.checkpoint import save_atomic
    from spark_det.encoder import SparseEncoder

    root = Path(__file__).resolve().parents[1]
    suffix = ".pkl" if target == "detectron2" else f"_{target}.pth"
    paths = {}
    for arch in archs:
        src = save_atomic(SparseEncoder(arch).dense_state_dict(), Path(folder) / f"{arch}.pth")
        paths[arch] = Path(folder) / f"{arch}{suffix}"
        subprocess.run([sys.executable, "tools/convert_weights.py", str(src), str(paths[arch]), "--to", target],
                       cwd=root, check=True, env={**os.environ, "PYTHONPATH": str(root)})
    return paths
