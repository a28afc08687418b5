"""Shared fixtures. Our code is imported as ``seg_tsam.*`` through ``extension/loader.py``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _load_loader():
    spec = importlib.util.spec_from_file_location("seg_tsam_loader", REPO_ROOT / "extension" / "loader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


loader = _load_loader()
loader.register_package(REPO_ROOT)

from seg_tsam.extension.adapters import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd_pipe():
    """Tiny SD1.x-layout pipeline (random weights). Treat as read-only: tests share it."""
    return tiny_models.tiny_sd_pipeline()


@pytest.fixture(scope="session")
def tiny_sdxl_pipe():
    """Tiny SDXL-layout pipeline (random weights, two text encoders). Read-only."""
    return tiny_models.tiny_sdxl_pipeline()


@pytest.fixture(params=["sd1", "sdxl"])
def tiny_pipe(request, tiny_sd_pipe, tiny_sdxl_pipe):
    return tiny_sd_pipe if request.param == "sd1" else tiny_sdxl_pipe


@pytest.fixture
def fresh_unet_factory():
    """Build a UNet from the same config and seed: an untouched twin to compare outputs against."""

    def build(kind: str):
        config = tiny_models.TINY_SD1_UNET_CONFIG if kind == "sd1" else tiny_models.TINY_SDXL_UNET_CONFIG
        return tiny_models.tiny_unet(config)

    return build
