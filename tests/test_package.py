"""The core package stays framework-free: only spark_det.d2 / spark_det.mmdet import them."""

import subprocess
import sys

CORE = ["spark_det", "spark_det.spark", "spark_det.encoder", "spark_det.sparse", "spark_det.decoder",
        "spark_det.masking", "spark_det.models", "spark_det.data", "spark_det.engine", "spark_det.optim",
        "spark_det.checkpoint", "spark_det.convert", "spark_det.synthetic", "spark_det.config",
        "spark_det.distributed", "spark_det.visualize"]


def test_core_modules_import_neither_detectron2_nor_mmdet():
    code = (f"import importlib, sys\nfor m in {CORE!r}: importlib.import_module(m)\n"
            "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('detectron2', 'mmdet', 'mmcv', 'mmengine'))\n"
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
