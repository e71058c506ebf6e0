"""The software stack spark-det runs on (``spark-det collect-env``; paste it into bug reports)."""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _torch() -> list[tuple[str, str]]:
    try:
        import torch
    except ImportError as exc:
        return [("torch", f"not importable ({exc})")]
    import torchvision

    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    devices = f"{torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() \
        else "no GPU available"
    return [("torch", f"{torch.__version__} ({cuda}; {devices})"), ("torchvision", torchvision.__version__)]


def _mmcv() -> str:
    try:
        import mmcv
    except ImportError as exc:
        return f"not importable ({exc})"
    try:
        importlib.import_module("mmcv._ext")
        ops = "compiled ops available"
    except ImportError as exc:
        ops = f"NO compiled ops ({exc})"
    return f"{mmcv.__version__} ({ops})"


def detectron2_flavour() -> str:
    """'main' or 'v0.6': both report ``__version__`` 0.6, so tell them apart by API only main has
    (``Backbone.padding_constraints``, ``get_default_optimizer_params(lr_factor_func=...)``)."""
    import inspect

    from detectron2.modeling import Backbone
    from detectron2.solver.build import get_default_optimizer_params

    newer = hasattr(Backbone, "padding_constraints") or \
        "lr_factor_func" in inspect.signature(get_default_optimizer_params).parameters
    return "main" if newer else "v0.6"


def _detectron2() -> str:
    try:
        import detectron2
    except ImportError as exc:
        return f"not importable ({exc})"
    try:
        flavour = detectron2_flavour()
    except Exception as exc:  # noqa: BLE001 - a broken install should still be reported, not crash the report
        flavour = f"unknown flavour ({type(exc).__name__}: {exc})"
    try:
        compiled = importlib.import_module("detectron2._C")
    except ImportError:
        return f"{detectron2.__version__}, {flavour} (no compiled ops; Detectron2 main works without them)"
    if getattr(compiled, "SPARK_DET_FALLBACK", False):
        return (f"{detectron2.__version__}, {flavour} (spark-det CPU test FALLBACK: the v0.6 Python package, "
                "no compiled ops)")
    return f"{detectron2.__version__}, {flavour} (build with compiled ops)"


def collect_env() -> list[tuple[str, str]]:
    """(component, version and details) for Python, torch, timm, the frameworks and spark-det."""
    rows = [("Python", f"{platform.python_version()} ({sys.executable})"), ("platform", platform.platform())]
    rows += _torch()
    rows += [
        ("timm", _version("timm")),
        ("numpy", _version("numpy")),
        ("pycocotools", _version("pycocotools")),
        ("mmengine", _version("mmengine")),
        ("mmcv", _mmcv()),
        ("mmdet", _version("mmdet")),
        ("detectron2", _detectron2()),
        ("spark-det", _version("spark-det")),
    ]
    return rows


def format_env(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns, one component per line."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
