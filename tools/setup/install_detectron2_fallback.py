"""Make Detectron2 importable on a CPU machine that cannot reach GitHub.

If any Detectron2 is already importable (an official build, or Detectron2 main which needs no
compiled extension), it is left untouched. Otherwise this installs the Detectron2 v0.6 *Python*
package from the PyPI sdist ``pb1-detectron2==0.6`` (the version the SparK paper used) with the
smallest compatibility layer that lets Mask R-CNN train and evaluate on CPU:

* ``detectron2/_C.py``: a stand-in for the compiled extension. v0.6 imports ``_C`` at import
  time in a few modules; Mask R-CNN R50-FPN calls none of its ops (NMS and ROIAlign go through
  torchvision). Any op call raises a clear error instead of computing something wrong.
* ``np.bool`` -> ``bool`` and ``Image.LINEAR`` -> ``Image.BILINEAR`` (the fixes upstream made).

THIS IS A CPU TEST FALLBACK, not a Detectron2 build: for real GPU training install the official
Detectron2 (see docs/getting-started.md). Run with the interpreter of the target environment.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "pb1-detectron2==0.6"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
FALLBACK_VERSION = "0.6+cpufallback"

STAND_IN_C = '''\
"""spark-det CPU test fallback: stand-in for Detectron2's compiled extension ``_C``.

Installed by spark-det's tools/setup/install_detectron2_fallback.py because this machine could not
build Detectron2 from source. Mask R-CNN with FPN uses no op from here; deformable conv, rotated
boxes and the fast COCO evaluator are unavailable (build with use_fast_impl=False).
"""

SPARK_DET_FALLBACK = True


def get_compiler_version() -> str:
    return "none (spark-det CPU fallback, no compiled ops)"


def get_cuda_version() -> str:
    return "none (spark-det CPU fallback, no compiled ops)"


def has_cuda() -> bool:
    return False


def __getattr__(name):
    raise NotImplementedError(
        f"detectron2._C.{name} is not available: this is spark-det's CPU test fallback of "
        "Detectron2 v0.6 without compiled ops. Install the official Detectron2 for this feature."
    )
'''

SETUP_PY = f'''\
# Written by spark-det: installs only the Python package (the sdist has no C++ sources).
from setuptools import find_packages, setup

setup(
    name="detectron2",
    version="{FALLBACK_VERSION}",
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    package_data={{"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]}},
    python_requires=">=3.7",
)
'''


def detectron2_importable() -> bool:
    return importlib.util.find_spec("detectron2") is not None


def patch_sources(package_dir: Path) -> int:
    """Apply the two one-word compatibility fixes; returns the number of files changed."""
    changed = 0
    for path in package_dir.rglob("*.py"):
        text = path.read_text()
        new = re.sub(r"\bnp\.bool\b(?!_)", "bool", text)
        new = new.replace("Image.LINEAR", "Image.BILINEAR")
        if new != text:
            path.write_text(new)
            changed += 1
    return changed


def main() -> int:
    if detectron2_importable():
        import detectron2

        print(f"[detectron2] using the installed Detectron2 {detectron2.__version__} "
              f"({Path(detectron2.__file__).parent}); nothing to do")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        print(f"[detectron2] no Detectron2 found: installing the CPU test fallback from the sdist {SDIST}")
        # pip fetches it with the user's pip configuration (index, mirror, proxy), as every other package;
        # preparing its metadata runs its setup.py, which imports torch: hence no build isolation
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "--no-build-isolation", "-d", tmp, SDIST], check=True)
        sdist = Path(tmp) / "pb1-detectron2-0.6.tar.gz"
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise SystemExit(f"pb1-detectron2 sdist checksum mismatch: {digest} != {SDIST_SHA256}")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = Path(tmp) / "pb1-detectron2-0.6"
        package_dir = src / "detectron2"
        if (package_dir / "_C.py").exists() or list(package_dir.glob("_C*.so")):
            raise SystemExit("unexpected _C in the sdist; refusing to overwrite it")
        (package_dir / "_C.py").write_text(STAND_IN_C)
        print(f"[detectron2] patched {patch_sources(package_dir)} files (np.bool, Image.LINEAR)")
        (src / "setup.py").write_text(SETUP_PY)
        for stale in ("setup.cfg", "pyproject.toml"):
            (src / stale).unlink(missing_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(src)],
            check=True,
        )
    print(f"[detectron2] installed detectron2 {FALLBACK_VERSION} (CPU test fallback)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
