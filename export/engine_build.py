"""Build a TensorRT engine from an ONNX file with the TensorRT Python API (TensorRT 10 and 11).

- The network is **strongly typed**: precision comes from the ONNX file (export fp16 weights
  for an fp16 engine). TensorRT 11 has no other mode (and no ``BuilderFlag.FP16``); on 10 the
  ``STRONGLY_TYPED`` creation flag asks for it. :func:`network_creation_flags` is the one place
  that knows the difference.
- The ONNX file is parsed with ``parse_from_file`` so external data (> 2 GB models) next to it
  is found. Parser and builder errors are raised as :class:`EngineBuildError` with TensorRT's
  own messages; nothing is swallowed and nothing calls ``exit``.
- One optimisation profile, from a ``(min, opt, max)`` shape per graph input (for a UNet:
  :func:`~seg_tsam.export.profiles.trt_profile_shapes`, see :func:`build_unet_engine`).
- A timing cache per TensorRT version and compute capability in a folder the caller names;
  read before the build, merged with whatever another build saved meanwhile, written back
  atomically.
- Progress goes to a callback (the WebUI's progress bar) and to tqdm. The callback, or a
  ``should_cancel`` poll, cancels the build by returning False / True; TensorRT then stops and
  :class:`BuildCancelled` is raised. An exception inside the callback cancels the build too and
  is re-raised afterwards (TensorRT's binding would otherwise print it and carry on).
- The engine file is written atomically (temporary file, fsync, rename).

``tensorrt`` is imported inside the functions only; importing this module needs neither
TensorRT nor CUDA.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock

from .profiles import EngineProfile, ModelFamily, ShapeTriple, trt_profile_shapes
from .registry import write_file_atomically

log = logging.getLogger(__name__)

#: Oldest TensorRT major this module supports (name-based tensor API, strongly typed networks).
MIN_TENSORRT_MAJOR = 10


class TensorRTUnavailable(RuntimeError):
    """``tensorrt`` cannot be imported, is too old, or finds no usable CUDA device."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX file or build the engine; the message holds its errors."""


class BuildCancelled(RuntimeError):
    """The build was cancelled from the progress callback or ``should_cancel``."""


# --- version differences, one small function each ---------------------------------------------------


def tensorrt_major(trt: Any) -> int:
    """The major version of the imported ``tensorrt`` module (``"10.13.2.6"`` → 10)."""
    version = str(getattr(trt, "__version__", ""))
    try:
        return int(version.split(".", 1)[0])
    except ValueError:
        raise TensorRTUnavailable(f"cannot read the TensorRT version from {version!r}") from None


def network_creation_flags(trt: Any) -> int:
    """Flags for ``Builder.create_network`` that make the network strongly typed.

    TensorRT 11: strongly typed always, the flag is deprecated and ignored, so pass none.
    TensorRT 10: ``1 << STRONGLY_TYPED``.
    """
    major = tensorrt_major(trt)
    if major >= 11:
        return 0
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    if major < MIN_TENSORRT_MAJOR or flag is None:
        raise TensorRTUnavailable(
            f"TensorRT {trt.__version__} has no strongly typed networks; install TensorRT 10 or 11"
        )
    return 1 << int(flag)


def engine_device_memory_size(engine: Any) -> int:
    """Scratch memory an execution context needs: ``device_memory_size_v2`` (TensorRT ≥ 10.1,
    the only one in 11) or ``device_memory_size`` (TensorRT 10.0)."""
    if hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)


def _import_tensorrt() -> Any:
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as error:
        raise TensorRTUnavailable(f"the tensorrt package is not installed ({error})") from None
    except OSError as error:  # a wheel whose shared libraries fail to load
        raise TensorRTUnavailable(f"tensorrt is installed but its libraries failed to load: {error}") from None
    if tensorrt_major(trt) < MIN_TENSORRT_MAJOR:
        raise TensorRTUnavailable(
            f"TensorRT {trt.__version__} is too old; this extension needs TensorRT {MIN_TENSORRT_MAJOR} or newer"
        )
    return trt


# --- logger ---------------------------------------------------------------------------------------------


def _make_logger(trt: Any) -> Any:
    """A ``trt.ILogger`` that forwards to :mod:`logging` and keeps error messages for exceptions."""

    class CollectingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif level == int(trt.ILogger.Severity.WARNING):
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return CollectingLogger()


def tensorrt_available() -> tuple[bool, str]:
    """``(True, "TensorRT <version>")`` when engines can be built here, else ``(False, reason)``.

    Imports ``tensorrt`` and creates a ``Builder`` (which initialises CUDA), so call it when
    the answer is needed (the Export tab), not at start-up. Never raises.
    """
    try:
        trt = _import_tensorrt()
    except TensorRTUnavailable as error:
        return False, str(error)
    try:
        _create_builder(trt, _make_logger(trt))
    except TensorRTUnavailable as error:
        return False, str(error)
    return True, f"TensorRT {trt.__version__}"


def _create_builder(trt: Any, logger: Any) -> Any:
    """``trt.Builder(logger)``; without a usable CUDA device the binding raises or returns None."""
    try:
        builder = trt.Builder(logger)
    except Exception as error:  # noqa: BLE001 - re-raised with the reason
        builder, failure = None, str(error)
    else:
        failure = ""
    if builder is None:
        details = "; ".join([*logger.errors, failure] if failure else logger.errors) or "no details"
        raise TensorRTUnavailable(
            f"TensorRT {trt.__version__} is installed but cannot use a CUDA device (no GPU, driver or "
            f"CUDA runtime it can load): {details}"
        )
    return builder


def current_compute_capability(device_index: int = 0) -> str:
    """``"major.minor"`` of a CUDA device, through torch (which the WebUI always has)."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("no CUDA device is visible to torch; cannot tell the GPU's compute capability")
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"{major}.{minor}"


# --- progress ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildProgress:
    """One progress report: ``steps_done`` of ``num_steps`` in ``phase`` (nested under ``parent``)."""

    phase: str
    parent: str | None
    steps_done: int
    num_steps: int
    depth: int  #: 0 for a top-level phase

    @property
    def fraction(self) -> float:
        return self.steps_done / self.num_steps if self.num_steps else 1.0


#: Receives each report; returning ``False`` cancels the build (``None``/``True`` continue).
ProgressCallback = Callable[[BuildProgress], "bool | None"]


class BuildProgressTracker:
    """The logic behind TensorRT's ``IProgressMonitor``, free of TensorRT so it can be tested.

    TensorRT calls it from its own threads, so state changes take a lock. It never raises into
    TensorRT: a failing callback is stored in :attr:`error`, and the build is cancelled.
    """

    def __init__(
        self,
        on_progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
        use_tqdm: bool = True,
    ):
        self._on_progress = on_progress
        self._should_cancel = should_cancel
        self._use_tqdm = use_tqdm
        self._lock = threading.Lock()
        self._phases: dict[str, tuple[str | None, int, int]] = {}  # name → (parent, num_steps, depth)
        self._bars: dict[str, Any] = {}
        self.cancelled = False
        self.error: BaseException | None = None

    def cancel(self) -> None:
        """Ask TensorRT to stop at its next step."""
        self.cancelled = True

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        with self._lock:
            depth = self._phases[parent_phase][2] + 1 if parent_phase in self._phases else 0
            self._phases[phase_name] = (parent_phase, num_steps, depth)
            self._open_bar(phase_name, num_steps, depth)
        self._report(BuildProgress(phase_name, parent_phase, 0, num_steps, depth))

    def step_complete(self, phase_name: str, step: int) -> bool:
        """Record step ``step`` (0-based) of ``phase_name`` as done; False asks TensorRT to cancel."""
        with self._lock:
            parent, num_steps, depth = self._phases.get(phase_name, (None, step + 1, 0))
            bar = self._bars.get(phase_name)
            if bar is not None:
                bar.update(max(0, step + 1 - bar.n))
        self._report(BuildProgress(phase_name, parent, step + 1, num_steps, depth))
        return not self.cancelled

    def phase_finish(self, phase_name: str) -> None:
        with self._lock:
            self._phases.pop(phase_name, None)
            bar = self._bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    def close(self) -> None:
        """Close any bar TensorRT left open (it may skip ``phase_finish`` on errors)."""
        with self._lock:
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()
            self._phases.clear()

    def _report(self, progress: BuildProgress) -> None:
        try:
            if self._should_cancel is not None and self._should_cancel():
                self.cancelled = True
            if self._on_progress is not None and self._on_progress(progress) is False:
                self.cancelled = True
        except BaseException as error:  # noqa: BLE001 - stored, re-raised after the build
            if self.error is None:
                self.error = error
            self.cancelled = True

    def _open_bar(self, phase_name: str, num_steps: int, depth: int) -> None:
        if not self._use_tqdm:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            self._use_tqdm = False
            return
        self._bars[phase_name] = tqdm(total=num_steps, desc=phase_name, position=depth, leave=depth == 0)


def _make_progress_monitor(trt: Any, tracker: BuildProgressTracker) -> Any:
    """A ``trt.IProgressMonitor`` that delegates to ``tracker``."""

    class ProgressMonitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            tracker.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return tracker.step_complete(phase_name, step)

        def phase_finish(self, phase_name: str) -> None:
            tracker.phase_finish(phase_name)

    return ProgressMonitor()


# --- options and results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildOptions:
    """Builder settings beyond the shapes. Precision is not one: it comes from the ONNX file."""

    timing_cache_dir: Path | None = None  #: None: no timing cache
    compute_capability: str | None = None  #: for the timing cache's name; None: ask torch
    refittable: bool = False  #: ``BuilderFlag.REFIT``, so LoRA weights can be refitted
    allow_tf32: bool = False  #: TF32 on fp32 layers: faster, but identity blur rows stop being exact
    workspace_bytes: int | None = None  #: workspace pool limit; None: TensorRT's default
    optimization_level: int | None = None  #: 0-5; None: TensorRT's default (3)
    show_tqdm: bool = True


@dataclass(frozen=True)
class BuildReport:
    engine_path: Path
    engine_bytes: int
    seconds: float
    trt_version: str
    input_shapes: Mapping[str, ShapeTriple]
    timing_cache_path: Path | None = None


def timing_cache_path(cache_dir: Path | str, trt_version: str, compute_capability: str) -> Path:
    """One cache per TensorRT version and compute capability (a cache is valid for neither another
    version nor another GPU architecture)."""
    capability = compute_capability.replace(".", "")
    return Path(cache_dir) / f"timing_cache_trt{trt_version}_cc{capability}.cache"


def _load_timing_cache(config: Any, path: Path | None) -> Any:
    data = b""
    if path is not None and path.is_file():
        data = path.read_bytes()
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, False):
        log.warning("timing cache %s is unusable (corrupt or from another GPU/TensorRT); starting a new one", path)
        cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(cache, False):
            raise EngineBuildError("TensorRT refused a new, empty timing cache")
    return cache


def _save_timing_cache(config: Any, path: Path) -> None:
    """Merge with what another build may have saved meanwhile, then replace the file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path) + ".lock", timeout=120):
        cache = config.get_timing_cache()
        if path.is_file():
            on_disk = config.create_timing_cache(path.read_bytes())
            if on_disk is not None and not cache.combine(on_disk, False):
                log.warning("could not merge timing cache %s; overwriting it with this build's", path)
        write_file_atomically(path, cache.serialize())


def _parser_errors(parser: Any, logged: Sequence[str]) -> str:
    """The parser's errors with the failing node, else what TensorRT logged (an unreadable file
    is reported through the logger only)."""
    lines = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node = error.node()
        where = f" (node {node}: {error.node_name()} [{error.node_operator()}])" if node >= 0 else ""
        lines.append(f"{error.desc()}{where}")
    return "\n".join(lines or logged) or "no message from the parser"


def _network_inputs(network: Any) -> dict[str, tuple[int, ...]]:
    return {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}


def _check_shapes(inputs: Mapping[str, tuple[int, ...]], shapes: Mapping[str, ShapeTriple]) -> None:
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise EngineBuildError(f"profile names input(s) {unknown} that the network does not have ({sorted(inputs)})")
    for name, dims in inputs.items():
        if name not in shapes:
            if any(dim < 0 for dim in dims):
                raise EngineBuildError(f"input {name!r} has dynamic shape {dims} but no (min, opt, max) in the profile")
            continue
        triple = shapes[name]
        if len(triple) != 3:
            raise EngineBuildError(f"input {name!r}: expected (min, opt, max) shapes, got {triple}")
        for label, shape in zip(("min", "opt", "max"), triple, strict=True):
            if len(shape) != len(dims) or any(
                fixed >= 0 and fixed != size for fixed, size in zip(dims, shape, strict=True)
            ):
                raise EngineBuildError(
                    f"{label} shape {tuple(shape)} of input {name!r} does not fit its dimensions {dims}"
                )
        minimum, optimum, maximum = triple
        if not all(low <= mid <= high for low, mid, high in zip(minimum, optimum, maximum, strict=True)):
            raise EngineBuildError(f"input {name!r}: need min ≤ opt ≤ max in every dimension, got {triple}")


def _configure(trt: Any, config: Any, options: BuildOptions) -> None:
    if options.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if not options.allow_tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_bytes))
    if options.optimization_level is not None:
        config.builder_optimization_level = int(options.optimization_level)


# --- building ------------------------------------------------------------------------------------------------


def build_engine(
    onnx_path: Path | str,
    engine_path: Path | str,
    shapes_for_inputs: Callable[[Sequence[str]], Mapping[str, ShapeTriple]],
    *,
    options: BuildOptions = BuildOptions(),
    on_progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> BuildReport:
    """Parse ``onnx_path``, build a strongly typed engine and write it to ``engine_path``.

    ``shapes_for_inputs`` receives the network's input names and returns ``(min, opt, max)``
    for each dynamic input. Raises :class:`TensorRTUnavailable`, :class:`EngineBuildError`
    (with TensorRT's messages) or :class:`BuildCancelled`; on any of them no engine file is left.
    """
    trt = _import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}")
    logger = _make_logger(trt)
    builder = _create_builder(trt, logger)
    network = builder.create_network(network_creation_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}:\n{_parser_errors(parser, logger.errors)}")

    inputs = _network_inputs(network)
    shapes = {name: tuple(tuple(int(d) for d in shape) for shape in triple)
              for name, triple in shapes_for_inputs(list(inputs)).items()}
    _check_shapes(inputs, shapes)

    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (minimum, optimum, maximum) in shapes.items():
        try:
            profile.set_shape(name, minimum, optimum, maximum)
        except RuntimeError as error:  # the binding's "inconsistent shapes" check
            raise EngineBuildError(f"TensorRT rejected the shapes {shapes[name]} of input {name!r}: {error}") from error
    if config.add_optimization_profile(profile) < 0:
        raise EngineBuildError("TensorRT rejected the optimisation profile:\n" + "\n".join(logger.errors))
    _configure(trt, config, options)

    cache_path = None
    if options.timing_cache_dir is not None:
        capability = options.compute_capability or current_compute_capability()
        cache_path = timing_cache_path(options.timing_cache_dir, trt.__version__, capability)
        _load_timing_cache(config, cache_path)

    tracker = BuildProgressTracker(on_progress, should_cancel, use_tqdm=options.show_tqdm)
    monitor = _make_progress_monitor(trt, tracker)  # kept referenced for the whole build
    config.progress_monitor = monitor
    started = time.perf_counter()
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        tracker.close()
    seconds = time.perf_counter() - started
    if tracker.error is not None:
        raise tracker.error
    if tracker.cancelled:
        raise BuildCancelled(f"engine build cancelled after {seconds:.1f} s")
    if serialized is None:
        raise EngineBuildError("TensorRT failed to build the engine:\n" + ("\n".join(logger.errors) or "no message"))

    if cache_path is not None:
        _save_timing_cache(config, cache_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(engine_path, serialized)
    return BuildReport(
        engine_path=engine_path,
        engine_bytes=int(serialized.nbytes),
        seconds=seconds,
        trt_version=trt.__version__,
        input_shapes=shapes,
        timing_cache_path=cache_path,
    )


def build_unet_engine(
    onnx_path: Path | str,
    engine_path: Path | str,
    profile: EngineProfile,
    family: ModelFamily,
    *,
    in_channels: int | None = None,
    options: BuildOptions = BuildOptions(),
    on_progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> BuildReport:
    """:func:`build_engine` for an exported UNet: shapes from ``profile`` for each graph input."""
    return build_engine(
        onnx_path,
        engine_path,
        lambda names: trt_profile_shapes(profile, names, family, in_channels=in_channels),
        options=options,
        on_progress=on_progress,
        should_cancel=should_cancel,
    )
