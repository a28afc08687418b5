"""T-SAM inside a WebUI's sampling loop: when and where the latent is updated (every WebUI host).

AUTOMATIC1111 and the Forge family share the sampling loop: a k-diffusion (or DDIM/PLMS)
sampler keeps its latent ``x`` in a local variable and calls the WebUI's ``CFGDenoiser`` as
``model(x, sigma, **extra_args)``; the ``on_cfg_denoiser`` callback only sees a copy (A1111) or
a blend (Forge with a mask). So :class:`TsamSteps` puts a forward **pre-hook** on the sampler's
``CFGDenoiser`` and, at the first denoiser call of an active step, overwrites the incoming ``x``
**in place** (``x.copy_``, under the host's inference mode): that tensor is the sampler's own
variable, so the CFG step that follows and the sampler's update both use the aligned latent.
The sampler's step index comes from its per-step ``callback_state`` (the WebUI's
``state.sampling_step`` lags one step behind the model calls).

What an update is (the UNet call, its conditioning, the text targets) is the host's: a
subclass implements :meth:`TsamSteps.aligned_latent`. The schedule, the progress text and the
"show maps" records are shared here. Everything is installed on an
:class:`contextlib.ExitStack` and removed in ``__exit__``. Nothing here imports a WebUI.
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

from ..core.tsam import TsamSettings
from .text_targets import TextTarget

logger = logging.getLogger("seg_tsam")
_MISSING = object()

#: ``reconstruct_cond(cond, step) -> (conds_list, tensor or SDXL dict)``: the WebUI's
#: ``prompt_parser.reconstruct_multicond_batch``.
ReconstructCond = Callable[[Any, int], tuple[list, Any]]


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


def select_rows(conditioning: Any, rows: Sequence[int]) -> Any:
    """Rows of a text conditioning: a tensor, or SDXL's dict (``crossattn``, ``vector``)."""
    if isinstance(conditioning, dict):
        return {key: select_rows(value, rows) for key, value in conditioning.items()}
    return conditioning[torch.as_tensor(list(rows), dtype=torch.long, device=conditioning.device)]


def autograd_ready(value: Any) -> Any:
    """Inference-mode tensors (autograd cannot save those) cloned into normal ones; call it
    outside inference mode."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, dict):
        return {key: autograd_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [autograd_ready(item) for item in value]
    return value


def active_schedule_index(schedules: Sequence, step: int) -> int:
    """Which prompt-editing entry is in use at denoiser call ``step`` (the WebUI's own rule)."""
    for index, entry in enumerate(schedules):
        if step <= entry.end_at_step:
            return index
    return 0


def first_part_rows(conds_list: Sequence[Sequence[tuple[int, float]]]) -> list[int]:
    """Each image's conditioning row: its first ``AND`` part (the WebUI's ``conds_list``)."""
    return [conds[0][0] for conds in conds_list]


class TsamSteps:
    """T-SAM for one generation: the hooks and the schedule. Use as a context manager around
    ``p.sample``; call :meth:`attach` with each new sampler (the WebUI creates it inside
    ``p.sample``). A host adapter implements :meth:`aligned_latent`."""

    def __init__(
        self,
        settings: TsamSettings,
        *,
        reconstruct_cond: ReconstructCond,
        owner: object = None,
        should_stop: Callable[[], bool] | None = None,
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
        self._stack = contextlib.ExitStack()
        self._image_texts: list[list[str]] = []
        self._next_step = 0  #: index of the sampler step the next denoiser call belongs to
        self._aligned_step = -1
        self.attached = False
        self.attach_error: Exception | None = None  #: set by the script when :meth:`attach` failed
        self.steps_aligned = 0
        self.maps: list[ImageMaps | None] = []  #: per image of the batch, with "show maps"

    def __enter__(self) -> TsamSteps:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

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

    # -- one update (the host's) ---------------------------------------------------------------------
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
        raise NotImplementedError

    # -- shared by the hosts' updates ----------------------------------------------------------------
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

    def _log_descent(self, descent, step: int, total: int, step_size: float) -> None:
        if descent.losses.numel():
            logger.info("T-SAM step %d/%d: %d update(s) of size %.4g, loss %s → last %s", step, total,
                        descent.losses.shape[0], step_size, _round(descent.losses[0]), _round(descent.losses[-1]))


def _round(values: torch.Tensor) -> list[float]:
    return [float(f"{float(value):.6g}") for value in values]
