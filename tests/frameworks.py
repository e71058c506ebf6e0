"""Import a detection framework for a test: skip locally if absent, but never in CI, where a
missing framework means a broken setup that a skip would hide."""

import importlib
import os

import pytest


def require(module: str):
    if os.environ.get("CI") or os.environ.get("SPARK_DET_REQUIRE_FRAMEWORKS"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} not installed (run `make setup`)")
