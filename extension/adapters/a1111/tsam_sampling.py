"""T-SAM inside the WebUI's sampling loop, for one generation (one ``p.sample`` call).

Where the update happens. The k-diffusion samplers keep their latent ``x`` in a local
variable and call the WebUI's ``CFGDenoiser`` as ``model(x, sigma, **extra_args)``; the
``on_cfg_denoiser`` callback only sees a fresh ``torch.cat`` of it. So :class:`TsamGeneration`
puts a forward **pre-hook** on the sampler's ``CFGDenoiser`` and, at the first denoiser call
of an active step, overwrites the incoming ``x`` **in place** (``x.copy_``): that tensor is
the sampler's own variable, so the CFG step that follows and the sampler's update both use
the aligned latent. (DDIM/PLMS in ``sd_samplers_timesteps_impl`` pass their loop variable
the same way.)

Space and scale. The UNet sees ``z = c_in·x`` (k-diffusion: ``c_in = 1/sqrt(σ²+1)`` from the
denoiser wrapper's ``get_scalings``, eps and v models alike; timestep samplers: ``c_in = 1``
and the "sigma" argument is the timestep). The gradient is taken with respect to ``z``,
``z' = z − α·∇_z L`` (the step size T-SAM was tuned for), and the sampler gets ``x' = z'/c_in``.

What runs. The T-SAM forward calls ``sd_model.apply_model`` directly on the cond rows (one
per image: the first ``AND`` part of its prompt, at the step's prompt-editing schedule),
not the denoiser's inner model: SEG's row-appending hooks live on that inner model and
stay out of it, and SEG's query-blur hooks do nothing without a request. Each image's T
comes from the prompt text the WebUI encoded for it. The sampler's step index comes from
its per-step ``callback_state`` (the WebUI's ``state.sampling_step`` lags one step behind
the model calls).

Everything is installed on an :class:`contextlib.ExitStack` and removed in ``__exit__``;
the coarse attention capture lives only for the duration of each update. Nothing here
imports the WebUI at import time.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import ldm_tsam
from .ldm_tsam import TextTarget
from ...core import tsam_descent
from ...core.tsam import TsamSettings

logger = logging.getLogger("seg_tsam")
_MISSING = object()

#: Samplers whose latent T-SAM cannot update, and why.
UNSUPPORTED_SAMPLERS = {
    "UniPC": "UniPC's corrector recomputes the latent from its own copies, so an update of the sampler's "
             "latent would be lost; use Euler, DPM++ 2M, DDIM, …",
    "DPM adaptive": "DPM adaptive chooses its own number of steps, so T-SAM's schedule cannot be placed",
}


@dataclass
class ImageMaps:
    """What "show maps" draws for one image."""

    prompt: str  #: the text whose T is used
    target: TextTarget  #: T per chunk and the token labels
    maps_before: torch.Tensor  #: (ΣL, h, w) smoothed token maps before the first update
    loss_before: float
    step_before: int  #: the sampler step of ``maps_before``
    maps_after: torch.Tensor | None = None  #: the same after the last update
    loss_after: float | None = None
    step_after: int | None = None  #: the (last active) step of ``maps_after``; another σ than before


def model_input_scaling(wrapper: torch.nn.Module, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_in (B,), UNet timestep (B,))`` for the sampler's ``sigma`` argument.

    k-diffusion wrappers (``CompVisDenoiser``, ``CompVisVDenoiser``) give ``c_in`` as the last
    of their scalings and map σ to the timestep; the timestep denoisers of DDIM/PLMS get the
    timestep itself and feed the UNet ``x`` unscaled.
    """
    if hasattr(wrapper, "get_scalings") and hasattr(wrapper, "sigma_to_t"):
        return wrapper.get_scalings(sigma)[-1], wrapper.sigma_to_t(sigma)
    return torch.ones(sigma.shape, dtype=torch.float32, device=sigma.device), sigma


def select_rows(conditioning: Any, rows: Sequence[int]) -> Any:
    """Rows of a text conditioning: a tensor, or SDXL's dict (``crossattn``, ``vector``)."""
    if isinstance(conditioning, dict):
        return {key: select_rows(value, rows) for key, value in conditioning.items()}
    return conditioning[torch.as_tensor(list(rows), dtype=torch.long, device=conditioning.device)]


def unet_condition(text: Any, image_cond: torch.Tensor | None, conditioning_key: str | None) -> dict:
    """The ``cond`` argument of ``sd_model.apply_model``, laid out as the WebUI's ``CFGDenoiser`` does."""
    if conditioning_key == "crossattn-adm":
        return {"c_crossattn": [text], "c_adm": image_cond}
    if isinstance(text, dict):
        return {**text, "c_concat": [image_cond]}
    return {"c_crossattn": [text], "c_concat": [image_cond]}


def _autograd_ready(value: Any) -> Any:
    """Inference-mode tensors (autograd cannot save those) cloned into normal ones."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, dict):
        return {key: _autograd_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_autograd_ready(item) for item in value]
    return value


def active_schedule_index(schedules: Sequence, step: int) -> int:
    """Which prompt-editing entry is in use at denoiser call ``step`` (the WebUI's own rule)."""
    for index, entry in enumerate(schedules):
        if step <= entry.end_at_step:
            return index
    return 0


class TsamGeneration:
    """T-SAM for one generation. Use as a context manager around ``p.sample``; call
    :meth:`attach` with each new sampler (the WebUI creates it inside ``p.sample``)."""

    def __init__(
        self,
        settings: TsamSettings,
        *,
        reconstruct_cond: Callable,
        owner: object = None,
        should_stop: Callable[[], bool] | None = None,
        context_transform: ldm_tsam.ContextTransform | None = None,
        report: Callable[[str], None] | None = None,
    ):
        self.settings = settings
        self.owner = owner  #: the processing object this generation belongs to
        self.should_stop = should_stop or (lambda: False)
        self.report = report or (lambda text: None)  #: progress text for the user ("" when done)
        self._updates_done = 0
        self._updates_total = 0
        self._started = 0.0
        self._on_iteration: Callable[[int], None] = lambda done: None
        self._reconstruct_cond = reconstruct_cond
        self.context_transform = context_transform
        self._stack = contextlib.ExitStack()
        self._image_texts: list[list[str]] = []
        self._targets: dict[tuple[int, str], TextTarget] = {}
        self._next_step = 0  #: index of the sampler step the next denoiser call belongs to
        self._aligned_step = -1
        self.attached = False
        self.attach_error: Exception | None = None  #: set by the script when :meth:`attach` failed
        self.steps_aligned = 0
        self.maps: list[ImageMaps | None] = []  #: per image of the batch, with "show maps"

    def __enter__(self) -> TsamGeneration:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()
        self._targets.clear()

    # -- attaching to a sampler ------------------------------------------------------------------
    def attach(self, sampler, image_texts: Sequence[Sequence[str]]) -> None:
        """Hook ``sampler`` (``p.sampler``) for this pass.

        ``image_texts[i]`` lists image ``i``'s prompt texts in prompt-editing order (the first
        ``AND`` part; one text without editing).
        """
        denoiser = sampler.model_wrap_cfg
        self._image_texts = [list(texts) for texts in image_texts]
        self._next_step, self._aligned_step = 0, -1
        self.maps = [None] * len(self._image_texts)
        signature = inspect.signature(type(denoiser).forward)

        def before_denoiser(module, args: tuple, kwargs: dict):
            bound = signature.bind(module, *args, **kwargs)
            self._before_denoiser(module, bound.arguments)
            return None

        handle = denoiser.register_forward_pre_hook(before_denoiser, with_kwargs=True)
        self._stack.callback(handle.remove)
        self._count_steps(sampler)
        self.attached = True

    def _count_steps(self, sampler) -> None:
        previous = sampler.__dict__.get("callback_state", _MISSING)
        original = sampler.callback_state

        def callback_state(d):
            self._next_step = int(d["i"]) + 1
            return original(d)

        sampler.callback_state = callback_state

        def restore() -> None:
            if sampler.__dict__.get("callback_state") is callback_state:
                if previous is _MISSING:
                    del sampler.callback_state
                else:
                    sampler.callback_state = previous

        self._stack.callback(restore)

    # -- the pre-hook ------------------------------------------------------------------------------
    def _before_denoiser(self, denoiser, arguments: dict) -> None:
        step = self._next_step
        if step == self._aligned_step or self.should_stop():
            return  # a later call of the same step (second-order samplers), or interrupted
        self._aligned_step = step
        total = int(getattr(denoiser, "steps", None) or 0)
        plan = self.settings.step_plan(step, total)
        if plan.updates == 0:
            return
        if self._updates_total == 0:
            self._updates_total = sum(self.settings.step_plan(index, total).updates for index in range(total))
            self._started = time.monotonic()
        done_before = self._updates_done
        self._report_progress(done_before)
        self._on_iteration = lambda done: self._report_progress(done_before + done)
        x = arguments["x"]
        updated = self.aligned_latent(
            denoiser, x, arguments["sigma"], arguments["cond"], arguments["image_cond"],
            step=step, total=total, step_size=plan.step_size, iterations=plan.updates,
        )
        if updated is not None:
            x.copy_(updated)  # the sampler's own latent: the rest of this step and the sampler use it
            self.steps_aligned += 1
        self._updates_done = done_before + plan.updates
        self._report_progress(self._updates_done)

    def _report_progress(self, done: int) -> None:
        """``T-SAM: 12/51 latent updates, about 20 s left`` (timed from the updates so far); ""
        once the last one ran. Every update is about two UNet passes; the sampler's own progress
        bar does not count them."""
        total = self._updates_total
        if done >= total:
            self.report("")
            return
        text = f"T-SAM: {done}/{total} latent updates"
        if done:
            left = (time.monotonic() - self._started) / done * (total - done)
            text += f", about {left:.0f} s left"
        self.report(text)

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
        rows = [conds[0][0] for conds in conds_list]  # each image's first AND part
        targets = [self._target(sd_model, self._text_at(image, cond, denoiser.step)) for image in range(images)]
        device = x.device
        prompt_targets = [target.to(device).target for target in targets]

        exact = torch.promote_types(x.dtype, torch.float32)  # the update in float32 (or wider)
        with torch.no_grad():
            c_in, timestep = model_input_scaling(wrapper, sigma)
            c_in = c_in.to(device=device, dtype=exact).view(-1, *[1] * (x.dim() - 1))  # (B, 1, 1, 1)
            z = x.to(exact) * c_in
        with torch.inference_mode(False):
            text = _autograd_ready(select_rows(text_cond, rows))
            image_rows = None if image_cond is None else _autograd_ready(image_cond[:images])
            timestep = _autograd_ready(timestep)
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
        if descent.losses.numel():
            logger.info("T-SAM step %d/%d: %d update(s) of size %.4g, loss %s → last %s", step, total,
                        descent.losses.shape[0], step_size, _round(descent.losses[0]), _round(descent.losses[-1]))
        updated = (descent.model_input / c_in).to(x.dtype)
        return torch.where(descent.changed.view(-1, *[1] * (x.dim() - 1)), updated, x)

    def _keep_maps(self, targets: list[TextTarget], descent, step: int, total: int, evaluate_after) -> None:
        for image, target in enumerate(targets):
            if self.maps[image] is None:
                self.maps[image] = ImageMaps(
                    prompt=self._image_texts[image][0] if self._image_texts[image] else "",
                    target=target,
                    maps_before=descent.first.maps[image].cpu(),
                    loss_before=float(descent.first.losses[image]),
                    step_before=step,
                )
        last_active = self.settings.step_plan(step + 1, total).updates == 0
        if last_active:
            after = evaluate_after()
            for image, record in enumerate(self.maps):
                record.maps_after = after.maps[image].cpu()
                record.loss_after = float(after.losses[image])
                record.step_after = step

    def _reconstruct(self, cond, step: int):
        return self._reconstruct_cond(cond, step)

    def _text_at(self, image: int, cond, step: int) -> str:
        texts = self._image_texts[image]
        schedules = cond.batch[image][0].schedules
        index = active_schedule_index(schedules, step)
        if len(texts) != len(schedules):
            logger.warning("T-SAM: prompt-editing schedule of image %d does not match the conditioning; "
                           "using its last text", image)
            return texts[-1]
        return texts[index]

    def _target(self, sd_model, text: str) -> TextTarget:
        key = (id(sd_model.cond_stage_model), text)
        target = self._targets.get(key)
        if target is None:
            embedders = ldm_tsam.text_embedders(sd_model.cond_stage_model)
            target = ldm_tsam.text_target(embedders, text, power=self.settings.power)
            self._targets[key] = target
        return target


def _round(values: torch.Tensor) -> list[float]:
    return [float(f"{float(value):.6g}") for value in values]
