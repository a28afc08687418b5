"""Registered SEG TensorRT engines as sessions for :class:`~.unet_runtime.ReplacementUNet`.

UNVERIFIED: written against TensorRT 10's name-based tensor API (``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``) and its ``Refitter``; no GPU or TensorRT was
available where it was written, so :class:`TensorRTSession` has never run. The engine *choice*
(:class:`RegistryEngines`) is plain Python over the registry and is tested on CPU.

For each call, :class:`RegistryEngines` asks the registry (:func:`~.registry.find_engine`) for
the best engine of the loaded checkpoint, this TensorRT version and GPU, the SEG layer spec in
use and the call's shape; the reason it gives when none fits becomes the fallback notice. One
engine is loaded at a time (another profile's engine replaces it).

Module import touches neither tensorrt nor the WebUI.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..extension.core.query_blur_patch import ActiveBlur
from .profiles import EngineCall, blur_input_level
from .refit import RefitError, refit_map_beside
from .trt_refit import refit_engine
from .registry import EngineEntry, EngineQuery, EngineRegistry, LookupResult, find_engine
from .seg_unet import OUTPUT, SAMPLE
from .unet_runtime import CHECKPOINT_WEIGHTS, EngineCannotRun, UNetWeights, check_extra_inputs

logger = logging.getLogger("seg_tsam")

_UNKNOWN_WEIGHTS = object()  #: equal to no key: the next call refits again


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
             trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64}
    return table[dtype]


class TensorRTSession:
    """A deserialised engine and one execution context; ``run`` takes named CUDA tensors.

    LoRA (:meth:`load_weights`): the engine (built refittable) is refitted in place with the
    PyTorch UNet's current weights through the refit map saved beside it; ``onnx_path``, the
    export it was built from, supplies graph constants TensorRT may ask for with them.
    """

    def __init__(self, engine_path: Path | str, onnx_path: Path | str | None = None):
        import tensorrt as trt

        self.engine_path = Path(engine_path)
        self.onnx_path = Path(onnx_path) if onnx_path is not None else None  #: the export it was built from
        self.weights_key: Hashable = CHECKPOINT_WEIGHTS
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise EngineCannotRun(f"TensorRT could not load the engine {self.engine_path.name} "
                                  "(built by another TensorRT version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self._dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.levels = tuple(sorted({level for n in self.input_names if (level := blur_input_level(n)) is not None}))

    def run(self, named: Mapping[str, torch.Tensor]) -> torch.Tensor:
        bound = {}  # keeps the cast inputs alive until the stream is done
        for name in self.input_names:
            tensor = named[name].to(self._dtypes[name]).contiguous()
            bound[name] = tensor
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        device = named[SAMPLE].device
        output = torch.empty(tuple(self.context.get_tensor_shape(OUTPUT)), dtype=self._dtypes[OUTPUT], device=device)
        self.context.set_tensor_address(OUTPUT, output.data_ptr())
        stream = torch.cuda.current_stream(device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT engine execution failed")
        stream.synchronize()
        return output

    def load_weights(self, weights: UNetWeights) -> None:
        """Refit the engine with ``weights`` (for the checkpoint's own too: they are the UNet's
        restored weights). A failed refit leaves the engine's weights unknown until the next one."""
        self.weights_key = _UNKNOWN_WEIGHTS
        onnx_path = self.onnx_path if self.onnx_path is not None and self.onnx_path.is_file() else None
        try:
            refit_engine(self.engine, refit_map_beside(self.engine_path), weights.applied(), onnx_path=onnx_path)
        except RefitError as error:
            gone = f" (its ONNX export {self.onnx_path.name} is gone)" if self.onnx_path and not onnx_path else ""
            raise EngineCannotRun(f"the engine {self.engine_path.name} cannot take these weights{gone}: {error}"
                                  ) from None
        self.weights_key = weights.key


class RegistryEngines:
    """Choose and load the registered engine for each call (a ``SessionChooser``).

    ``checkpoint_hash`` is read per call (the user may switch checkpoints while the option stays
    selected); ``trt_version`` and ``compute_capability`` describe this machine; ``onnx_folder``
    holds the exports the engines were built from; ``load`` makes a session from an engine file
    and its export's path (default :class:`TensorRTSession`), injectable so the choice is
    testable without a GPU.
    """

    def __init__(self, registry: EngineRegistry, *, checkpoint_hash: Callable[[], str], trt_version: str,
                 compute_capability: str, onnx_folder: Path | None = None,
                 load: Callable[[Path, Path | None], Any] = TensorRTSession):
        self.registry = registry
        self.onnx_folder = onnx_folder
        self.checkpoint_hash = checkpoint_hash
        self.trt_version = trt_version
        self.compute_capability = compute_capability
        self.load = load
        self._entries = registry.entries()
        self._loaded: tuple[EngineEntry, Any] | None = None  #: (the loaded engine's entry, its session)

    def __call__(self, call: EngineCall, blur: ActiveBlur | None, extra_names: Sequence[str]) -> Any:
        if blur is None and self._loaded is not None:  # no blur: any layer set does, keep the loaded one
            entry = self._loaded[0]
            kept = self._lookup(self._query(call, entry.key.seg_layers, frozenset(entry.seg_layer_names) or None))
            if kept.entry is not None:
                return self._checked(kept.entry, extra_names)
        result = self._lookup(self._query(call, blur.layer_spec, blur.layer_names) if blur is not None
                              else self._query(call, None, None))
        if result.entry is None:
            raise EngineCannotRun(result.message)
        return self._checked(result.entry, extra_names)

    def _query(self, call: EngineCall, layers: str | None, layer_names: frozenset[str] | None) -> EngineQuery:
        return EngineQuery(checkpoint_hash=self.checkpoint_hash(), trt_version=self.trt_version,
                           compute_capability=self.compute_capability, call=call, seg_layers=layers,
                           seg_layer_names=layer_names)

    def _lookup(self, query: EngineQuery) -> LookupResult:
        """:func:`find_engine` over the entries read at construction."""
        return find_engine(self._entries, query, lambda entry: self.registry.engine_path(entry).is_file())

    def _checked(self, entry: EngineEntry, extra_names: Sequence[str]) -> Any:
        session = self._session(entry)
        check_extra_inputs(extra_names, session.input_names)
        return session

    def _session(self, entry: EngineEntry) -> Any:
        if self._loaded is None or self._loaded[0].id != entry.id:
            self._loaded = None  # free the previous engine before loading the next
            onnx_path = self.onnx_folder / entry.onnx_file if self.onnx_folder and entry.onnx_file else None
            self._loaded = (entry, self.load(self.registry.engine_path(entry), onnx_path))
            logger.info("SEG: loaded TensorRT engine %s (%s)", entry.engine_file, entry.key.profile.describe())
        return self._loaded[1]

    def release(self) -> None:
        self._loaded = None

