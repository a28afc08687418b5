"""An exported SEG UNet run by ONNX Runtime: the portable runtime (CPU, or any ONNX Runtime build).

Tensors cross to the host as NumPy arrays and back, so on a CUDA device this costs two copies per
call; the fast GPU path is a TensorRT engine (:mod:`.trt_runtime`). With ``onnxruntime-gpu``
and a CUDA device the graph runs on ONNX Runtime's CUDA provider (:func:`onnxruntime_providers`).
What the graph was exported with (flavour, SEG layers, levels) is read from the metadata
``onnx_export`` writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .onnx_export import METADATA_PREFIX
from .refit import RefitError, RefitMap, refit_map_beside
from .seg_unet import OUTPUT
from .unet_runtime import CHECKPOINT_WEIGHTS, EngineCannotRun, UNetWeights, check_extra_inputs, check_layers

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def onnxruntime_providers(device: torch.device, available: Sequence[str] | None = None) -> list[str]:
    """ONNX Runtime's execution providers for UNet calls on ``device``: its CUDA provider first when
    ``device`` is a CUDA device and this build has it (``onnxruntime-gpu``), else the CPU.
    ``available`` defaults to ``onnxruntime.get_available_providers()`` (none without onnxruntime).

    UNVERIFIED on a GPU: the CUDA provider has not run here (no GPU).
    """
    if available is None:
        try:
            import onnxruntime
        except ImportError:
            available = ()
        else:
            available = onnxruntime.get_available_providers()
    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxSessionError(RuntimeError):
    """The file cannot be run as a SEG UNet (not found, not ours, onnxruntime missing)."""


class OnnxRuntimeSession:
    """``run(named) -> out_sample`` for one exported file; see the module docstring.

    LoRA (:meth:`load_weights`): ONNX Runtime cannot change a loaded session's weights, so a new
    session is made whose initializers are overridden (``SessionOptions.add_initializer``) with
    the PyTorch UNet's current weights, found through the refit map saved beside the export.
    """

    def __init__(self, path: Path | str, *, providers: list[str] | None = None):
        try:
            import onnxruntime
        except ImportError as error:
            raise OnnxSessionError("onnxruntime is not installed (pip install onnxruntime)") from error
        self._onnxruntime = onnxruntime
        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxSessionError(f"no ONNX file at {self.path}")
        self.providers = providers or ["CPUExecutionProvider"]
        self.session, self._initializers = self._load({})
        self.weights_key: Hashable = CHECKPOINT_WEIGHTS
        self._refit_map: RefitMap | None = None
        metadata = self.session.get_modelmeta().custom_metadata_map
        if METADATA_PREFIX + "layer_names" not in metadata:
            raise OnnxSessionError(f"{self.path.name} is not a SEG export of this extension (no SEG metadata)")
        self.flavour = metadata[METADATA_PREFIX + "flavour"]
        self.layer_spec = metadata[METADATA_PREFIX + "layers"]
        self.layer_names = frozenset(name for name in metadata[METADATA_PREFIX + "layer_names"].split(",") if name)
        self.levels = tuple(int(level) for level in metadata[METADATA_PREFIX + "levels"].split(",") if level)
        self.input_names = tuple(node.name for node in self.session.get_inputs())
        self._input_types = {node.name: _ORT_TYPES[node.type] for node in self.session.get_inputs()}

    def _load(self, initializers: Mapping[str, np.ndarray]) -> tuple[Any, dict[str, Any]]:
        """A session of the file with ``initializers`` (name → value) replacing the file's, and
        the ``OrtValue`` buffers it uses (ONNX Runtime does not copy them: keep them with it)."""
        options = self._onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        if initializers:
            # Found on ONNX Runtime 1.20 (CPU): with the layout optimisations of ORT_ENABLE_ALL the
            # session computes with most of the file's weights, not the overrides (the LoRA is lost);
            # up to ORT_ENABLE_EXTENDED it uses the overrides (tests/test_unet_runtime.py checks it).
            options.graph_optimization_level = self._onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        values = {name: self._onnxruntime.OrtValue.ortvalue_from_numpy(array) for name, array in initializers.items()}
        for name, value in values.items():
            options.add_initializer(name, value)
        try:
            session = self._onnxruntime.InferenceSession(os.fspath(self.path), options, providers=self.providers)
        except Exception as error:
            raise OnnxSessionError(f"ONNX Runtime cannot load {self.path.name}: {error}") from error
        return session, values

    def run(self, named: Mapping[str, torch.Tensor]) -> torch.Tensor:
        feeds = {name: np.ascontiguousarray(named[name].detach().cpu().numpy(), dtype=self._input_types[name])
                 for name in self.input_names}
        (output,) = self.session.run([OUTPUT], feeds)
        return torch.from_numpy(output)

    def load_weights(self, weights: UNetWeights) -> None:
        """A new session with ``weights`` (the file as it is for the checkpoint's own)."""
        initializers: dict[str, np.ndarray] = {}
        if weights.key != CHECKPOINT_WEIGHTS:
            try:
                if self._refit_map is None:
                    self._refit_map = refit_map_beside(self.path)
                initializers = self._refit_map.weights_from(weights.applied())
            except RefitError as error:
                raise EngineCannotRun(f"{self.path.name} cannot take these LoRA weights: {error}") from None
        try:
            self.session, self._initializers = self._load(initializers)
        except OnnxSessionError as error:
            raise EngineCannotRun(str(error)) from None
        self.weights_key = weights.key


class OnnxExportSessions:
    """A ``SessionChooser`` for one exported file: checks the checkpoint and SEG layers per call.

    ``checkpoint_hash`` returns the loaded checkpoint's short hash (read per call); the file is
    loaded on the first call that needs it, and a file that cannot be loaded makes every call fall
    back with the reason.
    """

    def __init__(self, path: Path | str, *, checkpoint_hash: str, current_checkpoint_hash: Callable[[], str],
                 providers: list[str] | None = None):
        self.path = Path(path)
        self.checkpoint_hash = checkpoint_hash
        self.current_checkpoint_hash = current_checkpoint_hash
        self.providers = providers
        self._session: OnnxRuntimeSession | None = None
        self._load_error: str | None = None

    def __call__(self, call, blur, extra_names) -> OnnxRuntimeSession:
        current = self.current_checkpoint_hash()
        if current != self.checkpoint_hash:
            raise EngineCannotRun(f"{self.path.name} was exported from checkpoint {self.checkpoint_hash}, "
                                  f"the loaded checkpoint is {current}")
        session = self.session()
        check_layers(blur, session.layer_names, session.layer_spec)
        check_extra_inputs(extra_names, session.input_names)
        return session

    def session(self) -> OnnxRuntimeSession:
        if self._session is None:
            if self._load_error is None:
                try:
                    self._session = OnnxRuntimeSession(self.path, providers=self.providers)
                except OnnxSessionError as error:
                    self._load_error = str(error)
            if self._session is None:
                raise EngineCannotRun(self._load_error)
        return self._session
