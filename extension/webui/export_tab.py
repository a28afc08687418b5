"""The "SEG Export" tab and the ``/seg-tsam/*`` API routes.

Imported only inside the WebUI. Handlers are thin: widgets or JSON become an
:class:`~seg_tsam.extension.webui.export_service.ExportRequest`, the work is done by
``extension/webui/export_service.py``, and exceptions become a message (tab) or a status code (API).
onnx, onnxruntime and tensorrt are never imported while the UI is built: the tab only asks
``importlib.util.find_spec`` whether they are installed, and offers to install them (never at
start-up); TensorRT's real availability (a CUDA device it can use) is checked when an export
runs and reported in its result. File paths never
come from a request: the folders are the WebUI's models folder, the names are derived, and
deletes take an engine id or the name of a listed ONNX export (no folder).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from fastapi import Body, FastAPI, HTTPException
from modules import paths, script_callbacks, sd_unet, shared
from modules.call_queue import queue_lock

from . import export_service
from ...export.profiles import PRESETS, preset_for_family
from ...export.onnx_exports import remove_interrupted_exports
from ...export.tensorrt_package import TensorRTOffer, tensorrt_offer
from .export_service import (
    ENGINE_COLUMNS,
    EXPORT_COLUMNS,
    NO_TENSORRT_HINT,
    EngineNotFound,
    ExportFailed,
    ExportNotFound,
    ExportRequest,
    ExportRequestError,
)
from .common import package_installed
from .host import HOST
from .lora_weights import checkpoint_weights

logger = logging.getLogger("seg_tsam")

CUSTOM = "Custom"
#: onnx, onnxruntime and a protobuf the WebUI tolerates, pinned (the tab's install button)
EXPORT_REQUIREMENTS = Path(__file__).resolve().parents[2] / "export" / "requirements-webui.txt"
API_PREFIX = "/seg-tsam"


# --- WebUI glue -------------------------------------------------------------------------------------


def _models_dir() -> str:
    return paths.models_path


@contextlib.contextmanager
def plain_attention(unet) -> Iterator[None]:
    """Trace with the repositories' own attention: undo the WebUI's cross-attention optimisation
    (it replaces ``CrossAttention.forward`` at class level), re-apply the user's choice after."""
    from modules import sd_hijack

    sd_hijack.model_hijack.apply_optimizations("None")
    try:
        yield
    finally:
        sd_hijack.model_hijack.apply_optimizations()


def _state_progress(fraction: float, text: str) -> None:
    """The export's stage and percent where the WebUI reports progress (``/sdapi/v1/progress``)."""
    shared.state.job_count = 1
    shared.state.sampling_steps = 100
    shared.state.sampling_step = round(100 * min(max(fraction, 0.0), 1.0))
    shared.state.textinfo = f"SEG export: {text}"


def run_export(request: ExportRequest, progress=_state_progress) -> export_service.ExportResult:
    """Export under the WebUI's queue lock, so no generation runs on the model meanwhile."""
    with queue_lock:
        shared.state.begin(job="seg_export")
        try:
            # The trace must run the checkpoint's own UNet, not an active SD Unet replacement (which
            # the WebUI routes every UNet call to); the next generation applies the setting again.
            sd_unet.apply_unet("None")
            with checkpoint_weights():  # not the LoRA weights a previous generation left applied
                result = export_service.export_current_checkpoint(
                    shared.sd_model, request, models_dir=_models_dir(), attention_path=plain_attention,
                    progress=progress
                )
            sd_unet.list_unets()  # the new export/engine shows up in Settings → SD Unet
            return result
        finally:
            shared.state.end()


def machine_tensorrt_offer() -> TensorRTOffer:
    """The TensorRT wheel for this WebUI's torch and GPU (see :mod:`...export.tensorrt_package`)."""
    return tensorrt_offer(torch.version.cuda, torch.cuda.is_available())


def tensorrt_notice(offer: TensorRTOffer) -> str:
    """The tab's top line when TensorRT is not installed (empty when it is; the full check runs at export)."""
    if package_installed("tensorrt"):
        return ""
    install = (f"The button installs {offer.reason}." if offer.requirement
               else f"No TensorRT install is offered: {offer.reason}.")
    return f"⚠️ TensorRT is not installed (`import tensorrt` would fail). {NO_TENSORRT_HINT} {install}"


# --- tab handlers -------------------------------------------------------------------------------------


def _custom_profile(images, height, width, chunks, rows_per_image) -> dict[str, Any]:
    def triple(values) -> list[int]:
        return [int(value) for value in values]

    return {"images": triple(images), "height": triple(height), "width": triple(width),
            "prompt_chunks": triple(chunks), "rows_per_image": int(rows_per_image)}


def request_from_widgets(preset: str, layers: str, precision: str, build_engine: bool,
                         *custom: float) -> ExportRequest:
    """Widgets → request. ``custom``: images, height, width, prompt chunks as (min, opt, max) each,
    then rows per image."""
    if preset == CUSTOM:
        ranges = [custom[i:i + 3] for i in range(0, 12, 3)]
        try:
            profile = _custom_profile(*ranges, custom[12])
        except (TypeError, ValueError) as error:
            raise ExportRequestError(f"custom profile: every range needs whole numbers ({error})") from None
        return ExportRequest(preset=None, profile=profile, seg_layers=layers, precision=precision,
                             build_engine=bool(build_engine))
    return ExportRequest(preset=preset, seg_layers=layers, precision=precision, build_engine=bool(build_engine))


#: What the tables' columns are called on screen (the API's lists use the keys in ENGINE_COLUMNS/EXPORT_COLUMNS).
_HEADERS = {"id": "Engine id", "checkpoint": "Checkpoint", "hash": "Hash", "family": "Family", "profile": "Sizes",
            "seg_layers": "SEG layers", "precision": "Precision", "tensorrt": "TensorRT", "gpu": "GPU",
            "file": "File", "LoRA": "LoRA"}


def _headers(columns: tuple[str, ...]) -> list[str]:
    return [_HEADERS.get(column, column) for column in columns]


def _table(columns: tuple[str, ...], rows: list[list[Any]]) -> dict[str, Any]:
    """A Dataframe value that keeps its column names: Gradio 3.41 numbers the columns of an empty list."""
    return {"headers": _headers(columns), "data": rows}


def _first_cell_of_selected_row(table: Any, event: gr.SelectData) -> str:
    """Clicking a row of a table puts its id/file (first column) into the delete box."""
    rows = table.get("data", []) if isinstance(table, dict) else getattr(table, "values", table)
    try:
        return str(list(rows)[event.index[0]][0])
    except (IndexError, TypeError, KeyError):
        return ""


#: Asks before deleting; cancelling sends an empty name, which deletes nothing.
_CONFIRM_DELETE = "(name) => (name && confirm('Delete ' + name + ' and its files?')) ? name : ''"


def _engine_table() -> dict[str, Any]:
    try:
        rows = export_service.engine_rows(export_service.list_engines(_models_dir()))
    except ExportFailed as error:
        logger.warning("SEG export: %s", error)
        rows = []
    return _table(ENGINE_COLUMNS, rows)


def _on_export(progress=gr.Progress(), *values):  # noqa: B008  (gradio passes its tracker through the default)
    """The Export button. Its stages and percent show over the status box and in ``/sdapi/v1/progress``."""
    def report(fraction: float, text: str) -> None:
        _state_progress(fraction, text)
        progress(fraction, desc=text)

    try:
        request = request_from_widgets(*values)
        message = run_export(request, report).to_markdown()
    except ExportRequestError as error:
        message = f"**Invalid request:** {_plain(error)}"
    except ExportFailed as error:
        message = f"**Export failed:** {_plain(error)}"
    except Exception as error:  # the UI must answer with a message, not hang
        logger.exception("SEG export failed")
        message = f"**Export failed unexpectedly:** {type(error).__name__}: {_plain(error)}"
    return message, _engine_table(), _export_table()


def _loaded_family_preset() -> str:
    """The preset for the loaded checkpoint's family (the first one before a model is loaded; reading
    ``shared.sd_model`` would load one)."""
    from modules import sd_models

    model = sd_models.model_data.sd_model
    try:
        family = export_service.checkpoint_facts(model).family if model is not None else None
    except Exception:  # a model the export does not know: the user picks
        family = None
    return (preset_for_family(family) if family else None) or next(iter(PRESETS))


def _plain(error: object) -> str:
    return export_service.plain_markdown(str(error))


def _export_table() -> dict[str, Any]:
    return _table(EXPORT_COLUMNS, export_service.export_rows(export_service.list_exports(_models_dir())))


SD_UNET_RESET = (" It was the selected SD Unet: Settings → SD Unet is now **Automatic**, and the checkpoint's "
                 "own UNet runs.")


NOTHING_SELECTED = "Nothing deleted: click a row of the table first (or the deletion was cancelled)."


def _deleting(selected: str, delete: Callable[[str], str], table: Callable[[], dict[str, Any]]):
    """A delete button: ``delete(name)`` returns the message; then the message under the table, the
    table again, and the selection box (cleared after a deletion, kept after a refusal)."""
    name = (selected or "").strip()
    if not name:
        return NOTHING_SELECTED, table(), ""
    try:
        message = delete(name)
    except (ExportRequestError, ExportNotFound, EngineNotFound, ExportFailed) as error:
        return f"**Not deleted:** {_plain(error)}", table(), name
    sd_unet.list_unets()
    return message, table(), ""


def _delete_export(name: str) -> str:
    deleted = export_service.delete_export(_models_dir(), name)
    message = f"Deleted the ONNX export `{deleted['onnx_file']}` ({', '.join(deleted['removed'])})."
    if _release_if_selected(deleted["label"]):
        message += SD_UNET_RESET
    return message


def _delete_engine(engine_id: str) -> str:
    entry = export_service.delete_engine(_models_dir(), engine_id)
    return f"Deleted engine `{entry['id']}` ({entry['engine_file']})."


def _pip_install(arguments: str, what: str) -> str:
    import launch  # the WebUI's launcher module; only imported on click

    try:
        launch.run_pip(f"install {arguments}", what)
    except Exception as error:
        return f"**Install failed:** {error}"
    return f"Installed {what}. Restart the WebUI to use them."


def _on_install() -> str:
    return _pip_install(f'-r "{EXPORT_REQUIREMENTS}"', "the SEG export packages")


def _on_install_tensorrt() -> str:
    offer = machine_tensorrt_offer()
    if offer.requirement is None:
        return f"**Not installed:** {offer.reason}"
    return _pip_install(f'"{offer.requirement}"', f"TensorRT ({offer.requirement})")


# --- the tab ------------------------------------------------------------------------------------------


def _range_row(label: str, low: int, high: int, step: int, values: tuple[int, int, int]) -> list:
    with gr.Row():
        return [gr.Number(label=f"{label} {part}", value=value, precision=0, minimum=low, maximum=high, step=step)
                for part, value in zip(("min", "opt", "max"), values)]


#: Why the export cannot be used on this host, or ``None`` where it can.
UNAVAILABLE = (f"The SEG export is not available on {HOST.label}. This WebUI never runs \"SD Unet\" "
               "replacements, so an exported UNet or TensorRT engine would not be used. SEG and T-SAM work here, "
               "on the WebUI's own UNet. To export, use AUTOMATIC1111 1.10.1 or its `dev` branch."
               if HOST.is_forge else None)


def on_ui_tabs():
    if UNAVAILABLE:
        with gr.Blocks(analytics_enabled=False) as tab:
            gr.Markdown(f"**{export_service.plain_markdown(UNAVAILABLE)}**", elem_id="seg_export_unavailable")
        return [(tab, "SEG Export", "seg_export")]
    with gr.Blocks(analytics_enabled=False) as tab:
        offer = machine_tensorrt_offer()
        notice = tensorrt_notice(offer)
        with gr.Row(visible=bool(notice)):
            gr.Markdown(notice, elem_id="seg_export_trt_notice")
            install_tensorrt = gr.Button("Install TensorRT", visible=offer.requirement is not None,
                                         elem_id="seg_export_install_tensorrt")
        missing = [package for package in ("onnx", "onnxruntime") if not package_installed(package)]
        with gr.Row(visible=bool(missing)):
            gr.Markdown(f"Not installed: `{'`, `'.join(missing)}` (`onnx` to export, `onnxruntime` to run an "
                        "export as SD Unet). The button installs the versions pinned in "
                        "`export/requirements-webui.txt`.")
            install = gr.Button("Install export packages", elem_id="seg_export_install")
        with gr.Row():
            # a function as the value: evaluated when the page loads, so a checkpoint loaded (or switched)
            # after the UI was built is the one preselected for
            preset = gr.Dropdown(label="Profile", choices=[*PRESETS, CUSTOM], value=_loaded_family_preset,
                                 info="The sizes the engine will take. Preselected for the loaded checkpoint; "
                                      "Custom opens the ranges below.", elem_id="seg_export_preset")
            layers = gr.Textbox(label="SEG layers", value=export_service.DEFAULT_LAYERS, elem_id="seg_export_layers")
            precision = gr.Radio(label="Precision", choices=list(export_service.PRECISIONS), value=default_precision(),
                                 info="Preselected: the precision this WebUI runs its UNet in.",
                                 elem_id="seg_export_precision")
            trt_usable = package_installed("tensorrt")
            build_engine = gr.Checkbox(label="Build TensorRT engine", value=trt_usable, interactive=trt_usable,
                                       info="After the ONNX export, on this GPU." if trt_usable
                                       else "Needs TensorRT (see the notice above).", elem_id="seg_export_build")
        with gr.Accordion("Custom ranges (profile 'Custom')", open=False) as custom_ranges:
            custom = [
                *_range_row("images", 1, 64, 1, (1, 1, 4)),
                *_range_row("height px", 256, 4096, 8, (512, 512, 768)),
                *_range_row("width px", 256, 4096, 8, (512, 512, 768)),
                *_range_row("prompt chunks", 1, 16, 1, (1, 1, 3)),
                gr.Number(label="rows per image", value=3, precision=0, minimum=1, maximum=16),
            ]
        export = gr.Button("Export", variant="primary", elem_id="seg_export_run")
        status = gr.Markdown("", elem_id="seg_export_status")
        gr.Markdown("### ONNX exports\nEach can run as Settings → SD Unet `[SEG ONNX] …`. Click a row to select it.")
        exports = gr.Dataframe(headers=_headers(EXPORT_COLUMNS), value=_export_table, interactive=False,
                               elem_id="seg_export_onnx_files")
        with gr.Row():
            onnx_file = gr.Textbox(label="Selected ONNX export", placeholder="click a row above",
                                   elem_id="seg_export_delete_onnx_name")
            delete_onnx = gr.Button("Delete ONNX export", elem_id="seg_export_delete_onnx")
            refresh = gr.Button("Refresh lists", elem_id="seg_export_refresh")
        exports_status = gr.Markdown("", elem_id="seg_export_onnx_status")
        gr.Markdown("### TensorRT engines\nBuilt from the exports for this GPU; Settings → SD Unet `[SEG TRT] …` "
                    "picks the one that fits each call. Click a row to select it.")
        engines = gr.Dataframe(headers=_headers(ENGINE_COLUMNS), value=_engine_table, interactive=False,
                               elem_id="seg_export_engines")
        with gr.Row():
            engine_id = gr.Textbox(label="Selected engine", placeholder="click a row above",
                                   elem_id="seg_export_delete_id")
            delete = gr.Button("Delete engine", elem_id="seg_export_delete")
        engines_status = gr.Markdown("", elem_id="seg_export_engine_status")

        preset.change(lambda chosen: gr.update(open=chosen == CUSTOM), inputs=[preset], outputs=[custom_ranges],
                      show_progress=False)
        export.click(_on_export, inputs=[preset, layers, precision, build_engine, *custom],
                     outputs=[status, engines, exports])
        exports.select(_first_cell_of_selected_row, inputs=[exports], outputs=[onnx_file], show_progress=False)
        engines.select(_first_cell_of_selected_row, inputs=[engines], outputs=[engine_id], show_progress=False)
        delete.click(lambda selected: _deleting(selected, _delete_engine, _engine_table), inputs=[engine_id],
                     outputs=[engines_status, engines, engine_id], _js=_CONFIRM_DELETE)
        delete_onnx.click(lambda selected: _deleting(selected, _delete_export, _export_table), inputs=[onnx_file],
                          outputs=[exports_status, exports, onnx_file], _js=_CONFIRM_DELETE)
        refresh.click(lambda: (_engine_table(), _export_table()), inputs=[], outputs=[engines, exports])
        install.click(_on_install, inputs=[], outputs=[status])
        install_tensorrt.click(_on_install_tensorrt, inputs=[], outputs=[status])
    return [(tab, "SEG Export", "seg_export")]


def _release_if_selected(label: str) -> bool:
    """Deselect a deleted export's "SD Unet" option if it is the selected one (AUTOMATIC1111: the
    Forge family lists none of ours)."""
    if HOST.is_forge:
        return False
    from . import unet_options  # AUTOMATIC1111's sd_unet classes

    return unet_options.release_if_selected(unet_options.onnx_option_label(label))


# --- API routes ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _http_errors(failure_prefix: str = "") -> Iterator[None]:
    """The export's exceptions as HTTP answers: 422 bad request, 404 unknown engine or export, 500 failure."""
    try:
        yield
    except ExportRequestError as error:
        raise HTTPException(status_code=422, detail=str(error)) from None
    except (EngineNotFound, ExportNotFound) as error:
        raise HTTPException(status_code=404, detail=str(error)) from None
    except ExportFailed as error:
        raise HTTPException(status_code=500, detail=f"{failure_prefix}{error}") from None


def default_precision() -> str:
    """The precision the WebUI runs its UNet in: fp32 under ``--no-half`` (GTX 16xx, AMD, Mac, CPU),
    where an fp16 export fails (``mat1 and mat2 must have the same dtype``), else fp16. Read from the
    command line as well as from ``devices.dtype_unet``: the WebUI sets that only when a model loads,
    and the tab may be built before the first load finishes. (Forge Neo has no ``--no-half``.)"""
    import torch
    from modules import devices, shared

    no_half = getattr(shared.cmd_opts, "no_half", False)
    return "fp32" if no_half or devices.dtype_unet == torch.float32 else "fp16"


def _api_export(body: Any = Body(...)) -> dict[str, Any]:
    if UNAVAILABLE:
        raise HTTPException(status_code=409, detail=UNAVAILABLE)
    with _http_errors():
        request = ExportRequest.from_json(body, default_precision=default_precision())
    with _http_errors("export failed: "):
        return {"request": request.to_dict(), **run_export(request).to_dict()}


def _api_engines() -> dict[str, Any]:
    with _http_errors():
        return {"engines": export_service.list_engines(_models_dir())}


def _api_delete(engine_id: str) -> dict[str, Any]:
    with _http_errors():
        deleted = export_service.delete_engine(_models_dir(), engine_id)
    sd_unet.list_unets()
    return {"deleted": deleted}


def _api_exports() -> dict[str, Any]:
    return {"exports": export_service.list_exports(_models_dir())}


def _api_delete_export(onnx_file: str) -> dict[str, Any]:
    with _http_errors():
        deleted = export_service.delete_export(_models_dir(), onnx_file)
    sd_unet.list_unets()
    reset = _release_if_selected(deleted["label"])
    return {"deleted": deleted, "sd_unet_reset": reset}


def _api_status() -> dict[str, Any]:
    """What the export can do here, without importing the heavy packages."""
    offer = machine_tensorrt_offer()
    return {"available": UNAVAILABLE is None, "unavailable_reason": UNAVAILABLE,
            "onnx_installed": package_installed("onnx"),
            "onnxruntime_installed": package_installed("onnxruntime"),
            "tensorrt_installed": package_installed("tensorrt"),
            "tensorrt_offer": {"requirement": offer.requirement, "reason": offer.reason},
            "presets": list(PRESETS), "precisions": list(export_service.PRECISIONS),
            "default_precision": default_precision()}


def on_app_started(_demo, app: FastAPI) -> None:
    removed = remove_interrupted_exports(export_service.onnx_folder(_models_dir()))
    if removed:
        logger.warning("SEG export: removed the working folders of interrupted exports: %s", ", ".join(removed))
    # sync handlers: FastAPI runs them in its thread pool, so a long export blocks no event loop
    app.add_api_route(f"{API_PREFIX}/export", _api_export, methods=["POST"])
    app.add_api_route(f"{API_PREFIX}/export/status", _api_status, methods=["GET"])
    app.add_api_route(f"{API_PREFIX}/engines", _api_engines, methods=["GET"])
    app.add_api_route(f"{API_PREFIX}/engines/{{engine_id}}", _api_delete, methods=["DELETE"])
    app.add_api_route(f"{API_PREFIX}/exports", _api_exports, methods=["GET"])
    app.add_api_route(f"{API_PREFIX}/exports/{{onnx_file}}", _api_delete_export, methods=["DELETE"])


def register_callbacks() -> None:
    """Called by ``scripts/seg_tsam.py`` at every (re)load: the WebUI clears callbacks on reload."""
    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_app_started(on_app_started)
