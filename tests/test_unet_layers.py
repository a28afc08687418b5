"""The attention-layer table: levels against a measured forward, stage indices against SEG's numbering."""

from __future__ import annotations

import pytest
import torch

from seg_tsam.extension.adapters.diffusers import tiny_models
from seg_tsam.extension.adapters.unet_layers import (
    attention_layers,
    cross_attention_layers,
    downsampling_count,
    self_attention_layers,
)
from seg_tsam.extension.core.layers import grid_at_level, select_layers


def measured_grids(unet: torch.nn.Module, layers, run) -> dict[int, tuple[int, int]]:
    """``(h, w)`` of the input each grid source really gets in ``run()``, keyed by ``id(source)``."""
    grids: dict[int, tuple[int, int]] = {}

    def record(module, args, kwargs):
        features = args[0] if args else kwargs["hidden_states"]
        grids[id(module)] = tuple(features.shape[-2:])

    sources = {id(layer.grid_source): layer.grid_source for layer in layers}.values()
    handles = [source.register_forward_pre_hook(record, with_kwargs=True) for source in sources]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return grids


def assert_levels_match_the_forward(layers, grids, latent) -> None:
    assert layers and {layer.kind for layer in layers} == {"self", "cross"}
    for layer in layers:
        assert grids[id(layer.grid_source)] == grid_at_level(latent, layer.level), (layer.name, latent)


def diffusers_forward(unet, latent):
    cross_dim = unet.config.cross_attention_dim
    kwargs = {"encoder_hidden_states": torch.randn(1, 77, cross_dim)}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)}
    return lambda: unet(torch.randn(1, 4, *latent), 321, **kwargs)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@pytest.mark.parametrize("latent", [(9, 13), (7, 5), (11, 3)])
def test_levels_equal_the_grids_a_forward_measures(fresh_unet_factory, kind, latent):
    """Odd, non-square latents: every level's ceil-halved grid differs, so a wrong level shows."""
    unet = fresh_unet_factory(kind)
    layers = attention_layers(unet)
    grids = measured_grids(unet, layers, diffusers_forward(unet, latent))
    assert_levels_match_the_forward(layers, grids, latent)
    assert {layer.level for layer in layers} == ({0, 1, 2} if kind == "sd1" else {1, 2})  # the tiny layouts
    assert downsampling_count(unet) == len(unet.config.block_out_channels) - 1


def sd15_names(attention: str) -> dict[str, list[str]]:
    """SD1.5's transformer layers by stage, written out from its block layout (2 per down block, 3 per up block)."""
    def path(stage, block, index):
        return f"{stage}.{block}.attentions.{index}.transformer_blocks.0.{attention}"

    return {
        "down": [path("down_blocks", block, index) for block in range(3) for index in range(2)],
        "mid": [f"mid_block.attentions.0.transformer_blocks.0.{attention}"],
        "up": [path("up_blocks", block, index) for block in range(1, 4) for index in range(3)],
    }


def test_stage_indices_are_seg_numbering_on_sd15():
    """d0-d5, m0, u0-u8 in forward order, for attn1 (SEG) and attn2 alike; levels from the block layout."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**tiny_models.SD15_UNET_CONFIG)
    for kind, attention in (("self", "attn1"), ("cross", "attn2")):
        layers = [layer for layer in attention_layers(unet) if layer.kind == kind]
        for stage, names in sd15_names(attention).items():
            staged = [layer for layer in layers if layer.stage == stage]
            assert [(layer.index, layer.name) for layer in staged] == list(enumerate(names))
    self_layers = self_attention_layers(unet)
    for layer in self_layers:
        assert select_layers(self_layers, f"{layer.stage[0]}{layer.index}") == [layer]
    block_level = {"down_blocks": lambda b: b, "mid_block": lambda b: 3, "up_blocks": lambda b: 3 - b}
    for layer in attention_layers(unet):
        block, number = layer.name.split(".")[:2]
        assert layer.level == block_level[block](int(number) if number.isdigit() else 0), layer.name
    assert downsampling_count(unet) == 3


def test_sdxl_indices_run_per_stage_and_kind():
    """SDXL: 24/10/36 of each kind, indices 0… n-1 in forward order within each stage."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**tiny_models.SDXL_UNET_CONFIG)
    for layers in (self_attention_layers(unet), cross_attention_layers(unet)):
        stages = [layer.stage for layer in layers]
        assert stages == ["down"] * 24 + ["mid"] * 10 + ["up"] * 36
        for stage in ("down", "mid", "up"):
            assert [layer.index for layer in layers if layer.stage == stage] == list(range(stages.count(stage)))


def test_each_layer_points_at_its_own_modules(tiny_sdxl_pipe):
    unet = tiny_sdxl_pipe.unet
    modules = dict(unet.named_modules())
    for layer in attention_layers(unet):
        assert layer.module is modules[layer.name]
        assert layer.query_proj is modules[layer.name].to_q
        assert layer.grid_source is modules[layer.name.split(".transformer_blocks.")[0]]


def test_an_unknown_model_has_an_empty_table():
    assert attention_layers(torch.nn.Linear(2, 2)) == []
    assert downsampling_count(torch.nn.Linear(2, 2)) == 0
