"""tools/setup: the second test environment installs exactly setup.cfg's lower bounds."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "setup"))

from lowest_pins import lowest_pins  # noqa: E402


def test_lowest_pins_are_the_lower_bounds_of_install_requires(tmp_path):
    cfg = tmp_path / "setup.cfg"
    cfg.write_text("[options]\ninstall_requires =\n    torch>=2.4\n    # a comment\n    timm>=1.0.31,<1.1  # why\n"
                   "    numpy\n\n[options.extras_require]\ndemo =\n    torch>=9\n")
    assert lowest_pins(["torch", "timm"], cfg) == ["torch==2.4", "timm==1.0.31"]


def test_a_requirement_without_a_lower_bound_is_an_error_not_a_guess(tmp_path):
    done = subprocess.run([sys.executable, "tools/setup/lowest_pins.py", "torch", "numpy"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == f"error: {ROOT / 'setup.cfg'} has no '>=' lower bound for numpy in install_requires"

