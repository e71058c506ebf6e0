"""The lowest versions that setup.cfg's ``install_requires`` allows, as pip pins.

    python tools/setup/lowest_pins.py torch torchvision timm     # torch==2.4 torchvision==0.19 timm==1.0.3

tools/setup/setup_min_env.sh installs these into the second test environment, so the lower bounds
users are promised are the versions CI tests; a bound without ``>=`` is an error, not a guess.
Standard library only (a regular expression, not ``packaging``): it runs before anything is installed.
"""

from __future__ import annotations

import configparser
import re
import sys
from pathlib import Path

SETUP_CFG = Path(__file__).resolve().parents[2] / "setup.cfg"


def lowest_pins(names: list[str], setup_cfg: Path = SETUP_CFG) -> list[str]:
    """``name==lowest`` for each of ``names``, from the ``>=`` bound of its ``install_requires`` line."""
    parser = configparser.ConfigParser()
    parser.read(setup_cfg)
    bounds = {}
    for line in parser["options"]["install_requires"].splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", line)
        if match:
            low = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", match.group(2))
            bounds[match.group(1).lower()] = low.group(1) if low else None
    pins = []
    for name in names:
        if bounds.get(name.lower()) is None:
            raise SystemExit(f"error: {setup_cfg} has no '>=' lower bound for {name} in install_requires")
        pins.append(f"{name}=={bounds[name.lower()]}")
    return pins


if __name__ == "__main__":
    print(" ".join(lowest_pins(sys.argv[1:])))
