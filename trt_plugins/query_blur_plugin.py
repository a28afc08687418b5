"""The Triton query blur as a TensorRT plugin, ``seg_tsam::query_blur`` (TensorRT ≥ 10.6).

What it is: a "quickly deployable" Python plugin (``tensorrt.plugin``) with inputs
``queries`` ``(B, h·w, C)``, ``a_h`` ``(B, h, h)``, ``a_w`` ``(B, w, w)`` and one output shaped and
typed like ``queries``, computing ``A_h[b] · Q[b] · A_w[b]ᵀ`` per channel with
:func:`~seg_tsam.trt_plugins.query_blur_kernel.triton_query_blur` on TensorRT's stream. It is
a JIT plugin (``@tensorrt.plugin.impl``): the engine calls back into Python, so an engine that
contains it runs only in a process that has called :func:`register_query_blur_plugin` (and has
triton), never in plain ``trtexec``.

Why it is not used: the exported graph's standard-op blur (two batched matmuls,
:func:`~seg_tsam.extension.core.blur.apply_blur_matrices`) is the default and the portable path.
The plugin is only worth emitting on a GPU where ``bench/query_blur_kernel.py`` shows the kernel
faster than those matmuls for the shapes that matter; no such benchmark has been run, so
nothing in the export emits it.

How an export would emit it (not implemented): TensorRT's ONNX parser imports a node as a
plugin when its ``op_type`` is the plugin name and it carries a string attribute
``plugin_namespace`` with the plugin's namespace (the node's ONNX ``domain`` is not what the
parser matches; a custom domain is still needed for the model to be valid ONNX, with an
``opset_import`` entry for it). :func:`query_blur_onnx_node` builds exactly that node:
``op_type="query_blur"``, ``domain="seg_tsam"``, ``plugin_namespace="seg_tsam"``. From the
torch exporter, the blur in ``export/seg_unet.py`` would go through an ``autograd.Function``
whose ``symbolic`` returns ``g.op("seg_tsam::query_blur", q, a_h, a_w, plugin_namespace_s="seg_tsam")``
with ``custom_opsets={"seg_tsam": 1}``; ONNX Runtime cannot run that graph, so the ORT checks
of the export would need the standard-op graph anyway.

This module imports neither tensorrt nor triton at import time, and deliberately has no
``from __future__ import annotations``: ``tensorrt.plugin.register`` checks the *evaluated*
type annotations of the descriptor function (``issubclass(annotation, TensorDesc)``).
"""

import importlib
import importlib.util
import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

#: ONNX domain of the node, and TensorRT namespace of the plugin.
PLUGIN_DOMAIN = "seg_tsam"
#: ONNX ``op_type`` of the node, and TensorRT name of the plugin.
PLUGIN_OP = "query_blur"
#: The ``tensorrt.plugin`` id, ``"{namespace}::{name}"``.
PLUGIN_ID = f"{PLUGIN_DOMAIN}::{PLUGIN_OP}"
#: Opset version to declare for :data:`PLUGIN_DOMAIN` in a model that contains the node.
PLUGIN_OPSET_VERSION = 1
#: ``tensorrt.plugin`` (quickly deployable plugins) first shipped in TensorRT 10.6.
MIN_TENSORRT_VERSION = (10, 6)

_lock = threading.Lock()
_registered = False


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in str(version).split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def query_blur_plugin_unavailable_reason() -> str | None:
    """``None`` when the plugin can be registered here, else why not (never raises).

    Imports ``tensorrt`` (not triton: finding the package is enough to register; the kernel is
    compiled when the engine first runs the plugin).
    """
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed"
    try:
        trt = importlib.import_module("tensorrt")
    except (ImportError, OSError) as error:  # OSError: a wheel whose shared libraries fail to load
        return f"tensorrt failed to import: {error}"
    version = getattr(trt, "__version__", "?")
    if _version_tuple(version) < MIN_TENSORRT_VERSION:
        return f"TensorRT {version} has no tensorrt.plugin (needs ≥ {'.'.join(map(str, MIN_TENSORRT_VERSION))})"
    try:
        importlib.import_module("tensorrt.plugin")
    except ImportError as error:
        return f"TensorRT {version} is installed but tensorrt.plugin cannot be imported: {error}"
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (the plugin runs a Triton kernel)"
    return None


def _already_defined(trtp: Any) -> bool:
    """Whether ``seg_tsam::query_blur`` is in ``tensorrt.plugin.op`` (e.g. from a reloaded copy of this module).

    ``tensorrt.plugin.register`` raises on a second definition of the same id, so look first.
    """
    try:
        return hasattr(getattr(trtp.op, PLUGIN_DOMAIN), PLUGIN_OP)
    except AttributeError:
        return False


def _define_plugin(trtp: Any) -> None:
    """The register / autotune / impl triple, with the schema ``tensorrt.plugin`` validates.

    The argument names of ``impl`` and ``autotune`` must repeat the descriptor function's tensor
    names, followed by ``outputs`` (and ``stream`` for ``impl``), or registration fails.
    """

    @trtp.register(PLUGIN_ID)
    def query_blur_desc(queries: trtp.TensorDesc, a_h: trtp.TensorDesc, a_w: trtp.TensorDesc) -> trtp.TensorDesc:
        return queries.like()

    @trtp.autotune(PLUGIN_ID)
    def query_blur_autotune(
        queries: trtp.TensorDesc, a_h: trtp.TensorDesc, a_w: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc]
    ) -> list[trtp.AutoTuneCombination]:
        # All four I/O tensors share one dtype ('|' = dependent choice), float32 or float16, linear layout:
        # what the kernel supports. In a strongly typed network the ONNX types pick one.
        return [trtp.AutoTuneCombination("FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16", "LINEAR")]

    @trtp.impl(PLUGIN_ID)
    def query_blur_impl(
        queries: trtp.Tensor, a_h: trtp.Tensor, a_w: trtp.Tensor, outputs: tuple[trtp.Tensor], stream: int
    ) -> None:
        import torch

        from .query_blur_kernel import triton_query_blur

        # trtp.Tensor exposes __cuda_array_interface__, so torch.as_tensor wraps it without a copy;
        # the kernel launches on torch's current stream, made TensorRT's stream here.
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            q_t = torch.as_tensor(queries, device="cuda")
            a_h_t = torch.as_tensor(a_h, device="cuda")
            a_w_t = torch.as_tensor(a_w, device="cuda")
            out_t = torch.as_tensor(outputs[0], device="cuda")
            triton_query_blur(q_t, a_h_t, a_w_t, out=out_t)


def register_query_blur_plugin() -> bool:
    """Register ``seg_tsam::query_blur`` with TensorRT once per process; ``True`` when registered.

    Idempotent and thread-safe. Returns ``False`` (and logs why, at INFO) when TensorRT ≥ 10.6
    with ``tensorrt.plugin`` or triton is missing; never raises for a missing dependency. Call
    it before parsing an ONNX file that contains the node and before deserialising an engine
    built from one.
    """
    global _registered
    with _lock:
        if _registered:
            return True
        reason = query_blur_plugin_unavailable_reason()
        if reason is not None:
            log.info("TensorRT plugin %s not registered: %s", PLUGIN_ID, reason)
            return False
        import tensorrt.plugin as trtp

        if not _already_defined(trtp):
            _define_plugin(trtp)
        _registered = True
        log.debug("TensorRT plugin %s registered", PLUGIN_ID)
        return True


def query_blur_onnx_node(queries: str, a_h: str, a_w: str, output: str, name: str | None = None) -> Any:
    """An ``onnx.NodeProto`` that TensorRT's parser maps to this plugin (imports ``onnx``).

    The model holding it must declare the opset ``(PLUGIN_DOMAIN, PLUGIN_OPSET_VERSION)``.
    """
    from onnx import helper

    return helper.make_node(
        PLUGIN_OP, [queries, a_h, a_w], [output], name=name or f"{PLUGIN_OP}_{output}",
        domain=PLUGIN_DOMAIN, plugin_namespace=PLUGIN_DOMAIN,
    )
