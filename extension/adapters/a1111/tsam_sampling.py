"""T-SAM inside AUTOMATIC1111's sampling loop, for one generation (one ``p.sample`` call).

Where and when the latent is updated is shared with the Forge family (:mod:`..tsam_steps`: a
pre-hook on the sampler's ``CFGDenoiser`` updates the sampler's own ``x`` in place at the first
denoiser call of each active step). This module is the AUTOMATIC1111 update.

Space and scale. The UNet sees ``z = c_in·x`` (k-diffusion: ``c_in = 1/sqrt(σ²+1)`` from the
denoiser wrapper's ``get_scalings``, eps and v models alike; timestep samplers: ``c_in = 1``
and the "sigma" argument is the timestep). The gradient is taken with respect to ``z``,
``z' = z − α·∇_z L`` (the step size T-SAM was tuned for), and the sampler gets ``x' = z'/c_in``.

What runs. The T-SAM forward calls ``sd_model.apply_model`` directly on the cond rows (one
per image: the first ``AND`` part of its prompt, at the step's prompt-editing schedule),
not the denoiser's inner model: SEG's row-appending hooks live on that inner model and
stay out of it, and SEG's query-blur hooks do nothing without a request. Each image's T
comes from the prompt text the WebUI encoded for it.

The coarse attention capture lives only for the duration of each update. Nothing here
imports the WebUI at import time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from . import ldm_tsam
from ...core import tsam_descent
from ...core.tsam import TsamSettings
from ..text_targets import TextTarget
from ..tsam_steps import ReconstructCond, TsamSteps, autograd_ready, first_part_rows, select_rows

logger = logging.getLogger("seg_tsam")

#: Samplers whose latent T-SAM cannot update, and why.
UNSUPPORTED_SAMPLERS = {
    "UniPC": "UniPC's corrector recomputes the latent from its own copies, so an update of the sampler's "
             "latent would be lost; use Euler, DPM++ 2M, DDIM, …",
    "DPM adaptive": "DPM adaptive chooses its own number of steps, so T-SAM's schedule cannot be placed",
}


def model_input_scaling(wrapper: torch.nn.Module, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_in (B,), UNet timestep (B,))`` for the sampler's ``sigma`` argument.

    k-diffusion wrappers (``CompVisDenoiser``, ``CompVisVDenoiser``) give ``c_in`` as the last
    of their scalings and map σ to the timestep; the timestep denoisers of DDIM/PLMS get the
    timestep itself and feed the UNet ``x`` unscaled.
    """
    if hasattr(wrapper, "get_scalings") and hasattr(wrapper, "sigma_to_t"):
        return wrapper.get_scalings(sigma)[-1], wrapper.sigma_to_t(sigma)
    return torch.ones(sigma.shape, dtype=torch.float32, device=sigma.device), sigma


def unet_condition(text: Any, image_cond: torch.Tensor | None, conditioning_key: str | None) -> dict:
    """The ``cond`` argument of ``sd_model.apply_model``, laid out as the WebUI's ``CFGDenoiser`` does."""
    if conditioning_key == "crossattn-adm":
        return {"c_crossattn": [text], "c_adm": image_cond}
    if isinstance(text, dict):
        return {**text, "c_concat": [image_cond]}
    return {"c_crossattn": [text], "c_concat": [image_cond]}


class TsamGeneration(TsamSteps):
    """T-SAM for one AUTOMATIC1111 generation (see :class:`..tsam_steps.TsamSteps`)."""

    def __init__(
        self,
        settings: TsamSettings,
        *,
        reconstruct_cond: ReconstructCond,
        owner: object = None,
        should_stop: Callable[[], bool] | None = None,
        context_transform: ldm_tsam.ContextTransform | None = None,
        report: Callable[[str], None] | None = None,
    ):
        super().__init__(settings, reconstruct_cond=reconstruct_cond, owner=owner, should_stop=should_stop,
                         report=report)
        self.context_transform = context_transform
        self._targets: dict[tuple[int, str], TextTarget] = {}

    def __exit__(self, *exc_info: object) -> None:
        super().__exit__(*exc_info)
        self._targets.clear()

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
        wrapper = denoiser.inner_model
        sd_model = wrapper.inner_model
        images = x.shape[0]
        conds_list, text_cond = self._reconstruct(cond, denoiser.step)
        if len(conds_list) != images:
            logger.warning("T-SAM: %d prompts for %d latents; step %d left unchanged", len(conds_list), images, step)
            return None
        rows = first_part_rows(conds_list)
        targets = [self._target(sd_model, self._text_at(image, cond, denoiser.step)) for image in range(images)]
        device = x.device
        prompt_targets = [target.to(device).target for target in targets]

        exact = torch.promote_types(x.dtype, torch.float32)  # the update in float32 (or wider)
        with torch.no_grad():
            c_in, timestep = model_input_scaling(wrapper, sigma)
            c_in = c_in.to(device=device, dtype=exact).view(-1, *[1] * (x.dim() - 1))  # (B, 1, 1, 1)
            z = x.to(exact) * c_in
        with torch.inference_mode(False):
            text = autograd_ready(select_rows(text_cond, rows))
            image_rows = None if image_cond is None else autograd_ready(image_cond[:images])
            timestep = autograd_ready(timestep)
        key = getattr(sd_model.model, "conditioning_key", None)

        def run_unet(model_input: torch.Tensor):
            return sd_model.apply_model(model_input, timestep, unet_condition(text, image_rows, key))

        unet = sd_model.model.diffusion_model
        where = f"at step {step} (σ {float(sigma.flatten()[0]):.4g}) "
        with ldm_tsam.alignment_session(unet, context_transform=self.context_transform) as capture:
            descent = tsam_descent.descend(
                capture, run_unet, z, prompt_targets, self.settings.loss,
                step_size=step_size, iterations=iterations, should_stop=self.should_stop,
                on_iteration=self._on_iteration, where=where,
            )
            if self.settings.show_maps and descent.first is not None:
                self._keep_maps(targets, descent, step, total, lambda: tsam_descent.alignment_losses(
                    capture, run_unet, descent.model_input, prompt_targets, self.settings.loss))
        self._log_descent(descent, step, total, step_size)
        updated = (descent.model_input / c_in).to(x.dtype)
        return torch.where(descent.changed.view(-1, *[1] * (x.dim() - 1)), updated, x)

    def _target(self, sd_model, text: str) -> TextTarget:
        key = (id(sd_model.cond_stage_model), text)
        target = self._targets.get(key)
        if target is None:
            embedders = ldm_tsam.text_embedders(sd_model.cond_stage_model)
            target = ldm_tsam.text_target(embedders, text, power=self.settings.power)
            self._targets[key] = target
        return target
