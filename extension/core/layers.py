"""The layer-selection spec users type, e.g. ``mid``, ``down,up`` or ``d4,d5,m0-9``.

Self-attention layers (``attn1``) are numbered per UNet stage in forward order, as the
official SEG code does: ``d0…`` in the down path, ``m0…`` in the middle block, ``u0…`` in
the up path. SD1.x/SD2.x have 6/1/9 of them, SDXL 24/10/36.

Grammar (case-insensitive, spaces ignored, items separated by commas)::

    item  := "all" | stage | letter INDEX | letter INDEX "-" INDEX
    stage := "down" | "mid" | "up"   (aliases: "input", "middle", "output")
    letter:= "d" | "m" | "u"

Parsing needs no model; :func:`resolve_layer_spec` checks indices against a model's counts.
Adapters describe a model's layers as :class:`AttentionLayer` rows (one table per UNet, see
``extension/adapters/unet_layers.py``); selection and the query patch work on those rows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from .fields import shown

if TYPE_CHECKING:  # layer specs and grids need no torch: the export's profiles import them torch-free
    from torch import nn

STAGES = ("down", "mid", "up")
KINDS = ("self", "cross")
_STAGE_WORDS = {"down": "down", "input": "down", "mid": "mid", "middle": "mid", "up": "up", "output": "up"}
_LETTERS = {"d": "down", "m": "mid", "u": "up"}
MAX_INDEX_DIGITS = 4  #: longer layer indices are refused before int() (which refuses > 4300 digits)
_INDEXED = re.compile(r"^([dmu])(\d+)(?:-(\d+))?$")


def grid_at_level(latent_size: tuple[int, int], level: int) -> tuple[int, int]:
    """The ``(h, w)`` token grid ``level`` stride-2 downsamplings below an ``(H, W)`` latent.

    A stride-2 convolution with padding 1 maps ``n`` to ``⌈n/2⌉``, and the up path resizes
    back to the skip connections' sizes, so every UNet level of any size is exactly this.
    """
    if level < 0:
        raise ValueError(f"grid level must be ≥ 0, got {level}")
    height, width = (int(side) for side in latent_size)
    if height < 1 or width < 1:
        raise ValueError(f"latent size must be positive, got {latent_size}")
    for _ in range(level):
        height, width = -(-height // 2), -(-width // 2)
    return height, width


@dataclass(frozen=True)
class AttentionLayer:
    """One transformer attention module of a UNet, placed without running the model.

    ``index`` is the layer's position among the layers of its stage and kind, in forward order:
    for self-attention it is the number SEG's spec counts (``d0…``, ``m0…``, ``u0…``).
    ``level`` is the number of stride-2 downsamplings between the latent and the layer's
    token grid, so the grid of an ``(H, W)`` latent is :func:`grid_at_level` of it.
    """

    name: str  #: module path in the UNet, e.g. ``mid_block.attentions.0.transformer_blocks.0.attn1``
    kind: str  #: "self" (``attn1``) or "cross" (``attn2``)
    stage: str  #: "down", "mid" or "up"
    index: int  #: position within its stage and kind, forward order
    level: int  #: stride-2 downsamplings between the latent and this layer's token grid
    module: nn.Module  #: the attention module itself
    query_proj: nn.Module  #: its query projection (``to_q``)
    grid_source: nn.Module  #: the spatial transformer whose (B, C, h, w) input gives the exact grid


class LayerSpecError(ValueError):
    """A layer spec that cannot be parsed or does not fit the model."""


@dataclass(frozen=True)
class LayerRange:
    """Layers ``first … last`` (inclusive) of a stage; ``last=None`` means to the end."""

    stage: str
    first: int = 0
    last: int | None = None


def parse_layer_spec(spec: str) -> tuple[LayerRange, ...]:
    """Parse a spec into ranges; raise :class:`LayerSpecError` with the offending item."""
    if not isinstance(spec, str):
        raise LayerSpecError(f"layers must be a string such as 'mid' or 'd4,m0-9', got {shown(spec)}")
    items = [item for item in spec.replace(" ", "").lower().split(",") if item]
    if not items:
        raise LayerSpecError("layers is empty; use e.g. 'mid', 'down,up' or 'd4,d5,m0-9'")
    ranges: list[LayerRange] = []
    for item in items:
        if item == "all":
            ranges.extend(LayerRange(stage) for stage in STAGES)
        elif item in _STAGE_WORDS:
            ranges.append(LayerRange(_STAGE_WORDS[item]))
        elif (match := _INDEXED.match(item)) and max(len(match.group(2)), len(match.group(3) or "")) > MAX_INDEX_DIGITS:
            raise LayerSpecError(f"layer index in {shown(item, 20)} has more than {MAX_INDEX_DIGITS} digits: no UNet has that many layers")
        elif match:
            letter, first, last = match.group(1), int(match.group(2)), match.group(3)
            last_index = int(last) if last is not None else first
            if last_index < first:
                raise LayerSpecError(f"layer range {shown(item, 40)} runs backwards")
            ranges.append(LayerRange(_LETTERS[letter], first, last_index))
        else:
            raise LayerSpecError(
                f"unknown layer {shown(item, 40)}: use down/mid/up/all or d<i>, m<i>, u<i> with ranges like m0-9"
            )
    return tuple(ranges)


def resolve_layer_spec(spec: str, counts: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Indices selected per stage, sorted and de-duplicated, checked against ``counts``."""
    selected: dict[str, set[int]] = {stage: set() for stage in STAGES}
    for layer_range in parse_layer_spec(spec):
        available = counts.get(layer_range.stage, 0)
        last = available - 1 if layer_range.last is None else layer_range.last
        if layer_range.last is not None and last >= available:
            letter = layer_range.stage[0]
            have = f"{letter}0-{letter}{available - 1}" if available else "none"
            raise LayerSpecError(
                f"layer {letter}{last} does not exist: this model's {layer_range.stage} stage has "
                f"{available} self-attention layers ({have})"
            )
        selected[layer_range.stage].update(range(layer_range.first, last + 1))
    if not any(selected.values()):
        raise LayerSpecError(f"layers {shown(spec)} select no self-attention layer of this model ({dict(counts)})")
    return {stage: tuple(sorted(indices)) for stage, indices in selected.items()}


class _Staged(Protocol):
    stage: str


LayerT = TypeVar("LayerT", bound=_Staged)


def select_layers(layers: Sequence[LayerT], spec: str) -> list[LayerT]:
    """The layers (in forward order per stage) that ``spec`` selects from a model's ``layers``."""
    by_stage = {stage: [layer for layer in layers if layer.stage == stage] for stage in STAGES}
    indices = resolve_layer_spec(spec, {stage: len(found) for stage, found in by_stage.items()})
    return [by_stage[stage][index] for stage in STAGES for index in indices[stage]]
