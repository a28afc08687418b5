"""The "T-SAM alignment" always-on script: UI, infotext, X/Y/Z axes, settings, API, "show maps".

Imported only inside the WebUI (it imports ``modules.*``). Like the SEG script it translates
widgets and API arguments into :class:`TsamSettings` (``tsam_args.py``), refuses what it
cannot do with a 422 before anything touches the model, and wraps ``p.sample`` so that every
hook lives exactly as long as the sampling call (:class:`TsamGeneration` on AUTOMATIC1111,
:class:`ForgeTsamGeneration` on the Forge family). The sampler only exists inside ``p.sample``;
``process_before_every_sampling`` attaches the generation to it (first pass only: the hires-fix
second pass refines an image whose layout is already set).
"""

from __future__ import annotations

import inspect

import gradio as gr
import torch
from modules import script_callbacks, scripts, shared
from modules.ui_components import InputAccordion
from PIL import Image, ImageDraw, ImageFont

from ..adapters.a1111 import ldm_tsam
from ..core import tsam
from ..core import fields
from ..core.settings import SettingsError
from ..core.tsam import TsamSettings
from . import controls, forge_host
from .host import HOST, unet_module
from .common import RequestError, axis_confirmer, refuse_foreign_replacement, register_xyz_axes, settings_or_fail
from ..adapters.a1111 import tsam_sampling as a1111_tsam
from ..adapters.a1111.tsam_sampling import TsamGeneration
from ..adapters.forge import tsam_sampling as forge_tsam
from ..adapters.forge.tsam_sampling import ForgeTsamGeneration
from ..adapters.tsam_steps import ImageMaps
from ..adapters.unet_layers import coarse_level, cross_attention_layers

TITLE = "T-SAM alignment"


class TsamError(RequestError):
    """Fails a bad T-SAM request with a clear message (the API reports the class name)."""


class _Active:
    """The generation whose hooks are installed right now (the WebUI runs one at a time)."""

    generation: TsamGeneration | ForgeTsamGeneration | None = None


class TsamScript(scripts.Script):
    def title(self) -> str:
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        with InputAccordion(False, label=self.title(), elem_id=self.elem_id("enabled")) as enabled:
            widgets = {"enabled": enabled}
            gr.Markdown(TsamSettings.DESCRIPTION, elem_classes=["seg-tsam-description"])
            for row in (("strength", "active_fraction"), ("iterations", "refinement_steps", "refinement_iterations"),
                        ("loss", "power"), ("show_maps",)):
                widgets |= controls.build_row(TsamSettings, row, self.elem_id)
        self.infotext_fields = controls.infotext_fields(TsamSettings, widgets)
        self.paste_field_names = controls.paste_field_names(self.infotext_fields)
        return [widgets[name] for name in fields.positional_names(TsamSettings)]

    def process(self, p, *args):
        settings = settings_or_fail(p, TsamSettings, args, getattr(p, "tsam_overrides", None), TsamError, TITLE,
                                    lambda settings: _check_supported(p))
        if settings is None or not settings.has_effect:
            return
        p.extra_generation_params.update(settings.to_infotext())
        _wrap_sampling(p, settings)

    def process_before_every_sampling(self, p, *args, **kwargs):
        generation = _Active.generation
        if generation is None or generation.owner is not p or getattr(p, "is_hr_pass", False):
            return
        try:
            generation.attach(p.sampler, _image_prompt_texts(p))
        except Exception as error:
            generation.attach_error = error  # the WebUI only prints errors raised here; p.sample re-raises
            raise

    def postprocess(self, p, processed, *args):
        records = getattr(p, "tsam_maps", None)
        if not records:
            return
        from modules import images  # noqa: PLC0415

        for index, record in enumerate(records):
            if record is None:
                continue
            maps_image = render_maps(record)
            processed.images.append(maps_image)
            infotext_index = processed.index_of_first_image + index
            infotexts = processed.infotexts
            infotext = infotexts[infotext_index] if infotext_index < len(infotexts) else processed.info
            infotexts.append(infotext)
            if shared.opts.samples_save and not p.do_not_save_samples:  # beside the image, like the WebUI's own
                seeds = getattr(p, "all_seeds", None) or [p.seed]
                prompts = getattr(p, "all_prompts", None) or [p.prompt]
                images.save_image(maps_image, p.outpath_samples, "", seeds[min(index, len(seeds) - 1)],
                                  prompts[min(index, len(prompts) - 1)], shared.opts.samples_format, info=infotext,
                                  p=p, suffix="-tsam-maps")


def _check_supported(p) -> None:
    """Refuse, with a message, what T-SAM cannot do (before anything touches the model)."""
    from modules import sd_samplers  # noqa: PLC0415

    model = shared.sd_model
    if getattr(model, "cond_stage_key", None) == "edit":
        raise SettingsError("InstructPix2Pix (edit) models are not supported")
    if getattr(shared.opts, "use_old_emphasis_implementation", False):
        raise SettingsError("the old emphasis implementation chunks prompts differently; turn it off")
    config = sd_samplers.find_sampler_config(p.sampler_name)
    sampler = config.name if config is not None else p.sampler_name
    unsupported = forge_tsam.UNSUPPORTED_SAMPLERS if HOST.is_forge else a1111_tsam.UNSUPPORTED_SAMPLERS
    if sampler in unsupported:
        raise SettingsError(f"sampler {sampler}: {unsupported[sampler]}")
    try:
        if HOST.is_forge:
            forge_host.check_text_encoders(model)
        else:
            ldm_tsam.text_embedders(model.cond_stage_model)
        coarse_level(cross_attention_layers(unet_module(model)))
    except (ValueError, AttributeError) as error:
        raise SettingsError(str(error).removeprefix("T-SAM: ")) from None


def _show_progress(text: str) -> None:
    """T-SAM's progress in the WebUI's progress bar text (and ``/sdapi/v1/progress``'s ``textinfo``)."""
    shared.state.textinfo = text or None


def _interrupted() -> bool:
    return bool(shared.state.interrupted or shared.state.skipped)


def _hypernetwork_context(context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values context as the WebUI's attention optimisations compute it (hypernetworks)."""
    from modules.hypernetworks import hypernetwork  # noqa: PLC0415

    return hypernetwork.apply_hypernetworks(shared.loaded_hypernetworks, context)


def _image_prompt_texts(p) -> list[list[str]]:
    """Per image of the batch: the texts the WebUI encodes for its first ``AND`` part, in
    prompt-editing order, computed with the WebUI's own parsers and step count."""
    from modules import prompt_parser  # noqa: PLC0415

    indexes, flat, _ = prompt_parser.get_multicond_prompt_list(p.prompts)
    steps = getattr(p, "firstpass_steps", None) or p.steps
    schedule = prompt_parser.get_learned_conditioning_prompt_schedules
    old_scheduling = {}  # Forge Neo has no old prompt-editing timelines
    if "use_old_scheduling" in inspect.signature(schedule).parameters:
        old_scheduling["use_old_scheduling"] = getattr(shared.opts, "use_old_scheduling", False)
    schedules = schedule(list(flat), steps, None, **old_scheduling)
    return [[text for _, text in schedules[parts[0][0]]] for parts in indexes]


def _wrap_sampling(p, settings: TsamSettings) -> None:
    """Run ``p.sample`` (both hires passes included) inside one T-SAM generation."""
    original = p.sample

    def sample(*args, **kwargs):
        from modules import prompt_parser  # noqa: PLC0415

        if HOST.is_forge:
            generation = ForgeTsamGeneration(
                settings, reconstruct_cond=prompt_parser.reconstruct_multicond_batch,
                unet_patcher=lambda: p.sd_model.forge_objects.unet,
                text_encoders=lambda: forge_host.tsam_text_encoders(p.sd_model),
                copy_saved_activations=forge_host.TRANSFORMER_BLOCKS_ADD_IN_PLACE, owner=p,
                should_stop=_interrupted, report=_show_progress)
        else:
            refuse_foreign_replacement(TITLE, TsamError)
            generation = TsamGeneration(settings, reconstruct_cond=prompt_parser.reconstruct_multicond_batch, owner=p,
                                        should_stop=_interrupted, context_transform=_hypernetwork_context,
                                        report=_show_progress)
        with generation:
            _Active.generation = generation
            try:
                result = original(*args, **kwargs)
            finally:
                _Active.generation = None
        if generation.attach_error is not None:
            raise TsamError(f"{TITLE}: could not attach to the sampler: {generation.attach_error}", 500)
        if settings.show_maps:
            p.tsam_maps = [*getattr(p, "tsam_maps", []), *generation.maps]
        return result

    p.sample = sample


# --------------------------------------------------------------------------------------------
# "Show maps": one gallery image per generated image
# --------------------------------------------------------------------------------------------

_TILE = 56  #: pixels of one token map
_TILES_PER_ROW = 12
_MATRIX_PIXELS = 300  #: target size of a T/S matrix panel
_BACKGROUND = (24, 24, 24)
_TEXT = (235, 235, 235)


def _heat(value: float) -> tuple[int, int, int]:
    """Black → red → yellow → white for ``value`` in [0, 1]."""
    value = min(max(value, 0.0), 1.0)
    return (int(255 * min(1.0, 3 * value)), int(255 * min(1.0, max(0.0, 3 * value - 1))),
            int(255 * min(1.0, max(0.0, 3 * value - 2))))


def _cell_size(tokens: int) -> int:
    """Pixels per matrix entry: up to 24, so that a matrix panel stays about ``_MATRIX_PIXELS`` wide."""
    return max(2, min(24, _MATRIX_PIXELS // max(tokens, 1)))


def _normalised(matrix: torch.Tensor) -> torch.Tensor:
    """The lower triangle scaled by its largest entry below the diagonal (else its largest entry)."""
    lower = matrix.tril()
    peak = float(matrix.tril(-1).max()) if matrix.shape[0] > 1 else 0.0
    if peak <= 0:
        peak = float(lower.max()) if lower.numel() else 0.0
    return (lower / peak).clamp(0, 1) if peak > 0 else lower


def _similarity_blocks(maps: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Block-diagonal S (one block per prompt chunk, as the loss sees it) from ``(ΣL, h, w)`` maps."""
    blocks, start = [], 0
    for size in sizes:
        blocks.append(tsam.map_similarity(maps[start:start + size].float()))
        start += size
    return torch.block_diag(*blocks) if blocks else torch.zeros(0, 0)


def _draw_matrix(draw: ImageDraw.ImageDraw, origin: tuple[int, int], matrix: torch.Tensor, title: str,
                 labels: tuple[str, ...], font, rescale: bool) -> None:
    """The lower triangle as a heat map, rows labelled ``index token``; ``rescale`` stretches the
    entries below the diagonal to the full colour range (T), else values are shown as they are (S: cosines)."""
    left, top = origin
    draw.text((left, top), title, fill=_TEXT, font=font)
    top += 16
    tokens = matrix.shape[0]
    cell = _cell_size(tokens)
    label_width = 90
    shown = _normalised(matrix.float()) if rescale else matrix.float().tril().clamp(0, 1)
    values = shown.tolist() if tokens else []
    for row in range(tokens):
        if cell >= 8:
            draw.text((left, top + row * cell + (cell - 10) // 2), f"{row} {labels[row]}"[:14], fill=_TEXT, font=font)
        for column in range(row + 1):
            x0, y0 = left + label_width + column * cell, top + row * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=_heat(values[row][column]))


def _tile(token_map: torch.Tensor) -> Image.Image:
    peak = float(token_map.max())
    scaled = (token_map / peak if peak > 0 else token_map).clamp(0, 1)
    pixels = [_heat(float(value)) for value in scaled.flatten()]
    image = Image.new("RGB", (token_map.shape[1], token_map.shape[0]))
    image.putdata(pixels)
    return image.resize((_TILE, _TILE), Image.NEAREST)


def render_maps(record: ImageMaps) -> Image.Image:
    """T, S before/after (lower triangles, row-labelled with the tokens) and each token's
    smoothed cross-attention map before and after alignment."""
    font = ImageFont.load_default()
    labels, sizes = record.target.labels, record.target.chunk_sizes
    target = torch.block_diag(*[chunk.matrix.float().cpu() for chunk in record.target.target])
    before = _similarity_blocks(record.maps_before, sizes)
    panels = [("T (text self-attention)", target, True),
              (f"S before, step {record.step_before} (loss {record.loss_before:.4g})", before, False)]
    rows_of_maps = [("before", record.maps_before, record.step_before)]
    if record.maps_after is not None:
        after = _similarity_blocks(record.maps_after, sizes)
        panels.append((f"S after, step {record.step_after} (loss {record.loss_after:.4g})", after, False))
        rows_of_maps.append(("after", record.maps_after, record.step_after))

    tokens = len(labels)
    cell = _cell_size(tokens)
    panel_width, panel_height = max(90 + cell * tokens + 20, 240), 16 + cell * tokens + 20
    tile_rows = -(-tokens // _TILES_PER_ROW) if tokens else 0
    block_height = 16 + tile_rows * (_TILE + 14)
    width = max(len(panels) * panel_width, _TILES_PER_ROW * (_TILE + 4)) + 20
    height = 24 + panel_height + len(rows_of_maps) * block_height + _LEGEND_HEIGHT + 10
    image = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((10, 6), f"T-SAM: {record.prompt}"[:160], fill=_TEXT, font=font)
    for index, (title, matrix, rescale) in enumerate(panels):
        _draw_matrix(draw, (10 + index * panel_width, 24), matrix, title, labels, font, rescale)
    top = 24 + panel_height
    for name, maps, step in rows_of_maps:
        draw.text((10, top), f"token maps {name} (step {step})", fill=_TEXT, font=font)
        for token in range(tokens):
            x = 10 + (token % _TILES_PER_ROW) * (_TILE + 4)
            y = top + 16 + (token // _TILES_PER_ROW) * (_TILE + 14)
            image.paste(_tile(maps[token].float()), (x, y))
            draw.text((x, y + _TILE), labels[token][:9], fill=_TEXT, font=font)
        top += block_height
    _draw_legend(draw, (10, top + 4), font)
    return image


_LEGEND_HEIGHT = 40
_LEGEND_WIDTH = 240


def _draw_legend(draw: ImageDraw.ImageDraw, origin: tuple[int, int], font) -> None:
    """The colour scale and what 0 and 1 mean on each kind of panel."""
    left, top = origin
    for x in range(_LEGEND_WIDTH):
        draw.line([(left + x, top), (left + x, top + 10)], fill=_heat(x / (_LEGEND_WIDTH - 1)))
    draw.text((left, top + 13), "0", fill=_TEXT, font=font)
    draw.text((left + _LEGEND_WIDTH - 6, top + 13), "1", fill=_TEXT, font=font)
    draw.text((left + _LEGEND_WIDTH + 12, top),
              "T: share of a token's attention, scaled to the largest entry below the diagonal", fill=_TEXT, font=font)
    draw.text((left + _LEGEND_WIDTH + 12, top + 13),
              "S: cosine similarity of two tokens' maps; token maps: scaled to their own peak", fill=_TEXT, font=font)


# --------------------------------------------------------------------------------------------
# Settings, X/Y/Z, callbacks
# --------------------------------------------------------------------------------------------


def _register_xyz_axes() -> None:
    register_xyz_axes("tsam_overrides", controls.xyz_axes(TsamSettings), axis_confirmer(TsamSettings, TsamError, TITLE))


def register_callbacks() -> None:
    """Called by ``scripts/seg_tsam.py`` at every (re)load: the WebUI clears callbacks on reload."""
    script_callbacks.on_before_ui(_register_xyz_axes)
    _register_xyz_axes()
