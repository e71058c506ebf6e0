#!/usr/bin/env bash
# Creates .venv-min: spark-det without the detection frameworks on the LOWEST torch, torchvision and
# timm that setup.cfg's install_requires allows (tools/setup/lowest_pins.py reads them), so that
# `make test` tests that promise beside the pinned stack of .venv. Other packages resolve as pip
# chooses for a user who runs `pip install spark-det` next to that torch. Idempotent, as setup_env.sh.
#
#   bash tools/setup/setup_min_env.sh        # or: make setup-min
#
# Environment:
#   SPARK_DET_MIN_VENV   virtual environment to create or update      (default: <repo>/.venv-min)
#   SPARK_DET_PYTHON     interpreter for the venv                       (default: python3.11 or python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=tools/setup/common.sh
source "$ROOT/tools/setup/common.sh"
VENV="${SPARK_DET_MIN_VENV:-$ROOT/.venv-min}"
PY_BOOT="${SPARK_DET_PYTHON:-$(command -v python3.11 || command -v python3)}"

read -r -a PINS <<< "$("$PY_BOOT" "$ROOT/tools/setup/lowest_pins.py" torch torchvision timm)"
WANT="$(fingerprint "$ROOT/tools/setup/setup_min_env.sh" "$ROOT/tools/setup/common.sh" \
  "$ROOT/tools/setup/lowest_pins.py" "$ROOT/setup.cfg" "$ROOT/pyproject.toml")"
exit_if_up_to_date "$VENV" "$WANT"

T_ALL=$(date +%s)
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

phase_start "virtual environment ($VENV)"
[[ -x "$VENV/bin/python" ]] || "$PY_BOOT" -m venv "$VENV"
"$VENV/bin/python" --version
phase_end

phase_start "the lowest allowed ${PINS[*]}"
"${PIP[@]}" install -q "${PINS[@]}"
phase_end

phase_start "spark-det (editable) with its test and demo extras"
# the pins again, so that resolving spark-det's requirements cannot move them
"${PIP[@]}" install -q -e "$ROOT[dev,demo]" "${PINS[@]}"
phase_end

"$VENV/bin/python" "$ROOT/tools/collect_env.py"
echo "$WANT" > "$VENV/.spark-det-setup"
echo "[setup] finished in $(( $(date +%s) - T_ALL ))s"
