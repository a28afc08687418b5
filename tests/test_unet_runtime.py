"""The replacement-UNet runtime: an exported SEG UNet run in place of the PyTorch one.

Reference: the PyTorch UNet with SEG's own hooks (``QueryBlurPatch``) blurring the same rows.
Under test: :class:`ReplacementUNet` over an ONNX Runtime session of the export, fed only the
WebUI-style call ``(x, timesteps, context, **extra)`` and the patch's :meth:`active_blur`, and
its fallback routing (each reason once, the PyTorch result returned). The TensorRT session has
the same interface and is covered by the GPU tests; its *choice* of engine is tested here.
"""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from seg_tsam.export.onnx_exports import OnnxExportInfo, list_onnx_exports, write_export_info  # noqa: E402
from seg_tsam.export.onnx_export import export_onnx  # noqa: E402
from seg_tsam.export.ort_session import (  # noqa: E402
    OnnxExportSessions,
    OnnxRuntimeSession,
    OnnxSessionError,
    onnxruntime_providers,
)
from seg_tsam.export.profiles import EngineCall, EngineProfile  # noqa: E402
from seg_tsam.export.registry import EngineEntry, EngineKey, EngineRegistry  # noqa: E402
from seg_tsam.export.seg_unet import SegExportUNet  # noqa: E402
from seg_tsam.export.trt_runtime import RegistryEngines  # noqa: E402
from seg_tsam.export.refit import sidecar_path, weight_map  # noqa: E402
from seg_tsam.export.unet_runtime import CHECKPOINT_WEIGHTS, EngineCannotRun, ReplacementUNet, UNetWeights  # noqa: E402
from seg_tsam.extension.adapters.diffusers import tiny_models  # noqa: E402
from seg_tsam.extension.adapters.unet_layers import self_attention_layers  # noqa: E402
from seg_tsam.extension.core.layers import select_layers  # noqa: E402
from seg_tsam.extension.core.query_blur_patch import QueryBlurPatch  # noqa: E402
from test_refit import lora_like  # noqa: E402

INF = math.inf
CHECKPOINT = "0123456789"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Exported:
    """A tiny diffusers UNet, its SEG export, and the WebUI-style call pieces."""

    def __init__(self, config: dict, layers: str, folder):
        self.unet = tiny_models.tiny_unet(config).eval()
        self.layers = layers
        self.sdxl = config.get("addition_embed_type") == "text_time"
        self.context_width = config["cross_attention_dim"]
        self.path = export_onnx(SegExportUNet(self.unet, flavour="diffusers", layers=layers), folder / "unet.onnx")
        weight_map(self.path, self.unet).save(sidecar_path(self.path))  # as the WebUI export does, for LoRA

    def call(self, latent, batch, tokens, seed=0):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 4, *latent, generator=generator)
        timesteps = torch.linspace(999.0, 20.0, batch)
        context = torch.randn(batch, tokens, self.context_width, generator=generator)
        extra = {}
        if self.sdxl:
            extra = {"text_embeds": torch.randn(batch, 32, generator=generator),
                     "time_ids": torch.tensor([[64.0, 48.0, 0.0, 0.0, 64.0, 48.0]]).repeat(batch, 1)}
        return x, timesteps, context, extra

    def pytorch(self, x, timesteps, context, **extra):
        added = dict(extra) if self.sdxl else None
        return self.unet(x, timesteps, context, added_cond_kwargs=added, return_dict=False)[0]

    def patch(self, layers: str | None = None) -> QueryBlurPatch:
        layers = layers or self.layers
        return QueryBlurPatch(select_layers(self_attention_layers(self.unet), layers), layers)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return Exported(tiny_models.TINY_SD1_UNET_CONFIG, "all", tmp_path_factory.mktemp("sd1"))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return Exported(tiny_models.TINY_SDXL_UNET_CONFIG, "mid", tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(params=["sd1", "sdxl"])
def exported(request):
    return request.getfixturevalue(request.param)


def replacement(exported, patch, *, checkpoint=CHECKPOINT, fallback=None):
    notices: list[str] = []
    fallbacks: list[int] = []

    def pytorch(x, timesteps, context, *args, **kwargs):
        fallbacks.append(x.shape[0])
        return (fallback or exported.pytorch)(x, timesteps, context, *args, **kwargs)

    chooser = OnnxExportSessions(exported.path, checkpoint_hash=CHECKPOINT, current_checkpoint_hash=lambda: checkpoint)
    runtime = ReplacementUNet(choose_session=chooser, blur=patch.active_blur, fallback=pytorch, notice=notices.append)
    return runtime, notices, fallbacks


def same_checkpoint(path) -> OnnxExportSessions:
    """The chooser for an export of the loaded checkpoint."""
    return OnnxExportSessions(path, checkpoint_hash=CHECKPOINT, current_checkpoint_hash=lambda: CHECKPOINT)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


# (latent, batch, tokens, blurred rows, σ): square, non-square and odd sizes, mixed rows.
CASES = [
    ((8, 8), 3, 77, [2], 0.5),
    ((9, 5), 4, 154, [1, 3], 2.0),
    ((6, 11), 2, 77, [0], 10.0),
    ((7, 7), 3, 77, [0, 2], INF),
    ((8, 6), 2, 77, [], 0.0),
]


@pytest.mark.parametrize("latent, batch, tokens, rows, sigma", CASES)
def test_replacement_runs_all_rows_in_one_session_call_like_the_hooks(exported, latent, batch, tokens, rows, sigma):
    x, timesteps, context, extra = exported.call(latent, batch, tokens)
    with torch.no_grad(), exported.patch() as patch:
        runtime, notices, fallbacks = replacement(exported, patch)
        with patch.blurring(rows, batch, sigma):
            expected = exported.pytorch(x, timesteps, context, **extra)  # SEG's hooks blur these rows
            actual = runtime.forward(x, timesteps, context, **extra)
    assert (notices, fallbacks, runtime.session_calls) == ([], [], 1)
    assert actual.dtype == x.dtype and actual.shape == expected.shape
    assert relative_error(actual, expected) <= 1e-4


def test_unblurred_rows_equal_the_plain_unet_and_sigma_changes_only_blurred_rows(sd1):
    x, timesteps, context, extra = sd1.call((8, 8), 3, 77)
    with torch.no_grad(), sd1.patch() as patch:
        runtime, _, _ = replacement(sd1, patch)
        plain = sd1.pytorch(x, timesteps, context)
        outputs = {}
        for sigma in (2.0, INF):
            with patch.blurring([1], 3, sigma):
                outputs[sigma] = runtime.forward(x, timesteps, context)
    for sigma, output in outputs.items():
        assert relative_error(output[[0, 2]], plain[[0, 2]]) <= 1e-4
        assert relative_error(output[1], plain[1]) > 1e-3, f"σ={sigma} left the SEG row unchanged"
    assert relative_error(outputs[2.0][1], outputs[INF][1]) > 1e-3


def test_falls_back_to_pytorch_once_per_reason(sd1):
    x, timesteps, context, _ = sd1.call((8, 8), 2, 77)
    with torch.no_grad(), sd1.patch() as patch:
        runtime, notices, fallbacks = replacement(sd1, patch, checkpoint="another000")
        with patch.blurring([1], 2, 2.0):
            expected = sd1.pytorch(x, timesteps, context)
            first = runtime.forward(x, timesteps, context)
            runtime.forward(x, timesteps, context)
    assert torch.equal(first, expected)  # the PyTorch UNet ran, its hooks blurred
    assert fallbacks == [2, 2] and runtime.session_calls == 0
    assert len(notices) == 1 and "another000" in notices[0] and CHECKPOINT in notices[0]
    assert dict(runtime.fallbacks) == {notices[0]: 2}  # every call counted, for the generation info


def test_other_seg_layers_than_exported_fall_back(sdxl):
    x, timesteps, context, extra = sdxl.call((8, 8), 2, 77)
    with torch.no_grad(), sdxl.patch("up") as patch:
        runtime, notices, fallbacks = replacement(sdxl, patch)
        with patch.blurring([1], 2, 2.0):
            runtime.forward(x, timesteps, context, **extra)
        runtime.forward(x, timesteps, context, **extra)  # no blur in this call: the export serves it
    assert fallbacks == [2] and runtime.session_calls == 1
    assert len(notices) == 1 and "'up'" in notices[0] and "'mid'" in notices[0]


def test_unknown_inputs_gradients_and_positional_extras_fall_back(sd1):
    x, timesteps, context, _ = sd1.call((8, 8), 2, 77)
    with sd1.patch() as patch:
        runtime, notices, fallbacks = replacement(sd1, patch, fallback=lambda x, t, c, *a, **k: sd1.pytorch(x, t, c))
        with torch.no_grad():
            runtime.forward(x, timesteps, context, control=torch.zeros(1))
            runtime.forward(x, timesteps, context, torch.zeros(1))
            runtime.forward(x, timesteps, context, control=None)  # None extras are absent inputs
        runtime.forward(x.clone().requires_grad_(True), timesteps, context)
    assert fallbacks == [2, 2, 2] and runtime.session_calls == 1
    assert ["control" in notices[0], "positional" in notices[1], "gradients" in notices[2]] == [True] * 3


def test_a_file_that_is_not_a_seg_export_is_refused_with_the_reason(tmp_path, sd1):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["a"], ["out_sample"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, [1])])
    path = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(OnnxSessionError, match="not a SEG export"):
        OnnxRuntimeSession(path)
    chooser = OnnxExportSessions(tmp_path / "missing.onnx", checkpoint_hash="h", current_checkpoint_hash=lambda: "h")
    for _ in range(2):  # the load error is kept, not retried per call
        with pytest.raises(EngineCannotRun, match="no ONNX file"):
            chooser(EngineCall(2, 8, 8, 77), None, ())


def test_cuda_provider_only_for_cuda_calls_where_the_build_has_it():
    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnxruntime_providers(torch.device("cuda", 1), gpu_build) == ["CUDAExecutionProvider",
                                                                        "CPUExecutionProvider"]
    assert onnxruntime_providers("cpu", gpu_build) == ["CPUExecutionProvider"]
    assert onnxruntime_providers("cuda", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    import onnxruntime  # this build's own list: a CPU session always loads

    providers = onnxruntime_providers("cpu")
    assert providers == ["CPUExecutionProvider"] and set(providers) <= set(onnxruntime.get_available_providers())


def test_session_reads_what_the_export_was_made_with(sd1):
    session = OnnxRuntimeSession(sd1.path)
    layers = select_layers(self_attention_layers(sd1.unet), "all")
    assert session.layer_names == frozenset(layer.name for layer in layers)
    assert session.levels == (0, 1, 2) and session.layer_spec == "all" and session.flavour == "diffusers"


def test_export_info_listing(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.onnx").write_bytes(b"x")
    write_export_info(tmp_path / "a.onnx", OnnxExportInfo("a.onnx", "h1", "one.safetensors", "sd1", "mid", "fp16"))
    write_export_info(tmp_path / "b.onnx", OnnxExportInfo("other.onnx", "h2", "two", "sd1", "mid", "fp16"))
    (tmp_path / "c.json").write_text("{not json")
    write_export_info(tmp_path / "d.onnx", OnnxExportInfo("d.onnx", "h4", "four", "sd1", "mid", "fp16"))  # no .onnx
    listed = list_onnx_exports(tmp_path)
    assert [info.onnx_file for info in listed] == ["a.onnx"]
    assert listed[0].label == "one.safetensors (mid, fp16)"


# --- TensorRT engine choice (the registry side; loading is injected) ---------------------------------


class LoadedEngine:
    def __init__(self, path, onnx_path=None):
        self.path = path
        self.onnx_path = onnx_path
        self.input_names = ("sample", "timestep", "encoder_hidden_states", "blur_h_2", "blur_w_2")
        self.levels = (2,)


def register(registry: EngineRegistry, *, layers: str, height, checkpoint=CHECKPOINT, trt="10.9.0", cc="8.9",
             names: tuple[str, ...] = (), onnx_file: str | None = None):
    profile = EngineProfile(images=(1, 1, 2), height=height, width=(512, 512, 768))
    key = EngineKey(checkpoint_hash=checkpoint, profile=profile, seg_layers=layers, trt_version=trt,
                    compute_capability=cc)
    entry = EngineEntry(key=key, engine_file=registry.engine_file_name(key, "tiny"), seg_layer_names=names,
                        onnx_file=onnx_file)
    registry.engine_path(entry).write_bytes(b"engine")
    registry.add(entry)
    return entry


@pytest.fixture
def engines(tmp_path):
    registry = EngineRegistry(tmp_path)
    small = register(registry, layers="mid", height=(512, 512, 768))
    large = register(registry, layers="mid", height=(768, 1024, 1024))
    other_layers = register(registry, layers="d2,m0", height=(512, 512, 768))
    loads: list[str] = []

    def load(path, onnx_path):
        loads.append(path.name)
        return LoadedEngine(path, onnx_path)

    chooser = RegistryEngines(registry, checkpoint_hash=lambda: CHECKPOINT, trt_version="10.9.0",
                              compute_capability="8.9", load=load)
    return chooser, loads, small, large, other_layers


def blur(spec: str, names: frozenset[str] | None = None):
    """What the chooser reads of an ActiveBlur; ``names`` default to one per spec, as resolving would give."""
    return type("Blur", (), {"layer_spec": spec, "layer_names": names or frozenset({f"layers of {spec}"})})()


def test_engine_choice_follows_size_and_seg_layers(engines):
    chooser, loads, small, large, other_layers = engines
    assert chooser(EngineCall(3, 64, 64, 77), blur("mid"), ()).path.name == small.engine_file
    assert chooser(EngineCall(3, 128, 64, 77), blur("mid"), ()).path.name == large.engine_file
    assert chooser(EngineCall(3, 64, 64, 77), blur("d2,m0"), ()).path.name == other_layers.engine_file
    assert loads == [small.engine_file, large.engine_file, other_layers.engine_file]


def test_unblurred_calls_keep_the_loaded_engine(engines):
    chooser, loads, small, _, other_layers = engines
    chooser(EngineCall(3, 64, 64, 77), blur("d2,m0"), ())
    for _ in range(2):
        assert chooser(EngineCall(2, 64, 64, 77), None, ()).path.name == other_layers.engine_file
    assert loads == [other_layers.engine_file]


def test_engines_registered_with_layer_names_match_any_spelling(tmp_path):
    registry = EngineRegistry(tmp_path)
    entry = register(registry, layers="mid", height=(512, 512, 768), names=("mid.attn1",))
    chooser = RegistryEngines(registry, checkpoint_hash=lambda: CHECKPOINT, trt_version="10.9.0",
                              compute_capability="8.9", load=LoadedEngine)
    assert chooser(EngineCall(3, 64, 64, 77), blur("m0", frozenset({"mid.attn1"})), ()).path.name == entry.engine_file
    with pytest.raises(EngineCannotRun, match="SEG layers 'mid'"):
        chooser(EngineCall(3, 64, 64, 77), blur("mid", frozenset({"up.attn1"})), ())


def test_sessions_get_the_export_their_engine_was_built_from(tmp_path):
    """The refit may need the export's graph constants: the session is told where the export is."""
    (tmp_path / "engines").mkdir()
    registry = EngineRegistry(tmp_path / "engines")
    built = register(registry, layers="mid", height=(512, 512, 768), onnx_file="tiny-seg.onnx")
    older = register(registry, layers="mid", height=(768, 1024, 1024))  # registered before exports were recorded
    chooser = RegistryEngines(registry, checkpoint_hash=lambda: CHECKPOINT, trt_version="10.9.0",
                              compute_capability="8.9", onnx_folder=tmp_path / "exports", load=LoadedEngine)
    session = chooser(EngineCall(3, 64, 64, 77), blur("mid"), ())
    assert (session.path.name, session.onnx_path) == (built.engine_file, tmp_path / "exports" / "tiny-seg.onnx")
    session = chooser(EngineCall(3, 128, 64, 77), blur("mid"), ())
    assert (session.path.name, session.onnx_path) == (older.engine_file, None)


def test_no_fitting_engine_says_why(engines):
    chooser = engines[0]
    with pytest.raises(EngineCannotRun, match="SEG layers"):
        chooser(EngineCall(3, 64, 64, 77), blur("up"), ())
    with pytest.raises(EngineCannotRun, match="control"):
        chooser(EngineCall(3, 64, 64, 77), None, ("control",))
    with pytest.raises(EngineCannotRun, match="height|size|pixels"):
        chooser(EngineCall(3, 256, 64, 77), None, ())
    other_gpu = RegistryEngines(chooser.registry, checkpoint_hash=lambda: CHECKPOINT, trt_version="10.9.0",
                                compute_capability="9.0", load=LoadedEngine)
    with pytest.raises(EngineCannotRun, match="compute capability"):
        other_gpu(EngineCall(3, 64, 64, 77), None, ())


# --- LoRA: the session takes the PyTorch UNet's weights when they change --------------------------------


def with_hooks(unet: torch.nn.Module, layers: str, rows: list[int], batch: int, sigma: float, *call) -> torch.Tensor:
    """The reference: ``unet`` with SEG's own hooks blurring ``rows``."""
    x, timesteps, context, extra = call
    patch = QueryBlurPatch(select_layers(self_attention_layers(unet), layers), layers)
    added = dict(extra) if extra else None
    with torch.no_grad(), patch, patch.blurring(rows, batch, sigma):
        return unet(x, timesteps, context, added_cond_kwargs=added, return_dict=False)[0]


class Weights:
    """What the WebUI glue's ``current_weights`` says, switchable; counts ``applied()`` calls."""

    def __init__(self, exported: Exported):
        self.unet_by_key = {CHECKPOINT_WEIGHTS: exported.unet}
        self.key = CHECKPOINT_WEIGHTS
        self.applied = 0

    def __call__(self) -> UNetWeights:
        key = self.key

        def applied() -> torch.nn.Module:
            self.applied += 1
            return self.unet_by_key[key]

        return UNetWeights(key, applied)


def test_lora_weights_are_loaded_into_the_session_once_per_change(exported):
    """A LoRA-changed UNet (as the WebUI's Lora extension leaves it) vs the export that took its
    weights through the refit map; back to the checkpoint's weights afterwards."""
    lora_unet, _ = lora_like(exported.unet)
    weights = Weights(exported)
    weights.unet_by_key[("style", 0.8)] = lora_unet
    rows, batch, sigma = [1], 3, 2.0
    call = exported.call((9, 7), batch, 77, seed=4)
    notices = []
    with torch.no_grad(), exported.patch() as patch, patch.blurring(rows, batch, sigma):
        chooser = same_checkpoint(exported.path)
        runtime = ReplacementUNet(choose_session=chooser, blur=patch.active_blur, notice=notices.append,
                                  fallback=lambda *a, **k: pytest.fail("no call may fall back"), weights=weights)
        plain = runtime.forward(call[0], call[1], call[2], **call[3])
        weights.key = ("style", 0.8)
        with_lora = [runtime.forward(call[0], call[1], call[2], **call[3]) for _ in range(2)]
        weights.key = CHECKPOINT_WEIGHTS
        plain_again = runtime.forward(call[0], call[1], call[2], **call[3])
    expected_plain = with_hooks(exported.unet, exported.layers, rows, batch, sigma, *call)
    expected_lora = with_hooks(lora_unet, exported.layers, rows, batch, sigma, *call)
    assert relative_error(expected_lora, expected_plain) > 1e-2  # the LoRA makes a difference
    assert relative_error(plain, expected_plain) <= 1e-4 and relative_error(plain_again, expected_plain) <= 1e-4
    assert all(relative_error(output, expected_lora) <= 1e-4 for output in with_lora)
    # one load per change (LoRA on, LoRA off); the way back reloads the file, without asking the UNet
    assert (runtime.weight_loads, weights.applied, runtime.session_calls, notices) == (2, 1, 4, [])


def test_weights_a_session_cannot_take_run_on_pytorch_and_are_not_retried(sd1, tmp_path):
    ambiguous = copy.deepcopy(sd1.unet)  # a fresh GroupNorm's ones: which initializer holds it is unknown
    with torch.no_grad():
        ambiguous.down_blocks[1].resnets[0].norm1.weight.add_(0.5)
    without_map = tmp_path / "copied.onnx"  # an export with no refit map beside it
    shutil.copyfile(sd1.path, without_map)
    for path, changed, reason in ((sd1.path, ambiguous, "no name or scope tells which"),
                                  (without_map, lora_like(sd1.unet)[0], "has no refit map")):
        weights = Weights(sd1)
        weights.unet_by_key["lora"] = changed
        weights.key = "lora"
        notices, fallbacks = [], []
        x, timesteps, context, _ = sd1.call((8, 8), 2, 77)
        chooser = same_checkpoint(path)
        runtime = ReplacementUNet(choose_session=chooser, blur=lambda: None, notice=notices.append, weights=weights,
                                  fallback=lambda *a, **k: fallbacks.append(1) or changed(*a, return_dict=False)[0])
        with torch.no_grad():
            outputs = [runtime.forward(x, timesteps, context) for _ in range(2)]
            expected = changed(x, timesteps, context, return_dict=False)[0]
        assert all(torch.equal(output, expected) for output in outputs)
        assert (fallbacks, runtime.session_calls, runtime.weight_loads) == ([1, 1], 0, 0)
        assert len(notices) == 1 and reason in notices[0], notices
        assert weights.applied <= 1  # refused once, then not tried again


def test_weights_no_export_can_hold_run_on_pytorch(sd1):
    """The glue's ``current_weights`` raises for hypernetworks: those calls run on PyTorch."""
    x, timesteps, context, _ = sd1.call((8, 8), 2, 77)
    reason = ["hypernetworks are active"]

    def weights() -> UNetWeights:
        if reason[0]:
            raise EngineCannotRun(reason[0])
        return UNetWeights(CHECKPOINT_WEIGHTS, lambda: pytest.fail("nothing to apply"))

    with torch.no_grad(), sd1.patch() as patch:
        notices, fallbacks = [], []
        chooser = same_checkpoint(sd1.path)
        runtime = ReplacementUNet(choose_session=chooser, blur=patch.active_blur, notice=notices.append,
                                  fallback=lambda *a, **k: fallbacks.append(1) or sd1.pytorch(*a, **k),
                                  weights=weights)
        runtime.forward(x, timesteps, context)
        reason[0] = None
        runtime.forward(x, timesteps, context)
    assert (fallbacks, runtime.session_calls, notices) == ([1], 1, ["hypernetworks are active"])


def test_fallback_note_counts_the_calls_per_reason():
    from collections import Counter

    from seg_tsam.export.unet_runtime import fallback_note

    assert fallback_note("[SEG ONNX] x", 12, Counter()) is None
    note = fallback_note("[SEG ONNX] x", 12, Counter({"SEG layers d0 not in the export": 8, "T-SAM gradient": 2}))
    assert note == ("10 of 12 UNet calls ran on PyTorch instead of [SEG ONNX] x: SEG layers d0 not in the export (8×); "
                    "T-SAM gradient (2×)")
