"""Refit a TensorRT engine with a UNet's current weights, through the export's :class:`~.refit.RefitMap`.

Written against TensorRT 10's ``Refitter`` Python API (``get_all_weights``,
``set_named_weights``, ``get_missing_weights``, ``refit_cuda_engine``) and UNVERIFIED: no
TensorRT or GPU was available where it was written. Its control flow is checked against a
stand-in that follows those calls' documented meaning (``tests/test_refit.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from torch import nn

from .refit import AmbiguousWeight, MappedWeight, RefitError, RefitMap, float_state, digest, source_array


def _by_engine_name(entries: Iterable[MappedWeight | AmbiguousWeight], values: Mapping[str, np.ndarray]
                    ) -> dict[str, np.ndarray]:
    """Each value under its initializer's name and every alias: the ONNX parser may name a
    deduplicated weight after either (unverified which), and both hold the same value."""
    return {alias: values[entry.name] for entry in entries if entry.name in values
            for alias in (entry.name, *entry.aliases)}


def _unchanged_ambiguous(refit_map: RefitMap, unet: nn.Module) -> dict[str, np.ndarray]:
    """Ambiguous initializers whose candidates are unchanged (:meth:`RefitMap.problems` checked
    that) equal any candidate: TensorRT may ask for them when they are combined with set weights."""
    tensors = float_state(unet)
    return {e.name: source_array(tensors, e.candidates[0], e.dtype, e.shape) for e in refit_map.ambiguous}


def _graph_constants(onnx_path: str | os.PathLike, names: set[str]) -> dict[str, np.ndarray]:
    """Values of ``names`` among the export's initializers and ``Constant`` node outputs."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(os.fspath(onnx_path), load_external_data=True)
    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in names}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in names:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                found[node.output[0]] = numpy_helper.to_array(value)
    return {name: np.ascontiguousarray(array) for name, array in found.items()}


def refit_engine(engine: Any, refit_map: RefitMap, unet: nn.Module, *, logger: Any = None,
                 onnx_path: str | os.PathLike | None = None) -> int:
    """Refit a ``BuilderFlag.REFIT`` engine with ``unet``'s current weights; return how many were set.

    Every mapped initializer the engine reports as refittable (``get_all_weights``) is set; a
    mapped one the engine baked in (not refittable) must be unchanged. TensorRT may then miss
    weights it combined with the set ones: ambiguous-but-unchanged initializers are supplied,
    and with ``onnx_path`` (the exported file) the graph's constants too (fixed initializers,
    ``Constant`` nodes: they never change). Anything else missing raises :class:`RefitError`
    before ``refit_cuda_engine`` touches the engine, as does everything
    :meth:`RefitMap.weights_from` refuses.

    UNVERIFIED: written against TensorRT 10's Python ``Refitter`` without TensorRT or a GPU.
    """
    import tensorrt as trt

    values = refit_map.weights_from(unet)  # strict: refuses what cannot be refitted exactly
    refitter = trt.Refitter(engine, logger or trt.Logger(trt.Logger.WARNING))
    refittable = set(refitter.get_all_weights())
    if not refittable:
        raise RefitError("the engine has no refittable weights (built without BuilderFlag.REFIT?)")
    named = _by_engine_name(refit_map.mapped, values)
    baked = sorted(entry.name for entry in refit_map.mapped
                   if not refittable & {entry.name, *entry.aliases} and digest(values[entry.name]) != entry.digest)
    if baked:
        raise RefitError(f"the engine holds these weights as constants, yet they changed: {baked[:10]}; rebuild it")
    keep_alive = []  # TensorRT reads the host arrays in refit_cuda_engine

    def set_weights(batch: Mapping[str, np.ndarray]) -> int:
        for name, array in sorted(batch.items()):
            keep_alive.append(array)
            if not refitter.set_named_weights(name, trt.Weights(array)):
                raise RefitError(f"TensorRT rejected the weights {name!r} ({array.dtype}, {array.shape})")
        return len(batch)

    count = set_weights({name: array for name, array in named.items() if name in refittable})
    missing = set(refitter.get_missing_weights())
    if missing:
        extra = _by_engine_name(refit_map.ambiguous, _unchanged_ambiguous(refit_map, unet))
        count += set_weights({name: array for name, array in extra.items() if name in missing})
        missing = set(refitter.get_missing_weights())
    if missing and onnx_path is not None:
        count += set_weights(_graph_constants(onnx_path, missing - set(named)))
        missing = set(refitter.get_missing_weights())
    if missing:
        raise RefitError(f"TensorRT needs weights no UNet tensor explains: {sorted(missing)[:10]}")
    if not refitter.refit_cuda_engine():
        raise RefitError("TensorRT refit_cuda_engine failed (see the TensorRT log)")
    return count
