"""T-SAM's optimisation of the UNet input ``z``, the same for every framework (pure torch).

An adapter supplies a capture (:class:`~.attention_capture.AttentionCapture`, installed) and
``run_unet(z)``, one UNet call on the cond rows (one row per image). This module turns the
captured probabilities into each image's loss, its gradient with respect to ``z`` and the
descent ``z ← z − α·∇_z L``. Images never mix inside the UNet, so one backward of the summed
loss gives every image exactly the gradient of its own loss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import tsam
from .attention_capture import AttentionCapture
from .layers import grid_at_level
from .tsam import PromptTarget

logger = logging.getLogger("seg_tsam")

#: Runs the UNet on a ``(B, C, h, w)`` input ``z`` (cond rows only); the output is not used.
UnetCall = Callable[[torch.Tensor], object]


@dataclass(frozen=True)
class Alignment:
    losses: torch.Tensor  #: (B,) per-image loss
    maps: list[torch.Tensor]  #: per image (ΣL, h, w) smoothed token maps, chunks concatenated


def _alignment(capture: AttentionCapture, run_unet: UnetCall, z: torch.Tensor, targets: Sequence[PromptTarget],
               mode: str) -> Alignment:
    grid = grid_at_level((z.shape[-2], z.shape[-1]), capture.level)
    probabilities = capture.probabilities(lambda: run_unet(z), grid)  # (B, h·w, context)
    losses, maps = [], []
    for image, target in enumerate(targets):
        loss, image_maps = tsam.prompt_loss_and_maps(probabilities[image], grid, target, mode)
        losses.append(loss)
        maps.append(image_maps)
    return Alignment(torch.stack(losses), maps)


def alignment_losses(capture: AttentionCapture, run_unet: UnetCall, z: torch.Tensor,
                     targets: Sequence[PromptTarget], mode: str) -> Alignment:
    """Losses and maps at ``z``, without gradient."""
    with torch.no_grad():
        return _alignment(capture, run_unet, z, targets, mode)


def alignment_gradient(capture: AttentionCapture, run_unet: UnetCall, z: torch.Tensor,
                       targets: Sequence[PromptTarget], mode: str) -> tuple[Alignment, torch.Tensor]:
    """``(alignment at z, ∇_z Σ_images loss)``, also when called under inference mode (the WebUI
    samples under it): the gradient is taken on a fresh leaf copy of ``z``."""
    with torch.inference_mode(False), torch.enable_grad():
        leaf = z.detach().clone().requires_grad_(True)  # a normal leaf even if z is an inference tensor
        alignment = _alignment(capture, run_unet, leaf, targets, mode)
        total = alignment.losses.sum()
        if total.requires_grad:
            (gradient,) = torch.autograd.grad(total, leaf)
        else:  # no prompt with two tokens or more: nothing to align
            gradient = torch.zeros_like(leaf)
    return Alignment(alignment.losses.detach(), [maps.detach() for maps in alignment.maps]), gradient


@dataclass(frozen=True)
class Descent:
    """Result of :func:`descend`."""

    model_input: torch.Tensor  #: the updated ``z`` (float32 or wider)
    changed: torch.Tensor  #: (B,) bool: the image's ``z`` was updated at least once
    losses: torch.Tensor  #: (iterations run, B) loss before each update
    first: Alignment | None  #: losses and maps of the first forward (before any update)
    last: Alignment | None = None  #: losses and maps of the last forward (before the last update)


def descend(
    capture: AttentionCapture,
    run_unet: UnetCall,
    z: torch.Tensor,
    targets: Sequence[PromptTarget],
    mode: str,
    *,
    step_size: float,
    iterations: int,
    should_stop: Callable[[], bool] | None = None,
    on_iteration: Callable[[int], None] | None = None,
    where: str = "",
) -> Descent:
    """``iterations`` steps ``z ← z − α·∇_z L`` for every image, in float32 (or wider).

    ``run_unet`` gets ``z`` in that precision (cast it to the UNet's dtype there). An image whose
    loss or gradient is not finite keeps its ``z`` for that iteration and a warning names it
    (logger ``seg_tsam``; ``where`` says which step, e.g. ``"at timestep 981 "``). ``should_stop``
    is polled between iterations (the WebUI's interrupt button); ``on_iteration(done)`` is told
    after each one (progress).
    """
    if len(targets) != z.shape[0]:
        raise ValueError(f"T-SAM: {z.shape[0]} latents but {len(targets)} targets")
    exact = torch.promote_types(z.dtype, torch.float32)
    z = z.detach().to(exact)
    changed = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
    losses, first, alignment = [], None, None
    for iteration in range(iterations):
        if should_stop is not None and should_stop():
            break
        alignment, gradient = alignment_gradient(capture, run_unet, z, targets, mode)
        first = alignment if first is None else first
        finite = torch.isfinite(gradient).flatten(1).all(dim=1) & torch.isfinite(alignment.losses)  # (B,)
        for image in (~finite).nonzero().flatten().tolist():
            logger.warning("T-SAM: non-finite loss or gradient for image %d %s(iteration %d); update skipped",
                           image, where, iteration)
        stepped = z - step_size * gradient.to(exact)
        z = torch.where(finite.view(-1, *[1] * (z.dim() - 1)), stepped, z)
        changed |= finite
        losses.append(alignment.losses)
        if on_iteration is not None:
            on_iteration(iteration + 1)
    stacked = torch.stack(losses) if losses else z.new_zeros((0, z.shape[0]))
    return Descent(z, changed, stacked, first, alignment)
