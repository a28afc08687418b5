"""T-SAM in the Forge family's sampling loop (Forge Neo, Forge, reForge), for one generation.

The loop is AUTOMATIC1111's (k-diffusion and DDIM/PLMS samplers calling a ``CFGDenoiser``), so
where and when the sampler's own latent is updated is shared (:mod:`..tsam_steps`). What differs
is the update:

- **The UNet call.** The model behind the generation's ``UnetPatcher`` (``KModel`` in Forge Neo
  and Forge, ``BaseModel`` in reForge) is called directly, ``apply_model(x, σ, c_crossattn=…,
  y=…, c_concat=…, transformer_options=…)``, on the cond rows (one per image: the first ``AND``
  part of its prompt, at the step's prompt-editing schedule), with the patcher's own
  transformer options plus T-SAM's attention replacements (:mod:`.tsam_unet`). The host's
  batching function, its model function wrapper (SEG's twin rows) and its CFG functions stay out
  of it; ControlNet's residuals are not applied in the T-SAM pass.
- **Space and scale.** ``apply_model`` scales its input itself: the UNet sees
  ``z = c_in·x`` with ``c_in`` = the model's ``calculate_input(σ, 1)``. DDIM/PLMS pass the
  timestep and the denoiser rescales ``x`` by ``sqrt(σ_t² + 1)`` for the σ of that timestep
  (``classic_ddim_eps_estimation``), so there ``z = c_in(σ_t)·sqrt(σ_t² + 1)·x`` (= ``x`` for eps
  models). The gradient is taken with respect to ``z``, ``z' = z − α·∇_z L``, the sampler gets
  ``x' = z'/(z/x)``.
- **The text side.** Each image's T comes from the host's own CLIP encoders (SDXL: both,
  averaged), computed for every prompt text of the batch when the generation attaches to the
  sampler (before sampling loads the UNet, while the text encoders are at hand).

Nothing here imports the host: the glue passes in the patcher, the encoders, the host's prompt
reconstruction and whether its transformer blocks add in place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...core import tsam_descent
from ...core.tsam import TsamSettings
from .. import text_targets
from ..text_targets import PromptEncoder, TextTarget
from ..tsam_steps import ReconstructCond, TsamSteps, autograd_ready, first_part_rows, select_rows
from . import tsam_unet

logger = logging.getLogger("seg_tsam")

#: Samplers whose latent T-SAM cannot update on these hosts, and why. Checked on each host's
#: sampler list by updating the denoiser's ``x`` in place at step 0 and comparing with the same
#: change made to the starting noise (equal for every other sampler), and by counting the steps
#: the sampler reports (one per requested step for every other sampler).
UNSUPPORTED_SAMPLERS = {
    "UniPC": "UniPC's corrector recomputes the latent from its own copies, so an update of the sampler's "
             "latent would be lost; use Euler, DPM++ 2M, DDIM, …",
    "DPM adaptive": "DPM adaptive chooses its own number of steps, so T-SAM's schedule cannot be placed",
    "DPM fast": "DPM fast reports one step per group of up to 3 model calls, fewer steps than requested, so "
                "T-SAM's schedule cannot be placed; use Euler, DPM++ 2M, DDIM, …",
    # reForge's extra samplers
    **dict.fromkeys(
        ("ODE (Bosh3)", "ODE (Fehlberg2)", "ODE (Adaptive Heun)", "ODE (Dopri5)", "ODE Custom"),
        "the ODE samplers integrate with their own stages and step-size control (many model calls per step, "
        "some reused across steps), so an update of one call's input does not become their state; use Euler, "
        "DPM++ 2M, DDIM, …"),
    "DPM++ 2S Ancestral CFG++ Intern": "this sampler calls the model on a resized copy of its latent and reports "
                                       "fewer steps than requested, so T-SAM's updates would not reach it; use "
                                       "DPM++ 2S Ancestral CFG++, Euler, DPM++ 2M, …",
}


def model_sampling(model: Any) -> Any:
    """The object with ``calculate_input``: ``KModel.predictor`` (Forge Neo, Forge) or
    ``BaseModel.model_sampling`` (reForge)."""
    sampling = getattr(model, "predictor", None)
    return sampling if sampling is not None else model.model_sampling


def timestep_sigma(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The σ of DDIM/PLMS timesteps, by the hosts' ``classic_ddim_eps_estimation`` rule:
    ``sqrt((1 − ᾱ)/ᾱ)`` at the rounded timestep."""
    table = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return table[timesteps.round().long().clip(0, table.shape[0] - 1)]


def unet_sigma_and_scale(denoiser: Any, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(σ for apply_model (B,), the factor the denoiser applies to x first (B,))``: σ and 1 for
    k-diffusion samplers; for DDIM/PLMS the timestep's σ and ``sqrt(σ² + 1)``."""
    if getattr(denoiser, "classic_ddim_eps_estimation", False):
        alphas_cumprod = denoiser.inner_model.inner_model.alphas_cumprod.to(sigma.device)
        real = timestep_sigma(alphas_cumprod, sigma)
        return real, (real**2 + 1.0) ** 0.5
    return sigma, torch.ones_like(sigma)


def unet_conditioning(text: Any, image_cond: torch.Tensor | None, latent: torch.Tensor) -> dict:
    """``apply_model``'s conditioning keywords for the cond rows, as the hosts' sampling function
    lays them out: ``c_crossattn`` (SDXL: ``crossattn``, and ``y`` from ``vector``), and ``c_concat``
    when the image conditioning has the latent's rows and size (inpainting models)."""
    kwargs = {"c_crossattn": text["crossattn"], "y": text["vector"]} if isinstance(text, dict) else {"c_crossattn": text}
    if isinstance(image_cond, torch.Tensor) and image_cond.shape[0] == latent.shape[0] \
            and image_cond.shape[2:] == latent.shape[2:]:
        kwargs["c_concat"] = image_cond
    return kwargs


def cond_row_options(options: dict, rows: int, sigma: torch.Tensor) -> dict:
    """The per-call keys the hosts' batching function sets, for one chunk of ``rows`` cond rows
    (some attention patches read them): ``cond_or_uncond``, ``sigmas``; Forge Neo's and Forge's
    ``cond_mark``/``cond_indices``/``uncond_indices``."""
    options = {**options, "cond_or_uncond": [0], "sigmas": sigma}
    if "cond_mark" in options or "cond_indices" in options:
        options["cond_mark"] = torch.zeros(rows, device=sigma.device)
        options["cond_indices"], options["uncond_indices"] = list(range(rows)), []
    return options


class ForgeTsamGeneration(TsamSteps):
    """T-SAM for one Forge-family generation (see :class:`..tsam_steps.TsamSteps`).

    ``unet_patcher()`` gives the generation's current ``UnetPatcher``; ``text_encoders()`` the
    host's prompt encoders, ready to run (it loads them); ``copy_saved_activations``: the host's
    transformer blocks add in place (Forge Neo, Forge).
    """

    def __init__(
        self,
        settings: TsamSettings,
        *,
        reconstruct_cond: ReconstructCond,
        unet_patcher: Callable[[], Any],
        text_encoders: Callable[[], Sequence[PromptEncoder]],
        copy_saved_activations: bool,
        owner: object = None,
        should_stop: Callable[[], bool] | None = None,
        report: Callable[[str], None] | None = None,
    ):
        super().__init__(settings, reconstruct_cond=reconstruct_cond, owner=owner, should_stop=should_stop,
                         report=report)
        self.unet_patcher = unet_patcher
        self.text_encoders = text_encoders
        self.copy_saved_activations = copy_saved_activations
        self._targets: dict[str, TextTarget] = {}

    def __exit__(self, *exc_info: object) -> None:
        super().__exit__(*exc_info)
        self._targets.clear()

    def attach(self, sampler, image_texts: Sequence[Sequence[str]]) -> None:
        """Hook ``sampler`` and compute T of every text of the batch (see :meth:`TsamSteps.attach`)."""
        texts = [text for image in image_texts for text in image if text not in self._targets]
        if texts:
            encoders = self.text_encoders()
            for text in dict.fromkeys(texts):
                self._targets[text] = text_targets.text_target(encoders, text, power=self.settings.power)
        super().attach(sampler, image_texts)

    # -- one update ----------------------------------------------------------------------------------
    def aligned_latent(
        self,
        denoiser,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond,
        image_cond: torch.Tensor | None,
        *,
        step: int,
        total: int,
        step_size: float,
        iterations: int,
    ) -> torch.Tensor | None:
        """The sampler latent after ``iterations`` T-SAM updates at this step (``None``: unchanged)."""
        images = x.shape[0]
        conds_list, text_cond = self._reconstruct(cond, denoiser.step)
        if len(conds_list) != images:
            logger.warning("T-SAM: %d prompts for %d latents; step %d left unchanged", len(conds_list), images, step)
            return None
        targets = [self._targets[self._text_at(image, cond, denoiser.step)] for image in range(images)]
        device = x.device
        prompt_targets = [target.to(device).target for target in targets]
        patcher = self.unet_patcher()
        model = patcher.model
        concat = getattr(patcher, "extra_concat_condition", None)
        image_cond = concat if concat is not None else image_cond

        exact = torch.promote_types(x.dtype, torch.float32)  # the update in float32 (or wider)
        with torch.inference_mode(False):
            unet_sigma, scale = (autograd_ready(value.to(device=device, dtype=exact))
                                 for value in unet_sigma_and_scale(denoiser, sigma))
            shape = (-1, *[1] * (x.dim() - 1))
            c_in = model_sampling(model).calculate_input(unet_sigma, torch.ones_like(x, dtype=exact))  # (B, C, h, w)
            to_unet = c_in * scale.view(shape)  # z = to_unet · x
            z = autograd_ready(x.to(exact)) * to_unet
            text = autograd_ready(select_rows(text_cond, first_part_rows(conds_list)))
            image_rows = None if image_cond is None else autograd_ready(image_cond[:images])
            conditioning = unet_conditioning(text, image_rows, x)
            base_options = cond_row_options(model_options_of(patcher), images, unet_sigma)

        def run_unet(model_input: torch.Tensor):
            options = capture.transformer_options(base_options)
            return model.apply_model(model_input / c_in, unet_sigma, transformer_options=options, **conditioning)

        unet = model.diffusion_model
        where = f"at step {step} (σ {float(sigma.flatten()[0]):.4g}) "
        with tsam_unet.alignment_session(unet, copy_saved_activations=self.copy_saved_activations) as capture:
            descent = tsam_descent.descend(
                capture, run_unet, z, prompt_targets, self.settings.loss,
                step_size=step_size, iterations=iterations, should_stop=self.should_stop,
                on_iteration=self._on_iteration, where=where,
            )
            if self.settings.show_maps and descent.first is not None:
                self._keep_maps(targets, descent, step, total, lambda: tsam_descent.alignment_losses(
                    capture, run_unet, descent.model_input, prompt_targets, self.settings.loss))
        self._log_descent(descent, step, total, step_size)
        updated = (descent.model_input / to_unet).to(x.dtype)
        return torch.where(descent.changed.view(shape), updated, x)


def model_options_of(patcher: Any) -> dict:
    """The patcher's transformer options (its attention patches, block modifiers, …)."""
    return dict(patcher.model_options.get("transformer_options", {}))
