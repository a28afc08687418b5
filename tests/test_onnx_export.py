"""ONNX export of the SEG-capable UNet: ONNX Runtime (CPU) against the eager SEG path.

The reference is the real eager path, independent of the export wrapper: the UNet called
directly with the core's :class:`QueryBlurPatch` blurring the same rows with the same σ
(depthwise separable blur, exact mean for σ = ∞). The export feeds σ as matrices built by
:func:`blur_matrix_inputs`. Relative error = max |ORT − eager| / max |eager| over the output.
Exports are module-scoped: each costs a few seconds of tracing.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import math
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper

from seg_tsam.export import onnx_export
from seg_tsam.export.onnx_checks import OnnxCheckError, check_onnx_for_tensorrt
from seg_tsam.export.onnx_export import OnnxExportError, export_onnx, hooked_modules, keep_installed_attention
from seg_tsam.export.seg_unet import SegExportUNet, blur_matrix_inputs, grid_at_level
from seg_tsam.extension.core.blur import apply_blur_matrices
from seg_tsam.extension.adapters.diffusers import tiny_models
from seg_tsam.extension.adapters.unet_layers import attention_layers, downsampling_count, self_attention_layers
from seg_tsam.extension.core.blur import blur_matrices, blur_queries
from seg_tsam.extension.core.layers import select_layers
from seg_tsam.extension.core.query_blur_patch import QueryBlurPatch

INF = math.inf
FP32_TOLERANCE = 1e-4

#: (latent, batch, tokens, blurred rows, σ): square and non-square (odd) sizes, batches and
#: token counts other than the traced ones (batch 2, 77 tokens, a 9×13 latent), mixed rows.
CASES = [
    ((8, 8), 3, 77, [2], 0.5),
    ((9, 5), 4, 154, [1, 3], 2.0),
    ((6, 11), 1, 77, [0], 10.0),
    ((7, 7), 3, 154, [0, 2], INF),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def relative_error(actual: np.ndarray, expected: torch.Tensor) -> float:
    expected = expected.detach().numpy()
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def ort_session(path: Path) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def run_ort(session, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    return session.run(None, {name: tensor.numpy() for name, tensor in inputs.items()})[0]


# --- diffusers --------------------------------------------------------------------------------


class DiffusersCase:
    """A tiny diffusers UNet, its export, and a direct (wrapper-free) eager SEG reference."""

    def __init__(self, config: dict, layers: str, tmp: Path, **export_kwargs):
        self.unet = tiny_models.tiny_unet(config)
        self.layers = layers
        self.sdxl = config.get("addition_embed_type") == "text_time"
        self.context_width = config["cross_attention_dim"]
        fixed = self.conditioning((7, 6), 2, 77)
        with torch.no_grad():
            self.output_before = self.eager(fixed, [], 0.0)
        self.processors_before = dict(self.unet.attn_processors)
        self.fixed_inputs = fixed
        self.wrapper = SegExportUNet(self.unet, flavour="diffusers", layers=layers)
        self.path = export_onnx(self.wrapper, tmp / f"unet-{layers}.onnx", **export_kwargs)
        self.session = ort_session(self.path)

    def conditioning(self, latent, batch, tokens, seed=0) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        inputs = {
            "sample": torch.randn(batch, 4, *latent, generator=generator),
            "timestep": torch.tensor([981.0, 500.0, 20.0, 999.0][:batch] + [300.0] * max(0, batch - 4)),
            "encoder_hidden_states": torch.randn(batch, tokens, self.context_width, generator=generator),
        }
        if self.sdxl:
            inputs["text_embeds"] = torch.randn(batch, 32, generator=generator)
            inputs["time_ids"] = torch.tensor([[64.0, 48.0, 0.0, 0.0, 64.0, 48.0]]).repeat(batch, 1)
        return inputs

    def eager(self, inputs, rows, sigma) -> torch.Tensor:
        """The UNet called directly, the chosen layers' queries blurred by the eager SEG patch."""
        added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]} if self.sdxl else None
        layers = select_layers(self_attention_layers(self.unet), self.layers)
        batch = inputs["sample"].shape[0]
        with torch.no_grad(), QueryBlurPatch(layers) as patch, patch.blurring(rows, batch, sigma):
            return self.unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                             added_cond_kwargs=added, return_dict=False)[0]

    def onnx_inputs(self, latent, batch, tokens, rows, sigma) -> dict[str, torch.Tensor]:
        inputs = self.conditioning(latent, batch, tokens)
        inputs.update(blur_matrix_inputs(self.wrapper.levels, latent, batch, rows, sigma))
        return inputs


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """SD1 layout, every self-attention layer (grid levels 0, 1, 2); weights as external data."""
    return DiffusersCase(tiny_models.TINY_SD1_UNET_CONFIG, "all", tmp_path_factory.mktemp("sd1"), external_data=True)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """SDXL layout, the default "mid" (3 transformer layers at one level); weights inline."""
    return DiffusersCase(tiny_models.TINY_SDXL_UNET_CONFIG, "mid", tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(params=["sd1", "sdxl"])
def exported(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("latent, batch, tokens, rows, sigma", CASES)
def test_onnx_runtime_matches_eager_seg(exported, latent, batch, tokens, rows, sigma):
    inputs = exported.onnx_inputs(latent, batch, tokens, rows, sigma)
    conditioning = exported.conditioning(latent, batch, tokens)
    expected = exported.eager(conditioning, rows, sigma)
    plain = exported.eager(conditioning, [], 0.0)
    actual = run_ort(exported.session, inputs)
    assert relative_error(actual, expected) <= FP32_TOLERANCE
    assert (expected - plain)[rows].abs().max() > 1e-3  # the blur really changed the blurred rows
    identity_rows = [row for row in range(batch) if row not in rows]
    if identity_rows:  # rows fed identity matrices are the plain UNet's rows
        assert relative_error(actual[identity_rows], plain[identity_rows]) <= FP32_TOLERANCE


def test_two_sigmas_through_one_exported_file(sd1):
    latent, batch, rows = (10, 6), 3, [1, 2]
    conditioning = sd1.conditioning(latent, batch, 77, seed=3)
    outputs = {}
    for sigma in (0.5, INF):
        inputs = dict(conditioning, **blur_matrix_inputs(sd1.wrapper.levels, latent, batch, rows, sigma))
        outputs[sigma] = run_ort(sd1.session, inputs)
        assert relative_error(outputs[sigma], sd1.eager(conditioning, rows, sigma)) <= FP32_TOLERANCE
    assert np.abs(outputs[0.5] - outputs[INF])[rows].max() > 1e-3


def test_identity_matrices_leave_the_unet_bit_identical(sdxl):
    """In PyTorch, identity rows through the two matmuls are exact: same bits as the plain UNet."""
    latent, batch = (5, 9), 2
    conditioning = sdxl.conditioning(latent, batch, 77)
    inputs = dict(conditioning, **blur_matrix_inputs(sdxl.wrapper.levels, latent, batch, [], 2.0))
    with torch.no_grad():
        assert torch.equal(sdxl.wrapper.run(inputs), sdxl.eager(conditioning, [], 0.0))


def test_static_check_passes_on_the_exports(exported):
    report = check_onnx_for_tensorrt(exported.path)
    assert report.ok, report.summary()
    assert report.opset == onnx_export.DEFAULT_OPSET
    assert report.op_counts["MatMul"] > 0 and "Softmax" in report.op_counts


def test_export_graph_interface(sd1):
    model = onnx.load(os.fspath(sd1.path), load_external_data=False)
    dims = {value.name: [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]
            for value in model.graph.input}
    assert list(dims) == ["sample", "timestep", "encoder_hidden_states",
                          "blur_h_0", "blur_w_0", "blur_h_1", "blur_w_1", "blur_h_2", "blur_w_2"]
    assert dims["encoder_hidden_states"] == ["batch", "tokens", 32]
    assert dims["blur_h_0"] == ["batch", "height", "height"] and dims["blur_w_2"] == ["batch", "grid_w_2", "grid_w_2"]
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    assert metadata["seg_tsam.levels"] == "0,1,2" and metadata["seg_tsam.flavour"] == "diffusers"
    data_files = [p.name for p in sd1.path.parent.iterdir() if p.name.endswith(".data")]
    assert len(data_files) == 1 and data_files[0].startswith(sd1.path.name)  # external data, one file


def test_wrapped_unet_is_bit_identical_after_export(exported):
    assert hooked_modules(exported.unet) == []
    after = exported.unet.attn_processors
    assert all(after[name] is processor for name, processor in exported.processors_before.items())
    with torch.no_grad():
        assert torch.equal(exported.eager(exported.fixed_inputs, [], 0.0), exported.output_before)


@pytest.mark.parametrize("latent", [(9, 5), (13, 7), (3, 11), (16, 16)])
def test_level_maps_to_the_exact_grid(sd1, latent):
    """Each layer's grid (recorded from its transformer input) is its level's ceil-halved latent."""
    inputs = sd1.conditioning(latent, 1, 77)
    layers = [site.layer for site in sd1.wrapper.sites]
    with torch.no_grad(), QueryBlurPatch(layers) as patch:
        sd1.unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
        for site in sd1.wrapper.sites:
            assert patch.recorded_grid(site.layer) == grid_at_level(latent, site.level), site.layer.name


def test_fp16_export_from_an_fp32_unet(tmp_path):
    unet = tiny_models.tiny_unet(tiny_models.TINY_SD1_UNET_CONFIG)
    wrapper = SegExportUNet(unet, flavour="diffusers", layers="mid")
    path = export_onnx(wrapper, tmp_path / "fp16.onnx", dtype="fp16")
    assert {p.dtype for p in unet.parameters()} == {torch.float32}  # exported from a copy
    model = onnx.load(os.fspath(path))
    types = {value.name: value.type.tensor_type.elem_type for value in model.graph.input}
    assert types == {"sample": TensorProto.FLOAT16, "timestep": TensorProto.FLOAT,
                     "encoder_hidden_states": TensorProto.FLOAT16, "blur_h_2": TensorProto.FLOAT16,
                     "blur_w_2": TensorProto.FLOAT16}
    assert check_onnx_for_tensorrt(model).ok
    latent, batch, rows = (9, 6), 2, [1]
    inputs = {"sample": torch.randn(batch, 4, *latent), "timestep": torch.tensor([700.0, 700.0]),
              "encoder_hidden_states": torch.randn(batch, 77, 32)}
    layers = select_layers(self_attention_layers(unet), "mid")
    with torch.no_grad(), QueryBlurPatch(layers) as patch, patch.blurring(rows, batch, 2.0):
        expected = unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample
    feeds = {name: tensor.half() if name != "timestep" else tensor for name, tensor in inputs.items()}
    feeds.update(blur_matrix_inputs(wrapper.levels, latent, batch, rows, 2.0, dtype=torch.float16))
    actual = run_ort(ort_session(path), feeds).astype(np.float32)
    assert relative_error(actual, expected) <= 1e-2


# --- host-side matrices --------------------------------------------------------------------------


def test_blur_matrix_inputs_use_the_core_matrices_and_identity_elsewhere():
    inputs = blur_matrix_inputs([0, 2], (9, 5), 3, [2, 0], 1.5)
    assert sorted(inputs) == ["blur_h_0", "blur_h_2", "blur_w_0", "blur_w_2"]
    a_h, a_w = blur_matrices(3, 2, 1.5)  # level 2 of 9×5: 9→5→3, 5→3→2
    assert torch.equal(inputs["blur_h_2"][0], a_h) and torch.equal(inputs["blur_w_2"][2], a_w)
    assert torch.equal(inputs["blur_h_0"][1], torch.eye(9)) and torch.equal(inputs["blur_w_2"][1], torch.eye(2))
    mean = blur_matrix_inputs([1], (7, 4), 1, [0], INF)
    assert torch.allclose(mean["blur_h_1"][0], torch.full((4, 4), 0.25)) and mean["blur_w_1"].shape == (1, 2, 2)
    with pytest.raises(ValueError, match="outside a batch"):
        blur_matrix_inputs([0], (8, 8), 2, [2], 1.0)


@pytest.mark.parametrize("sigma", [0.5, 2.0, 10.0, INF])
def test_matrix_form_equals_the_core_blur(sigma):
    """Two batched matmuls equal the core's blur; for σ = ∞ the 1/n matrices give the exact mean to rounding."""
    queries = torch.randn(3, 9 * 5, 16, generator=torch.Generator().manual_seed(0))
    a_h, a_w = blur_matrices(9, 5, sigma)
    blurred = apply_blur_matrices(queries, a_h.expand(3, 9, 9), a_w.expand(3, 5, 5))
    expected = blur_queries(queries, (9, 5), sigma)
    assert (blurred - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_wrapper_rejects_matrices_of_the_wrong_grid(sdxl):
    inputs = sdxl.conditioning((8, 8), 1, 77)
    inputs.update(blur_matrix_inputs(sdxl.wrapper.levels, (8, 10), 1, [0], 2.0))
    with torch.no_grad(), pytest.raises(ValueError, match="grid"):
        sdxl.wrapper.run(inputs)
    assert hooked_modules(sdxl.unet) == []
    with pytest.raises(ValueError, match="unknown UNet flavour"):
        SegExportUNet(sdxl.unet, flavour="comfy")


def test_grid_at_level_halves_with_ceil():
    assert grid_at_level((135, 240), 0) == (135, 240)
    assert grid_at_level((135, 240), 1) == (68, 120)
    assert grid_at_level((135, 240), 3) == (17, 30)
    with pytest.raises(ValueError):
        grid_at_level((8, 8), -1)


# --- failures leave nothing behind ----------------------------------------------------------------


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_failing_export_leaves_no_file(sdxl, tmp_path, monkeypatch):
    def half_write_then_fail(model, args, f, **kwargs):
        Path(f).write_bytes(b"half an onnx file")
        raise RuntimeError("simulated exporter crash")

    monkeypatch.setattr(torch.onnx, "export", half_write_then_fail)
    target = tmp_path / "unet.onnx"
    with pytest.raises(OnnxExportError, match="simulated exporter crash"):
        export_onnx(sdxl.wrapper, target)
    assert leftovers(tmp_path) == []  # no target, no temporary folder
    target.write_bytes(b"previous export")
    with pytest.raises(OnnxExportError):
        export_onnx(sdxl.wrapper, target)
    assert leftovers(tmp_path) == ["unet.onnx"] and target.read_bytes() == b"previous export"
    assert hooked_modules(sdxl.unet) == []


def test_export_refuses_a_patched_unet_and_bad_arguments(sdxl, tmp_path):
    layers = select_layers(self_attention_layers(sdxl.unet), "mid")
    with QueryBlurPatch(layers), pytest.raises(OnnxExportError, match="remove guidance patches"):
        export_onnx(sdxl.wrapper, tmp_path / "a.onnx")
    with pytest.raises(OnnxExportError, match="opset 21"):
        export_onnx(sdxl.wrapper, tmp_path / "a.onnx", opset=21)
    with pytest.raises(OnnxExportError, match="dtype"):
        export_onnx(sdxl.wrapper, tmp_path / "a.onnx", dtype="bf16")
    with pytest.raises(OnnxExportError, match="does not exist"):
        export_onnx(sdxl.wrapper, tmp_path / "missing" / "a.onnx")
    assert leftovers(tmp_path) == []


# --- the static check on hand-made graphs ---------------------------------------------------------


def make_model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def float_input(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_check_accepts_shapes_from_dims():
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["y", "s"], ["out"])]
    model = make_model(nodes, [float_input("x", ["n"]), float_input("y", ["n"])], [float_input("out", ["n"])])
    assert check_onnx_for_tensorrt(model, raise_on_failure=True).ok


def test_check_flags_shapes_from_values_through_any_path():
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["m"], keepdims=1),
        helper.make_node("Cast", ["m"], ["mi"], to=TensorProto.INT64),
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Add", ["s", "mi"], ["target"]),  # dims plus a value: value-dependent
        helper.make_node("Reshape", ["x", "target"], ["out"]),
        helper.make_node("NonZero", ["x"], ["nz"]),
    ]
    model = make_model(nodes, [float_input("x", ["n"])], [float_input("out", None)])
    report = check_onnx_for_tensorrt(model)
    kinds = sorted((f.kind, f.op_type) for f in report.findings)
    assert kinds == [("data-dependent-shape", "NonZero"), ("data-dependent-shape", "Reshape")]
    reshape = next(f for f in report.findings if f.op_type == "Reshape")
    assert "target <- mi <- m <- x" in reshape.message
    with pytest.raises(OnnxCheckError):
        report.raise_if_failed()


def test_check_flags_unsupported_ops_opset_and_non_constant_axes():
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [0])
    nodes = [
        helper.make_node("Unique", ["x"], ["u"]),
        helper.make_node("MyBlur", ["x"], ["b"], domain="custom"),
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Unsqueeze", ["x", "axes"], ["ok"]),
        helper.make_node("Unsqueeze", ["x", "s"], ["not_constant"]),
    ]
    model = make_model(nodes, [float_input("x", ["n"])], [float_input("b", None)], [axes], opset=21)
    model.opset_import.append(helper.make_opsetid("custom", 1))
    kinds = sorted((f.kind, f.op_type) for f in check_onnx_for_tensorrt(model).findings)
    assert kinds == [("data-dependent-shape", "Unique"), ("not-constant", "Unsqueeze"), ("opset", "-"),
                     ("unsupported-op", "MyBlur"), ("unsupported-op", "Unique")]


# --- the WebUI's ldm / sgm UNets ---------------------------------------------------------------------

WEBUI_ROOT = os.environ.get("SEG_TSAM_WEBUI_ROOT")


def _bare_package(name: str, path: Path):
    """A package object for ``name`` without running its ``__init__`` (sgm's pulls in training deps)."""
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    package = importlib.util.module_from_spec(spec)
    package.__path__ = [os.fspath(path)]
    return package


@pytest.fixture(scope="module")
def openaimodel_modules():
    """``ldm``/``sgm`` ``openaimodel`` from the WebUI's ``repositories/``.

    ``sgm/__init__.py`` imports its training stack (pytorch_lightning, open_clip …); the UNet
    module needs only torch, einops and omegaconf, so ``sgm`` and ``sgm.modules`` are
    registered as bare packages for the import.
    """
    if not WEBUI_ROOT:
        pytest.skip("SEG_TSAM_WEBUI_ROOT is not set (a WebUI checkout with repositories/)")
    repositories = Path(WEBUI_ROOT) / "repositories"
    ldm_root, sgm_root = repositories / "stable-diffusion-stability-ai", repositories / "generative-models"
    if not (ldm_root / "ldm").is_dir() or not (sgm_root / "sgm").is_dir():
        pytest.skip(f"no ldm/sgm repositories under {repositories}")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(os.fspath(ldm_root))
        patch.syspath_prepend(os.fspath(sgm_root))
        for name, folder in [("sgm", "sgm"), ("sgm.modules", "sgm/modules"),
                             ("sgm.modules.diffusionmodules", "sgm/modules/diffusionmodules")]:
            if name not in sys.modules:
                patch.setitem(sys.modules, name, _bare_package(name, sgm_root / folder))
        try:
            with contextlib.redirect_stdout(None):
                ldm = importlib.import_module("ldm.modules.diffusionmodules.openaimodel")
                sgm = importlib.import_module("sgm.modules.diffusionmodules.openaimodel")
        except ImportError as exc:
            pytest.skip(f"ldm/sgm UNet modules not importable from this venv ({exc}); see requirements-dev.txt")
        yield {"ldm": ldm, "sgm": sgm}


class WebUICatShim:
    """``torch`` as ldm/sgm's ``openaimodel.th``, with the WebUI's resizing ``cat``.

    The WebUI (``modules/sd_hijack_unet.py``) makes ``th.cat`` resize the upsampled tensor to
    the skip connection's size, which is what lets its UNets run latents that are not
    multiples of 2^levels; the same behaviour here lets the tests use odd sizes.
    """

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def cat(tensors, *args, **kwargs):
        if len(tensors) == 2 and tensors[0].shape[-2:] != tensors[1].shape[-2:]:
            tensors = (torch.nn.functional.interpolate(tensors[0], tensors[1].shape[-2:], mode="nearest"), tensors[1])
        return torch.cat(tensors, *args, **kwargs)


def tiny_openai_unet(modules, flavour: str, **overrides) -> torch.nn.Module:
    """Small ldm (SD1 layout: attention at both levels) / sgm (SDXL layout: depth-2 transformers, ``y``).

    ``overrides`` replace ``UNetModel`` arguments (e.g. more levels, ``resblock_updown``).
    """
    torch.manual_seed(0)
    common = dict(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1, channel_mult=[1, 2],
                  num_head_channels=8, use_spatial_transformer=True, legacy=False)
    if flavour == "ldm":
        arguments = dict(common, image_size=16, attention_resolutions=[1, 2], transformer_depth=1, context_dim=32)
    else:
        arguments = dict(common, attention_resolutions=[2], transformer_depth=[1, 2], context_dim=64,
                         use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=48)
    with contextlib.redirect_stdout(None):
        unet = modules[flavour].UNetModel(**{**arguments, **overrides})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # zero-initialised output layers would hide every difference
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return unet.eval()


@pytest.mark.filterwarnings("ignore:.*sdp_kernel.*:FutureWarning")  # sgm's attention uses the old context manager
@pytest.mark.parametrize(
    "flavour, overrides, levels, latents",
    [("ldm", {}, {0, 1}, [(9, 13), (11, 7)]),
     # ResBlock(down=True) pools without a conv, which floors odd sides: non-square multiples of 4 instead.
     ("ldm", dict(channel_mult=[1, 2, 2], attention_resolutions=[1, 2, 4], resblock_updown=True), {0, 1, 2},
      [(12, 20), (16, 8)]),
     ("sgm", {}, {1}, [(9, 13), (11, 7)])],
    ids=["ldm", "ldm-resblock-updown", "sgm"],
)
def test_webui_unet_levels_equal_the_grids_a_forward_measures(openaimodel_modules, flavour, overrides, levels,
                                                              latents, monkeypatch):
    """The layer table's levels against each grid source's input in a forward at non-square latents
    (odd where the UNet downsamples with strided convolutions, as the SD models do)."""
    from test_unet_layers import assert_levels_match_the_forward, measured_grids

    monkeypatch.setattr(openaimodel_modules[flavour], "th", WebUICatShim())
    unet = tiny_openai_unet(openaimodel_modules, flavour, **overrides)
    layers = attention_layers(unet)
    assert {layer.level for layer in layers} == levels
    context_width = 32 if flavour == "ldm" else 64
    for latent in latents:
        args = [torch.randn(1, 4, *latent), torch.tensor([10.0]), torch.randn(1, 77, context_width)]
        args += [torch.randn(1, 48)] if flavour == "sgm" else []
        grids = measured_grids(unet, layers, lambda: unet(*args))
        assert_levels_match_the_forward(layers, grids, latent)
    assert downsampling_count(unet) == len(overrides.get("channel_mult", [1, 2])) - 1


@pytest.mark.filterwarnings("ignore:.*sdp_kernel.*:FutureWarning")  # sgm's attention uses the old context manager
@pytest.mark.parametrize("flavour", ["ldm", "sgm"])
def test_webui_unets_match_eager_seg(openaimodel_modules, flavour, tmp_path, monkeypatch):
    module = openaimodel_modules[flavour]
    monkeypatch.setattr(module, "th", WebUICatShim())
    unet = tiny_openai_unet(openaimodel_modules, flavour)
    wrapper = SegExportUNet(unet, flavour=flavour, layers="all")
    with pytest.raises(OnnxExportError, match="attention_path"):
        export_onnx(wrapper, tmp_path / "unet.onnx")
    context_width = 32 if flavour == "ldm" else 64
    probe = [torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 77, context_width)]
    probe += [torch.randn(1, 48)] if flavour == "sgm" else []
    with torch.no_grad():
        before = unet(*probe)
    path = export_onnx(wrapper, tmp_path / "unet.onnx", attention_path=keep_installed_attention)
    assert check_onnx_for_tensorrt(path).ok
    session = ort_session(path)
    for (latent, batch, tokens, rows, sigma), seed in zip(CASES, range(len(CASES))):
        generator = torch.Generator().manual_seed(seed)
        args = [torch.randn(batch, 4, *latent, generator=generator), torch.full((batch,), 400.0),
                torch.randn(batch, tokens, context_width, generator=generator)]
        if flavour == "sgm":
            args.append(torch.randn(batch, 48, generator=generator))
        layers = select_layers(self_attention_layers(unet), "all")
        with torch.no_grad(), QueryBlurPatch(layers) as patch, patch.blurring(rows, batch, sigma):
            expected = unet(*args)
        inputs = dict(zip(wrapper.conditioning_names, args))
        inputs.update(blur_matrix_inputs(wrapper.levels, latent, batch, rows, sigma))
        assert relative_error(run_ort(session, inputs), expected) <= FP32_TOLERANCE, (latent, sigma)
    assert hooked_modules(unet) == []
    with torch.no_grad():
        assert torch.equal(unet(*probe), before)
