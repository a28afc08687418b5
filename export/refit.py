"""LoRA through refit: which torch tensor each ONNX initializer of an export came from.

The WebUI applies a LoRA by changing the PyTorch UNet's weights in place. A TensorRT engine
built with ``BuilderFlag.REFIT`` can take new weights by *ONNX initializer name*
(``tensorrt.Refitter.set_named_weights``), so the engine can follow the LoRA if we know, for
every initializer, which UNet parameter it holds and in which form. :func:`weight_map` works
that out once, from the exported file and the UNet it was exported from, and returns a
:class:`RefitMap` (saved as a JSON sidecar next to the engine); :meth:`RefitMap.weights_from`
then gives the engine's weights for the UNet's current state, and
:func:`~.trt_refit.refit_engine` pushes them into an engine.

What the legacy TorchScript exporter (``do_constant_folding=True``) does to the weights, and
how each case is recognised:

- A parameter used as is keeps its ``state_dict`` name (``unet.conv_in.weight``): **by name**.
- A ``Linear`` weight feeding ``MatMul`` is transposed at export and the folded result renamed
  (``onnx::MatMul_1234``); GroupNorm's affine parameters are unsqueezed to ``(C, 1, 1)`` and
  renamed (``onnx::Mul_…``). These are found **by value**: the initializer equals the parameter
  (reshaped) or its transpose, exactly, after casting the torch value to the initializer's
  dtype (an fp16 export casts a copy of the UNet). Values are compared through a hash of their
  raw bytes, so the whole mapping is one pass over the parameters and one over the
  initializers.
- Initializers with the same value are **deduplicated**: one is kept, every other use reads it
  through an ``Identity`` node whose output keeps the duplicate's name. So one initializer can
  stand for several parameters; each of its uses (the initializer and its Identity aliases) is
  resolved on its own, and the initializer records all of them (:attr:`MappedWeight.sources`).
  A refit can set it only while those parameters still agree.
- Where several parameters have the value of a renamed initializer, the node that consumes
  it tells which: its name carries the module scope (``/unet/down_blocks.0/…/to_q/MatMul``),
  **by scope**. Values in which every element is the same (fresh ``ones``/``zeros`` norms,
  scalars) carry no identity at all — a folded constant could equal them by chance — so for
  those only a name counts. What stays unresolved is recorded as **ambiguous**, never guessed.
- Everything else matches no tensor of the UNet (shape constants, folded products, blur
  helpers): **fixed**, not refittable from torch.

Safety rule of :meth:`RefitMap.weights_from` (strict by default): a refit that cannot be done
exactly is refused with :class:`RefitError`, naming the weights — when an ambiguous
initializer's candidate parameters, a parameter found in no initializer (its effect may be
folded into a fixed constant), or the parameters behind one deduplicated initializer have
changed since the export. While such parameters keep their exported values the engine's copy
is still right and the refit goes ahead.

The mapping is checked on CPU by replacing the initializers of an export and running it in
ONNX Runtime (``tests/test_refit.py``); the TensorRT side is in :mod:`.trt_refit`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT_VERSION = 1
#: The sidecar file next to an engine or ONNX export: ``<file name><suffix>``.
SIDECAR_SUFFIX = ".refit.json"

#: How an initializer is made from its torch tensor (after the dtype cast).
TRANSFORMS = ("none", "reshape", "transpose")
#: How a source was identified (see the module docstring).
VIA = ("name", "scope", "value")

_NUMPY_TO_TORCH = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                   np.dtype(np.float64): torch.float64}


class RefitError(RuntimeError):
    """The engine cannot be refitted exactly from this UNet; the message says which weights and why."""


# --- the map ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightSource:
    """A torch tensor (``state_dict`` key, wrapper prefix stripped) and how it becomes the initializer."""

    key: str
    transform: str  #: one of :data:`TRANSFORMS`
    via: str = "value"  #: one of :data:`VIA`

    def to_dict(self) -> dict[str, str]:
        return {"key": self.key, "transform": self.transform, "via": self.via}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WeightSource:
        source = cls(str(data["key"]), str(data["transform"]), str(data.get("via", "value")))
        if source.transform not in TRANSFORMS or source.via not in VIA:
            raise ValueError(f"bad weight source {dict(data)}")
        return source


@dataclass(frozen=True)
class MappedWeight:
    """An initializer refittable from torch: every use of it resolved to a tensor of the UNet.

    ``sources`` holds more than one entry when the exporter merged equal weights into this one
    initializer. ``digest`` is the hash of the exported bytes.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    digest: str
    sources: tuple[WeightSource, ...]
    aliases: tuple[str, ...] = ()  #: ``Identity`` outputs that read it (the exporter's deduplication)

    @property
    def key(self) -> str:
        """The (first) torch key this initializer holds."""
        return self.sources[0].key

    @property
    def transform(self) -> str:
        return self.sources[0].transform

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "digest": self.digest,
                "sources": [s.to_dict() for s in self.sources], "aliases": list(self.aliases)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MappedWeight:
        return cls(str(data["name"]), str(data["dtype"]), tuple(int(d) for d in data["shape"]), str(data["digest"]),
                   tuple(WeightSource.from_dict(s) for s in data["sources"]),
                   tuple(str(a) for a in data.get("aliases", ())))


@dataclass(frozen=True)
class AmbiguousWeight:
    """An initializer equal to several candidate tensors (or to a constant-filled one) with no
    name or scope to pick: not refittable, and refused as soon as a candidate changes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    digest: str
    candidates: tuple[WeightSource, ...]
    aliases: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "digest": self.digest,
                "candidates": [c.to_dict() for c in self.candidates], "aliases": list(self.aliases)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AmbiguousWeight:
        return cls(str(data["name"]), str(data["dtype"]), tuple(int(d) for d in data["shape"]), str(data["digest"]),
                   tuple(WeightSource.from_dict(c) for c in data["candidates"]),
                   tuple(str(a) for a in data.get("aliases", ())))


@dataclass(frozen=True)
class RefitMap:
    """Initializer name → torch tensor, for one exported ONNX file and the UNet it came from.

    ``unmapped`` holds every floating-point tensor of the UNet that no initializer holds or
    might hold, with the hash of its value (cast to ``weights_dtype``) at mapping time: if one
    of them changes, the engine cannot follow (see the module docstring).
    """

    prefix: str
    weights_dtype: str
    mapped: tuple[MappedWeight, ...]
    ambiguous: tuple[AmbiguousWeight, ...] = ()
    fixed: tuple[str, ...] = ()
    unmapped: Mapping[str, str] = field(default_factory=dict)

    # --- views ---

    def by_name(self) -> dict[str, MappedWeight]:
        return {entry.name: entry for entry in self.mapped}

    def mapped_keys(self) -> set[str]:
        """Torch keys held by at least one refittable initializer."""
        return {source.key for entry in self.mapped for source in entry.sources}

    def summary(self) -> dict[str, int]:
        """Counts for reports: initializers by how they were mapped, plus tied/ambiguous/fixed/unmapped."""
        counts = {f"via_{via}": 0 for via in VIA} | {transform: 0 for transform in TRANSFORMS}
        for entry in self.mapped:
            counts[f"via_{entry.sources[0].via}"] += 1
            counts[entry.transform] += 1
        counts.update(mapped=len(self.mapped), tied=sum(len(e.sources) > 1 for e in self.mapped),
                      ambiguous=len(self.ambiguous), fixed=len(self.fixed), unmapped_tensors=len(self.unmapped))
        return counts

    # --- serialisation ---

    def to_json(self) -> str:
        data = {"format": FORMAT_VERSION, "prefix": self.prefix, "weights_dtype": self.weights_dtype,
                "mapped": [e.to_dict() for e in self.mapped], "ambiguous": [e.to_dict() for e in self.ambiguous],
                "fixed": list(self.fixed), "unmapped": dict(sorted(self.unmapped.items()))}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> RefitMap:
        data = json.loads(text)
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"refit map format {data.get('format')!r} is not {FORMAT_VERSION}; map the export again")
        return cls(prefix=str(data["prefix"]), weights_dtype=str(data["weights_dtype"]),
                   mapped=tuple(MappedWeight.from_dict(e) for e in data["mapped"]),
                   ambiguous=tuple(AmbiguousWeight.from_dict(e) for e in data["ambiguous"]),
                   fixed=tuple(str(name) for name in data["fixed"]),
                   unmapped={str(k): str(v) for k, v in data["unmapped"].items()})

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON atomically (e.g. to :func:`sidecar_path` of the engine)."""
        from .registry import write_file_atomically

        path = Path(path)
        write_file_atomically(path, self.to_json().encode("utf-8"))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> RefitMap:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    # --- current weights ---

    def weights_from(self, unet: nn.Module, *, strict: bool = True) -> dict[str, np.ndarray]:
        """The value of every mapped initializer for ``unet``'s current weights (CPU, contiguous).

        Each is the torch tensor of its first source, cast to the initializer's dtype and
        transformed. With ``strict`` (the default), raises :class:`RefitError` when the
        weights cannot be refitted exactly (:meth:`problems`).
        """
        tensors = float_state(unet)
        if strict:
            problems = self.problems(unet, tensors=tensors)
            if problems:
                raise RefitError("cannot refit exactly, export the UNet again:\n" + "\n".join(problems))
        return {entry.name: source_array(tensors, entry.sources[0], entry.dtype, entry.shape) for entry in self.mapped}

    def problems(self, unet: nn.Module, *, tensors: Mapping[str, torch.Tensor] | None = None) -> list[str]:
        """Why ``unet``'s current weights cannot be refitted exactly; empty when they can."""
        tensors = float_state(unet) if tensors is None else tensors
        problems = [f"{name}: {reason}" for name, reason in self._missing_keys(tensors)]
        if problems:
            return problems
        for entry in self.mapped:
            problems += _tied_problems(entry, tensors)
        for entry in self.ambiguous:
            changed = [c.key for c in entry.candidates
                       if digest(source_array(tensors, c, entry.dtype, entry.shape)) != entry.digest]
            if changed:
                problems.append(f"{entry.name}: equal at export to {[c.key for c in entry.candidates]}, no name or "
                                f"scope tells which; changed since: {changed}")
        dtype = np.dtype(self.weights_dtype)
        for key, expected in sorted(self.unmapped.items()):
            if digest(cast_array(tensors[key], dtype)) != expected:
                problems.append(f"{key}: changed, but no initializer holds it (folded into a constant or unused)")
        return problems

    def changed(self, unet: nn.Module) -> list[str]:
        """Mapped initializers whose value for ``unet`` differs from the exported one."""
        exported = self.by_name()
        return sorted(name for name, array in self.weights_from(unet, strict=False).items()
                      if digest(array) != exported[name].digest)

    def _missing_keys(self, tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
        wanted = {s.key for e in self.mapped for s in e.sources} | {c.key for e in self.ambiguous for c in e.candidates}
        wanted |= set(self.unmapped)
        reason = "not a floating-point tensor of this UNet (another model?)"
        return [(key, reason) for key in sorted(wanted - set(tensors))]


def _tied_problems(entry: MappedWeight, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """A merged initializer can follow its sources only while they agree."""
    if len(entry.sources) == 1:
        return []
    digests = {s.key: digest(source_array(tensors, s, entry.dtype, entry.shape)) for s in entry.sources}
    if len(set(digests.values())) > 1:
        return [f"{entry.name}: the export merged {sorted(digests)} (equal then), they now differ"]
    return []


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    """Where an engine's (or ONNX export's) refit map lives: ``<file>.refit.json`` beside it."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + SIDECAR_SUFFIX)


def refit_map_beside(path: str | os.PathLike) -> RefitMap:
    """The refit map saved beside the exported file ``path``; :class:`RefitError` says why there is none."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        raise RefitError(f"{Path(path).name} has no refit map ({sidecar.name}); export it again to use LoRA with it")
    try:
        return RefitMap.load(sidecar)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RefitError(f"the refit map {sidecar.name} cannot be read ({error}); export again") from error


# --- values and hashes ----------------------------------------------------------------------------


def digest(array: np.ndarray) -> str:
    """Hash of an array's raw bytes (C order): equal digests ⇔ bit-identical values, for equal dtype/size."""
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).hexdigest()


def cast_array(tensor: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """``tensor`` on the CPU as a contiguous numpy array of ``dtype`` (torch does the cast, as the export did)."""
    return tensor.detach().to(device="cpu", dtype=_NUMPY_TO_TORCH[np.dtype(dtype)]).contiguous().numpy()


def source_array(tensors: Mapping[str, torch.Tensor], source: WeightSource, dtype: str,
                 shape: Sequence[int]) -> np.ndarray:
    """The initializer value ``source`` gives: cast, transposed if so, in the initializer's shape."""
    array = cast_array(tensors[source.key], np.dtype(dtype))
    if source.transform == "transpose":
        array = array.T
    return np.ascontiguousarray(array).reshape(tuple(shape))


def float_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """Floating-point parameters and buffers by ``state_dict`` key."""
    return {key: value for key, value in unet.state_dict().items() if value.is_floating_point()}


def _is_constant_filled(array: np.ndarray) -> bool:
    """Every element equal (fresh ones/zeros, scalars): such a value says nothing about where it came from."""
    flat = array.reshape(-1)
    return flat.size <= 1 or bool((flat == flat[0]).all())


class _ValueIndex:
    """Hashes of every floating-point UNet tensor, as is and transposed (2-D), per needed dtype.

    ``lookup`` finds the tensors an initializer equals in O(1); nothing but hashes is kept.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], dtypes: Iterable[np.dtype]):
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.flat_digest: dict[tuple[str, str], str] = {}
        self._index: dict[tuple[str, int, str], list[tuple[str, str]]] = defaultdict(list)
        for key, tensor in tensors.items():
            for dtype in dtypes:
                array = cast_array(tensor, dtype)
                self.shapes[key] = tuple(array.shape)
                flat = digest(array)
                self.flat_digest[(key, dtype.name)] = flat
                self._index[(dtype.name, array.size, flat)].append((key, "flat"))
                if array.ndim == 2:
                    self._index[(dtype.name, array.size, digest(array.T))].append((key, "transpose"))

    def lookup(self, array: np.ndarray) -> list[WeightSource]:
        """Tensors equal to ``array`` (as is, reshaped or transposed), one transform per key."""
        found: dict[str, str] = {}
        for key, kind in self._index.get((array.dtype.name, array.size, digest(array)), []):
            shape = self.shapes[key]
            if kind == "flat":
                transform = "none" if shape == tuple(array.shape) else "reshape"
            elif tuple(array.shape) == shape[::-1]:
                transform = "transpose"
            else:
                continue
            if found.get(key) not in ("none", "reshape"):  # a symmetric matrix matches both: keep the plain one
                found[key] = transform
        return [WeightSource(key, transform) for key, transform in sorted(found.items())]


# --- the graph: aliases and scopes -------------------------------------------------------------------


@dataclass
class _Use:
    """One value name under which an initializer is read, and the module scopes of its readers."""

    alias: str
    scopes: list[str]
    read: bool  #: read by a non-Identity node (or a graph output)


def _scope_readings(segments: Sequence[str]) -> set[str]:
    """Module paths a node's scope segments may spell.

    Each segment names a called module relative to the one before, except that a child of a
    called container repeats the container's segment: ``in_layers/in_layers.2`` is module
    ``in_layers.2`` and ``ff/net/net.0`` is ``ff.net.0`` (diffusers: ``attn1/to_out.0``). A
    child attribute spelled like its parent's segment could be either, so both readings are kept.
    """
    collapsed: list[str] = []
    for segment in segments:
        if collapsed and segment.startswith(collapsed[-1] + "."):
            collapsed[-1] = segment
        else:
            collapsed.append(segment)
    return {".".join(collapsed), ".".join(segments)}


def _node_scopes(node_name: str, prefix: str, modules: set[str]) -> list[str]:
    """``/unet/down_blocks.0/attn1/to_q/MatMul`` → ``["down_blocks.0.attn1.to_q"]`` (prefix ``unet.``).

    Only readings naming a module of the UNet count (``""`` is the UNet itself); an unscoped
    node name gives none (no evidence).
    """
    if not node_name.startswith("/"):
        return []
    scopes = []
    for path in _scope_readings(node_name.split("/")[1:-1]):
        full = path + "."
        if full.startswith(prefix):
            scope = full[len(prefix):-1] if len(full) > len(prefix) else ""
            if scope in modules:
                scopes.append(scope)
    return sorted(scopes)


def _uses(graph: Any, initializers: Iterable[str], prefix: str, modules: set[str]) -> dict[str, list[_Use]]:
    """For each initializer, itself and every ``Identity`` alias of it (exporter deduplication)."""
    readers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    outputs = {value.name for value in graph.output}
    uses: dict[str, list[_Use]] = {}
    for root in initializers:
        found, pending = [], [root]
        while pending:
            alias = pending.pop()
            nodes = readers.get(alias, [])
            pending += [node.output[0] for node in nodes if node.op_type == "Identity"]
            others = [node for node in nodes if node.op_type != "Identity"]
            scopes = [scope for node in others for scope in _node_scopes(node.name, prefix, modules)]
            found.append(_Use(alias, scopes, bool(others) or alias in outputs))
        uses[root] = found
    return uses


def _in_scope(key: str, scopes: Sequence[str]) -> bool:
    return any(scope == "" or key.startswith(scope + ".") for scope in scopes)


# --- resolving one initializer ---------------------------------------------------------------------


@dataclass
class _Resolution:
    sources: list[WeightSource] = field(default_factory=list)
    candidates: list[WeightSource] = field(default_factory=list)  #: unresolved (ambiguous) uses


def _by_name(alias: str, array: np.ndarray, prefix: str, index: _ValueIndex) -> WeightSource | None:
    """The tensor the alias is named after, if it has exactly the initializer's value."""
    if not alias.startswith(prefix):
        return None
    key = alias[len(prefix):]
    if index.shapes.get(key) != tuple(array.shape):
        return None
    if index.flat_digest.get((key, array.dtype.name)) != digest(array):
        return None
    return WeightSource(key, "none", "name")


def _resolve_use(use: _Use, array: np.ndarray, candidates: list[WeightSource], constant_filled: bool,
                 resolution: _Resolution) -> None:
    """Name failed: pick among value candidates by scope, or by uniqueness (never for constant-filled values).

    No candidate: this use reads a constant of the graph. (A name match implies a value match,
    so an initializer with a constant use has no source at all and ends up fixed.)
    """
    if not candidates:
        return
    if constant_filled:
        resolution.candidates += candidates
        return
    in_scope = [c for c in candidates if _in_scope(c.key, use.scopes)]
    if len(in_scope) == 1:
        resolution.sources.append(WeightSource(in_scope[0].key, in_scope[0].transform, "scope"))
    elif not in_scope and len(candidates) == 1:
        resolution.sources.append(candidates[0])
    else:
        resolution.candidates += in_scope or candidates


def _resolve(uses: list[_Use], array: np.ndarray, prefix: str, index: _ValueIndex) -> _Resolution:
    resolution = _Resolution()
    candidates = index.lookup(array)
    constant_filled = _is_constant_filled(array)
    for use in uses:
        named = _by_name(use.alias, array, prefix, index)
        if named is not None:
            resolution.sources.append(named)
        elif use.read:
            _resolve_use(use, array, candidates, constant_filled, resolution)
    if not resolution.sources and not resolution.candidates and not any(use.read for use in uses):
        _resolve_use(_Use(uses[0].alias, [], True), array, candidates, constant_filled, resolution)  # never read
    return resolution


def _unique(sources: Iterable[WeightSource]) -> tuple[WeightSource, ...]:
    """One source per key, the first seen kept (name before scope before value, as resolved)."""
    seen: dict[str, WeightSource] = {}
    for source in sources:
        seen.setdefault(source.key, source)
    return tuple(seen.values())


# --- the entry point -----------------------------------------------------------------------------------


def _float_arrays(model: Any) -> tuple[dict[str, np.ndarray], list[str]]:
    """Floating-point initializers as arrays, and the names of all others (integer shapes …)."""
    from onnx import numpy_helper

    arrays, others = {}, []
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype in _NUMPY_TO_TORCH:
            arrays[tensor.name] = np.ascontiguousarray(array)
        else:
            others.append(tensor.name)
    return arrays, others


def _weights_dtype(arrays: Mapping[str, np.ndarray]) -> np.dtype:
    """The dtype holding the most weight elements (the export's precision)."""
    sizes: dict[np.dtype, int] = defaultdict(int)
    for array in arrays.values():
        sizes[array.dtype] += array.size
    return max(sizes, key=sizes.get) if sizes else np.dtype(np.float32)


def weight_map(onnx_path: str | os.PathLike, unet: nn.Module, *, prefix: str = "unet.") -> RefitMap:
    """Map every initializer of ``onnx_path`` to the tensor of ``unet`` it was exported from.

    ``unet`` is the UNet as exported, weights unchanged since (any device or dtype: values are
    compared after casting to each initializer's dtype); ``prefix`` is the wrapper's attribute
    path in the ONNX names (:class:`~seg_tsam.export.seg_unet.SegExportUNet` keeps the UNet as
    ``.unet``). See the module docstring for the rules.
    """
    import onnx

    model = onnx.load(os.fspath(onnx_path), load_external_data=True)
    arrays, fixed = _float_arrays(model)
    tensors = float_state(unet)
    dtypes = sorted({array.dtype for array in arrays.values()}, key=lambda d: d.name)
    weights_dtype = _weights_dtype(arrays)
    index = _ValueIndex(tensors, set(dtypes) | {weights_dtype})
    uses = _uses(model.graph, arrays, prefix, {name for name, _ in unet.named_modules()})
    mapped, ambiguous = [], []
    for name, array in arrays.items():
        resolution = _resolve(uses[name], array, prefix, index)
        common = (name, array.dtype.name, tuple(array.shape), digest(array))
        aliases = tuple(sorted(use.alias for use in uses[name] if use.alias != name))
        if resolution.candidates:  # part of it unresolved: the whole initializer is
            candidates = _unique([*resolution.sources, *resolution.candidates])
            ambiguous.append(AmbiguousWeight(*common, candidates, aliases))
        elif resolution.sources:
            mapped.append(MappedWeight(*common, _unique(resolution.sources), aliases))
        else:
            fixed.append(name)
    held = {s.key for e in mapped for s in e.sources} | {c.key for e in ambiguous for c in e.candidates}
    unmapped = {key: index.flat_digest[(key, weights_dtype.name)] for key in sorted(set(tensors) - held)}
    return RefitMap(prefix, weights_dtype.name, tuple(mapped), tuple(ambiguous), tuple(fixed), unmapped)
