"""The package's shape: the core stays framework-free, the public API and the commands are where
the docs say they are (docs/layout.md, docs/api.md, the commands table of docs/getting-started.md)."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import spark_det

ADAPTERS = ("spark_det.d2", "spark_det.mmdet")
FRAMEWORKS = ("detectron2", "mmdet", "mmcv", "mmengine")
ROOT = Path(__file__).resolve().parents[1]


def core_modules() -> list[str]:
    """Every module of spark_det outside the framework adapters, found by walking the package's
    folders (without importing anything, so the adapters are never touched)."""
    found = ["spark_det"]

    def walk(path: list[str], prefix: str) -> None:
        for info in pkgutil.iter_modules(path, prefix):
            if info.name.startswith(ADAPTERS) or info.name == "spark_det.__main__":
                continue
            found.append(info.name)
            if info.ispkg:
                walk([str(Path(path[0]) / info.name.rsplit(".", 1)[-1])], info.name + ".")

    walk(list(spark_det.__path__), "spark_det.")
    return sorted(found)


def test_the_walk_finds_every_subpackage_of_the_core():
    found = set(core_modules())
    for module in ("spark_det.sparse.norms", "spark_det.model.spark", "spark_det.train.pretrainer",
                   "spark_det.transfer.convert", "spark_det.cli.pretrain", "spark_det.demo.pipeline"):
        assert module in found


def test_core_modules_import_neither_detectron2_nor_mmdet():
    code = (f"import importlib, sys\nfor m in {core_modules()!r}: importlib.import_module(m)\n"
            f"bad = sorted(k for k in sys.modules if k.split('.')[0] in {FRAMEWORKS!r})\n"
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_core_check_fails_when_a_core_module_imports_a_framework(tmp_path):
    """The check above can fail: a core module that imports mmengine is caught."""
    (tmp_path / "leaky.py").write_text("import mmengine\n")
    code = ("import importlib, sys\nimportlib.import_module('leaky')\n"
            f"bad = sorted(k for k in sys.modules if k.split('.')[0] in {FRAMEWORKS!r})\nassert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "mmengine" in proc.stderr


def test_the_console_script_lists_every_tool_and_each_tool_has_a_shim():
    from spark_det.cli import COMMANDS

    proc = subprocess.run([sys.executable, "-m", "spark_det", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for name in COMMANDS:
        assert name in proc.stdout
    shims = {p.stem for p in (ROOT / "tools").glob("*.py")}
    assert shims == {"pretrain", "pack_shards", "convert_weights", "visualize", "demo", "collect_env",
                     "make_synthetic_data", "train_det2", "train_mmdet"}
    for shim in (ROOT / "tools").glob("*.py"):
        assert len(shim.read_text().splitlines()) <= 10, f"{shim.name} holds logic; it belongs in spark_det/"
