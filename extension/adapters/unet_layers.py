"""The attention-layer table of a UNet: every ``attn1``/``attn2`` with its stage, index, level and grid.

One structural walk (no forward pass) serves SEG (self-attention, by stage index), T-SAM
(cross-attention, by level) and the export (the level of each blurred layer). Both
diffusers' ``UNet2DConditionModel`` and the WebUI's ldm/sgm ``UNetModel`` name their
transformer attentions ``….transformer_blocks.<k>.attn1|attn2`` under a spatial transformer,
which is the grid source: its ``(B, C, h, w)`` input gives the token grid.

**Another host's UNet plugs in here**, with a :class:`UNetLayout`: the attributes holding its
down, middle and up blocks (in forward order) and how a block changes the level. A block's
attention runs at the level the block starts at; a down block that ends in a stride-2
downsampling sends the next blocks one level down, an up block that ends in an upsampling
one level up. Add the layout to :data:`LAYOUTS` and SEG, T-SAM and the export all follow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from ..core.layers import AttentionLayer

_KIND_OF_SUFFIX = {".attn1": "self", ".attn2": "cross"}


def _has_downsamplers(block: nn.Module) -> bool:
    return bool(getattr(block, "downsamplers", None))


def _has_upsamplers(block: nn.Module) -> bool:
    return bool(getattr(block, "upsamplers", None))


def _contains(class_name: str) -> Callable[[nn.Module], bool]:
    """ldm/sgm: a block changes the level when it holds a ``Downsample``/``Upsample`` module
    (alone, or inside a ``ResBlock(down=True)``/``ResBlock(up=True)``)."""
    return lambda block: any(type(module).__name__ == class_name for module in block.modules())


@dataclass(frozen=True)
class UNetLayout:
    """Where one host's UNet keeps its blocks, and which blocks change the resolution level."""

    name: str
    down: str  #: attribute holding the down-path blocks, a sequence in forward order
    mid: str  #: attribute holding the middle block (may be ``None`` on the model)
    up: str  #: attribute holding the up-path blocks, a sequence in forward order
    goes_down: Callable[[nn.Module], bool]  #: the down block ends in a stride-2 downsampling
    goes_up: Callable[[nn.Module], bool]  #: the up block ends in an upsampling


DIFFUSERS = UNetLayout("diffusers", "down_blocks", "mid_block", "up_blocks", _has_downsamplers, _has_upsamplers)
OPENAI = UNetLayout("ldm/sgm", "input_blocks", "middle_block", "output_blocks",
                    _contains("Downsample"), _contains("Upsample"))
#: The layouts tried in order; the first whose down and up attributes the UNet has is used.
LAYOUTS = (DIFFUSERS, OPENAI)


def unet_layout(unet: nn.Module) -> UNetLayout | None:
    """The layout of ``unet``, or ``None`` for a model none of :data:`LAYOUTS` describes."""
    return next((layout for layout in LAYOUTS if hasattr(unet, layout.down) and hasattr(unet, layout.up)), None)


def _blocks(unet: nn.Module, layout: UNetLayout) -> Iterator[tuple[str, str, nn.Module, int]]:
    """``(stage, path, block, level its attention runs at)`` for every block, in forward order."""
    level = 0
    for index, block in enumerate(getattr(unet, layout.down)):
        yield "down", f"{layout.down}.{index}", block, level
        level += layout.goes_down(block)
    middle = getattr(unet, layout.mid, None)
    if middle is not None:
        yield "mid", layout.mid, middle, level
    for index, block in enumerate(getattr(unet, layout.up)):
        yield "up", f"{layout.up}.{index}", block, level
        level -= layout.goes_up(block)


def downsampling_count(unet: nn.Module) -> int:
    """How many stride-2 downsamplings the down path holds (the middle block's level); 0 if unknown."""
    layout = unet_layout(unet)
    return 0 if layout is None else sum(layout.goes_down(block) for block in getattr(unet, layout.down))


def _kind(name: str, module: nn.Module, transformer_block: nn.Module) -> str | None:
    """``"self"``, ``"cross"`` or ``None`` (not a transformer attention, or an ``attn1`` that
    attends to the text, which neither SEG nor T-SAM uses)."""
    kind = next((kind for suffix, kind in _KIND_OF_SUFFIX.items() if name.endswith(suffix)), None)
    if kind is None or ".transformer_blocks." not in name or not hasattr(module, "to_q"):
        return None
    if kind == "self" and (getattr(module, "is_cross_attention", False)
                           or getattr(transformer_block, "disable_self_attn", False)):
        return None
    return kind


def attention_layers(unet: nn.Module) -> list[AttentionLayer]:
    """Every transformer ``attn1`` (self) and ``attn2`` (cross) of ``unet``, in forward order.

    Read from the block structure alone; a UNet no layout describes has an empty table.
    """
    layout = unet_layout(unet)
    if layout is None:
        return []
    modules = dict(unet.named_modules())
    layers: list[AttentionLayer] = []
    counts: dict[tuple[str, str], int] = {}
    for stage, path, block, level in _blocks(unet, layout):
        for relative, module in block.named_modules():
            name = f"{path}.{relative}"
            kind = _kind(name, module, modules[name.rsplit(".", 1)[0]])
            if kind is None:
                continue
            index = counts.get((stage, kind), 0)
            counts[stage, kind] = index + 1
            grid_source = modules[name.split(".transformer_blocks.", 1)[0]]
            layers.append(AttentionLayer(name, kind, stage, index, level, module, module.to_q, grid_source))
    return layers


def self_attention_layers(unet: nn.Module) -> list[AttentionLayer]:
    """SEG's layers: every ``attn1`` that is a self-attention, in forward order (down, mid, up)."""
    layers = [layer for layer in attention_layers(unet) if layer.kind == "self"]
    for layer in layers:
        if getattr(layer.module, "fused_projections", False):
            raise ValueError(
                f"{layer.name} uses fused QKV projections; call unet.unfuse_qkv_projections() before SEG"
            )
    return layers


def cross_attention_layers(unet: nn.Module) -> list[AttentionLayer]:
    """T-SAM's candidates: every ``attn2``, in forward order, each with its level."""
    return [layer for layer in attention_layers(unet) if layer.kind == "cross"]


#: T-SAM's maps: the official code's 16×16 of SD1.5 at 512², the latent halved twice.
TSAM_LEVEL = 2


def coarse_level(layers: Sequence[AttentionLayer], preferred: int = TSAM_LEVEL) -> int:
    """``preferred`` if some ``attn2`` runs there, else the coarsest level with cross-attention."""
    levels = {layer.level for layer in layers}
    if not levels:
        raise ValueError("T-SAM: this UNet has no cross-attention (attn2) layers")
    return preferred if preferred in levels else max(levels)
