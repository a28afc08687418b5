"""What the Forge family provides to this extension's Forge adapter (imported only there)."""

from __future__ import annotations

from collections.abc import Callable

from .host import HOST


def calc_batch() -> Callable:
    """The host's batching function as ``calc(model, conds, x, sigma, model_options) -> prediction``:
    the weighted average of the UNet's outputs for the condition list ``conds``."""
    if HOST.name == "reforge":
        from ldm_patched.modules.samplers import calc_cond_batch

        return lambda model, conds, x, sigma, options: calc_cond_batch(model, [conds], x, sigma, options)[0]
    from backend.sampling.sampling_function import calc_cond_uncond_batch

    return lambda model, conds, x, sigma, options: calc_cond_uncond_batch(model, conds, None, x, sigma, options)[0]
