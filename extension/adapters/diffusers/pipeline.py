"""SEG generation with a diffusers pipeline's own components (text encoders, UNet, scheduler, VAE).

Works with ``StableDiffusionPipeline`` (SD1.x/SD2.x) and ``StableDiffusionXLPipeline``. The
SEG rows go into the same UNet call as the uncond/cond rows (``batch_seg_rows=True``) or into
one extra call; both give the same prediction.

Example::

    pipe = StableDiffusionXLPipeline.from_pretrained(...)
    images = generate(pipe, "a photo of a cat", seg=SegSettings(enabled=True), steps=30)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from ...core.guidance import seg_guidance, single_conds
from ...core.layers import select_layers
from ...core.query_blur_patch import QueryBlurPatch
from .rows import plan_seg_rows
from ...core.settings import SegSettings
from ...core.tsam import TsamSettings
from .conditioning import RowConditioning, concat_rows, is_sdxl
from .tsam import model_input_scale, pipeline_prompt_targets, tsam_update
from ..unet_layers import self_attention_layers


def guided_prediction(
    unet: torch.nn.Module,
    patch: QueryBlurPatch | None,
    latents: torch.Tensor,
    timestep: torch.Tensor | float,
    cond: RowConditioning,
    uncond: RowConditioning | None,
    *,
    cfg_scale: float,
    seg: SegSettings | None,
    batch_seg_rows: bool = True,
) -> torch.Tensor:
    """One guided model prediction for ``latents`` (B images): CFG, plus SEG when ``seg`` is given.

    Base rows are ``[uncond…, cond…]`` (diffusers' order); SEG rows copy the cond rows (mode
    ``cond``) or the uncond rows (mode ``uncond``) and have their queries blurred in ``patch``.
    """
    images = latents.shape[0]
    uncond_rows = list(range(images)) if uncond is not None else []
    cond_rows = [len(uncond_rows) + image for image in range(images)]
    base_cond = concat_rows([uncond, cond]) if uncond is not None else cond
    base_x = latents.repeat(2 if uncond is not None else 1, 1, 1, 1)

    def run(x: torch.Tensor, conditioning: RowConditioning) -> torch.Tensor:
        return unet(x, timestep, **conditioning.unet_kwargs(), return_dict=False)[0]

    if seg is None:
        prediction, blurred, blurs_uncond = run(base_x, base_cond), None, False
    else:
        if patch is None:
            raise ValueError("SEG needs the QueryBlurPatch of the selected layers")
        seg_rows = plan_seg_rows(cond_rows, uncond_rows, seg.mode)
        blurs_uncond = seg_rows.blurs_uncond
        seg_x, seg_cond = base_x[list(seg_rows.source)], base_cond.take(seg_rows.source)
        base_count = base_x.shape[0]
        if batch_seg_rows:
            total = base_count + seg_rows.count
            with patch.blurring(range(base_count, total), total, seg.sigma):
                both = run(torch.cat([base_x, seg_x]), concat_rows([base_cond, seg_cond]))
            prediction, blurred = both[:base_count], both[base_count:]
        else:
            prediction = run(base_x, base_cond)
            with patch.blurring(range(seg_rows.count), seg_rows.count, seg.sigma):
                blurred = run(seg_x, seg_cond)
    cond_prediction = prediction[cond_rows]
    uncond_prediction = prediction[uncond_rows] if uncond is not None else None
    return seg_guidance(
        cond=cond_prediction,
        uncond=uncond_prediction,
        conds_list=single_conds(images),
        cfg_scale=cfg_scale,
        seg_scale=seg.scale if seg is not None else 0.0,
        cond_blurred=None if blurs_uncond else blurred,
        uncond_blurred=blurred if blurs_uncond else None,
    )


def encode_prompts(
    pipe, prompts: list[str], negative_prompts: list[str], *, do_cfg: bool, height: int, width: int
) -> tuple[RowConditioning, RowConditioning | None]:
    """Encode with the pipeline's own ``encode_prompt`` (and SDXL's size conditioning)."""
    device = pipe.unet.device
    if not is_sdxl(pipe):
        cond, uncond = pipe.encode_prompt(prompts, device, 1, do_cfg, negative_prompts)
        return RowConditioning(cond), (RowConditioning(uncond) if do_cfg else None)
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
        prompt=prompts, device=device, num_images_per_prompt=1,
        do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompts,
    )
    time_ids = sdxl_time_ids(pipe.unet, pooled.shape[-1], height, width, len(prompts), cond.dtype, device)
    cond_rows = RowConditioning(cond, pooled, time_ids)
    return cond_rows, (RowConditioning(uncond, uncond_pooled, time_ids) if do_cfg else None)


def sdxl_time_ids(unet, pooled_dim: int, height: int, width: int, rows: int, dtype, device) -> torch.Tensor:
    """SDXL's micro-conditioning ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``."""
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device).repeat(rows, 1)
    expected = unet.add_embedding.linear_1.in_features
    if unet.config.addition_time_embed_dim * ids.shape[1] + pooled_dim != expected:
        raise ValueError("the UNet's added-embedding size does not match SDXL's 6 time ids + pooled text")
    return ids


@torch.no_grad()
def generate(
    pipe,
    prompt: str | list[str],
    *,
    negative_prompt: str | list[str] = "",
    seg: SegSettings | None = None,
    tsam: TsamSettings | None = None,
    steps: int = 20,
    guidance_scale: float = 5.0,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    batch_seg_rows: bool = True,
    output_type: str = "pil",
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
):
    """Generate images with CFG and, when enabled, Smoothed Energy Guidance and T-SAM.

    ``guidance_scale ≤ 1`` disables CFG (SEG alone: ``ε_c + s(ε_c − ε̃_c)``). T-SAM updates the
    latent at the start of its active steps (each image with its own prompt's target), then
    the guided step runs from the updated latent. Diffusers' ``encode_prompt`` keeps one
    77-token chunk, so T-SAM aligns the first 75 prompt tokens here. All hooks exist only
    inside this call: afterwards (or after an exception) the models are untouched.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    unet, scheduler = pipe.unet, pipe.scheduler
    scale_factor = pipe.vae_scale_factor
    height = height or unet.config.sample_size * scale_factor
    width = width or unet.config.sample_size * scale_factor
    if height % scale_factor or width % scale_factor:
        raise ValueError(f"height and width must be multiples of {scale_factor}, got {height}×{width}")
    do_cfg = guidance_scale > 1.0
    cond, uncond = encode_prompts(pipe, prompts, negatives, do_cfg=do_cfg, height=height, width=width)
    use_tsam = tsam is not None and tsam.has_effect
    targets = pipeline_prompt_targets(pipe, prompts, power=tsam.power, max_chunks=cond.text.shape[1] // 77) if use_tsam else None

    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (len(prompts), unet.config.in_channels, height // scale_factor, width // scale_factor)
    latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(unet.device, unet.dtype)
    scheduler.set_timesteps(steps, device=unet.device)
    latents = latents * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps

    use_seg = seg is not None and seg.has_effect
    layers = select_layers(self_attention_layers(unet), seg.layers) if use_seg else []
    with QueryBlurPatch(layers) if use_seg else contextlib.nullcontext() as patch:
        for index, timestep in enumerate(timesteps):
            model_input = scheduler.scale_model_input(latents, timestep)
            plan = tsam.step_plan(index, len(timesteps), steps) if use_tsam else None
            if plan is not None and plan.updates:
                update = tsam_update(unet, model_input, timestep, cond, targets, tsam,
                                     step_size=plan.step_size, iterations=plan.updates)
                model_input = update.model_input
                latents = (model_input / model_input_scale(scheduler, timestep, latents)).to(latents.dtype)
            step_seg = seg if use_seg and seg.active_at(index, len(timesteps)) else None
            prediction = guided_prediction(
                unet, patch, model_input, timestep, cond, uncond,
                cfg_scale=guidance_scale, seg=step_seg, batch_seg_rows=batch_seg_rows,
            )
            latents = scheduler.step(prediction, timestep, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(index, len(timesteps), latents)
    if output_type == "latent":
        return latents
    return decode_latents(pipe, latents, output_type)


def decode_latents(pipe, latents: torch.Tensor, output_type: str = "pil"):
    vae = pipe.vae
    latents = latents.to(vae.dtype) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        latents = latents + vae.config.shift_factor
    image = vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)
