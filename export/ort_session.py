"""An exported SEG UNet run by ONNX Runtime: the portable runtime (CPU, or any ONNX Runtime build).

Tensors cross to the host as NumPy arrays and back, so on a CUDA device this costs two copies per
call; the fast GPU path is a TensorRT engine (:mod:`.trt_runtime`). What the graph was exported
with (flavour, SEG layers, levels) is read from the metadata ``onnx_export`` writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from .onnx_export import METADATA_PREFIX
from .seg_unet import OUTPUT
from .unet_runtime import EngineCannotRun, check_extra_inputs, check_layers

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32}


class OnnxSessionError(RuntimeError):
    """The file cannot be run as a SEG UNet (not found, not ours, onnxruntime missing)."""


class OnnxRuntimeSession:
    """``run(named) -> out_sample`` for one exported file; see the module docstring."""

    def __init__(self, path: Path | str, *, providers: list[str] | None = None):
        try:
            import onnxruntime
        except ImportError as error:
            raise OnnxSessionError("onnxruntime is not installed (pip install onnxruntime)") from error
        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxSessionError(f"no ONNX file at {self.path}")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        try:
            self.session = onnxruntime.InferenceSession(os.fspath(self.path), options,
                                                        providers=providers or ["CPUExecutionProvider"])
        except Exception as error:
            raise OnnxSessionError(f"ONNX Runtime cannot load {self.path.name}: {error}") from error
        metadata = self.session.get_modelmeta().custom_metadata_map
        if METADATA_PREFIX + "layer_names" not in metadata:
            raise OnnxSessionError(f"{self.path.name} is not a SEG export of this extension (no SEG metadata)")
        self.flavour = metadata[METADATA_PREFIX + "flavour"]
        self.layer_spec = metadata[METADATA_PREFIX + "layers"]
        self.layer_names = frozenset(name for name in metadata[METADATA_PREFIX + "layer_names"].split(",") if name)
        self.levels = tuple(int(level) for level in metadata[METADATA_PREFIX + "levels"].split(",") if level)
        self.input_names = tuple(node.name for node in self.session.get_inputs())
        self._input_types = {node.name: _ORT_TYPES[node.type] for node in self.session.get_inputs()}

    def run(self, named: Mapping[str, torch.Tensor]) -> torch.Tensor:
        feeds = {name: np.ascontiguousarray(named[name].detach().cpu().numpy(), dtype=self._input_types[name])
                 for name in self.input_names}
        (output,) = self.session.run([OUTPUT], feeds)
        return torch.from_numpy(output)


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
