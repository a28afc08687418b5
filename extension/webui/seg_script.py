"""The "Smoothed Energy Guidance" always-on script: UI, infotext, X/Y/Z axes, settings, API.

Imported only inside the WebUI (it imports ``modules.*``). It translates widgets and API
arguments into :class:`SegSettings` (``seg_args.py``) and wraps ``p.sample`` so that every
hook lives exactly as long as the sampling call (:class:`SegGeneration`), also when the
generation fails. A bad value makes the request fail with the validation message, before
anything touches the model.
"""

from __future__ import annotations

import logging

import gradio as gr
from modules import script_callbacks, scripts, shared
from modules.ui_components import InputAccordion

from ..adapters.unet_layers import self_attention_layers
from ..core.layers import LayerSpecError, select_layers
from ..core.settings import INFOTEXT_KEYS, SEG_MODES, SegSettings, SettingsError
from .common import RequestError, add_settings, fail_sampling, option, refuse_foreign_replacement, register_xyz_axes
from .seg_args import settings_from_args
from ..adapters.a1111.seg_sampling import SegGeneration

logger = logging.getLogger("seg_tsam")

SIGMA_CHOICES = ["inf", "64", "32", "16", "8", "4", "2", "1", "0.5"]


class SegError(RequestError):
    """Fails a bad SEG request with a clear message (the API reports the class name)."""


class _Active:
    """The generation whose hooks are installed right now (the WebUI runs one at a time)."""

    generation: SegGeneration | None = None


class SegScript(scripts.Script):
    def title(self) -> str:
        return "Smoothed Energy Guidance"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        defaults = SegSettings()
        with InputAccordion(False, label=self.title(), elem_id=self.elem_id("enabled")) as enabled:
            with gr.Row():
                scale = gr.Slider(label="SEG scale", minimum=0.0, maximum=20.0, step=0.1,
                                  value=option("seg_default_scale", defaults.scale), elem_id=self.elem_id("scale"))
                sigma = gr.Dropdown(label="Blur σ (inf = mean query; type any value ≥ 0)", choices=SIGMA_CHOICES,
                                    value=str(option("seg_default_sigma", "inf")), allow_custom_value=True,
                                    elem_id=self.elem_id("sigma"))
            with gr.Row():
                layers = gr.Textbox(label="Layers (mid | down,up | d4,d5,m0-9)",
                                    value=option("seg_default_layers", defaults.layers), elem_id=self.elem_id("layers"))
                mode = gr.Radio(label="Blurred branch (cond = official code, uncond = paper Eq. 10)",
                                choices=list(SEG_MODES), value=option("seg_default_mode", defaults.mode),
                                elem_id=self.elem_id("mode"))
            with gr.Row():
                start = gr.Slider(label="Start (fraction of steps)", minimum=0.0, maximum=1.0, step=0.01,
                                  value=defaults.start, elem_id=self.elem_id("start"))
                end = gr.Slider(label="End (fraction of steps)", minimum=0.0, maximum=1.0, step=0.01,
                                value=defaults.end, elem_id=self.elem_id("end"))
            with gr.Accordion("Hires. fix second pass", open=False):
                hires_override = gr.Checkbox(label="Use a different SEG scale and σ for the second pass",
                                             value=False, elem_id=self.elem_id("hires_override"))
                with gr.Row():
                    hires_scale = gr.Slider(label="Hires SEG scale", minimum=0.0, maximum=20.0, step=0.1,
                                            value=defaults.scale, elem_id=self.elem_id("hires_scale"))
                    hires_sigma = gr.Dropdown(label="Hires blur σ", choices=SIGMA_CHOICES, value="inf",
                                              allow_custom_value=True, elem_id=self.elem_id("hires_sigma"))
        keys = INFOTEXT_KEYS
        self.infotext_fields = [
            (enabled, lambda params: keys["scale"] in params),
            (scale, keys["scale"]), (sigma, keys["sigma"]), (layers, keys["layers"]),
            (start, keys["start"]), (end, keys["end"]), (mode, keys["mode"]),
            (hires_override, lambda params: keys["hires_scale"] in params or keys["hires_sigma"] in params),
            (hires_scale, keys["hires_scale"]), (hires_sigma, keys["hires_sigma"]),
        ]
        self.paste_field_names = list(keys.values())
        return [enabled, scale, sigma, layers, start, end, mode, hires_override, hires_scale, hires_sigma]

    def process(self, p, *args):
        try:
            settings = settings_from_args(args, getattr(p, "seg_overrides", None))
            if settings.has_effect:
                _check_model(settings)
        except (SettingsError, LayerSpecError) as error:
            logger.error("SEG: %s", error)
            fail_sampling(p, SegError(f"Smoothed Energy Guidance: {error}"))
            return
        if not settings.has_effect:
            return
        p.extra_generation_params.update(settings.to_infotext())
        _wrap_sampling(p, settings)

    def before_hr(self, p, *args):
        generation = _Active.generation
        if generation is not None and generation.owner is p:
            generation.settings = generation.settings.for_hires_pass()


def _check_model(settings: SegSettings) -> None:
    model = shared.sd_model
    if getattr(model, "cond_stage_key", None) == "edit":
        raise SettingsError("InstructPix2Pix (edit) models are not supported")
    select_layers(self_attention_layers(model.model.diffusion_model), settings.layers)


def _wrap_sampling(p, settings: SegSettings) -> None:
    """Run ``p.sample`` (both hires passes included) inside one :class:`SegGeneration`."""
    original = p.sample
    batch_rows = bool(option("seg_batch_rows", True)) and bool(shared.opts.batch_cond_uncond)

    def sample(*args, **kwargs):
        refuse_foreign_replacement("Smoothed Energy Guidance", SegError)
        generation = SegGeneration(settings, batch_rows=batch_rows, owner=p,
                                   max_extra_rows=None if shared.opts.batch_cond_uncond else p.batch_size)
        with generation:
            _Active.generation = generation
            try:
                return original(*args, **kwargs)
            finally:
                _Active.generation = None

    p.sample = sample


def _on_cfg_denoiser(params) -> None:
    generation = _Active.generation
    if generation is not None:
        generation.on_cfg_denoiser(params)


def _on_ui_settings() -> None:
    options = {
        "seg_batch_rows": shared.OptionInfo(
            True, "SEG: run the blurred rows in the same UNet call as cond/uncond (faster, more memory)"),
        "seg_default_scale": shared.OptionInfo(3.0, "SEG: default scale", gr.Slider,
                                               {"minimum": 0.0, "maximum": 20.0, "step": 0.1}),
        "seg_default_sigma": shared.OptionInfo("inf", "SEG: default blur σ (inf or a number)"),
        "seg_default_layers": shared.OptionInfo("mid", "SEG: default layers"),
        "seg_default_mode": shared.OptionInfo("cond", "SEG: default blurred branch", gr.Radio,
                                              {"choices": list(SEG_MODES)}),
    }
    add_settings(options)


def _register_xyz_axes() -> None:
    register_xyz_axes("seg_overrides", [
        ("[SEG] Scale", float, "scale", None),
        ("[SEG] Sigma", str, "sigma", None),
        ("[SEG] Layers", str, "layers", None),
        ("[SEG] Start", float, "start", None),
        ("[SEG] End", float, "end", None),
        ("[SEG] Mode", str, "mode", lambda: list(SEG_MODES)),
    ])


def register_callbacks() -> None:
    """Called by ``scripts/seg_tsam.py`` at every (re)load: the WebUI clears callbacks on reload."""
    script_callbacks.on_cfg_denoiser(_on_cfg_denoiser)
    script_callbacks.on_ui_settings(_on_ui_settings)
    script_callbacks.on_before_ui(_register_xyz_axes)  # in case X/Y/Z was not loaded yet
    _register_xyz_axes()
