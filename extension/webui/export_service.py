"""Export the WebUI's current checkpoint: request validation, file naming, export, engine, registry.

Shared by the "SEG Export" tab and the API routes (``extension/webui/export_tab.py``), which only
translate widgets or JSON into an :class:`ExportRequest` and exceptions into messages. Nothing
here imports gradio or ``modules.*``: the caller passes the WebUI objects in (the loaded
``sd_model``, the models folder, the attention-path context manager).

File names are derived from the checkpoint hash, the SEG layers and the precision, never taken
from a request; engines are deleted by registry id only. onnx and tensorrt are imported inside
the functions that need them (through ``onnx_export``/``engine_build``), never at import.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...export.onnx_export import DEFAULT_OPSET, AttentionPath
from ...export.onnx_exports import OnnxExportInfo, list_onnx_exports, remove_onnx_export, write_export_info
from ...export.profiles import PRECISIONS, PRESET_FAMILIES, PRESETS, EngineProfile, ProfileError, preset_for_family, preset_profile
from ..core.layers import LayerSpecError, parse_layer_spec
from ...export.refit import RefitMap, sidecar_path, weight_map
from ...export.registry import EngineRegistry, RegistryError, normalize_layers

ONNX_FOLDER = "Unet-seg-onnx"
ENGINE_FOLDER = "Unet-seg-trt"
TIMING_CACHE_FOLDER = "timing-cache"  #: inside the engine folder
DEFAULT_LAYERS = "mid"
MAX_LAYERS_LENGTH = 64
NO_TENSORRT_HINT = "ONNX export still works; engines need TensorRT and a CUDA GPU."

_ENGINE_ID = re.compile(r"^[0-9a-f]{16}$")
_ONNX_NAME = re.compile(r"^[A-Za-z0-9_-]{1,160}\.onnx$")  #: what onnx_file_name makes
_REQUEST_FIELDS = frozenset({"preset", "profile", "seg_layers", "precision", "build_engine"})

#: ``progress(fraction in [0, 1], text)``; the tab maps it to Gradio, the API to ``shared.state``.
Progress = Callable[[float, str], None]


class ExportRequestError(ValueError):
    """A request the export cannot run (the API answers 422 with this message)."""


class EngineNotFound(LookupError):
    """A well-formed engine id that the registry does not know (the API answers 404)."""


class ExportNotFound(LookupError):
    """A well-formed ONNX export name that the export folder does not list (the API answers 404)."""


class ExportFailed(RuntimeError):
    """The export itself failed (model, tracing, static check, engine build); the message says where."""


# --- the request ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportRequest:
    """What to export: a preset *or* a custom profile, the SEG layers, the precision, and
    whether to build a TensorRT engine (only done when TensorRT is usable here).

    ``profile`` is a custom :class:`EngineProfile` (or its dict form, parsed here); when given,
    ``preset`` must be ``None``.
    """

    preset: str | None = "SD1.x 512-768"
    profile: EngineProfile | Mapping[str, Any] | None = None
    seg_layers: str = DEFAULT_LAYERS
    precision: str = "fp16"
    build_engine: bool = True

    def __post_init__(self) -> None:
        if self.profile is not None:
            if self.preset is not None:
                raise ExportRequestError("give either a preset or a custom profile, not both")
            if not isinstance(self.profile, EngineProfile):
                try:
                    object.__setattr__(self, "profile", EngineProfile.from_dict(self.profile))
                except (ProfileError, TypeError) as error:
                    raise ExportRequestError(f"custom profile: {error}") from None
        elif self.preset is None:
            raise ExportRequestError(f"choose a preset ({', '.join(PRESETS)}) or give a custom profile")
        elif not isinstance(self.preset, str) or self.preset not in PRESETS:
            raise ExportRequestError(f"unknown preset {self.preset!r}; choose one of {list(PRESETS)}")
        object.__setattr__(self, "seg_layers", check_layers(self.seg_layers))
        if self.precision not in PRECISIONS:
            raise ExportRequestError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.build_engine, bool):
            raise ExportRequestError(f"build_engine must be true or false, got {self.build_engine!r}")

    @property
    def engine_profile(self) -> EngineProfile:
        if isinstance(self.profile, EngineProfile):
            return self.profile
        return preset_profile(self.preset)  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, body: Any, *, default_precision: str = "fp16") -> ExportRequest:
        """Parse an API body; unknown fields are an error (a typo must not be silently ignored).
        ``default_precision`` is used when the body names none (the WebUI passes how it runs the UNet)."""
        if not isinstance(body, Mapping):
            raise ExportRequestError(f"expected a JSON object, got {type(body).__name__}")
        unknown = sorted(set(body) - _REQUEST_FIELDS)
        if unknown:
            raise ExportRequestError(f"unknown field(s) {unknown}; known: {sorted(_REQUEST_FIELDS)}")
        values = {"precision": default_precision, **body}
        if values.get("profile") is not None and "preset" not in values:
            values["preset"] = None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "profile": self.engine_profile.to_dict(),
            "seg_layers": self.seg_layers,
            "precision": self.precision,
            "build_engine": self.build_engine,
        }


def check_layers(layers: Any) -> str:
    """A layer spec SEG's own parser accepts (``"mid"``, ``"d2,m0"`` …); the model checks the counts."""
    if isinstance(layers, str) and len(layers) > MAX_LAYERS_LENGTH:
        raise ExportRequestError(f"SEG layers: at most {MAX_LAYERS_LENGTH} characters, got {len(layers)}")
    try:
        parse_layer_spec(layers)
    except LayerSpecError as error:
        raise ExportRequestError(f"SEG layers: {error}") from None
    return layers.strip()


def check_engine_id(engine_id: Any) -> str:
    """``engine_id`` if it has the registry's id form (16 hex digits), else :class:`ExportRequestError`."""
    if not isinstance(engine_id, str) or not _ENGINE_ID.fullmatch(engine_id):
        raise ExportRequestError(f"not an engine id (16 hex digits): {str(engine_id)[:40]!r}")
    return engine_id


def check_onnx_name(name: Any) -> str:
    """``name`` if it has the form of an export's file name (no folder), else :class:`ExportRequestError`."""
    if not isinstance(name, str) or not _ONNX_NAME.fullmatch(name):
        raise ExportRequestError(f"not an ONNX export name (like 'abc1234567_mid_fp16.onnx'): {str(name)[:80]!r}")
    return name


# --- names and folders ----------------------------------------------------------------------------


def onnx_file_name(checkpoint_hash: str, seg_layers: str, precision: str) -> str:
    """``<hash>_<layers>_<precision>.onnx``, with every part reduced to file-name-safe characters."""
    parts = [re.sub(r"[^A-Za-z0-9-]+", "-", part).strip("-") for part in
             (checkpoint_hash, normalize_layers(seg_layers).replace(",", "-"), precision)]
    if not all(parts):
        raise ExportRequestError(f"cannot name an export from {checkpoint_hash!r}, {seg_layers!r}, {precision!r}")
    return "_".join(parts) + ".onnx"


def plain_markdown(text: str) -> str:
    """``text`` shown as itself in a Markdown block: ``<i>``, ``*`` and ``_`` are not markup."""
    return html.escape(text).replace("*", "\\*").replace("_", "\\_")


def onnx_folder(models_dir: Path | str) -> Path:
    return Path(models_dir) / ONNX_FOLDER


def engine_folder(models_dir: Path | str) -> Path:
    return Path(models_dir) / ENGINE_FOLDER


# --- the model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointFacts:
    """What the export needs to know about the loaded WebUI model."""

    short_hash: str
    name: str
    flavour: str  #: "ldm" (SD1.x/SD2.x) or "sgm" (SDXL)
    family: str  #: "sd1", "sd2" or "sdxl"


def checkpoint_facts(sd_model: Any) -> CheckpointFacts:
    """Hash, name, flavour and family of the WebUI's loaded ``sd_model``.

    The short hash is the WebUI's own (first 10 hex digits of the file's sha256); it is computed
    (and cached by the WebUI) when the checkpoint was loaded without one.
    """
    if sd_model is None:
        raise ExportFailed("no checkpoint is loaded")
    info = getattr(sd_model, "sd_checkpoint_info", None)
    if info is None:
        raise ExportFailed("the loaded model has no checkpoint information (sd_checkpoint_info)")
    short_hash = getattr(info, "shorthash", None)
    if not short_hash and hasattr(info, "calculate_shorthash"):
        short_hash = info.calculate_shorthash()
    if not short_hash:
        raise ExportFailed(f"could not compute the hash of checkpoint {getattr(info, 'name', '?')}")
    if getattr(sd_model, "is_sdxl", False):
        flavour, family = "sgm", "sdxl"
    else:
        flavour, family = "ldm", "sd2" if getattr(sd_model, "is_sd2", False) else "sd1"
    return CheckpointFacts(str(short_hash), str(getattr(info, "name", "") or ""), flavour, family)


# --- the export -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    """What happened, for the tab's Markdown and the API's JSON."""

    onnx_file: str  #: relative to the models folder, e.g. "Unet-seg-onnx/abc123_mid_fp16.onnx"
    levels: tuple[int, ...]
    static_check_ok: bool
    static_check_summary: str
    engine_built: bool
    engine_id: str | None = None
    engine_file: str | None = None  #: relative to the models folder
    engine_not_built_reason: str | None = None
    messages: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "onnx_file": self.onnx_file,
            "levels": list(self.levels),
            "static_check": {"ok": self.static_check_ok, "summary": self.static_check_summary},
            "engine_built": self.engine_built,
            "engine_id": self.engine_id,
            "engine_file": self.engine_file,
            "engine_not_built_reason": self.engine_not_built_reason,
            "messages": list(self.messages),
        }

    def to_markdown(self) -> str:
        lines = [f"**ONNX written:** `{self.onnx_file}` (blur levels {', '.join(map(str, self.levels))})",
                 f"**Static check:** {'passed' if self.static_check_ok else 'FAILED'}: {self.static_check_summary}"]
        if self.engine_built:
            lines.append(f"**TensorRT engine:** `{self.engine_file}` (id `{self.engine_id}`)")
        else:
            lines.append(f"**No TensorRT engine built:** {self.engine_not_built_reason}")
        return "\n\n".join(lines)


def _no_progress(fraction: float, text: str) -> None:
    return None


def export_current_checkpoint(
    sd_model: Any,
    request: ExportRequest,
    *,
    models_dir: Path | str,
    attention_path: AttentionPath,
    progress: Progress | None = None,
    tensorrt_check: Callable[[], tuple[bool, str]] | None = None,
) -> ExportResult:
    """Export ``sd_model``'s UNet with SEG at ``request.seg_layers`` to
    ``models_dir/Unet-seg-onnx/<hash>_<layers>_<precision>.onnx``, check it, and, when asked and
    TensorRT is usable, build and register an engine in ``models_dir/Unet-seg-trt``. Beside the
    ONNX file go its info (``.json``) and refit map (``.onnx.refit.json``, for LoRA).

    The UNet's weights are exported as they are: the caller makes them the checkpoint's own
    (the WebUI glue takes applied LoRA weights off first).

    ``attention_path`` selects the plain attention path while tracing (see ``onnx_export``).
    ``tensorrt_check`` defaults to :func:`engine_build.tensorrt_available`. Raises
    :class:`ExportRequestError` for a layer spec the model rejects and :class:`ExportFailed`
    for everything else; an existing export of the same name is replaced only by a complete one.
    """
    from ...export.onnx_checks import check_onnx_for_tensorrt
    from ...export.onnx_export import OnnxExportError, export_onnx
    from ...export.seg_unet import SegExportUNet

    report = progress or _no_progress
    facts = checkpoint_facts(sd_model)
    unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    if unet is None:
        raise ExportFailed("the loaded model has no UNet (sd_model.model.diffusion_model)")
    if request.preset is not None and facts.family not in PRESET_FAMILIES.get(request.preset, (facts.family,)):
        suggestion = preset_for_family(facts.family)
        raise ExportRequestError(
            f"the preset {request.preset!r} is for {'/'.join(PRESET_FAMILIES[request.preset])} checkpoints, the loaded "
            f"one is {facts.family}; choose {suggestion!r} or a custom profile" if suggestion else
            f"the preset {request.preset!r} is not for {facts.family} checkpoints; give a custom profile")
    report(0.05, f"preparing the {facts.family} UNet of {facts.name or facts.short_hash}")
    try:
        wrapper = SegExportUNet(unet, flavour=facts.flavour, layers=request.seg_layers)
    except LayerSpecError as error:
        raise ExportRequestError(f"SEG layers {request.seg_layers!r}: {error}") from None
    except Exception as error:
        raise ExportFailed(f"could not prepare the UNet for export: {type(error).__name__}: {error}") from error

    folder = onnx_folder(models_dir)
    folder.mkdir(parents=True, exist_ok=True)
    name = onnx_file_name(facts.short_hash, request.seg_layers, request.precision)
    report(0.1, f"exporting {name} (tracing the UNet, this takes a while)")
    try:
        path = export_onnx(wrapper, folder / name, opset=DEFAULT_OPSET, dtype=request.precision,
                           attention_path=attention_path)
    except OnnxExportError as error:
        raise ExportFailed(str(error)) from error
    report(0.55, "mapping the export's weights to the UNet (for LoRA)")
    refit_map = weight_map(path, unet)  # now, while the UNet holds the exported weights
    refit_map.save(sidecar_path(path))
    write_export_info(path, OnnxExportInfo(onnx_file=name, checkpoint_hash=facts.short_hash,
                                           checkpoint_name=facts.name, family=facts.family,
                                           seg_layers=normalize_layers(request.seg_layers),
                                           precision=request.precision))
    report(0.6, "checking the graph for TensorRT")
    check = check_onnx_for_tensorrt(path)
    result = dict(onnx_file=f"{ONNX_FOLDER}/{name}", levels=tuple(wrapper.levels),
                  static_check_ok=check.ok, static_check_summary=check.summary())
    if not request.build_engine:
        return ExportResult(**result, engine_built=False, engine_not_built_reason="not requested")
    if not check.ok:
        return ExportResult(**result, engine_built=False,
                            engine_not_built_reason="the graph failed the TensorRT static check")
    if tensorrt_check is None:
        from ...export.engine_build import tensorrt_available as tensorrt_check
    ok, reason = tensorrt_check()
    if not ok:
        return ExportResult(**result, engine_built=False, engine_not_built_reason=f"{reason}. {NO_TENSORRT_HINT}")
    entry = _build_and_register(path, request, facts, models_dir, refit_map=refit_map,
                                layer_names=tuple(site.layer.name for site in wrapper.sites),
                                in_channels=getattr(unet, "in_channels", None), progress=report)
    report(1.0, "done")
    return ExportResult(**result, engine_built=True, engine_id=entry.id,
                        engine_file=f"{ENGINE_FOLDER}/{entry.engine_file}")


def _build_and_register(onnx_path: Path, request: ExportRequest, facts: CheckpointFacts, models_dir: Path | str,
                        *, refit_map: RefitMap, layer_names: tuple[str, ...], in_channels: int | None,
                        progress: Progress):
    """Build the engine for ``onnx_path`` into the engine folder and add it to the registry.

    The engine is built refittable, with the export's refit map (ONNX weight → UNet parameter;
    the engine's weights keep the ONNX names) beside it, so LoRA weights can be refitted.
    UNVERIFIED: needs TensorRT and a GPU.
    """
    import tensorrt  # only reached when tensorrt_available() said yes

    from ...export.engine_build import BuildOptions, EngineBuildError, build_unet_engine, current_compute_capability
    from ...export.profiles import model_family
    from ...export.registry import EngineEntry, EngineKey

    folder = engine_folder(models_dir)
    folder.mkdir(parents=True, exist_ok=True)
    registry = EngineRegistry(folder)
    capability = current_compute_capability()
    key = EngineKey(checkpoint_hash=facts.short_hash, profile=request.engine_profile,
                    seg_layers=request.seg_layers, trt_version=tensorrt.__version__,
                    compute_capability=capability, precision=request.precision)
    engine_name = registry.engine_file_name(key, facts.name)

    def on_build(step) -> None:
        progress(0.65 + 0.3 * step.fraction, f"building the TensorRT engine: {step.phase}")

    try:
        build_unet_engine(onnx_path, folder / engine_name, request.engine_profile, model_family(facts.family),
                          in_channels=in_channels, on_progress=on_build,
                          options=BuildOptions(timing_cache_dir=folder / TIMING_CACHE_FOLDER,
                                               compute_capability=capability, refittable=True))
    except EngineBuildError as error:
        raise ExportFailed(f"TensorRT engine build failed: {error}") from error
    refit_file = refit_map.save(sidecar_path(folder / engine_name))
    entry = EngineEntry(key=key, engine_file=engine_name, extra_files=(refit_file.name,), checkpoint_name=facts.name,
                        family=facts.family, preset=request.preset, refittable=True, seg_layer_names=layer_names,
                        onnx_file=onnx_path.name)
    registry.add(entry)
    return entry


# --- engines: list and delete ---------------------------------------------------------------------


ENGINE_COLUMNS = ("id", "checkpoint", "hash", "family", "profile", "seg_layers", "precision", "tensorrt", "gpu", "file")


def list_engines(models_dir: Path | str) -> list[dict[str, Any]]:
    """Every registered engine as a dict (the registry's entry fields plus ``file_present``)."""
    registry = EngineRegistry(engine_folder(models_dir))
    try:
        entries = registry.entries()
    except RegistryError as error:
        raise ExportFailed(f"the engine registry cannot be read: {error}") from error
    engines = []
    for entry in entries:
        values = entry.to_dict()
        values["profile_description"] = entry.key.profile.describe()
        values["file_present"] = (registry.folder / entry.engine_file).is_file()
        engines.append(values)
    return engines


def engine_rows(engines: list[dict[str, Any]]) -> list[list[Any]]:
    """Table rows in :data:`ENGINE_COLUMNS` order, for the tab's Dataframe."""
    return [[engine["id"], engine["checkpoint_name"], engine["checkpoint_hash"], engine["family"],
             engine["preset"] or engine["profile_description"], engine["seg_layers"], engine["precision"],
             engine["trt_version"], engine["compute_capability"],
             engine["engine_file"] if engine["file_present"] else f"{engine['engine_file']} (missing)"]
            for engine in engines]


def delete_engine(models_dir: Path | str, engine_id: Any) -> dict[str, Any]:
    """Delete the engine ``engine_id`` (entry and files); return its entry as a dict.

    :class:`ExportRequestError` for a malformed id, :class:`EngineNotFound` for an unknown one.
    """
    engine_id = check_engine_id(engine_id)
    registry = EngineRegistry(engine_folder(models_dir))
    if registry.get(engine_id) is None:
        raise EngineNotFound(f"no engine with id {engine_id}")
    try:
        return registry.delete(engine_id).to_dict()
    except RegistryError as error:
        raise ExportFailed(f"could not delete engine {engine_id}: {error}") from error


# --- ONNX exports: list and delete --------------------------------------------------------------------


EXPORT_COLUMNS = ("file", "checkpoint", "hash", "family", "seg_layers", "precision", "LoRA")


def list_exports(models_dir: Path | str) -> list[dict[str, Any]]:
    """Every listed ONNX export as a dict (its info plus ``lora_ready``: its refit map is present)."""
    folder = onnx_folder(models_dir)
    return [{**asdict(info), "label": info.label, "lora_ready": sidecar_path(folder / info.onnx_file).is_file()}
            for info in list_onnx_exports(folder)]


def export_rows(exports: list[dict[str, Any]]) -> list[list[Any]]:
    """Table rows in :data:`EXPORT_COLUMNS` order, for the tab's Dataframe."""
    return [[export["onnx_file"], export["checkpoint_name"], export["checkpoint_hash"], export["family"],
             export["seg_layers"], export["precision"], "yes" if export["lora_ready"] else "export again"]
            for export in exports]


def delete_export(models_dir: Path | str, onnx_file: Any) -> dict[str, Any]:
    """Delete the listed export ``onnx_file`` (info, ONNX, external data, refit map); return its
    info and the removed file names. :class:`ExportRequestError` for a malformed name,
    :class:`ExportNotFound` for one that is not listed. Engines built from it stay."""
    name = check_onnx_name(onnx_file)
    folder = onnx_folder(models_dir)
    info = next((info for info in list_onnx_exports(folder) if info.onnx_file == name), None)
    if info is None:
        raise ExportNotFound(f"no ONNX export named {name}")
    path = folder / name
    try:
        removed = remove_onnx_export(path)
    except OSError as error:
        raise ExportFailed(f"could not delete {name}: {error}") from error
    return {**asdict(info), "label": info.label, "removed": removed}
