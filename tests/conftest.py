"""Shared fixtures. Our code is imported as ``seg_tsam.*`` through ``extension/loader.py``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def _load_loader():
    spec = importlib.util.spec_from_file_location("seg_tsam_loader", REPO_ROOT / "extension" / "loader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


loader = _load_loader()
loader.register_package(REPO_ROOT)

from seg_tsam.extension.adapters.diffusers import tiny_models  # noqa: E402


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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on shared cores: intra-op threads only add contention (measured 3× slower).

    Modules that export or run tiny UNets use it with ``pytestmark = pytest.mark.usefixtures(...)``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trt():
    """The real ``tensorrt`` module, or a skip that says exactly what is missing (engines are
    built from ONNX files, so ``onnx`` too)."""
    from seg_tsam.export.engine_build import tensorrt_available

    available, reason = tensorrt_available()
    if not available:
        pytest.skip(f"needs TensorRT and a CUDA device: {reason}")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT can build here, but torch sees no CUDA device to hold the engine's buffers")
    pytest.importorskip("onnx")
    import tensorrt

    return tensorrt
