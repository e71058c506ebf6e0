# Shared by setup_env.sh and setup_min_env.sh (sourced, not run): phase timing, the stamp that makes
# a finished setup return at once, and the installed version of a distribution in a venv.

phase_start() { PHASE="$1"; T0=$(date +%s); echo "[setup] == $PHASE"; }
phase_end() { echo "[setup] == $PHASE done in $(( $(date +%s) - T0 ))s"; }

# fingerprint FILE... [-- WORD...]: a hash of the setup's inputs (files, and words such as the versions
# chosen by variables), kept in the venv's stamp
fingerprint() {
  { while [[ $# -gt 0 && "$1" != "--" ]]; do cat "$1"; shift; done; shift || true; echo "$*"; } \
    | sha256sum | cut -d' ' -f1
}

# exit 0 from the calling script when VENV holds a finished setup of these inputs
exit_if_up_to_date() {
  local venv="$1" want="$2"
  if [[ -x "$venv/bin/python" && -f "$venv/.spark-det-setup" && "$(cat "$venv/.spark-det-setup")" == "$want" ]]; then
    echo "[setup] $venv is up to date (delete $venv/.spark-det-setup to force a re-check)"
    exit 0
  fi
}

installed_version() {  # installed_version VENV DISTRIBUTION: its version, or nothing
  "$1/bin/python" - "$2" <<'PYEOF' 2>/dev/null || true
import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass
PYEOF
}
