"""What the Forge family provides to this extension's Forge adapter (imported only there)."""

from __future__ import annotations

from collections.abc import Callable

from ..adapters.a1111 import ldm_tsam
from ..adapters.forge.tsam_text import HostClipEncoder, a1111_wrapper_encoder, classic_engine_encoder
from .host import HOST

#: Forge Neo's and Forge's transformer blocks add attention outputs in place (``x += n``) after
#: ``LayerNorm`` saved ``x``, so T-SAM's backward needs saved-activation copies; reForge's add out of place.
TRANSFORMER_BLOCKS_ADD_IN_PLACE = HOST.name != "reforge"
#: Forge Neo's and Forge's prompt encoders (SD1; SDXL's CLIP-L and CLIP-G).
_TEXT_ENGINES = ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g")


def calc_batch() -> Callable:
    """The host's batching function as ``calc(model, conds, x, sigma, model_options) -> prediction``:
    the weighted average of the UNet's outputs for the condition list ``conds``."""
    if HOST.name == "reforge":
        from ldm_patched.modules.samplers import calc_cond_batch

        return lambda model, conds, x, sigma, options: calc_cond_batch(model, [conds], x, sigma, options)[0]
    from backend.sampling.sampling_function import calc_cond_uncond_batch

    return lambda model, conds, x, sigma, options: calc_cond_uncond_batch(model, conds, None, x, sigma, options)[0]


def _text_engines(sd_model) -> list:
    engines = [getattr(sd_model, name, None) for name in _TEXT_ENGINES]
    return [engine for engine in engines if engine is not None]


def check_text_encoders(sd_model) -> None:
    """Raise ``ValueError`` unless T-SAM can read this model's text encoders (CLIP ones)."""
    if HOST.name == "reforge":
        ldm_tsam.text_embedders(sd_model.cond_stage_model)
        return
    engines = _text_engines(sd_model)
    if not engines:
        raise ValueError("T-SAM: no CLIP text encoder in this model (SD1.x/SD2.x/SDXL only)")
    for engine in engines:
        if not hasattr(getattr(engine.text_encoder, "transformer", None), "config"):
            raise ValueError(f"T-SAM: text encoder {type(engine.text_encoder).__name__} is not a CLIP text model")


def tsam_text_encoders(sd_model) -> list[HostClipEncoder]:
    """The model's prompt encoders for T-SAM, loaded where the host runs them (as its own
    ``get_learned_conditioning`` does)."""
    if HOST.name == "reforge":
        from modules import devices
        from modules_forge import forge_clip

        forge_clip.move_clip_to_gpu()
        return [a1111_wrapper_encoder(embedder, devices.device)
                for embedder in ldm_tsam.text_embedders(sd_model.cond_stage_model)]
    from backend import memory_management

    memory_management.load_model_gpu(sd_model.forge_objects.clip.patcher)
    return [classic_engine_encoder(engine) for engine in _text_engines(sd_model)]
