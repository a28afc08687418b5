"""LoRA through refit: the ONNX initializer → torch tensor map of ``export/refit.py``.

The decisive check emulates a TensorRT refit on CPU: the initializers of an exported model are
replaced by :meth:`RefitMap.weights_from` of a LoRA-like perturbed UNet, and ONNX Runtime runs
the result against the perturbed UNet in PyTorch (through :class:`SegExportUNet`, SEG rows
blurred). A wrong, missing or stale mapping shows up as a numerical mismatch. Tiny UNets:

- ``sd1``: SD1 layout as initialised (GroupNorm/LayerNorm weights exactly ones, biases zeros),
  every SEG layer, weights as external data — constant-filled tensors and deduplication;
- ``sdxl``: SDXL layout with every tensor holding distinct values (as after training), inline;
- ``sd1_fp16``: SD1 layout, distinct values, fp16 export from the fp32 UNet;
- ``ldm``: the WebUI's ldm UNet (when ``SEG_TSAM_WEBUI_ROOT`` is set, as in test_onnx_export.py).

The TensorRT test at the end needs ``tensorrt`` and a CUDA device and skips otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from seg_tsam.export.engine_build import BuildOptions, build_unet_engine
from seg_tsam.export.onnx_export import export_onnx, keep_installed_attention
from seg_tsam.export.profiles import EngineProfile, ModelFamily
from seg_tsam.export.refit import (
    AmbiguousWeight,
    MappedWeight,
    RefitError,
    RefitMap,
    WeightSource,
    _node_scopes,
    sidecar_path,
    weight_map,
)
from seg_tsam.export.seg_unet import SegExportUNet, blur_matrix_inputs, example_conditioning
from seg_tsam.export.trt_refit import refit_engine
from seg_tsam.extension.adapters.diffusers import tiny_models

FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 1e-2
LATENT, BATCH, ROWS, SIGMA = (9, 6), 3, [1, 2], 2.0
#: What a LoRA for the UNet changes: the attention projections and (LoCon) the convolutions.
LORA_TARGETS = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- helpers ------------------------------------------------------------------------------------


def float_keys(unet: nn.Module) -> set[str]:
    return {key for key, value in unet.state_dict().items() if value.is_floating_point()}


def distinct_values(unet: nn.Module, seed: int = 5) -> nn.Module:
    """Give every constant-filled tensor (fresh norms, zero-initialised layers) distinct values, as training does."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in unet.parameters():
            if (parameter == parameter.reshape(-1)[0]).all():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return unet


def lora_targets(unet: nn.Module) -> list[str]:
    """State-dict keys a LoRA/LoCon changes: attention projection weights and every Conv2d weight."""
    convs = {f"{name}.weight" for name, module in unet.named_modules() if isinstance(module, nn.Conv2d)}
    return sorted(convs | {key for key in float_keys(unet) if key.endswith(LORA_TARGETS)})


def lora_like(unet: nn.Module, seed: int = 11, scale: float = 0.3) -> tuple[nn.Module, list[str]]:
    """A copy of ``unet`` with a random delta (``scale`` × the weight's std) added to each LoRA target."""
    perturbed = copy.deepcopy(unet)
    generator = torch.Generator().manual_seed(seed)
    targets = lora_targets(perturbed)
    state = perturbed.state_dict()
    with torch.no_grad():
        for key in targets:
            weight = state[key]
            weight.add_(scale * weight.std() * torch.randn(weight.shape, generator=generator))
    return perturbed, targets


def expected_initializer(tensor: torch.Tensor, source: WeightSource, array: np.ndarray) -> np.ndarray:
    """The initializer a source should give, computed here independently of refit.py's helpers."""
    value = tensor.detach().to(torch.float16 if array.dtype == np.float16 else torch.float32)
    if source.transform == "transpose":
        value = value.t()
    elif source.transform == "none":
        assert tuple(value.shape) == array.shape
    return value.contiguous().numpy().reshape(array.shape)


def initializers(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(os.fspath(path), load_external_data=True)
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}


def with_initializers(path: Path, values: dict[str, np.ndarray]) -> bytes:
    """The exported model with the named initializers replaced (what a refit does to an engine)."""
    model = onnx.load(os.fspath(path), load_external_data=True)
    replaced = 0
    for tensor in model.graph.initializer:
        if tensor.name in values:
            assert values[tensor.name].shape == tuple(tensor.dims)
            tensor.CopyFrom(numpy_helper.from_array(values[tensor.name], tensor.name))
            replaced += 1
    assert replaced == len(values)
    return model.SerializeToString()


def ort_run(model: bytes | Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    source = model if isinstance(model, bytes) else os.fspath(model)
    session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def relative_error(actual: np.ndarray, expected: torch.Tensor) -> float:
    expected = expected.detach().float().numpy()
    return float(np.abs(actual.astype(np.float32) - expected).max() / np.abs(expected).max())


# --- exports ---------------------------------------------------------------------------------------


@dataclass
class Exported:
    """A tiny UNet, its SEG export and the refit map of that export."""

    unet: nn.Module
    flavour: str
    layers: str
    path: Path
    refit_map: RefitMap
    dtype: str = "fp32"

    @classmethod
    def make(cls, unet: nn.Module, flavour: str, layers: str, path: Path, **export_kwargs) -> Exported:
        wrapper = SegExportUNet(unet, flavour=flavour, layers=layers)
        export_onnx(wrapper, path, **export_kwargs)
        return cls(unet, flavour, layers, path, weight_map(path, unet), export_kwargs.get("dtype", "fp32"))

    def inputs(self, latent: tuple[int, int] = LATENT) -> dict[str, torch.Tensor]:
        """Conditioning plus blur matrices: rows ``ROWS`` blurred with σ = ``SIGMA``, the rest identity."""
        wrapper = SegExportUNet(self.unet, flavour=self.flavour, layers=self.layers)
        inputs = example_conditioning(wrapper.call, BATCH, latent, 77, torch.float32, "cpu")
        inputs.update(blur_matrix_inputs(wrapper.levels, latent, BATCH, ROWS, SIGMA))
        return {name: inputs[name] for name in wrapper.input_names}

    def feeds(self, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        half = self.dtype == "fp16"
        return {name: (t.half() if half and name != "timestep" else t).numpy() for name, t in inputs.items()}

    def torch_output(self, unet: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return SegExportUNet(unet, flavour=self.flavour, layers=self.layers).run(inputs)

    @property
    def tolerance(self) -> float:
        return FP16_TOLERANCE if self.dtype == "fp16" else FP32_TOLERANCE


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> Exported:
    unet = tiny_models.tiny_unet(tiny_models.TINY_SD1_UNET_CONFIG)
    return Exported.make(unet, "diffusers", "all", tmp_path_factory.mktemp("sd1") / "unet.onnx", external_data=True)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> Exported:
    unet = distinct_values(tiny_models.tiny_unet(tiny_models.TINY_SDXL_UNET_CONFIG))
    return Exported.make(unet, "diffusers", "mid", tmp_path_factory.mktemp("sdxl") / "unet.onnx")


@pytest.fixture(scope="module")
def sd1_fp16(tmp_path_factory) -> Exported:
    unet = distinct_values(tiny_models.tiny_unet(tiny_models.TINY_SD1_UNET_CONFIG))
    return Exported.make(unet, "diffusers", "mid", tmp_path_factory.mktemp("fp16") / "unet.onnx", dtype="fp16")


@contextlib.contextmanager
def webui_ldm_modules() -> Iterator[dict]:
    """ldm/sgm ``openaimodel`` through test_onnx_export.py's fixture, with the WebUI's resizing ``cat``."""
    helpers = pytest.importorskip("test_onnx_export")
    if not helpers.WEBUI_ROOT:
        pytest.skip("SEG_TSAM_WEBUI_ROOT is not set (a WebUI checkout with repositories/)")
    modules_gen = helpers.openaimodel_modules.__wrapped__()
    modules = next(modules_gen)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(modules["ldm"], "th", helpers.WebUICatShim())
            yield {"modules": modules, "tiny_openai_unet": helpers.tiny_openai_unet}
    finally:
        modules_gen.close()


@pytest.fixture(scope="module")
def ldm(tmp_path_factory) -> Iterator[Exported]:
    """The WebUI's ldm UNet (SD1 layout); its zero-initialised layers are randomised by the helper."""
    with webui_ldm_modules() as found:
        unet = distinct_values(found["tiny_openai_unet"](found["modules"], "ldm"))
        yield Exported.make(unet, "ldm", "all", tmp_path_factory.mktemp("ldm") / "unet.onnx",
                            attention_path=keep_installed_attention)


@pytest.fixture(params=["sd1", "sdxl", "sd1_fp16", "ldm"])
def exported(request) -> Exported:
    return request.getfixturevalue(request.param)


# --- the map on real exports ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sdxl", "sd1_fp16", "ldm"])
def test_distinct_values_map_every_tensor(request, name):
    """Every tensor of these UNets reaches the output, and each has distinct values: all must be mapped."""
    case: Exported = request.getfixturevalue(name)
    refit_map = case.refit_map
    assert refit_map.mapped_keys() == float_keys(case.unet)
    assert refit_map.ambiguous == () and dict(refit_map.unmapped) == {}
    counts = refit_map.summary()
    assert counts["via_name"] > 0 and counts["transpose"] > 0  # kept names; Linear weights of MatMuls
    assert counts["via_value"] == 0  # every renamed initializer confirmed by its reader's module scope
    assert counts["reshape"] > 0  # GroupNorm's affine, unsqueezed to (C, 1, 1) and renamed
    assert refit_map.weights_dtype == ("float16" if case.dtype == "fp16" else "float32")


def test_constant_filled_tensors_are_ambiguous_not_guessed(sd1):
    """In a fresh UNet, norm weights are exactly ones and biases zeros. Such values identify nothing,
    so only a kept name maps them: LayerNorm's (used as is) are mapped, GroupNorm's (exported
    unsqueezed, renamed) cannot be and must be guarded by ambiguous entries instead."""
    unet, refit_map = sd1.unet, sd1.refit_map
    group_norm = {f"{name}.{p}" for name, module in unet.named_modules() if isinstance(module, nn.GroupNorm)
                  for p in ("weight", "bias")}
    layer_norm = {f"{name}.{p}" for name, module in unet.named_modules() if isinstance(module, nn.LayerNorm)
                  for p in ("weight", "bias")}
    state = unet.state_dict()
    assert all((state[key] == state[key].reshape(-1)[0]).all() for key in group_norm | layer_norm)
    assert float_keys(unet) - refit_map.mapped_keys() == group_norm
    guarded = {candidate.key for entry in refit_map.ambiguous for candidate in entry.candidates}
    assert group_norm <= guarded and dict(refit_map.unmapped) == {}
    # equal LayerNorm tensors were merged by the exporter into shared initializers, each use resolved by name
    tied = [entry for entry in refit_map.mapped if len(entry.sources) > 1]
    assert tied and {s.key for e in tied for s in e.sources} == layer_norm
    assert all(s.via == "name" for e in tied for s in e.sources)


def test_initializers_equal_the_transformed_torch_tensors(exported):
    arrays = initializers(exported.path)
    state = exported.unet.state_dict()
    values = exported.refit_map.weights_from(exported.unet)
    assert set(values) == {entry.name for entry in exported.refit_map.mapped}
    for entry in exported.refit_map.mapped:
        array = arrays[entry.name]
        assert values[entry.name].dtype == array.dtype and np.array_equal(values[entry.name], array), entry.name
        for source in entry.sources:  # every use of a merged initializer, too
            assert np.array_equal(expected_initializer(state[source.key], source, array), array), source
    for entry in exported.refit_map.ambiguous:
        for candidate in entry.candidates:
            assert np.array_equal(expected_initializer(state[candidate.key], candidate, arrays[entry.name]),
                                  arrays[entry.name])
    assert exported.refit_map.changed(exported.unet) == []


def test_refit_emulated_in_onnxruntime(exported):
    """The decisive test: a LoRA-like change, refitted into the exported graph, gives the changed UNet's output."""
    perturbed, targets = lora_like(exported.unet)
    refit_map = exported.refit_map
    assert set(targets) <= refit_map.mapped_keys()
    values = refit_map.weights_from(perturbed)
    assert set(refit_map.changed(perturbed)) == {e.name for e in refit_map.mapped if e.key in targets}

    inputs = exported.inputs()
    feeds = exported.feeds(inputs)
    expected = exported.torch_output(perturbed, inputs)
    refitted = ort_run(with_initializers(exported.path, values), feeds)
    assert relative_error(refitted, expected) <= exported.tolerance
    original = exported.torch_output(exported.unet, inputs).numpy()  # what the engine computed before the refit
    assert relative_error(original, expected) > 20 * exported.tolerance


def test_changing_a_constant_filled_norm_is_refused(sd1):
    """GroupNorm weights all equal ones at export: which renamed initializer holds which is unknown,
    so a changed one must refuse the refit rather than guess."""
    perturbed = copy.deepcopy(sd1.unet)
    with torch.no_grad():
        perturbed.down_blocks[1].resnets[0].norm1.weight.add_(0.5)
    problems = sd1.refit_map.problems(perturbed)
    assert problems and all("no name or scope tells which" in problem for problem in problems)
    assert any("down_blocks.1.resnets.0.norm1.weight" in problem for problem in problems)
    with pytest.raises(RefitError, match="no name or scope"):
        sd1.refit_map.weights_from(perturbed)
    assert set(sd1.refit_map.weights_from(perturbed, strict=False)) == {e.name for e in sd1.refit_map.mapped}


def test_changing_one_of_merged_layer_norms_is_refused(sd1):
    """The exporter merged equal LayerNorm weights into one initializer: one of them alone cannot follow."""
    perturbed = copy.deepcopy(sd1.unet)
    block = perturbed.mid_block.attentions[0].transformer_blocks[0]
    with torch.no_grad():
        block.norm2.weight.mul_(1.5)
    problems = sd1.refit_map.problems(perturbed)
    assert any("merged" in problem and "mid_block.attentions.0.transformer_blocks.0.norm2.weight" in problem
               for problem in problems)


def test_json_round_trip_and_sidecar(sd1, tmp_path):
    refit_map = sd1.refit_map
    assert RefitMap.from_json(refit_map.to_json()) == refit_map
    engine = tmp_path / "unet.plan"
    path = refit_map.save(sidecar_path(engine))
    assert path == tmp_path / "unet.plan.refit.json" and RefitMap.load(path) == refit_map
    with pytest.raises(ValueError, match="format"):
        RefitMap.from_json(refit_map.to_json().replace('"format": 1', '"format": 99'))


# --- the rules on hand-made graphs ------------------------------------------------------------------------


class Holder(nn.Module):
    """Three bias-free Linear layers; ``a`` and ``b`` hold identical (random) weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b, self.c = (nn.Linear(3, 2, bias=False) for _ in range(3))
        self.scale = nn.Parameter(torch.ones(2))
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)


def write_graph(path: Path, holder: Holder, *, scoped: bool) -> Path:
    """``y = (x·Aᵀ + x·Bᵀ)·1 + c`` with one deduplicated initializer for ``Aᵀ = Bᵀ``, read through an
    Identity, as the exporter writes it. ``scoped``: node names carry module scopes
    (``/unet/a/MatMul``). The ones(2) initializer is read at the UNet's top scope; ``c`` is a constant.
    """
    weight = numpy_helper.from_array(holder.a.weight.detach().numpy().T.copy(), "onnx::MatMul_1")
    ones = numpy_helper.from_array(np.ones(2, np.float32), "onnx::Mul_2")
    constant = numpy_helper.from_array(np.array([0.25, -1.5], np.float32), "onnx::Add_3")

    def node_name(scope: str, op: str, index: int) -> str:
        return f"/unet/{scope}/{op}" if scoped else f"{op}_{index}"

    nodes = [
        helper.make_node("MatMul", ["x", weight.name], ["ya"], name=node_name("a", "MatMul", 0)),
        helper.make_node("Identity", [weight.name], ["onnx::MatMul_9"], name="Identity_0"),
        helper.make_node("MatMul", ["x", "onnx::MatMul_9"], ["yb"], name=node_name("b", "MatMul", 1)),
        helper.make_node("Add", ["ya", "yb"], ["s"], name="/unet/Add"),
        helper.make_node("Mul", ["s", "onnx::Mul_2"], ["m"], name="/unet/Mul"),
        helper.make_node("Add", ["m", "onnx::Add_3"], ["y"], name="/unet/Add_1"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                              [weight, ones, constant])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), os.fspath(path))
    return path


def test_node_names_give_module_scopes():
    """The legacy exporter's scope segments: a called container's child repeats the container's segment."""
    modules = {"", "input_blocks.1.0.in_layers.2", "ff.net.0", "down_blocks.0.attn1.to_out.0", "net", "net.net.0"}
    assert _node_scopes("/unet/input_blocks.1/input_blocks.1.0/in_layers/in_layers.2/Conv", "unet.", modules) == [
        "input_blocks.1.0.in_layers.2"]
    assert _node_scopes("/unet/ff/net/net.0/Mul", "unet.", modules) == ["ff.net.0"]
    assert _node_scopes("/unet/down_blocks.0/attn1/to_out.0/MatMul", "unet.", modules) == [
        "down_blocks.0.attn1.to_out.0"]
    # module "net" holding a (not called) list also named "net": the uncollapsed reading is the real one
    assert _node_scopes("/unet/net/net.0/MatMul", "unet.", modules) == ["net.net.0"]
    assert _node_scopes("/unet/Add", "unet.", modules) == [""]
    assert _node_scopes("/unet/missing/Add", "unet.", modules) == []  # names no module: no evidence
    assert _node_scopes("MatMul_12", "unet.", modules) == [] and _node_scopes("/Add", "unet.", modules) == []


def test_equal_weights_resolved_by_scope_and_tied(tmp_path):
    holder = Holder()
    refit_map = weight_map(write_graph(tmp_path / "g.onnx", holder, scoped=True), holder)
    sources = (WeightSource("a.weight", "transpose", "scope"), WeightSource("b.weight", "transpose", "scope"))
    assert refit_map.mapped == (MappedWeight("onnx::MatMul_1", "float32", (3, 2), refit_map.mapped[0].digest, sources,
                                             aliases=("onnx::MatMul_9",)),)
    # ones(2) equals scale by value, but a constant-filled value identifies nothing: ambiguous, not mapped
    assert refit_map.ambiguous == (AmbiguousWeight("onnx::Mul_2", "float32", (2,), refit_map.ambiguous[0].digest,
                                                   (WeightSource("scale", "none"),)),)
    assert refit_map.fixed == ("onnx::Add_3",) and dict(refit_map.unmapped).keys() == {"c.weight"}
    assert RefitMap.from_json(refit_map.to_json()) == refit_map

    changed = copy.deepcopy(holder)
    with torch.no_grad():
        changed.a.weight.add_(1.0)
    with pytest.raises(RefitError, match=r"merged \['a.weight', 'b.weight'\]"):
        refit_map.weights_from(changed)
    with torch.no_grad():
        changed.b.weight.add_(1.0)  # both changed alike: the shared initializer can follow
    values = refit_map.weights_from(changed)
    assert np.array_equal(values["onnx::MatMul_1"], changed.a.weight.detach().numpy().T)
    with torch.no_grad():
        changed.c.weight.add_(1.0)
    with pytest.raises(RefitError, match="c.weight: changed, but no initializer holds it"):
        refit_map.weights_from(changed)


def test_equal_weights_without_scope_are_ambiguous(tmp_path):
    holder = Holder()
    refit_map = weight_map(write_graph(tmp_path / "g.onnx", holder, scoped=False), holder)
    entry = next(e for e in refit_map.ambiguous if e.name == "onnx::MatMul_1")
    assert [(c.key, c.transform) for c in entry.candidates] == [("a.weight", "transpose"), ("b.weight", "transpose")]
    assert "onnx::MatMul_1" not in refit_map.by_name()
    assert refit_map.problems(holder) == []  # unchanged: the engine's copy is still right
    changed = copy.deepcopy(holder)
    with torch.no_grad():
        changed.b.weight.add_(1.0)
    with pytest.raises(RefitError, match=r"onnx::MatMul_1: equal at export to \['a.weight', 'b.weight'\]"):
        refit_map.weights_from(changed)


def test_a_kept_name_wins_over_value_and_scope(tmp_path):
    """A kept name is the exporter's own word: ``unet.b.weight`` is ``b.weight`` although ``a.weight``
    has the same value and the reading node sits in ``a``'s scope."""
    holder = Holder()
    weight = numpy_helper.from_array(holder.b.weight.detach().numpy(), "unet.b.weight")
    node = helper.make_node("Gemm", ["x", weight.name], ["y"], name="/unet/a/Gemm", transB=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [weight])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), os.fspath(path))
    refit_map = weight_map(path, holder)
    assert refit_map.by_name()["unet.b.weight"].sources == (WeightSource("b.weight", "none", "name"),)
    assert set(refit_map.unmapped) == {"a.weight", "c.weight", "scale"}


# --- refit_engine's logic, against a stand-in for tensorrt ------------------------------------------------


class StubEngine:
    """What a refittable engine knows of its weights: their names, which ones a refit must
    supply together (``required``), and their current values."""

    def __init__(self, weights: dict[str, np.ndarray], refittable: set[str], required: set[str] = frozenset()):
        self.weights, self.refittable, self.required = dict(weights), set(refittable), set(required)


class StubRefitter:
    """The four ``tensorrt.Refitter`` calls refit_engine uses, with TensorRT 10's documented meaning."""

    def __init__(self, engine: StubEngine, logger):
        self.engine, self.staged = engine, {}

    def get_all_weights(self) -> list[str]:
        return sorted(self.engine.refittable)

    def set_named_weights(self, name: str, weights) -> bool:
        current = self.engine.weights.get(name)
        if name not in self.engine.refittable or current is None or current.shape != weights.array.shape:
            return False
        self.staged[name] = weights.array
        return True

    def get_missing_weights(self) -> list[str]:
        return sorted(self.engine.required - set(self.staged)) if self.staged else []

    def refit_cuda_engine(self) -> bool:
        if self.get_missing_weights():
            return False
        self.engine.weights.update({name: array.copy() for name, array in self.staged.items()})
        return True


class StubLogger:
    WARNING = 2

    def __init__(self, severity=None):
        self.severity = severity


@pytest.fixture
def stub_tensorrt(monkeypatch):
    module = type(sys)("tensorrt")
    module.Refitter, module.Logger = StubRefitter, StubLogger
    module.Weights = lambda array: type("Weights", (), {"array": array})()
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


@pytest.mark.api_stand_in
def test_refit_engine_logic_with_a_stub_tensorrt(stub_tensorrt, sd1):
    """Every refittable initializer set, unchanged ambiguous ones supplied when required; the
    refitted weights, run in ONNX Runtime, give the changed UNet's output."""
    arrays = initializers(sd1.path)
    ambiguous = {entry.name for entry in sd1.refit_map.ambiguous}
    engine = StubEngine(arrays, refittable=set(arrays), required=ambiguous)
    perturbed, _ = lora_like(sd1.unet)
    assert refit_engine(engine, sd1.refit_map, perturbed) == len(arrays)
    assert all(np.array_equal(engine.weights[name], arrays[name]) for name in ambiguous)  # unchanged
    inputs = sd1.inputs()
    refitted = ort_run(with_initializers(sd1.path, engine.weights), sd1.feeds(inputs))
    assert relative_error(refitted, sd1.torch_output(perturbed, inputs)) <= FP32_TOLERANCE


@pytest.mark.api_stand_in
def test_refit_engine_refuses_what_it_cannot_do(stub_tensorrt, sd1):
    arrays = initializers(sd1.path)
    perturbed, _ = lora_like(sd1.unet)
    with pytest.raises(RefitError, match="no refittable weights"):
        refit_engine(StubEngine(arrays, set()), sd1.refit_map, perturbed)
    conv_in = next(entry.name for entry in sd1.refit_map.mapped if entry.key == "conv_in.weight")
    baked = StubEngine(arrays, set(arrays) - {conv_in})
    with pytest.raises(RefitError, match="holds these weights as constants"):
        refit_engine(baked, sd1.refit_map, perturbed)
    assert refit_engine(baked, sd1.refit_map, sd1.unet) == len(sd1.refit_map.mapped) - 1  # unchanged: nothing lost
    unknown = StubEngine({**arrays, "trt_internal": np.zeros(1)}, set(arrays) | {"trt_internal"}, {"trt_internal"})
    with pytest.raises(RefitError, match=r"needs weights no UNet tensor explains: \['trt_internal'\]"):
        refit_engine(unknown, sd1.refit_map, perturbed, onnx_path=sd1.path)
    assert np.array_equal(unknown.weights[conv_in], arrays[conv_in])  # refused before touching the engine


@pytest.mark.api_stand_in
def test_refit_engine_supplies_graph_constants_from_the_export(stub_tensorrt, sd1):
    """A constant TensorRT combined with refitted weights comes from the exported file, unchanged."""
    model = onnx.load(os.fspath(sd1.path), load_external_data=False)
    constant = next(node for node in model.graph.node if node.op_type == "Constant"
                    and node.attribute[0].t.data_type == TensorProto.FLOAT and len(node.attribute[0].t.dims) > 0)
    name, value = constant.output[0], numpy_helper.to_array(constant.attribute[0].t)
    arrays = initializers(sd1.path)
    engine = StubEngine({**arrays, name: np.zeros_like(value)}, set(arrays) | {name}, {name})
    perturbed, _ = lora_like(sd1.unet)
    with pytest.raises(RefitError, match="needs weights no UNet tensor explains"):
        refit_engine(engine, sd1.refit_map, perturbed)
    assert refit_engine(engine, sd1.refit_map, perturbed, onnx_path=sd1.path) == len(sd1.refit_map.mapped) + 1
    assert np.array_equal(engine.weights[name], value)


# --- TensorRT and CUDA -------------------------------------------------------------------------------------

#: Tiny SD1 UNet: 32-wide context. Latent 8–16 (opt 9 × 10), 1–3 rows, one prompt chunk.
TINY_SD1_FAMILY = ModelFamily("tiny-sd1", context_dim=32)
TRT_PROFILE = EngineProfile(images=1, height=(64, 72, 128), width=(64, 80, 128))
TRT_LATENT = (9, 10)
TRT_TOLERANCE = 1e-3  # fp32 engine without TF32 (BuildOptions default)


def run_engine(trt, engine, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """One call through the name-based tensor API (TensorRT ≥ 10), buffers in torch."""
    context = engine.create_execution_context()
    buffers = {}
    for name, array in feeds.items():
        buffers[name] = torch.from_numpy(np.ascontiguousarray(array)).cuda()
        assert context.set_input_shape(name, array.shape), name
        context.set_tensor_address(name, buffers[name].data_ptr())
    output = torch.empty(tuple(context.get_tensor_shape("out_sample")), dtype=torch.float32, device="cuda")
    context.set_tensor_address("out_sample", output.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return output.cpu().numpy()


def test_tensorrt_refit_follows_a_lora_like_change(trt, sd1, tmp_path):
    report = build_unet_engine(sd1.path, tmp_path / "unet.plan", TRT_PROFILE, TINY_SD1_FAMILY,
                               options=BuildOptions(refittable=True, show_tqdm=False))
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))  # must outlive the engine
    engine = runtime.deserialize_cuda_engine(report.engine_path.read_bytes())
    assert engine is not None and engine.refittable
    inputs = sd1.inputs(TRT_LATENT)
    feeds = sd1.feeds(inputs)
    original = sd1.torch_output(sd1.unet, inputs)
    assert relative_error(run_engine(trt, engine, feeds), original) <= TRT_TOLERANCE

    perturbed, _ = lora_like(sd1.unet)
    expected = sd1.torch_output(perturbed, inputs)
    assert refit_engine(engine, sd1.refit_map, perturbed, onnx_path=sd1.path) > 0
    assert relative_error(run_engine(trt, engine, feeds), expected) <= TRT_TOLERANCE
    assert relative_error(original.numpy(), expected) > 20 * TRT_TOLERANCE  # the change is visible

    refit_engine(engine, sd1.refit_map, sd1.unet, onnx_path=sd1.path)  # LoRA removed: back to the export
    assert relative_error(run_engine(trt, engine, feeds), original) <= TRT_TOLERANCE
