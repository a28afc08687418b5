"""TensorRT engine building.

The first part runs everywhere: version-difference helpers, the progress/cancel logic behind
TensorRT's ``IProgressMonitor``, the "TensorRT missing" paths, and a toy UNet-shaped ONNX graph
checked against numpy with ONNX Runtime. The second part needs ``import tensorrt`` and a CUDA
device and skips with the precise reason otherwise: it builds that graph into an engine with a
profile from :mod:`export.profiles`, runs it and compares with numpy.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from seg_tsam.export.engine_build import (
    BuildCancelled,
    BuildOptions,
    BuildProgress,
    BuildProgressTracker,
    EngineBuildError,
    TensorRTUnavailable,
    build_engine,
    build_unet_engine,
    engine_device_memory_size,
    network_creation_flags,
    tensorrt_available,
    timing_cache_path,
)
from seg_tsam.export.profiles import FAMILIES, EngineProfile, trt_profile_shapes

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Small profile for the toy graph: latent 8–16 (odd 9 and 13 at opt), 1–2 images × 3 rows, 1–2 chunks.
TOY_PROFILE = EngineProfile(images=(1, 1, 2), height=(64, 72, 128), width=(64, 104, 128), prompt_chunks=(1, 1, 2))
TOY_FAMILY = FAMILIES["sd1"]


# --- runs everywhere ---------------------------------------------------------------------------------------


def test_importing_the_export_modules_loads_no_heavy_package(tmp_path):
    script = f"""
import importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("seg_tsam_loader", {str(REPO_ROOT / "extension" / "loader.py")!r})
loader = importlib.util.module_from_spec(spec)
spec.loader.exec_module(loader)
loader.register_package(Path({str(REPO_ROOT)!r}))
import seg_tsam.export.profiles, seg_tsam.export.registry, seg_tsam.export.engine_build
print(sorted(name for name in ("torch", "tensorrt", "onnx", "onnxruntime", "tqdm") if name in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert list(tmp_path.iterdir()) == []  # and nothing was written


def test_missing_tensorrt_is_reported_not_raised(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    available, reason = tensorrt_available()
    assert not available and reason.startswith("the tensorrt package is not installed")
    with pytest.raises(TensorRTUnavailable, match="not installed"):
        build_engine("model.onnx", "model.plan", lambda names: {})


def test_old_tensorrt_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="8.6.1"))
    available, reason = tensorrt_available()
    assert not available and "TensorRT 8.6.1 is too old" in reason


@pytest.mark.api_stand_in
def test_strongly_typed_flag_per_version():
    flags = SimpleNamespace(STRONGLY_TYPED=1)  # its value in TensorRT 10 (EXPLICIT_BATCH is 0)
    assert network_creation_flags(SimpleNamespace(__version__="10.13.2.6", NetworkDefinitionCreationFlag=flags)) == 2
    assert network_creation_flags(SimpleNamespace(__version__="11.4.0.106", NetworkDefinitionCreationFlag=flags)) == 0
    with pytest.raises(TensorRTUnavailable, match="no strongly typed networks"):
        network_creation_flags(SimpleNamespace(__version__="9.3.0", NetworkDefinitionCreationFlag=SimpleNamespace()))


@pytest.mark.api_stand_in
def test_device_memory_size_per_version():
    assert engine_device_memory_size(SimpleNamespace(device_memory_size_v2=7, device_memory_size=5)) == 7
    assert engine_device_memory_size(SimpleNamespace(device_memory_size=5)) == 5  # TensorRT 10.0


def test_timing_cache_is_per_tensorrt_version_and_compute_capability(tmp_path):
    assert timing_cache_path(tmp_path, "10.13.2.6", "8.6") == tmp_path / "timing_cache_trt10.13.2.6_cc86.cache"
    assert timing_cache_path(tmp_path, "10.13.2.6", "8.9") != timing_cache_path(tmp_path, "10.13.2.6", "8.6")


def test_progress_tracker_reports_nested_phases():
    events: list[BuildProgress] = []
    tracker = BuildProgressTracker(events.append, use_tqdm=False)
    tracker.phase_start("Building engine", None, 2)
    tracker.phase_start("Tactic timing", "Building engine", 4)
    assert tracker.step_complete("Tactic timing", 0) is True
    tracker.phase_finish("Tactic timing")
    assert tracker.step_complete("Building engine", 1) is True
    tracker.phase_finish("Building engine")
    assert [(e.phase, e.parent, e.steps_done, e.num_steps, e.depth) for e in events] == [
        ("Building engine", None, 0, 2, 0),
        ("Tactic timing", "Building engine", 0, 4, 1),
        ("Tactic timing", "Building engine", 1, 4, 1),
        ("Building engine", None, 2, 2, 0),
    ]
    assert events[2].fraction == 0.25 and not tracker.cancelled and tracker.error is None


def test_progress_callback_returning_false_cancels_from_then_on():
    tracker = BuildProgressTracker(lambda progress: progress.steps_done < 2, use_tqdm=False)
    tracker.phase_start("Building engine", None, 5)
    assert tracker.step_complete("Building engine", 0) is True
    assert tracker.step_complete("Building engine", 1) is False  # the callback said stop
    assert tracker.step_complete("Building engine", 2) is False and tracker.cancelled


def test_cancel_poll_and_cancel_method():
    stop = {"now": False}
    tracker = BuildProgressTracker(should_cancel=lambda: stop["now"], use_tqdm=False)
    tracker.phase_start("Building engine", None, 3)
    assert tracker.step_complete("Building engine", 0) is True
    stop["now"] = True
    assert tracker.step_complete("Building engine", 1) is False
    other = BuildProgressTracker(use_tqdm=False)
    other.cancel()
    assert other.step_complete("anything", 0) is False


def test_a_failing_callback_cancels_and_is_kept_for_reraising():
    def broken(progress):
        raise KeyError("progress bar gone")

    tracker = BuildProgressTracker(broken, use_tqdm=False)
    tracker.phase_start("Building engine", None, 3)  # must not raise into TensorRT
    assert tracker.step_complete("Building engine", 0) is False
    assert isinstance(tracker.error, KeyError) and tracker.cancelled


def test_tqdm_bars_follow_the_phases_and_are_closed():
    pytest.importorskip("tqdm")
    tracker = BuildProgressTracker(use_tqdm=True)
    tracker.phase_start("Building engine", None, 3)
    tracker.phase_start("Tactic timing", "Building engine", 2)
    tracker.step_complete("Tactic timing", 1)
    assert tracker._bars["Tactic timing"].n == 2 and tracker._bars["Tactic timing"].pos in (1, -1)
    tracker.phase_finish("Tactic timing")
    assert set(tracker._bars) == {"Building engine"}
    tracker.close()  # a build that ended without phase_finish
    assert tracker._bars == {}


# --- the build flow against a stand-in for the bindings (names as in TensorRT 10.13 and 11.4) ---------------


class _HostMemory(bytes):
    @property
    def nbytes(self) -> int:
        return len(self)


def fake_tensorrt(version: str = "11.4.0.106", *, phases: int = 3):
    """Just enough of ``tensorrt`` to drive :func:`build_engine`'s control flow without a GPU.
    It records what the builder was asked; the real API runs in the tests further down."""
    calls: dict = {"flags": [], "cleared": [], "shapes": {}, "network_flags": None, "timing_cache_in": None}

    class ILogger:
        Severity = SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

        def __init__(self):
            pass

    class IProgressMonitor:
        def __init__(self):
            pass

    class Network:
        num_inputs = 2

        def __init__(self):
            self.inputs = [SimpleNamespace(name="x", shape=(-1, 4)), SimpleNamespace(name="scale", shape=(1,))]

        def get_input(self, index):
            return self.inputs[index]

    class OnnxParser:
        def __init__(self, network, logger):
            self.logger, self.num_errors = logger, 0

        def parse_from_file(self, path):
            if Path(path).read_bytes().startswith(b"bad"):
                self.logger.log(ILogger.Severity.ERROR, "Failed to parse ONNX model from file: " + path)
                return False
            return True

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data) or b"cache"

        def serialize(self):
            return _HostMemory(self.data)

        def combine(self, other, ignore_mismatch):
            return True

    class Config:
        progress_monitor = None

        def set_flag(self, flag):
            calls["flags"].append(flag)

        def clear_flag(self, flag):
            calls["cleared"].append(flag)

        def add_optimization_profile(self, profile):
            return 0

        def create_timing_cache(self, data):
            calls["timing_cache_in"] = calls["timing_cache_in"] or bytes(data)
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def set_shape(self, name, minimum, optimum, maximum):
            calls["shapes"][name] = (minimum, optimum, maximum)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            monitor = config.progress_monitor
            monitor.phase_start("Building engine", None, phases)
            for step in range(phases):
                if not monitor.step_complete("Building engine", step):
                    monitor.phase_finish("Building engine")
                    return None
            monitor.phase_finish("Building engine")
            return _HostMemory(b"ENGINE")

    module = SimpleNamespace(
        __version__=version, ILogger=ILogger, IProgressMonitor=IProgressMonitor, Builder=Builder,
        OnnxParser=OnnxParser, NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1),
        BuilderFlag=SimpleNamespace(REFIT="REFIT", TF32="TF32"), MemoryPoolType=SimpleNamespace(WORKSPACE="WS"),
    )
    return module, calls


X_SHAPES = {"x": ((1, 4), (2, 4), (8, 4))}


@pytest.fixture
def onnx_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"an onnx model")
    return path


@pytest.mark.api_stand_in
@pytest.mark.parametrize("version, network_flags", [("10.13.3.9", 2), ("11.4.0.106", 0)])
def test_build_flow_writes_the_engine_and_timing_cache(monkeypatch, tmp_path, onnx_file, version, network_flags):
    module, calls = fake_tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    events: list[BuildProgress] = []
    options = BuildOptions(timing_cache_dir=tmp_path / "cache", compute_capability="8.9", refittable=True,
                           show_tqdm=False)
    report = build_engine(onnx_file, tmp_path / "out" / "model.plan", lambda names: X_SHAPES, options=options,
                          on_progress=events.append)
    assert (tmp_path / "out" / "model.plan").read_bytes() == b"ENGINE" and report.engine_bytes == 6
    assert calls["network_flags"] == network_flags and calls["flags"] == ["REFIT"] and calls["cleared"] == ["TF32"]
    assert calls["shapes"] == {"x": ((1, 4), (2, 4), (8, 4))}  # the static input needs no shapes
    assert report.timing_cache_path == tmp_path / "cache" / f"timing_cache_trt{version}_cc89.cache"
    assert report.timing_cache_path.read_bytes() == b"cache" and calls["timing_cache_in"] == b""
    assert [event.steps_done for event in events] == [0, 1, 2, 3] and events[-1].fraction == 1.0


@pytest.mark.api_stand_in
def test_build_flow_cancel_and_callback_errors_leave_no_engine(monkeypatch, tmp_path, onnx_file):
    module, _ = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    engine = tmp_path / "model.plan"
    quiet = BuildOptions(show_tqdm=False)
    with pytest.raises(BuildCancelled):
        build_engine(onnx_file, engine, lambda names: X_SHAPES, options=quiet, on_progress=lambda p: p.steps_done < 2)
    with pytest.raises(BuildCancelled):
        build_engine(onnx_file, engine, lambda names: X_SHAPES, options=quiet, should_cancel=lambda: True)

    def broken(progress):
        raise ZeroDivisionError("bar")

    with pytest.raises(ZeroDivisionError, match="bar"):
        build_engine(onnx_file, engine, lambda names: X_SHAPES, options=quiet, on_progress=broken)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.api_stand_in
def test_build_flow_errors_carry_tensorrt_messages(monkeypatch, tmp_path, onnx_file):
    module, _ = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    quiet = BuildOptions(show_tqdm=False)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"bad bytes")
    with pytest.raises(EngineBuildError, match="(?s)could not parse .*Failed to parse ONNX model from file"):
        build_engine(bad, tmp_path / "x.plan", lambda names: X_SHAPES, options=quiet)
    with pytest.raises(EngineBuildError, match="input 'x' has dynamic shape \\(-1, 4\\) but no"):
        build_engine(onnx_file, tmp_path / "x.plan", lambda names: {}, options=quiet)
    with pytest.raises(EngineBuildError, match="network does not have"):
        build_engine(onnx_file, tmp_path / "x.plan", lambda names: {**X_SHAPES, "y": ((1,), (1,), (1,))}, options=quiet)
    with pytest.raises(EngineBuildError, match="max shape \\(8, 3\\) of input 'x' does not fit"):
        build_engine(onnx_file, tmp_path / "x.plan", lambda names: {"x": ((1, 4), (2, 4), (8, 3))}, options=quiet)
    with pytest.raises(FileNotFoundError, match="ONNX file not found"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "x.plan", lambda names: X_SHAPES, options=quiet)
    assert not (tmp_path / "x.plan").exists()


# --- a toy graph with the UNet's inputs ---------------------------------------------------------------------


def write_toy_unet_onnx(path: Path) -> Path:
    """An ONNX graph with the UNet export's inputs and the same shape couplings, small enough to
    build in seconds: level 0 blurs ``sample`` with ``blur_h_0 · x · blur_w_0ᵀ`` and adds the
    timestep and the mean context; level 1 downsamples with a stride-2 convolution (ceil-halving,
    as a UNet does) and blurs with the level-1 matrices."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def tensor(name, dims):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    inputs = [
        tensor("sample", ["B", 4, "H", "W"]), tensor("timestep", ["B"]),
        tensor("encoder_hidden_states", ["B", "T", TOY_FAMILY.context_dim]),
        tensor("blur_h_0", ["B", "H", "H"]), tensor("blur_w_0", ["B", "W", "W"]),
        tensor("blur_h_1", ["B", "H1", "H1"]), tensor("blur_w_1", ["B", "W1", "W1"]),
    ]
    outputs = [tensor("out0", ["B", 4, "H", "W"]), tensor("out1", ["B", 4, "H1", "W1"])]
    initializers = [
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array([-1, 1, 1, 1], dtype=np.int64), "per_row"),
        numpy_helper.from_array(np.ones((4, 1, 1, 1), dtype=np.float32), "pick"),
    ]
    nodes = [helper.make_node("Conv", ["sample", "pick"], ["down"], strides=[2, 2], group=4, kernel_shape=[1, 1])]
    for level, source in ((0, "sample"), (1, "down")):
        nodes += [
            helper.make_node("Unsqueeze", [f"blur_h_{level}", "axis1"], [f"h{level}"]),
            helper.make_node("Transpose", [f"blur_w_{level}"], [f"wt{level}"], perm=[0, 2, 1]),
            helper.make_node("Unsqueeze", [f"wt{level}", "axis1"], [f"w{level}"]),
            helper.make_node("MatMul", [f"h{level}", source], [f"hx{level}"]),
            helper.make_node("MatMul", [f"hx{level}", f"w{level}"], [f"blurred{level}" if level == 0 else "out1"]),
        ]
    nodes += [
        helper.make_node("Reshape", ["timestep", "per_row"], ["t"]),
        helper.make_node("ReduceMean", ["encoder_hidden_states"], ["context_mean"], axes=[1, 2], keepdims=1),
        helper.make_node("Unsqueeze", ["context_mean", "axis1"], ["c"]),
        helper.make_node("Add", ["blurred0", "t"], ["with_t"]),
        helper.make_node("Add", ["with_t", "c"], ["out0"]),
    ]
    graph = helper.make_graph(nodes, "toy_seg_unet", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def toy_feeds(rows: int, latent_h: int, latent_w: int, tokens: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    h1, w1 = -(-latent_h // 2), -(-latent_w // 2)

    def random(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    return {
        "sample": random(rows, 4, latent_h, latent_w), "timestep": random(rows),
        "encoder_hidden_states": random(rows, tokens, TOY_FAMILY.context_dim),
        "blur_h_0": random(rows, latent_h, latent_h), "blur_w_0": random(rows, latent_w, latent_w),
        "blur_h_1": random(rows, h1, h1), "blur_w_1": random(rows, w1, w1),
    }


def toy_reference(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    def blur(x, h, w):
        return h[:, None] @ x @ np.swapaxes(w, 1, 2)[:, None]

    x = feeds["sample"].astype(np.float64)
    context = feeds["encoder_hidden_states"].astype(np.float64).mean(axis=(1, 2))
    out0 = blur(x, feeds["blur_h_0"], feeds["blur_w_0"]) + feeds["timestep"][:, None, None, None]
    return {
        "out0": out0 + context[:, None, None, None],
        "out1": blur(x[:, :, ::2, ::2], feeds["blur_h_1"], feeds["blur_w_1"]),
    }


def test_toy_graph_matches_numpy_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    session = ort.InferenceSession(str(write_toy_unet_onnx(tmp_path / "toy.onnx")), providers=["CPUExecutionProvider"])
    names = [graph_input.name for graph_input in session.get_inputs()]
    assert list(trt_profile_shapes(TOY_PROFILE, names, TOY_FAMILY)) == names  # every input has a profile rule
    feeds = toy_feeds(rows=3, latent_h=9, latent_w=13, tokens=154)
    results = dict(zip(["out0", "out1"], session.run(None, feeds), strict=True))
    for name, expected in toy_reference(feeds).items():
        np.testing.assert_allclose(results[name], expected, rtol=1e-4, atol=1e-4)


# --- TensorRT + CUDA ------------------------------------------------------------------------------------------


def compute_capability() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def run_engine(trt, engine_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an engine once with the name-based tensor API (TensorRT ≥ 10), buffers in torch."""
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)  # must outlive the engine
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    assert engine is not None
    assert engine_device_memory_size(engine) >= 0
    context = engine.create_execution_context()
    buffers = {}
    for name, array in feeds.items():
        buffers[name] = torch.from_numpy(array).cuda()
        assert context.set_input_shape(name, array.shape), name
        context.set_tensor_address(name, buffers[name].data_ptr())
    outputs = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)
               if engine.get_tensor_mode(engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT]
    for name in outputs:
        buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
        context.set_tensor_address(name, buffers[name].data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return {name: buffers[name].cpu().numpy() for name in outputs}


def test_build_and_run_a_unet_shaped_engine(trt, tmp_path):
    onnx_path = write_toy_unet_onnx(tmp_path / "toy.onnx")
    events: list[BuildProgress] = []
    options = BuildOptions(timing_cache_dir=tmp_path / "cache", compute_capability=compute_capability(),
                           show_tqdm=False)
    report = build_unet_engine(onnx_path, tmp_path / "engines" / "toy.plan", TOY_PROFILE, TOY_FAMILY,
                               options=options, on_progress=events.append)
    assert report.engine_path.is_file() and report.engine_bytes == report.engine_path.stat().st_size
    assert report.trt_version == trt.__version__
    assert report.input_shapes["blur_h_1"] == ((1, 4, 4), (3, 5, 5), (6, 8, 8))
    assert report.timing_cache_path is not None and report.timing_cache_path.stat().st_size > 0
    assert events and all(0.0 <= event.fraction <= 1.0 for event in events)
    assert not [p for p in (tmp_path / "engines").iterdir() if p.name.endswith(".tmp")]

    for rows, latent_h, latent_w, tokens in ((3, 9, 13, 154), (1, 8, 16, 77), (6, 16, 8, 77)):
        feeds = toy_feeds(rows, latent_h, latent_w, tokens)
        results = run_engine(trt, report.engine_path, feeds)
        for name, expected in toy_reference(feeds).items():
            np.testing.assert_allclose(results[name], expected, rtol=1e-4, atol=1e-4, err_msg=name)


def test_refittable_build_with_the_timing_cache_reused(trt, tmp_path):
    onnx_path = write_toy_unet_onnx(tmp_path / "toy.onnx")
    options = BuildOptions(timing_cache_dir=tmp_path / "cache", compute_capability=compute_capability(),
                           refittable=True, show_tqdm=False)
    first = build_unet_engine(onnx_path, tmp_path / "a.plan", TOY_PROFILE, TOY_FAMILY, options=options)
    second = build_unet_engine(onnx_path, tmp_path / "b.plan", TOY_PROFILE, TOY_FAMILY, options=options)
    assert first.timing_cache_path == second.timing_cache_path and second.engine_path.is_file()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(second.engine_path.read_bytes())
    assert engine.refittable


def test_cancelling_from_the_progress_callback_stops_the_build(trt, tmp_path):
    onnx_path = write_toy_unet_onnx(tmp_path / "toy.onnx")
    engine_path = tmp_path / "toy.plan"
    with pytest.raises(BuildCancelled):
        build_unet_engine(onnx_path, engine_path, TOY_PROFILE, TOY_FAMILY,
                          options=BuildOptions(show_tqdm=False), on_progress=lambda progress: False)
    assert list(tmp_path.iterdir()) == [onnx_path]


def test_an_exception_in_the_callback_is_reraised(trt, tmp_path):
    onnx_path = write_toy_unet_onnx(tmp_path / "toy.onnx")

    def broken(progress):
        raise ZeroDivisionError("bar")

    with pytest.raises(ZeroDivisionError, match="bar"):
        build_unet_engine(onnx_path, tmp_path / "toy.plan", TOY_PROFILE, TOY_FAMILY,
                          options=BuildOptions(show_tqdm=False), on_progress=broken)
    assert not (tmp_path / "toy.plan").exists()


def test_parser_errors_are_raised_with_tensorrt_messages(trt, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not an ONNX protobuf")
    with pytest.raises(EngineBuildError, match="could not parse") as raised:
        build_engine(broken, tmp_path / "x.plan", lambda names: {}, options=BuildOptions(show_tqdm=False))
    assert len(str(raised.value).splitlines()) >= 2  # at least one parser message follows
    assert not (tmp_path / "x.plan").exists()


def test_profile_that_does_not_fit_the_network_is_refused(trt, tmp_path):
    onnx_path = write_toy_unet_onnx(tmp_path / "toy.onnx")
    with pytest.raises(EngineBuildError, match="no \\(min, opt, max\\)"):
        build_engine(onnx_path, tmp_path / "x.plan",
                     lambda names: {"sample": ((1, 4, 8, 8), (1, 4, 8, 8), (2, 4, 16, 16))},
                     options=BuildOptions(show_tqdm=False))
    with pytest.raises(EngineBuildError, match="does not fit its dimensions"):
        build_engine(onnx_path, tmp_path / "x.plan",
                     lambda names: {**trt_profile_shapes(TOY_PROFILE, names, TOY_FAMILY),
                                    "sample": ((1, 3, 8, 8), (1, 3, 8, 8), (2, 3, 16, 16))},
                     options=BuildOptions(show_tqdm=False))

