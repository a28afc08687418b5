"""Export a :class:`~seg_tsam.export.seg_unet.SegExportUNet` to ONNX for TensorRT.

Choices (research/tensorrt-onnx.md §3, §6):

- The legacy TorchScript exporter (``dynamo=False``) with explicit ``dynamic_axes``: batch,
  latent height/width, token count (75-token chunks: 77·k tokens; ONNX cannot express the
  multiple, so engine profiles should use multiples of 77) and each blur level's grid sides.
  Its opsets reach 20, which is also the top of TensorRT 10's parser range; default 17.
- The plain attention path is chosen explicitly while tracing. diffusers:
  :func:`plain_diffusers_attention` (``AttnProcessor``: matmul, softmax, matmul, not SDPA),
  restored afterwards. ldm/sgm: the WebUI swaps ``CrossAttention.forward`` *at class level*
  for its attention optimisation (``modules/sd_hijack_optimizations.py``), so the export cannot
  pick the path by itself: the caller passes ``attention_path``, a callable taking the UNet
  and returning a context manager that installs the plain forward (in the WebUI, e.g. one that
  undoes the optimisation and re-applies it on exit) — or :func:`keep_installed_attention` to
  trace whatever forward is installed (the repositories' own ``CrossAttention``: einsum +
  softmax in ldm, SDPA in sgm, which this exporter writes as MatMul/Softmax/MatMul).
- Guidance patches (SEG's or T-SAM's hooks) must be gone before tracing: a UNet with forward
  hooks is refused unless ``allow_foreign_hooks``.
- Every stage raises :class:`OnnxExportError` with a clear message, and the file appears at
  ``path`` only complete: everything is written into a temporary folder beside it and renamed
  into place last (the ONNX file last of all, after its external data file), the temporary
  folder removed whatever happens. Weights above 2 GiB go to one external data file
  ``<name>.<token>.data`` beside the model (TensorRT's ``parse_from_file`` reads it); the
  data of a replaced export is removed after the new one is in place.
- onnx and onnxruntime are imported inside functions, never at module import.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import nn

from .onnx_checks import OnnxCheckError, check_onnx_for_tensorrt
from .onnx_exports import new_data_file_name
from .profiles import PRECISIONS
from .seg_unet import CONTEXT, OUTPUT, SAMPLE, TOKENS_PER_CHUNK, SegExportUNet, blur_input_names

logger = logging.getLogger("seg_tsam")

DEFAULT_OPSET = 17
#: Legacy exporter maximum (torch ``ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET``) and TensorRT 10's
#: parser range top; 14 is the first with the ops the decomposed attention needs.
OPSET_RANGE = range(14, 21)
EXPORT_DTYPES = {precision: getattr(torch, {"fp32": "float32", "fp16": "float16"}[precision]) for precision in PRECISIONS}
#: Protobuf cannot serialise a message of 2 GiB or more; keep a margin for the graph itself.
INLINE_WEIGHTS_LIMIT = 2**31 - 2**28
METADATA_PREFIX = "seg_tsam."

AttentionPath = Callable[[nn.Module], AbstractContextManager]


class OnnxExportError(RuntimeError):
    """An export stage failed; the message says which and why."""


# --- attention paths -----------------------------------------------------------------------


@contextlib.contextmanager
def plain_diffusers_attention(unet: nn.Module) -> Iterator[None]:
    """Every attention of a diffusers UNet on ``AttnProcessor`` (plain math) inside the block."""
    from diffusers.models.attention_processor import AttnProcessor

    saved = dict(unet.attn_processors)
    unet.set_attn_processor(AttnProcessor())
    try:
        yield
    finally:
        unet.set_attn_processor(dict(saved))  # the setter pops from the dict it gets


def keep_installed_attention(unet: nn.Module) -> AbstractContextManager:
    """Trace whatever attention forward is installed (for ldm/sgm outside the WebUI)."""
    return contextlib.nullcontext()


def _default_attention_path(flavour: str) -> AttentionPath:
    if flavour == "diffusers":
        return plain_diffusers_attention
    raise OnnxExportError(
        f"{flavour} UNets need attention_path: the WebUI swaps CrossAttention.forward at class level, so "
        "pass a callable returning a context manager that installs the plain attention forward, or "
        "keep_installed_attention to trace the installed one"
    )


# --- stages --------------------------------------------------------------------------------


def dynamic_axes(wrapper: SegExportUNet) -> dict[str, dict[int, str]]:
    """Named dynamic axes for every input and the output (level-0 grids share the latent's names)."""
    axes = {name: {0: "batch"} for name in wrapper.input_names}
    axes[SAMPLE] = {0: "batch", 2: "height", 3: "width"}
    axes[CONTEXT] = {0: "batch", 1: "tokens"}
    for level in wrapper.levels:
        grid_h, grid_w = ("height", "width") if level == 0 else (f"grid_h_{level}", f"grid_w_{level}")
        name_h, name_w = blur_input_names(level)
        axes[name_h] = {0: "batch", 1: grid_h, 2: grid_h}
        axes[name_w] = {0: "batch", 1: grid_w, 2: grid_w}
    axes[OUTPUT] = {0: "batch", 2: "height", 3: "width"}
    return axes


def hooked_modules(module: nn.Module) -> list[str]:
    """Names of submodules carrying forward hooks or pre-hooks (e.g. a live guidance patch)."""
    return [
        name or "<root>"
        for name, sub in module.named_modules()
        if sub._forward_hooks or sub._forward_pre_hooks
    ]


def _validate(wrapper: SegExportUNet, opset: int, dtype: str, allow_foreign_hooks: bool) -> torch.dtype:
    if not isinstance(wrapper, SegExportUNet):
        raise OnnxExportError(f"expected a SegExportUNet, got {type(wrapper).__name__}")
    if opset not in OPSET_RANGE:
        raise OnnxExportError(f"opset {opset} unsupported: use {OPSET_RANGE.start}-{OPSET_RANGE.stop - 1} "
                              "(legacy exporter and TensorRT 10 parser)")
    if dtype not in EXPORT_DTYPES:
        raise OnnxExportError(f"dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    hooked = hooked_modules(wrapper.unet)
    if hooked and not allow_foreign_hooks:
        raise OnnxExportError(
            f"the UNet carries forward hooks on {len(hooked)} module(s) ({', '.join(hooked[:5])}…): remove "
            "guidance patches (SEG/T-SAM) before export, or pass allow_foreign_hooks=True if they are inert"
        )
    return EXPORT_DTYPES[dtype]


def _in_dtype(wrapper: SegExportUNet, dtype: torch.dtype) -> SegExportUNet:
    """The wrapper itself when its weights are ``dtype``; else a converted deep copy (costs memory)."""
    floating = {p.dtype for p in wrapper.parameters() if p.is_floating_point()}
    if floating == {dtype}:
        return wrapper
    logger.info("SEG export: converting a copy of the UNet to %s", dtype)
    return copy.deepcopy(wrapper).to(dtype)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    modes = {sub: sub.training for sub in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for sub, training in modes.items():
            sub.training = training


def _trace_to(
    model: SegExportUNet,
    onnx_path: Path,
    *,
    opset: int,
    dtype: torch.dtype,
    attention_path: AttentionPath,
    example_batch: int,
    example_latent: tuple[int, int],
    example_tokens: int,
) -> None:
    """Stage 1: trace with the legacy exporter into ``onnx_path`` (a temporary location)."""
    try:
        inputs = model.example_inputs(
            batch=example_batch, latent_size=example_latent, tokens=example_tokens, dtype=dtype
        )
    except Exception as exc:
        raise OnnxExportError(f"could not build example inputs for the trace: {exc}") from exc
    try:
        with warnings.catch_warnings(), _eval_mode(model), attention_path(model.unet), torch.no_grad():
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")  # chosen on purpose
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")  # its internals
            torch.onnx.export(
                model, inputs, os.fspath(onnx_path), dynamo=False, opset_version=opset,
                input_names=list(model.input_names), output_names=list(model.output_names),
                dynamic_axes=dynamic_axes(model), do_constant_folding=True,
            )
    except OnnxExportError:
        raise
    except Exception as exc:
        raise OnnxExportError(
            f"torch.onnx.export (legacy exporter, opset {opset}) failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not onnx_path.is_file():
        raise OnnxExportError(f"the exporter wrote no file at {onnx_path}")


def _metadata(wrapper: SegExportUNet, dtype: str) -> dict[str, str]:
    return {
        "format": "1",
        "flavour": wrapper.flavour,
        "layers": wrapper.layer_spec,
        "levels": ",".join(str(level) for level in wrapper.levels),
        "layer_names": ",".join(site.layer.name for site in wrapper.sites),
        "dtype": dtype,
        "tokens_per_chunk": str(TOKENS_PER_CHUNK),
    }


def _finalise(
    raw_path: Path, final_path: Path, data_name: str, metadata: dict[str, str], external_data: bool | None
) -> bool:
    """Stage 2: add metadata and write the model (inline or with one external data file). Returns whether external."""
    try:
        import onnx
    except ImportError as exc:
        raise OnnxExportError("the onnx package is needed to export (pip install onnx)") from exc
    try:
        model = onnx.load(os.fspath(raw_path), load_external_data=True)
        for key, value in metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = METADATA_PREFIX + key, value
        weight_bytes = sum(len(tensor.raw_data) for tensor in model.graph.initializer)
        external = weight_bytes > INLINE_WEIGHTS_LIMIT if external_data is None else external_data
        onnx.save_model(model, os.fspath(final_path), save_as_external_data=external,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=0)
        onnx.checker.check_model(os.fspath(final_path))
    except Exception as exc:
        raise OnnxExportError(f"writing the ONNX model failed: {type(exc).__name__}: {exc}") from exc
    return external


def _static_check(path: Path) -> None:
    """Stage 3: the graph must suit TensorRT's parser (ops, no value-dependent shapes)."""
    try:
        check_onnx_for_tensorrt(path, raise_on_failure=True)
    except OnnxCheckError as exc:
        raise OnnxExportError(f"the exported graph does not suit TensorRT:\n{exc}") from exc


def external_data_files(onnx_path: Path) -> set[str]:
    """External data files an existing model refers to (empty when it has none or is unreadable)."""
    try:
        import onnx

        model = onnx.load(os.fspath(onnx_path), load_external_data=False)
    except Exception:
        return set()
    return {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }


def _commit(temp_dir: Path, final_name: str, data_name: str | None, target: Path) -> None:
    """Stage 4: move the data file, then the model (the commit point), then drop replaced data."""
    previous_data = external_data_files(target) if target.exists() else set()
    moved_data = None
    try:
        if data_name is not None:
            moved_data = target.parent / data_name
            os.replace(temp_dir / data_name, moved_data)
        os.replace(temp_dir / final_name, target)
    except Exception as exc:
        if moved_data is not None:
            moved_data.unlink(missing_ok=True)
        raise OnnxExportError(f"could not move the export into place at {target}: {exc}") from exc
    for name in previous_data - {data_name}:
        stale = target.parent / name
        if stale.parent == target.parent and stale.is_file():
            stale.unlink(missing_ok=True)


def export_onnx(
    wrapper: SegExportUNet,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    dtype: str = "fp32",
    attention_path: AttentionPath | None = None,
    external_data: bool | None = None,
    example_batch: int = 2,
    example_latent: tuple[int, int] | None = None,
    example_tokens: int = TOKENS_PER_CHUNK,
    check: bool = True,
    allow_foreign_hooks: bool = False,
) -> Path:
    """Export ``wrapper`` (its flavour and SEG layers fixed at construction) to ``path``; return it.

    ``dtype`` ("fp32"/"fp16") is the graph's precision; a wrapper in another dtype is exported
    from a converted copy, so the caller's UNet is never changed. ``external_data`` ``None``
    means "only above 2 GiB". ``example_latent`` is the traced size, by default
    :meth:`SegExportUNet.general_latent_size` (odd at every level, so size-dependent branches
    are traced in their general form, right for every size); an ldm/sgm UNet outside the
    WebUI (without its resizing ``cat``) cannot run odd sizes and needs a multiple of ``2^n``.
    ``example_batch`` and ``example_tokens`` only shape the trace (all axes stay dynamic).
    ``check`` runs :func:`check_onnx_for_tensorrt` before the file is moved into place.
    Raises :class:`OnnxExportError`; on failure nothing is left at ``path`` (a file already
    there stays as it was).
    """
    target = Path(path).resolve()
    torch_dtype = _validate(wrapper, opset, dtype, allow_foreign_hooks)
    attention_path = attention_path or _default_attention_path(wrapper.flavour)
    example_latent = tuple(example_latent or wrapper.general_latent_size())
    if not target.parent.is_dir():
        raise OnnxExportError(f"the folder {target.parent} does not exist")
    try:
        temp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise OnnxExportError(f"cannot write in {target.parent}: {exc}") from exc
    try:
        try:
            model = _in_dtype(wrapper, torch_dtype)
        except Exception as exc:
            raise OnnxExportError(f"could not make a {dtype} copy of the UNet: {type(exc).__name__}: {exc}") from exc
        raw_path = temp_dir / "traced" / "model.onnx"
        raw_path.parent.mkdir()
        _trace_to(model, raw_path, opset=opset, dtype=torch_dtype, attention_path=attention_path,
                  example_batch=example_batch, example_latent=example_latent, example_tokens=example_tokens)
        del model
        data_name = new_data_file_name(target.name)
        final_name = "model.onnx"
        external = _finalise(raw_path, temp_dir / final_name, data_name, _metadata(wrapper, dtype), external_data)
        if check:
            _static_check(temp_dir / final_name)
        _commit(temp_dir, final_name, data_name if external else None, target)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    logger.info("SEG export: wrote %s (levels %s, opset %d, %s)", target, wrapper.levels, opset, dtype)
    return target
