#!/usr/bin/env bash
# Creates .venv with everything spark-det, its tests and its demo need, on a CPU-only machine
# that reaches only the package registries. Idempotent: a finished setup whose inputs have not
# changed is detected from a stamp and the script returns in about a second.
#
#   bash tools/setup/setup_env.sh            # or: make setup
#
# Environment:
#   SPARK_DET_VENV       virtual environment to create or update      (default: <repo>/.venv)
#   SPARK_DET_CACHE      where the built mmcv wheel is kept between     (default: ~/.cache/spark-det)
#                        setups; an empty cache costs a ~15 min build on 2 cores
#   SPARK_DET_PYTHON     interpreter for the venv                       (default: python3.11 or python3)
#   SPARK_DET_TORCH      another torch release to build the whole stack on (default: 2.14.1, the
#                        tested one); mmcv is then built against it, e.g. SPARK_DET_TORCH=2.15.0
#   SPARK_DET_TORCHVISION  torchvision for it (default: the 0.(minor+15) series that pairs with
#                        torch 2.minor since 2.1, e.g. 0.30.* for 2.15; pip picks the matching release)
#
# mmcv's source comes through pip (`pip download --no-binary`), so an index mirror or proxy set
# in pip's configuration (pip.conf, PIP_INDEX_URL, PIP_PROXY) is used as for every other package.
#
# GPU users with internet: install the official Detectron2 and a CUDA mmcv instead (README).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=tools/setup/common.sh
source "$ROOT/tools/setup/common.sh"
VENV="${SPARK_DET_VENV:-$ROOT/.venv}"
CACHE="${SPARK_DET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/spark-det}"
PY_BOOT="${SPARK_DET_PYTHON:-$(command -v python3.11 || command -v python3)}"

TORCH_VERSION="${SPARK_DET_TORCH:-2.14.1}"
if [[ -n "${SPARK_DET_TORCHVISION:-}" ]]; then
  TORCHVISION_VERSION="$SPARK_DET_TORCHVISION"
elif [[ -z "${SPARK_DET_TORCH:-}" ]]; then
  TORCHVISION_VERSION=0.29.1
elif [[ "$TORCH_VERSION" =~ ^2\.([0-9]+)(\.|$) && "${BASH_REMATCH[1]}" -ge 1 ]]; then
  TORCHVISION_VERSION="0.$(( BASH_REMATCH[1] + 15 )).*"
else
  echo "[setup] error: cannot tell which torchvision pairs with torch $TORCH_VERSION: set SPARK_DET_TORCHVISION" >&2
  exit 2
fi
MMCV_VERSION=2.1.0
# the sdist's hash, checked after pip fetched it (from PyPI or the user's mirror of it)
MMCV_SDIST_SHA256="d387bcab66b467479b6660310e23746cfc79c6e57acf04094680adb499a5cd3f"

# Pins that keep mmcv 2.1 / mmdet 3.3 / detectron2 0.6 importable together:
# numpy<2 for mmcv's compiled ops; opencv 4.12+ requires numpy>=2; setuptools 80.9 still has
# pkg_resources (mmcv's setup.py, mmengine) and satisfies torch's >=77.0.3.
BASE_PINS=(
  "setuptools==80.9.0" "wheel" "ninja"
  "numpy>=1.24,<2" "opencv-python-headless>=4.8,<4.12" "pillow" "pyyaml" "tqdm" "tensorboard"
  "matplotlib" "pycocotools>=2.0.6" "scipy" "timm>=1.0.31,<1.1" "webdataset>=0.2.86,<2"
  "mmengine==0.10.7"
  "fvcore==0.1.5.post20221221" "iopath==0.1.9" "yacs" "omegaconf>=2.1,<2.4" "hydra-core>=1.1"
  "termcolor" "tabulate" "cloudpickle"
  "pytest>=7.3" "pytest-timeout" "ruff"
  "safetensors>=0.4" "wandb" "mlflow-skinny"  # the tracker tests (W&B offline, MLflow file store)
  "mkdocs>=1.6,<2" "mkdocs-material>=9.5,<10"  # make docs, and tests/test_docs.py's strict build
)

WANT="$(fingerprint "$ROOT/tools/setup/setup_env.sh" "$ROOT/tools/setup/common.sh" \
  "$ROOT/tools/setup/install_detectron2_fallback.py" "$ROOT/setup.cfg" "$ROOT/pyproject.toml" \
  -- "$TORCH_VERSION" "$TORCHVISION_VERSION")"
exit_if_up_to_date "$VENV" "$WANT"

T_ALL=$(date +%s)
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

phase_start "virtual environment ($VENV)"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY_BOOT" -m venv "$VENV"
fi
"$VENV/bin/python" --version
phase_end

phase_start "torch $TORCH_VERSION + torchvision $TORCHVISION_VERSION"
if [[ "$(installed_version "$VENV" torch)" == "$TORCH_VERSION"* \
      && "$(installed_version "$VENV" torchvision)" == "${TORCHVISION_VERSION%\*}"* ]]; then
  echo "[setup] already installed"
else
  "${PIP[@]}" install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi
phase_end

phase_start "python dependencies"
"${PIP[@]}" install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "${BASE_PINS[@]}"
phase_end

phase_start "mmcv $MMCV_VERSION with compiled ops"
# mmcv's compiled ops work only with the torch they were built against: the venv records which one
TORCH_FULL="$(installed_version "$VENV" torch)"
mmcv_ok() {
  [[ "$(cat "$VENV/.spark-det-mmcv-torch" 2>/dev/null)" == "$TORCH_FULL" ]] &&
    "$VENV/bin/python" -c "import mmcv, mmcv.ops; from mmcv.ops import roi_align; assert mmcv.__version__ == '$MMCV_VERSION'" 2>/dev/null
}
if mmcv_ok; then
  echo "[setup] already installed"
else
  WHEELS="$CACHE/wheels/torch-$TORCH_VERSION-py$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
  mkdir -p "$WHEELS"
  WHEEL=$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n1 || true)
  if [[ -z "$WHEEL" ]]; then
    echo "[setup] no cached wheel in $WHEELS: building mmcv from source (about 15 minutes on 2 cores)"
    BUILD=$(mktemp -d)
    trap 'rm -rf "$BUILD"' EXIT
    # pip fetches the sdist with the user's pip configuration (index, mirror, proxy); preparing its
    # metadata runs mmcv's setup.py, which imports torch: hence the venv's pip, without isolation
    "${PIP[@]}" download -q --no-deps --no-binary :all: --no-build-isolation -d "$BUILD" "mmcv==$MMCV_VERSION"
    echo "$MMCV_SDIST_SHA256  $BUILD/mmcv-$MMCV_VERSION.tar.gz" | sha256sum -c --quiet
    tar xzf "$BUILD/mmcv-$MMCV_VERSION.tar.gz" -C "$BUILD"
    # torch >= 2.10 headers need C++20; mmcv 2.1.0 hard-codes C++17 (its only incompatibility there).
    if "$VENV/bin/python" -c "import sys, torch; sys.exit(tuple(map(int, torch.__version__.split('.')[:2])) < (2, 10))"; then
      sed -i 's/-std=c++17/-std=c++20/g' "$BUILD/mmcv-$MMCV_VERSION/setup.py"
      grep -q -- '-std=c++20' "$BUILD/mmcv-$MMCV_VERSION/setup.py"
    fi
    MMCV_WITH_OPS=1 MAX_JOBS="$(nproc)" "${PIP[@]}" wheel -q --no-build-isolation --no-deps \
      -w "$BUILD/dist" "$BUILD/mmcv-$MMCV_VERSION"
    # Publish atomically so an interrupted build never leaves a half-written wheel in the cache.
    BUILT=$(ls "$BUILD"/dist/mmcv-*.whl)
    cp "$BUILT" "$WHEELS/.$(basename "$BUILT").tmp"
    mv "$WHEELS/.$(basename "$BUILT").tmp" "$WHEELS/$(basename "$BUILT")"
    WHEEL="$WHEELS/$(basename "$BUILT")"
  else
    echo "[setup] using cached wheel $WHEEL"
  fi
  "${PIP[@]}" install -q --no-deps --force-reinstall "$WHEEL"
  "${PIP[@]}" install -q "addict" "packaging" "rich" "yapf" "regex; sys_platform=='win32'"
  echo "$TORCH_FULL" > "$VENV/.spark-det-mmcv-torch"
  mmcv_ok || { echo "[setup] mmcv installed but mmcv.ops does not import" >&2; exit 1; }
fi
phase_end

phase_start "mmdet 3.3.0"
if [[ "$(installed_version "$VENV" mmdet)" == "3.3.0" ]]; then
  echo "[setup] already installed"
else
  "${PIP[@]}" install -q "mmdet==3.3.0" "numpy<2"
fi
phase_end

phase_start "Detectron2"
"$VENV/bin/python" "$ROOT/tools/setup/install_detectron2_fallback.py"
phase_end

phase_start "spark-det (editable)"
"${PIP[@]}" install -q --no-build-isolation -e "$ROOT[dev,demo,d2,mmdet]"
phase_end

"$VENV/bin/python" "$ROOT/tools/collect_env.py"
echo "$WANT" > "$VENV/.spark-det-setup"
echo "[setup] finished in $(( $(date +%s) - T_ALL ))s"
