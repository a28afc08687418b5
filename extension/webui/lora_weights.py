"""The built-in Lora extension's state as UNet weights, for exports run in place of the UNet.

The WebUI's Lora extension (``extensions-builtin/Lora``, module ``networks``) applies LoRA-type
networks lazily: each patched ``Linear``/``Conv2d``/norm/attention module compares the wanted
networks with the ones its weights hold when it *runs*, and changes its weights in place (the
originals kept as a backup). A replacement UNet never runs those modules, so:

- :func:`current_weights` names the wanted networks (a cheap key per call) and, only when an
  export has to take them, applies them to every module of the PyTorch UNet the way their own
  forwards would (``networks.network_apply_weights``);
- :func:`checkpoint_weights` gives the export the checkpoint's own weights even right after a
  LoRA generation (which leaves its weights applied until the next forward).

Hypernetworks and the Lora extension's "functional" mode change the forward computation, not
the weights: no export can follow them, and such calls run on PyTorch.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch
from modules import shared

from ...export.unet_runtime import CHECKPOINT_WEIGHTS, EngineCannotRun, UNetWeights

#: The module types the Lora extension patches (``lora_patches.py``).
LORA_MODULE_TYPES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm,
                     torch.nn.MultiheadAttention)


def _networks() -> ModuleType | None:
    """The Lora extension's ``networks`` module, if it is loaded (it is unless disabled)."""
    networks = sys.modules.get("networks")
    return networks if hasattr(networks, "network_apply_weights") else None


def _pytorch_unet() -> torch.nn.Module:
    return shared.sd_model.model.diffusion_model


def apply_wanted_networks(unet: torch.nn.Module) -> torch.nn.Module:
    """Make every LoRA-patched module of ``unet`` hold the wanted networks' weights (the
    checkpoint's when none is wanted), as their forwards would; return ``unet``."""
    networks = _networks()
    if networks is not None:
        with torch.no_grad():
            for module in unet.modules():
                if isinstance(module, LORA_MODULE_TYPES):
                    networks.network_apply_weights(module)
    return unet


def current_weights() -> UNetWeights:
    """The UNet weights the WebUI's UNet calls are to use now (see the module docstring).

    Raises :class:`EngineCannotRun` for what an export cannot hold: hypernetworks, and LoRA in
    the Lora extension's functional mode.
    """
    if getattr(shared, "loaded_hypernetworks", None):
        raise EngineCannotRun("hypernetworks are active; an export holds weights, not hypernetworks")
    networks = _networks()
    wanted = list(networks.loaded_networks) if networks is not None else []
    if wanted and getattr(shared.opts, "lora_functional", False):
        raise EngineCannotRun("the Lora setting 'use old method' (lora_functional) adds LoRA in the forward, "
                              "which an export cannot do")
    key = tuple((net.name, net.unet_multiplier, net.dyn_dim, getattr(net, "mtime", None)) for net in wanted)
    return UNetWeights(key or CHECKPOINT_WEIGHTS, lambda: apply_wanted_networks(_pytorch_unet()))


@contextmanager
def checkpoint_weights() -> Iterator[None]:
    """The loaded UNet holds no network's weights while inside; the wanted networks stay wanted
    (their modules apply them again on their next forward)."""
    networks = _networks()
    unet = getattr(getattr(shared.sd_model, "model", None), "diffusion_model", None)
    if networks is None or unet is None:
        yield
        return
    wanted = list(networks.loaded_networks)
    networks.loaded_networks.clear()  # the extension's own list, used by reference
    try:
        apply_wanted_networks(unet)
        yield
    finally:
        networks.loaded_networks[:] = wanted
