"""This extension's entries in the WebUI's "SD Unet" setting: exported SEG UNets run in its place.

- ``[SEG TRT] <checkpoint>``: one per checkpoint with registered TensorRT engines (listed when
  ``tensorrt`` is installed). Its ``model_name`` is the checkpoint's, so "Automatic" picks it.
  For each call the registry chooses the engine (profile, SEG layers, TensorRT version, GPU).
- ``[SEG ONNX] <checkpoint> (<layers>, <precision>)``: one per exported ONNX file, run by ONNX
  Runtime (the portable path; on a GPU slower than TensorRT; its CUDA provider with
  ``onnxruntime-gpu``). Never picked by "Automatic".

Both run every row of a step (cond, uncond, SEG twins) in one call with the blur matrices of the
current σ (:class:`~seg_tsam.export.unet_runtime.ReplacementUNet`); calls they cannot take run
on the checkpoint's PyTorch UNet, with the reason in the console and the progress text. LoRA
networks in the prompt are applied to the export (a TensorRT refit, a new ONNX Runtime session)
once per change of networks or multipliers (:mod:`.lora_weights`); with hypernetworks every call
runs on PyTorch.

The WebUI moves the PyTorch UNet to the CPU while a replacement is active; the first fallback
moves it back to the call's device (it stays there until the replacement is deactivated).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from modules import paths, script_callbacks, sd_models, sd_unet, shared

from ...export.onnx_exports import OnnxExportInfo, list_onnx_exports
from ...export.ort_session import OnnxExportSessions, onnxruntime_providers
from ...export.registry import EngineEntry, EngineRegistry, RegistryError
from ...export.unet_runtime import EngineCannotRun, ReplacementUNet, SessionChooser, fallback_note
from .export_service import checkpoint_facts, engine_folder, onnx_folder
from .common import REPLACEMENT_UNET_MARKER, package_installed
from .lora_weights import current_weights
from ..adapters.a1111.seg_sampling import active_blur

logger = logging.getLogger("seg_tsam")

TRT_PREFIX = "[SEG TRT]"
ONNX_PREFIX = "[SEG ONNX]"


# --- the PyTorch side -------------------------------------------------------------------------------


def _pytorch_unet() -> torch.nn.Module:
    return shared.sd_model.model.diffusion_model


def loaded_checkpoint_hash() -> str:
    """The loaded checkpoint's short hash, as the export recorded it for its checkpoint."""
    return checkpoint_facts(shared.sd_model).short_hash


def pytorch_forward(x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, *args: Any,
                    **kwargs: Any) -> torch.Tensor:
    """The checkpoint's own UNet, bypassing the replacement (the class forward the WebUI patched)."""
    unet = _pytorch_unet()
    if not getattr(shared.sd_model, "lowvram", False):  # low/med VRAM move blocks to the GPU themselves
        parameter = next(unet.parameters())
        if parameter.device != x.device:
            unet.to(x.device)
    from modules import sd_hijack  # AUTOMATIC1111 only (Forge Neo has none; these options register only there)

    original = sd_hijack.sgm_original_forward if shared.sd_model.is_sdxl else sd_hijack.ldm_original_forward
    return original(unet, x, timesteps, context, *args, **kwargs)


# --- the replacement -----------------------------------------------------------------------------------


class SegReplacementUnet(sd_unet.SdUnet):
    """The WebUI's ``SdUnet`` for one option: a :class:`ReplacementUNet` over ``make_chooser()``."""

    def __init__(self, label: str, make_chooser: Callable[[], SessionChooser]):
        super().__init__()
        setattr(self, REPLACEMENT_UNET_MARKER, True)
        self.label = label
        self.make_chooser = make_chooser
        self.runtime: ReplacementUNet | None = None

    def activate(self) -> None:
        self.runtime = ReplacementUNet(choose_session=self.make_chooser(), blur=lambda: active_blur(_pytorch_unet()),
                                       fallback=pytorch_forward, notice=self._notice,
                                       weights=current_weights)

    def deactivate(self) -> None:
        self.runtime = None  # drops the sessions (engine memory) with it
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def forward(self, x, timesteps, context, *args, **kwargs):
        if self.runtime is None:
            self.activate()
        return self.runtime.forward(x, timesteps, context, *args, **kwargs)

    def _notice(self, reason: str) -> None:
        message = f"{self.label} not used for this call, running the PyTorch UNet: {reason}"
        logger.warning(message)
        shared.state.textinfo = message


class GenerationCalls:
    """Where one generation's UNet calls ran, for its infotext: a snapshot of the active
    replacement's counts when the generation starts, compared when its images are saved."""

    def __init__(self):
        self.unet = sd_unet.current_unet if isinstance(sd_unet.current_unet, SegReplacementUnet) else None
        runtime = None if self.unet is None else self.unet.runtime
        self.sessions_before = 0 if runtime is None else runtime.session_calls
        self.fallbacks_before = Counter() if runtime is None else Counter(runtime.fallbacks)

    def note(self) -> str | None:
        runtime = None if self.unet is None else self.unet.runtime
        if runtime is None or self.unet is not sd_unet.current_unet:
            return None
        fallbacks = runtime.fallbacks - self.fallbacks_before
        calls = runtime.session_calls - self.sessions_before + sum(fallbacks.values())
        return fallback_note(self.unet.label, calls, fallbacks)


class SegUnetOption(sd_unet.SdUnetOption):
    def __init__(self, label: str, model_name: str | None, make_chooser: Callable[[], SessionChooser]):
        self.label = label
        self.model_name = model_name
        self.make_chooser = make_chooser

    def create_unet(self) -> SegReplacementUnet:
        return SegReplacementUnet(self.label, self.make_chooser)


# --- listing -------------------------------------------------------------------------------------------


def _model_name(checkpoint_name: str) -> str:
    """The WebUI's ``CheckpointInfo.model_name`` for a checkpoint's name (what "Automatic" matches)."""
    info = sd_models.get_closet_checkpoint_match(checkpoint_name) if checkpoint_name else None
    return info.model_name if info else os.path.splitext(checkpoint_name.replace("/", "_").replace("\\", "_"))[0]


def _onnx_option(info: OnnxExportInfo, folder: Path) -> SegUnetOption:
    def make_chooser() -> SessionChooser:
        return OnnxExportSessions(folder / info.onnx_file, checkpoint_hash=info.checkpoint_hash,
                                  current_checkpoint_hash=loaded_checkpoint_hash,
                                  providers=onnxruntime_providers(shared.device))

    return SegUnetOption(onnx_option_label(info.label), None, _or_refusal(make_chooser))


def onnx_option_label(export_label: str) -> str:
    """The SD Unet option of an ONNX export, e.g. ``[SEG ONNX] tiny-sd1 (mid, fp32)``."""
    return f"{ONNX_PREFIX} {export_label}"


def release_if_selected(option_label: str) -> bool:
    """After its files were deleted: if ``option_label`` is the selected SD Unet, select
    "Automatic" and put the checkpoint's own UNet back. Returns whether it was selected."""
    if shared.opts.sd_unet != option_label:
        return False
    shared.opts.set("sd_unet", "Automatic")
    sd_unet.apply_unet("None")
    return True


def _trt_option(checkpoint_name: str, hashes: frozenset[str], registry: EngineRegistry) -> SegUnetOption:
    def make_chooser() -> SessionChooser:
        import tensorrt

        from ...export.engine_build import current_compute_capability
        from ...export.trt_runtime import RegistryEngines

        if not torch.cuda.is_available():
            raise EngineCannotRun("TensorRT engines need a CUDA GPU")
        engines = RegistryEngines(registry, checkpoint_hash=loaded_checkpoint_hash, trt_version=tensorrt.__version__,
                                  compute_capability=current_compute_capability(),
                                  onnx_folder=onnx_folder(paths.models_path))

        def choose(call, blur, extra_names):
            loaded = loaded_checkpoint_hash()
            if loaded not in hashes:
                raise EngineCannotRun(f"its engines are for {checkpoint_name}, the loaded checkpoint is {loaded}")
            return engines(call, blur, extra_names)

        return choose

    return SegUnetOption(f"{TRT_PREFIX} {checkpoint_name}", _model_name(checkpoint_name), _or_refusal(make_chooser))


def _or_refusal(make_chooser: Callable[[], SessionChooser]) -> Callable[[], SessionChooser]:
    """``make_chooser``, or, if it fails (runtime missing …), a chooser refusing every call with why."""

    def make() -> SessionChooser:
        try:
            return make_chooser()
        except Exception as error:  # an unusable option must not break generation: PyTorch runs instead
            reason = str(error) if isinstance(error, EngineCannotRun) else f"{type(error).__name__}: {error}"

            def refuse(call, blur, extra_names):
                raise EngineCannotRun(reason)

            return refuse

    return make


def list_unet_options(options: list) -> None:
    """``script_callbacks.on_list_unets``: add our options (cheap: reads only small index files)."""
    onnx_dir = onnx_folder(paths.models_path)
    options.extend(_onnx_option(info, onnx_dir) for info in list_onnx_exports(onnx_dir))
    if not package_installed("tensorrt"):
        return
    registry = EngineRegistry(engine_folder(paths.models_path))
    try:
        entries: tuple[EngineEntry, ...] = registry.entries()
    except RegistryError as error:
        logger.warning("SEG: the engine registry cannot be read, no TensorRT UNets listed: %s", error)
        return
    hashes: dict[str, set[str]] = {}  # checkpoint name -> its hashes (a re-saved checkpoint keeps its name)
    for entry in entries:
        hashes.setdefault(entry.checkpoint_name or entry.key.checkpoint_hash, set()).add(entry.key.checkpoint_hash)
    options.extend(_trt_option(name, frozenset(known), registry) for name, known in hashes.items())


def register_callbacks() -> None:
    script_callbacks.on_list_unets(list_unet_options)
