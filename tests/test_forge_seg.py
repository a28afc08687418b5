"""The Forge-family SEG adapter's own bookkeeping, on a real (tiny) diffusers UNet.

The host side (its batching function, its patcher, its CFG) is exercised only in the live Forge
suites (``tests/forge/``). Here the adapter's wrapper and post-CFG function are called the way
the host calls them (``wrapper(apply_model, {"input", "timestep", "c", "cond_or_uncond"})``,
``post_cfg({"denoised", "cond", "cond_denoised", …})``), with ``apply_model`` running the UNet,
and checked against references computed directly: the same UNet call with the blur requested
by hand, the core's guidance formula, the host's flag formulas written out as loops.
"""

from __future__ import annotations

import torch

from seg_tsam.extension.adapters.diffusers.tiny_models import TINY_SD1_UNET_CONFIG, tiny_unet
from seg_tsam.extension.adapters.forge.seg_sampling import (COND, UNCOND, ForgeSegGeneration, _Step,
                                                             _with_twin_flags)
from seg_tsam.extension.core.guidance import seg_cond_term
from seg_tsam.extension.core.settings import SegSettings


def test_twin_flags_follow_the_hosts_formulas():
    """Flags per chunk; ``cond_mark`` is each chunk's flag repeated per row; the index lists are
    the rows of the cond and the uncond chunks (Forge's compute_cond_mark/compute_cond_indices)."""
    flags, twins, size = [UNCOND, COND, COND], [1, 2], 2
    mark = torch.tensor([float(flag) for flag in flags for _ in range(size)])
    options = _with_twin_flags({"cond_mark": mark, "cond_indices": [], "uncond_indices": [], "uuids": ["u", "a", "b"],
                                "sigmas": torch.ones(size)}, flags, twins, size)
    extended = [UNCOND, COND, COND, COND, COND]
    assert options["cond_or_uncond"] == extended
    assert options["cond_mark"].tolist() == [float(flag) for flag in extended for _ in range(size)]
    cond_rows, uncond_rows = [], []
    for chunk, flag in enumerate(extended):
        (cond_rows if flag == COND else uncond_rows).extend(range(chunk * size, chunk * size + size))
    assert options["cond_indices"] == cond_rows and options["uncond_indices"] == uncond_rows
    assert options["uuids"] == ["u", "a", "b", "a", "b"]
    assert options["sigmas"].shape == (size,)  # per image, not per row: left alone


def _unet_and_apply():
    unet = tiny_unet(TINY_SD1_UNET_CONFIG, seed=0).eval()

    def apply_model(x, t, c_crossattn=None, transformer_options=None, **_):
        return unet(x, t, encoder_hidden_states=c_crossattn).sample

    return unet, apply_model


def _call_args(chunks: list[int], size: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    rows = len(chunks) * size
    x = torch.randn(rows, 4, 7, 5, generator=generator)  # odd, non-square latent
    context = torch.randn(rows, 77, TINY_SD1_UNET_CONFIG["cross_attention_dim"], generator=generator)
    return {"input": x, "timestep": torch.full((rows,), 500.0), "cond_or_uncond": chunks,
            "c": {"c_crossattn": context, "transformer_options": {"cond_or_uncond": chunks}}}


def test_the_wrapper_appends_twin_rows_to_the_hosts_call_and_cuts_them_off():
    """Uncond + two cond chunks of 2 images: the host gets back exactly its call's output, and
    each cond chunk's twin is that chunk computed in the same call with its queries blurred."""
    unet, apply_model = _unet_and_apply()
    settings = SegSettings(enabled=True, sigma=1.5, layers="all")
    chunks, size = [UNCOND, COND, COND], 2
    args = _call_args(chunks, size)
    generation = ForgeSegGeneration(settings, batch_rows=True, calc_batch=None)
    with torch.no_grad(), generation:
        generation._patch = generation._patch_for(unet)
        step = generation._step = _Step()
        out = generation._call(None, apply_model, args)
        # The reference: the call with the cond rows appended, the appended rows blurred by hand.
        index = torch.arange(size, 3 * size)
        x = torch.cat([args["input"], args["input"][index]])
        context = torch.cat([args["c"]["c_crossattn"], args["c"]["c_crossattn"][index]])
        with generation._patch.blurring(range(3 * size, 5 * size), 5 * size, settings.sigma):
            reference = apply_model(x, torch.full((5 * size,), 500.0), c_crossattn=context)
    assert torch.equal(out, reference[:3 * size])
    pairs = step.pairs[COND]
    assert [torch.equal(plain, reference[chunk * size:(chunk + 1) * size]) for (plain, _), chunk in zip(pairs, (1, 2))] == [True, True]
    assert [torch.equal(twin, reference[(3 + k) * size:(4 + k) * size]) for k, (_, twin) in enumerate(pairs)] == [True, True]
    assert not torch.equal(pairs[0][1], pairs[0][0])  # the blur changed the twin
    assert step.ran == {COND, UNCOND}
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules()) == 0  # hooks gone


def test_the_combination_weights_each_sub_prompt_by_its_strength():
    """``denoised + s·Σ_k w_k (c_k − c̃_k)`` (the core's formula), with the host's condition list
    [w=1.0, w=0.6] whose chunks it sends in reverse order."""
    generator = torch.Generator().manual_seed(1)
    cond = torch.randn(2, 1, 4, 7, 5, generator=generator)  # c_0, c_1 (one image)
    twins = torch.randn(2, 1, 4, 7, 5, generator=generator)
    weights = [1.0, 0.6]
    settings = SegSettings(enabled=True, scale=2.5)
    generation = ForgeSegGeneration(settings, batch_rows=True, calc_batch=None)
    step = _Step()
    step.pairs[COND] = [(cond[1], twins[1]), (cond[0], twins[0])]  # the host's order: last condition first
    step.ran = {COND, UNCOND}
    generation._step = step
    denoised = torch.randn(1, 4, 7, 5, generator=generator)
    host_average = (cond[0] * weights[0] + cond[1] * weights[1]) / sum(weights)
    out = generation._combine({"denoised": denoised, "cond": [{"strength": w} for w in weights],
                               "cond_denoised": host_average, "uncond": [{}], "uncond_denoised": torch.zeros_like(denoised)})
    expected = denoised + seg_cond_term(cond[:, 0], twins[:, 0], [[(0, weights[0]), (1, weights[1])]], settings.scale)
    # Both sides are a few float32 operations on O(1) values: a few ulps of the largest value.
    bound = 8 * torch.finfo(torch.float32).eps * float(expected.abs().max())
    assert float((out - expected).abs().max()) <= bound
    assert generation._step is None and generation.steps_guided == 1


def test_without_batched_twins_the_extra_pass_blurs_every_row():
    """Batching off: the wrapper leaves the host's call alone, and the post-CFG function asks the
    host's batching function for the conditions again with every row blurred."""
    unet, apply_model = _unet_and_apply()
    settings = SegSettings(enabled=True, sigma=2.0, layers="all", scale=3.0)
    size = 1
    args = _call_args([COND], size, seed=3)
    calls = []

    def host_batch(model, conds, x, sigma, options):  # the host runs its conditions through the wrapper
        calls.append(conds)
        return generation._call(None, apply_model, args)

    generation = ForgeSegGeneration(settings, batch_rows=False, calc_batch=host_batch)
    with torch.no_grad(), generation:
        generation._patch = generation._patch_for(unet)
        generation._step = _Step()
        plain = generation._call(None, apply_model, args)
        assert generation._step.pairs[COND] == []  # nothing appended
        out = generation._combine({"denoised": plain, "cond": [{"strength": 1.0}], "cond_denoised": plain,
                                   "uncond": None, "uncond_denoised": None, "model": None, "input": args["input"],
                                   "sigma": args["timestep"], "model_options": {}})
        with generation._patch.blurring(range(size), size, settings.sigma):
            blurred = apply_model(args["input"], args["timestep"], c_crossattn=args["c"]["c_crossattn"])
    assert len(calls) == 1
    assert torch.equal(out, plain + (plain - blurred) * settings.scale)
