"""Layer specs: parsing, resolution against model counts, and the real architectures' layers."""

from __future__ import annotations

import pytest
import torch

from seg_tsam.extension.adapters.diffusers import tiny_models
from seg_tsam.extension.adapters.unet_layers import self_attention_layers
from seg_tsam.extension.core.layers import LayerSpecError, resolve_layer_spec, select_layers

SD1_COUNTS = {"down": 6, "mid": 1, "up": 9}
SDXL_COUNTS = {"down": 24, "mid": 10, "up": 36}


@pytest.mark.parametrize(
    "spec, counts, expected",
    [
        ("mid", SD1_COUNTS, {"down": (), "mid": (0,), "up": ()}),
        ("mid", SDXL_COUNTS, {"down": (), "mid": tuple(range(10)), "up": ()}),
        ("d4,d5,m0-9", SDXL_COUNTS, {"down": (4, 5), "mid": tuple(range(10)), "up": ()}),
        ("down,up", SD1_COUNTS, {"down": tuple(range(6)), "mid": (), "up": tuple(range(9))}),
        (" Middle , u8 ,u2-3,u3", SD1_COUNTS, {"down": (), "mid": (0,), "up": (2, 3, 8)}),
        ("all", SD1_COUNTS, {"down": tuple(range(6)), "mid": (0,), "up": tuple(range(9))}),
    ],
)
def test_resolve(spec, counts, expected):
    assert resolve_layer_spec(spec, counts) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty"),
        ("  , ", "empty"),
        ("x3", "unknown layer 'x3'"),
        ("m", "unknown layer 'm'"),
        ("m5-2", "backwards"),
        ("m10", r"m10 does not exist: this model's mid stage has 10 self-attention layers \(m0-m9\)"),
        ("d2-30", "d30 does not exist"),
        ("mid;up", "unknown layer"),
    ],
)
def test_bad_specs_get_clear_errors(spec, message):
    with pytest.raises(LayerSpecError, match=message):
        resolve_layer_spec(spec, SDXL_COUNTS)


def test_non_string_spec():
    with pytest.raises(LayerSpecError, match="must be a string"):
        resolve_layer_spec(["mid"], SDXL_COUNTS)


@pytest.mark.parametrize(
    "config, counts",
    [(tiny_models.SD15_UNET_CONFIG, SD1_COUNTS), (tiny_models.SDXL_UNET_CONFIG, SDXL_COUNTS)],
    ids=["sd15", "sdxl"],
)
def test_real_architectures_have_the_official_layer_counts(config, counts):
    """SD1.5 and SDXL UNets (built on the meta device, no weights) list 6/1/9 and 24/10/36 attn1."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    layers = self_attention_layers(unet)
    assert {stage: sum(layer.stage == stage for layer in layers) for stage in counts} == counts
    mid = select_layers(layers, "mid")
    assert [layer.name for layer in mid] == [
        f"mid_block.attentions.0.transformer_blocks.{i}.attn1" for i in range(counts["mid"])
    ]
    assert all(layer.query_proj is dict(unet.named_modules())[layer.name].to_q for layer in layers)


def test_down_index_follows_forward_order(tiny_sdxl_pipe):
    layers = self_attention_layers(tiny_sdxl_pipe.unet)
    names = [layer.name for layer in select_layers(layers, "d0,d2")]
    assert names == [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1",
        "down_blocks.2.attentions.0.transformer_blocks.1.attn1",
    ]
