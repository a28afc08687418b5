"""Locate SEG's self-attention layers in a UNet: diffusers' or the WebUI's ldm/sgm one.

Both name their transformer self-attention ``….transformer_blocks.<k>.attn1`` under a
spatial transformer, which is the grid source: its ``(B, C, h, w)`` input gives the token
grid. Stages come from the first name component: diffusers ``down_blocks``/``mid_block``/
``up_blocks``, ldm and sgm ``input_blocks``/``middle_block``/``output_blocks``.
"""

from __future__ import annotations

from torch import nn

from ..core.layers import STAGES
from ..core.query_blur_patch import SelfAttentionLayer

_STAGE_PREFIXES = {
    "down_blocks": "down", "mid_block": "mid", "up_blocks": "up",  # diffusers
    "input_blocks": "down", "middle_block": "mid", "output_blocks": "up",  # ldm / sgm
}


def self_attention_layers(unet: nn.Module) -> list[SelfAttentionLayer]:
    """Every transformer ``attn1`` that is a self-attention, in forward order (down, mid, up)."""
    modules = dict(unet.named_modules())
    layers = []
    for name, module in modules.items():
        if not name.endswith(".attn1") or ".transformer_blocks." not in name or not hasattr(module, "to_q"):
            continue
        block = modules[name.rsplit(".", 1)[0]]
        if getattr(module, "is_cross_attention", False) or getattr(block, "disable_self_attn", False):
            continue  # attn1 attends to the text here: not a self-attention
        if getattr(module, "fused_projections", False):
            raise ValueError(f"{name} uses fused QKV projections; call unet.unfuse_qkv_projections() before SEG")
        stage = _STAGE_PREFIXES.get(name.split(".", 1)[0])
        if stage is None:
            continue
        grid_source = modules[name.split(".transformer_blocks.", 1)[0]]
        layers.append(SelfAttentionLayer(name, stage, module.to_q, grid_source))
    order = {stage: position for position, stage in enumerate(STAGES)}
    return sorted(layers, key=lambda layer: order[layer.stage])  # stable: keeps forward order per stage
