"""SEG on diffusers UNets: exact grids, batched rows vs a separate pass, and leaving no trace."""

from __future__ import annotations

import math

import pytest
import torch

from seg_tsam.extension.adapters.diffusers.pipeline import encode_prompts, generate, guided_prediction
from seg_tsam.extension.adapters.unet_layers import self_attention_layers
from seg_tsam.extension.core.layers import select_layers
from seg_tsam.extension.core.query_blur_patch import QueryBlurPatch
from seg_tsam.extension.core.settings import SegSettings


def expected_grid(layer_name: str, latent: tuple[int, int], levels: int) -> tuple[int, int]:
    """Stride-2 downsampling halves with ceil; up blocks restore the skip sizes level by level."""
    block, index = layer_name.split(".")[:2]
    level = {"down_blocks": int(index) if block == "down_blocks" else 0,
             "mid_block": levels - 1, "up_blocks": levels - 1 - int(index) if block == "up_blocks" else 0}[block]
    height, width = latent
    for _ in range(level):
        height, width = math.ceil(height / 2), math.ceil(width / 2)
    return height, width


def conditioning(pipe, prompts, latent):
    height, width = (side * pipe.vae_scale_factor for side in latent)
    return encode_prompts(pipe, prompts, [""] * len(prompts), do_cfg=True, height=height, width=width)


def no_hooks_left(module: torch.nn.Module) -> bool:
    return all(
        not (m._forward_hooks or m._forward_pre_hooks or m._forward_hooks_with_kwargs or m._forward_pre_hooks_with_kwargs)
        for m in module.modules()
    )


@pytest.mark.parametrize("latent", [(16, 16), (9, 5), (13, 7), (3, 11)])
def test_grid_is_exact_at_every_layer(tiny_pipe, latent):
    unet = tiny_pipe.unet
    layers = self_attention_layers(unet)
    levels = len(unet.config.block_out_channels)
    cond, uncond = conditioning(tiny_pipe, ["a cat"], latent)
    x = torch.randn(1, 4, *latent)
    with torch.no_grad(), QueryBlurPatch(layers) as patch:
        guided_prediction(unet, patch, x, 500, cond, uncond, cfg_scale=5.0, seg=SegSettings(enabled=True, sigma=2.0))
        for layer in layers:
            assert patch.recorded_grid(layer) == expected_grid(layer.name, latent, levels), layer.name


CASES = [
    dict(mode="cond", sigma=2.0, cfg=5.0, layers="mid"),
    dict(mode="cond", sigma=math.inf, cfg=1.0, layers="all"),
    dict(mode="uncond", sigma=0.7, cfg=5.0, layers="d0,m0,u1"),
    dict(mode="uncond", sigma=math.inf, cfg=1.0, layers="mid"),  # no uncond rows: blurs cond
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['mode']}-{c['sigma']}-cfg{c['cfg']}-{c['layers']}")
def test_batched_seg_rows_equal_a_separate_pass(tiny_pipe, case):
    torch.manual_seed(0)
    latent = (9, 7)
    cond, uncond = conditioning(tiny_pipe, ["a red cat", "a blue dog"], latent)
    if case["cfg"] <= 1.0:
        uncond = None
    x = torch.randn(2, 4, *latent)
    seg = SegSettings(enabled=True, sigma=case["sigma"], mode=case["mode"], layers=case["layers"])
    layers = select_layers(self_attention_layers(tiny_pipe.unet), seg.layers)
    with torch.no_grad(), QueryBlurPatch(layers) as patch:
        kwargs = dict(cfg_scale=case["cfg"], seg=seg)
        batched = guided_prediction(tiny_pipe.unet, patch, x, 700, cond, uncond, batch_seg_rows=True, **kwargs)
        separate = guided_prediction(tiny_pipe.unet, patch, x, 700, cond, uncond, batch_seg_rows=False, **kwargs)
        plain = guided_prediction(tiny_pipe.unet, patch, x, 700, cond, uncond, cfg_scale=case["cfg"], seg=None)
    torch.testing.assert_close(batched, separate, atol=1e-5, rtol=0)
    assert (batched - plain).abs().max() > 1e-4  # SEG really changed the prediction


def test_blur_touches_only_the_marked_rows_and_matches_the_operator(tiny_sd_pipe):
    """Record to_q outputs of one layer: SEG rows are the blurred base rows, base rows are untouched."""
    unet = tiny_sd_pipe.unet
    layer = select_layers(self_attention_layers(unet), "d1")[0]
    cond, uncond = conditioning(tiny_sd_pipe, ["a cat"], (10, 6))
    x = torch.randn(1, 4, 10, 6)
    seen = []
    # Registered after the patch's hook, so it sees the patched output.
    with torch.no_grad(), QueryBlurPatch([layer]) as patch:
        handle = layer.query_proj.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
        try:
            guided_prediction(unet, patch, x, 300, cond, uncond, cfg_scale=5.0, seg=None)
            guided_prediction(unet, patch, x, 300, cond, uncond, cfg_scale=5.0, seg=SegSettings(enabled=True, sigma=1.3))
        finally:
            handle.remove()
        grid = patch.recorded_grid(layer)
    plain, with_seg = seen
    assert grid == (5, 3)
    assert torch.equal(with_seg[:2], plain)  # uncond and cond rows untouched
    from seg_tsam.extension.core.blur import blur_matrices

    a_h, a_w = blur_matrices(*grid, 1.3)
    queries = plain[1].reshape(*grid, -1)  # the cond row, (h, w, C)
    expected = torch.einsum("ik,klc,jl->ijc", a_h, queries, a_w).reshape(with_seg[2].shape)
    torch.testing.assert_close(with_seg[2], expected, atol=1e-5, rtol=0)


def test_zero_sigma_seg_equals_plain_cfg(tiny_sdxl_pipe):
    cond, uncond = conditioning(tiny_sdxl_pipe, ["a cat"], (8, 8))
    x = torch.randn(1, 4, 8, 8)
    layers = select_layers(self_attention_layers(tiny_sdxl_pipe.unet), "mid")
    with torch.no_grad(), QueryBlurPatch(layers) as patch:
        seg = SegSettings(enabled=True, sigma=2.0)
        zero_blur = guided_prediction(tiny_sdxl_pipe.unet, patch, x, 400, cond, uncond, cfg_scale=5.0,
                                      seg=SegSettings(enabled=True, sigma=0.0))
        plain = guided_prediction(tiny_sdxl_pipe.unet, patch, x, 400, cond, uncond, cfg_scale=5.0, seg=None)
        blurred = guided_prediction(tiny_sdxl_pipe.unet, patch, x, 400, cond, uncond, cfg_scale=5.0, seg=seg)
    torch.testing.assert_close(zero_blur, plain, atol=1e-5, rtol=0)
    assert (blurred - plain).abs().max() > 1e-4


def unet_output(unet, seed=1):
    torch.manual_seed(seed)
    cross_dim = unet.config.cross_attention_dim
    kwargs = {"encoder_hidden_states": torch.randn(2, 77, cross_dim)}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
    with torch.no_grad():
        return unet(torch.randn(2, 4, 11, 7), 321, **kwargs).sample


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_model_is_bit_identical_after_seg_generation_and_after_a_failure(kind, fresh_unet_factory):
    from seg_tsam.extension.adapters.diffusers import tiny_models

    pipe = tiny_models.tiny_sd_pipeline() if kind == "sd1" else tiny_models.tiny_sdxl_pipeline()
    reference = unet_output(fresh_unet_factory(kind))
    seg = SegSettings(enabled=True, sigma=3.0, layers="all")
    generate(pipe, "a cat", seg=seg, steps=2, height=48, width=40, output_type="latent")
    assert no_hooks_left(pipe.unet)
    assert torch.equal(unet_output(pipe.unet), reference)

    mid = pipe.unet.mid_block

    def explode(*_):
        raise RuntimeError("boom inside the UNet")

    handle = mid.register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            generate(pipe, "a cat", seg=seg, steps=2, height=48, width=40, output_type="latent")
    finally:
        handle.remove()
    assert no_hooks_left(pipe.unet)
    assert torch.equal(unet_output(pipe.unet), reference)


def test_seg_changes_the_image_and_off_changes_nothing(tiny_sd_pipe):
    kwargs = dict(steps=3, height=40, width=56, output_type="latent", seed=7)
    plain = generate(tiny_sd_pipe, "a red cat", **kwargs)
    off = generate(tiny_sd_pipe, "a red cat", seg=SegSettings(enabled=False), **kwargs)
    zero_scale = generate(tiny_sd_pipe, "a red cat", seg=SegSettings(enabled=True, scale=0), **kwargs)
    seg = generate(tiny_sd_pipe, "a red cat", seg=SegSettings(enabled=True, sigma=2), **kwargs)
    assert torch.equal(plain, off) and torch.equal(plain, zero_scale)
    assert (seg - plain).abs().max() > 1e-3


def test_active_range_limits_the_guided_steps(tiny_sd_pipe):
    kwargs = dict(steps=4, height=32, width=32, output_type="latent", seed=3)
    seen = []
    plain = generate(tiny_sd_pipe, "a cat", on_step=lambda i, n, x: seen.append(x.clone()), **kwargs)
    late = []
    generate(tiny_sd_pipe, "a cat", seg=SegSettings(enabled=True, start=0.5), on_step=lambda i, n, x: late.append(x.clone()), **kwargs)
    assert torch.equal(seen[0], late[0]) and torch.equal(seen[1], late[1])  # steps 0, 1 unguided
    assert not torch.equal(seen[2], late[2])
    assert plain.shape == late[-1].shape


def test_fused_projections_are_refused():
    from seg_tsam.extension.adapters.diffusers import tiny_models

    unet = tiny_models.tiny_unet(tiny_models.TINY_SD1_UNET_CONFIG)
    unet.fuse_qkv_projections()
    with pytest.raises(ValueError, match="fused QKV"):
        self_attention_layers(unet)
