"""Which WebUI this extension runs in, found once at import.

The hosts keep AUTOMATIC1111's script API (``modules.scripts``, ``script_callbacks``, the HTTP
API) but run the UNet differently:

- ``a1111``: AUTOMATIC1111 1.10.1 and ``dev``; ldm/sgm modules, ``sd_unet`` replacements.
- ``forge-neo``, ``forge``: the ``backend/`` package; the UNet is patched through the
  per-generation ``UnetPatcher`` clone in ``p.sd_model.forge_objects``.
- ``reforge``: ComfyUI-derived ``ldm_patched`` with the same patcher methods.

The Forge family does not route "SD Unet" replacements, so this extension's exports cannot run
there (the export tab says so).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Host:
    name: str  #: ``a1111``, ``forge-neo``, ``forge`` or ``reforge``
    label: str  #: for messages: "Forge Neo", …

    @property
    def is_forge(self) -> bool:
        """The UNet is patched through a ``UnetPatcher`` (Forge Neo, Forge, reForge)."""
        return self.name != "a1111"


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing
        return False


def detect() -> Host:
    if not _exists("modules_forge"):
        return Host("a1111", "AUTOMATIC1111")
    if _exists("ldm_patched"):
        return Host("reforge", "reForge")
    from modules_forge import forge_version

    if getattr(forge_version, "version", "") == "neo":
        return Host("forge-neo", "Forge Neo")
    return Host("forge", "Forge")


HOST = detect()


def unet_module(sd_model):
    """The UNet ``nn.Module`` the host runs for ``sd_model`` (for the layer table)."""
    if HOST.is_forge:
        return sd_model.forge_objects.unet.model.diffusion_model
    return sd_model.model.diffusion_model
