"""The "Smoothed Energy Guidance" always-on script: UI, infotext, X/Y/Z axes, settings, API.

Imported only inside the WebUI (it imports ``modules.*``). It translates widgets and API
arguments into :class:`SegSettings` (``seg_args.py``) and wraps ``p.sample`` so that every
hook lives exactly as long as the sampling call (:class:`SegGeneration`), also when the
generation fails. A bad value makes the request fail with the validation message, before
anything touches the model.
"""

from __future__ import annotations

import gradio as gr
from modules import script_callbacks, scripts, shared
from modules.ui_components import InputAccordion

from ..adapters.forge.seg_sampling import ForgeSegGeneration
from ..adapters.unet_layers import self_attention_layers, unet_layout
from ..core.layers import select_layers
from ..core import fields
from ..core.settings import SegSettings, SettingsError
from . import controls, forge_host
from .common import (RequestError, add_settings, axis_confirmer, option, refuse_foreign_replacement,
                     register_xyz_axes, settings_or_fail)
from ..adapters.a1111.seg_sampling import SegGeneration
from .host import HOST, unet_module

TITLE = "Smoothed Energy Guidance"


class SegError(RequestError):
    """Fails a bad SEG request with a clear message (the API reports the class name)."""


class _Active:
    """The generation whose hooks are installed right now (the WebUI runs one at a time)."""

    generation: SegGeneration | ForgeSegGeneration | None = None


class SegScript(scripts.Script):
    def title(self) -> str:
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        with InputAccordion(False, label=self.title(), elem_id=self.elem_id("enabled")) as enabled:
            widgets = {"enabled": enabled}
            gr.Markdown(SegSettings.DESCRIPTION, elem_classes=["seg-tsam-description"])
            for row in (("scale", "sigma"), ("layers", "mode"), ("start", "end")):
                widgets |= controls.build_row(SegSettings, row, self.elem_id)
            with gr.Accordion("Hires. fix second pass", open=False):
                widgets |= controls.build_row(SegSettings, ("hires_override",), self.elem_id)
                widgets |= controls.build_row(SegSettings, ("hires_scale", "hires_sigma"), self.elem_id)
        controls.link_gates(SegSettings, widgets)
        self.infotext_fields = controls.infotext_fields(SegSettings, widgets)
        self.paste_field_names = controls.paste_field_names(self.infotext_fields)
        return [widgets[name] for name in fields.positional_names(SegSettings)]

    def process(self, p, *args):
        settings = settings_or_fail(p, SegSettings, args, getattr(p, "seg_overrides", None), SegError, TITLE,
                                    _check_model)
        if settings is None or not settings.has_effect:
            return
        p.extra_generation_params.update(settings.to_infotext())
        _wrap_sampling(p, settings)

    def process_before_every_sampling(self, p, *args, **kwargs):
        generation = _Active.generation
        if isinstance(generation, ForgeSegGeneration) and generation.owner is p:  # every pass: the host resets the patcher
            p.sd_model.forge_objects.unet = generation.patch(p.sd_model.forge_objects.unet)
        # The SD Unet replacement is applied just before sampling (after process()): count from here.
        if not HOST.is_forge and not hasattr(p, "seg_unet_calls"):
            from . import unet_options  # AUTOMATIC1111's sd_unet classes

            p.seg_unet_calls = unet_options.GenerationCalls()

    def postprocess_batch(self, p, *args, **kwargs):
        """Say in the generation info when an export selected as SD Unet did not run every call."""
        calls = getattr(p, "seg_unet_calls", None)
        note = calls.note() if calls is not None else None
        if note:
            p.extra_generation_params["SEG export"] = note

    def before_hr(self, p, *args):
        generation = _Active.generation
        if generation is not None and generation.owner is p:
            generation.settings = generation.settings.for_hires_pass()


def _check_model(settings: SegSettings) -> None:
    model = shared.sd_model
    if getattr(model, "cond_stage_key", None) == "edit":
        raise SettingsError("InstructPix2Pix (edit) models are not supported")
    unet = unet_module(model)
    if unet_layout(unet) is None:
        raise SettingsError(f"this model's denoiser ({type(unet).__name__}) is not a UNet; SEG supports "
                            "SD1.x, SD2.x and SDXL checkpoints")
    select_layers(self_attention_layers(unet), settings.layers)


def _wrap_sampling(p, settings: SegSettings) -> None:
    """Run ``p.sample`` (both hires passes included) inside one :class:`SegGeneration`."""
    original = p.sample
    batch_rows = bool(option("seg_batch_rows", True)) and bool(option("batch_cond_uncond", True))

    def sample(*args, **kwargs):
        if HOST.is_forge:
            generation = ForgeSegGeneration(settings, batch_rows=batch_rows, calc_batch=forge_host.calc_batch(), owner=p)
        else:
            refuse_foreign_replacement(TITLE, SegError)
            generation = SegGeneration(settings, batch_rows=batch_rows, owner=p,
                                       max_extra_rows=None if shared.opts.batch_cond_uncond else p.batch_size)
        with generation:
            _Active.generation = generation
            try:
                return original(*args, **kwargs)
            finally:
                _Active.generation = None
                if HOST.is_forge:
                    _unpatch(p.sd_model.forge_objects, generation)

    p.sample = sample


def _unpatch(forge_objects, generation: ForgeSegGeneration) -> None:
    """Put back the host's UNet patcher if it is still SEG's clone (the host would replace it at the
    next generation; until then nothing of SEG stays reachable from the model)."""
    for clone, source in reversed(generation.patched):
        if forge_objects.unet is clone:
            forge_objects.unet = source
    generation.patched.clear()


def _on_cfg_denoiser(params) -> None:
    generation = _Active.generation
    if generation is not None:
        generation.on_cfg_denoiser(params)


def _on_ui_settings() -> None:
    options = {
        "seg_batch_rows": shared.OptionInfo(
            True, "SEG: run the blurred rows in the same UNet call as cond/uncond (faster, more memory)").info(
            "Off: one extra UNet call per step instead, with the same result; also off when Optimizations → "
            "Batch cond/uncond is off."),
    }
    add_settings(options)


def _register_xyz_axes() -> None:  # an axis's layers are checked against the loaded model too
    register_xyz_axes("seg_overrides", controls.xyz_axes(SegSettings),
                      axis_confirmer(SegSettings, SegError, TITLE, _check_model))


def register_callbacks() -> None:
    """Called by ``scripts/seg_tsam.py`` at every (re)load: the WebUI clears callbacks on reload."""
    script_callbacks.on_cfg_denoiser(_on_cfg_denoiser)
    script_callbacks.on_ui_settings(_on_ui_settings)
    script_callbacks.on_before_ui(_register_xyz_axes)  # in case X/Y/Z was not loaded yet
    _register_xyz_axes()
