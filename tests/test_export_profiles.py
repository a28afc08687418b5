"""Engine profiles: derived engine-axis ranges, presets, validation and TensorRT profile shapes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from seg_tsam.export.profiles import (
    FAMILIES,
    PRESETS,
    AxisRange,
    EngineCall,
    EngineProfile,
    ProfileError,
    chunks_for_prompt_tokens,
    grid_size,
    model_family,
    preset_profile,
    trt_profile_shapes,
)

SD1 = PRESETS["SD1.x 512-768"]
SDXL = PRESETS["SDXL 768-1024"]


def test_presets_cover_what_their_names_say():
    assert (SD1.height, SD1.width) == (AxisRange(512, 512, 768), AxisRange(512, 512, 768))
    assert (SDXL.height, SDXL.width) == (AxisRange(768, 1024, 1024), AxisRange(768, 1024, 1024))
    for preset in PRESETS.values():
        assert preset.images == AxisRange(1, 1, 4) and preset.rows_per_image == 3
    assert model_family("sdxl").default_preset == "SDXL 768-1024" and model_family("sd1").default_preset in PRESETS


def test_presets_cannot_be_mutated():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SD1.height = AxisRange(64, 64, 64)
    with pytest.raises(TypeError):
        PRESETS["mine"] = SD1  # type: ignore[index]
    assert preset_profile("SD1.x 512-768") is SD1


def test_derived_ranges_sd1_preset():
    assert SD1.latent_height == AxisRange(64, 64, 96)
    assert SD1.tokens == AxisRange(77, 77, 231)  # 1–3 chunks of 75 prompt tokens
    assert SD1.batch_rows == AxisRange(1, 3, 12)  # 1 row (cond only) … 4 images × 3 rows
    assert [SD1.grid_height(level) for level in range(4)] == [
        AxisRange(64, 64, 96), AxisRange(32, 32, 48), AxisRange(16, 16, 24), AxisRange(8, 8, 12)
    ]


def test_grid_sizes_halve_with_ceil_for_odd_latents():
    profile = EngineProfile(images=2, height=(520, 520, 1048), width=(72, 104, 104), rows_per_image=5)
    assert profile.latent_height == AxisRange(65, 65, 131)
    assert profile.grid_height(1) == AxisRange(33, 33, 66)
    assert profile.grid_height(3) == AxisRange(9, 9, 17)
    assert profile.grid_width(2) == AxisRange(3, 4, 4)
    assert profile.batch_rows == AxisRange(2, 10, 10)
    assert profile.blur_matrix_shapes(1) == {
        "blur_h_1": ((2, 33, 33), (10, 33, 33), (10, 66, 66)),
        "blur_w_1": ((2, 5, 5), (10, 7, 7), (10, 7, 7)),
    }


def test_grid_formula_matches_a_real_unet_at_odd_latent_sizes(fresh_unet_factory):
    """The blur-matrix sizes must be the grids a UNet's transformers really see."""
    from seg_tsam.extension.adapters.unet_layers import self_attention_layers

    unet = fresh_unet_factory("sd1")
    latent_h, latent_w = 9, 13
    seen = []
    hooks = [
        layer.grid_source.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
        for layer in self_attention_layers(unet)
    ]
    try:
        with torch.no_grad():
            unet(torch.zeros(1, 4, latent_h, latent_w), 1, encoder_hidden_states=torch.zeros(1, 77, 32))
    finally:
        for hook in hooks:
            hook.remove()
    expected = {(grid_size(latent_h, level), grid_size(latent_w, level)) for level in range(4)}
    assert seen and set(seen) <= expected
    assert {(9, 13), (5, 7)} <= set(seen)  # the tiny SD1 UNet attends at levels 0 and 1


def test_engine_call_units_and_coverage():
    call = EngineCall.for_images(images=2, height=768, width=512, prompt_chunks=2)
    assert call == EngineCall(rows=6, latent_height=96, latent_width=64, tokens=154)
    assert SD1.covers(call)
    assert chunks_for_prompt_tokens(0) == 1 and chunks_for_prompt_tokens(75) == 1 and chunks_for_prompt_tokens(76) == 2


def test_mismatches_name_each_axis_in_user_units():
    call = EngineCall(rows=13, latent_height=128, latent_width=64, tokens=308)
    by_axis = {mismatch.axis: mismatch for mismatch in SD1.mismatches(call)}
    assert set(by_axis) == {"batch", "height", "tokens"}
    assert "1024 px" in by_axis["height"].message and "512–768 px" in by_axis["height"].message
    assert "308 tokens" in by_axis["tokens"].message and "4 chunks" in by_axis["tokens"].message
    assert "13 batch rows" in by_axis["batch"].message
    # A hires-fix size that is not a multiple of 8 is judged by its latent size.
    assert SD1.covers(EngineCall(rows=3, latent_height=665 // 8, latent_width=64, tokens=77))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=(512, 512, 770)), "height.max: must be a multiple of 8, got 770"),
        (dict(height=(768, 512, 1024)), "height: need min ≤ opt ≤ max, got 768, 512, 1024"),
        (dict(width=(32, 512, 512)), "width.min: must be in [64, 8192], got 32"),
        (dict(images=0), "images.min: must be in [1, 64], got 0"),
        (dict(images=(1, 2)), "images: expected (min, opt, max) or a single integer"),
        (dict(images=(1, True, 2)), "images.opt: expected an integer, got True"),
        (dict(images=(1, 1.5, 2)), "images.opt: expected an integer, got 1.5"),
        (dict(prompt_chunks=(1, 1, 17)), "prompt_chunks.max: must be in [1, 16], got 17"),
        (dict(rows_per_image=0), "rows_per_image: must be in [1, 16], got 0"),
        (dict(rows_per_image="3"), "rows_per_image: expected an integer, got '3'"),
    ],
)
def test_validation_names_the_field(kwargs, message):
    values = dict(images=(1, 1, 4), height=(512, 512, 768), width=(512, 512, 768)) | kwargs
    with pytest.raises(ProfileError) as raised:
        EngineProfile(**values)
    assert message in str(raised.value)


def test_single_integer_means_static_axis_and_integral_floats_are_accepted():
    profile = EngineProfile(images=1, height=1024.0, width=(768, 1024, 1024))
    assert profile.height == AxisRange(1024, 1024, 1024) and isinstance(profile.height.min, int)
    assert profile.prompt_chunks == AxisRange(1, 1, 1) and profile.rows_per_image == 3


def test_dict_round_trip_and_strict_from_dict():
    for preset in PRESETS.values():
        assert EngineProfile.from_dict(preset.to_dict()) == preset
    with pytest.raises(ProfileError, match=r"unknown field\(s\) \['hieght'\]"):
        EngineProfile.from_dict({**SD1.to_dict(), "hieght": [512, 512, 512]})
    with pytest.raises(ProfileError, match="width: missing"):
        EngineProfile.from_dict({"images": 1, "height": 512})
    with pytest.raises(ProfileError, match="height.opt"):
        EngineProfile.from_dict({**SD1.to_dict(), "height": [512, 515, 768]})
    assert SD1.key == "i1-1-4x3_h512-512-768_w512-512-768_c1-1-3"


def test_unknown_names_are_errors():
    with pytest.raises(ProfileError, match="preset: unknown preset 'SD3'"):
        preset_profile("SD3")
    with pytest.raises(ProfileError, match="family: unknown model family"):
        model_family("flux")


def test_trt_shapes_sd1_webui_inputs():
    names = ["sample", "timesteps", "encoder_hidden_states", "blur_h_3", "blur_w_3"]
    shapes = trt_profile_shapes(SD1, names, FAMILIES["sd1"])
    assert list(shapes) == names
    assert shapes["sample"] == ((1, 4, 64, 64), (3, 4, 64, 64), (12, 4, 96, 96))
    assert shapes["timesteps"] == ((1,), (3,), (12,))
    assert shapes["encoder_hidden_states"] == ((1, 77, 768), (3, 77, 768), (12, 231, 768))
    assert shapes["blur_h_3"] == ((1, 8, 8), (3, 8, 8), (12, 12, 12))
    assert shapes["blur_w_3"] == shapes["blur_h_3"]
    sd2 = trt_profile_shapes(SD1, ["encoder_hidden_states"], FAMILIES["sd2"])
    assert sd2["encoder_hidden_states"][2] == (12, 231, 1024)
    inpaint = trt_profile_shapes(SD1, ["sample"], FAMILIES["sd1"], in_channels=9)
    assert inpaint["sample"][0] == (1, 9, 64, 64)


def test_trt_shapes_sdxl_webui_and_diffusers_inputs():
    webui = trt_profile_shapes(SDXL, ["sample", "timesteps", "encoder_hidden_states", "y", "blur_h_1", "blur_w_2"],
                               FAMILIES["sdxl"])
    assert webui["sample"] == ((1, 4, 96, 96), (3, 4, 128, 128), (12, 4, 128, 128))
    assert webui["encoder_hidden_states"] == ((1, 77, 2048), (3, 77, 2048), (12, 231, 2048))
    assert webui["y"] == ((1, 2816), (3, 2816), (12, 2816))
    assert webui["blur_h_1"] == ((1, 48, 48), (3, 64, 64), (12, 64, 64))
    assert webui["blur_w_2"] == ((1, 24, 24), (3, 32, 32), (12, 32, 32))
    diffusers = trt_profile_shapes(SDXL, ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"],
                                   FAMILIES["sdxl"])
    assert diffusers["timestep"] == ((1,), (3,), (12,))  # the name export/seg_unet.py gives the graph input
    assert diffusers["text_embeds"] == ((1, 1280), (3, 1280), (12, 1280))
    assert diffusers["time_ids"] == ((1, 6), (3, 6), (12, 6))


def test_trt_shapes_reject_inputs_they_cannot_size():
    with pytest.raises(ValueError, match="'y' is not an input of a sd1 UNet"):
        trt_profile_shapes(SD1, ["sample", "y"], FAMILIES["sd1"])
    with pytest.raises(ValueError, match="'control_0' has no profile rule"):
        trt_profile_shapes(SD1, ["control_0"], FAMILIES["sd1"])
    with pytest.raises(ValueError, match="no profile rule"):
        trt_profile_shapes(SD1, ["blur_h_x"], FAMILIES["sd1"])


def test_each_preset_names_its_families_and_each_family_has_a_preset():
    from seg_tsam.export.profiles import PRESET_FAMILIES, preset_for_family

    assert set(PRESET_FAMILIES) == set(PRESETS)
    assert [preset_for_family(family) for family in ("sd1", "sd2", "sdxl", "flux")] == [
        "SD1.x 512-768", "SD1.x 512-768", "SDXL 768-1024", None]
