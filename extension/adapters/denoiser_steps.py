"""Where a denoising pass is, as the WebUIs' CFG denoisers count it (AUTOMATIC1111 and the Forge family
share that denoiser)."""

from __future__ import annotations


def denoiser_progress(denoiser, params) -> tuple[int, int]:
    """``(call index, expected calls)`` of this denoising pass, from the denoiser's own counter.

    ``params.sampling_step`` lags: the sampler's callback advances it after each step's model
    call, so steps 0 and 1 both read 0. The denoiser counts its calls itself (second-order
    samplers call it twice a step) and knows how many to expect, as the WebUI's own
    skip-early-CFG does with ``step / total_steps``.
    """
    total = getattr(denoiser, "total_steps", None)
    if total:
        return denoiser.step, total
    return params.sampling_step, params.total_sampling_steps
