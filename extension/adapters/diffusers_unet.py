"""Locate SEG's self-attention layers in a diffusers ``UNet2DConditionModel``."""

from __future__ import annotations

from torch import nn

from ..core.layers import STAGES
from ..core.query_blur_patch import SelfAttentionLayer

_STAGE_PREFIXES = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}


def self_attention_layers(unet: nn.Module) -> list[SelfAttentionLayer]:
    """Every transformer ``attn1`` in forward order (down, mid, up), with its grid source.

    The grid source is the ``Transformer2DModel`` holding the block: its input is the
    ``(B, C, h, w)`` feature map whose grid the block's tokens form.
    """
    modules = dict(unet.named_modules())
    layers = []
    for name, module in modules.items():
        if not name.endswith(".attn1") or ".transformer_blocks." not in name:
            continue
        if getattr(module, "is_cross_attention", False) or not hasattr(module, "to_q"):
            continue
        if getattr(module, "fused_projections", False):
            raise ValueError(
                f"{name} uses fused QKV projections; call unet.unfuse_qkv_projections() before SEG"
            )
        stage = _STAGE_PREFIXES.get(name.split(".", 1)[0])
        if stage is None:
            continue
        grid_source = modules[name.split(".transformer_blocks.", 1)[0]]
        layers.append(SelfAttentionLayer(name, stage, module.to_q, grid_source))
    order = {stage: position for position, stage in enumerate(STAGES)}
    return sorted(layers, key=lambda layer: order[layer.stage])  # stable: keeps forward order per stage

