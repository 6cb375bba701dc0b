"""Fixtures shared by the LaVin-DiT tests."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "train" / "lavin_dit.py"


@pytest.fixture(scope="session")
def lavin_script():
    """``train/lavin_dit.py`` imported as a module (its config dataclasses, ``check_config``, ``build_vae``), once."""
    spec = importlib.util.spec_from_file_location("train_lavin_dit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module
