"""Shared by the bench scripts (run as ``python bench/<script>.py``, so this folder is on ``sys.path``):
makes the repository importable as ``seg_tsam.*``, names the UNets they time and prints their tables."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("seg_tsam_loader", REPO_ROOT / "extension" / "loader.py")
_loader = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_loader)
_loader.register_package(REPO_ROOT)

from seg_tsam.extension.adapters.diffusers import tiny_models as tm  # noqa: E402

#: Random-weight UNet configs: the tests' tiny SD1 layout and the real SD1.5 / SDXL sizes.
CONFIGS = {"tiny": tm.TINY_SD1_UNET_CONFIG, "sd15": tm.SD15_UNET_CONFIG, "sdxl": tm.SDXL_UNET_CONFIG}
#: Default square image side in pixels, (on CPU, on CUDA).
DEFAULT_SIZE = {"tiny": (128, 128), "sd15": (256, 512), "sdxl": (256, 1024)}


def table(header: list[str], rows: list[list[str]]) -> None:
    print("\n| " + " | ".join(header) + " |\n|---|" + "---:|" * (len(header) - 1))
    for row in rows:
        print("| " + " | ".join(row) + " |")
