"""The Triton query-blur kernel and its TensorRT plugin (``trt_plugins/``).

Three tiers, each skipping with the precise reason when its dependencies are absent:

- everywhere: both modules import without triton/tensorrt, operand errors are clear
  ``ValueError``\\ s, and a missing triton/tensorrt gives ``RuntimeError`` / ``False``, never a crash;
- CUDA + triton: the kernel against the reference ``apply_blur_matrices`` (extension/core/blur.py)
  on square, non-square, odd, 1×1, 1×n, n×1 and >64-wide grids, channel counts that are not a
  multiple of the block size, random non-symmetric matrices (a transposition slip shows) and
  mixed identity/blurred rows from ``blur_matrix_inputs`` with σ ∈ {0.5, 2, 10, ∞};
- TensorRT ≥ 10.6 (``tensorrt.plugin``) + CUDA + triton + onnx: an ONNX graph holding one
  ``seg_tsam::query_blur`` node, built with the project's ``build_engine``, run and compared.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from seg_tsam.export.seg_unet import blur_matrix_inputs
from seg_tsam.extension.core.blur import apply_blur_matrices
from seg_tsam.trt_plugins import query_blur_kernel as qbk
from seg_tsam.trt_plugins import query_blur_plugin as qbp

REPO_ROOT = Path(__file__).resolve().parent.parent
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_CUDA = torch.cuda.is_available()


# --- everywhere -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["query_blur_kernel.py", "query_blur_plugin.py", "__init__.py"])
def test_modules_import_no_heavy_package_at_top_level(module):
    """triton / tensorrt / onnx only inside functions, so ``import`` works on a CPU-only install."""
    tree = ast.parse((REPO_ROOT / "trt_plugins" / module).read_text(encoding="utf-8"))
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    assert not top_level & {"triton", "tensorrt", "onnx"}


def test_plugin_names_match_the_onnx_node():
    assert qbp.PLUGIN_ID == "seg_tsam::query_blur"
    assert (qbp.PLUGIN_DOMAIN, qbp.PLUGIN_OP) == ("seg_tsam", "query_blur")


def test_onnx_node_carries_what_the_tensorrt_parser_matches():
    pytest.importorskip("onnx")
    node = qbp.query_blur_onnx_node("q", "a_h", "a_w", "out")
    assert (node.op_type, node.domain) == ("query_blur", "seg_tsam")
    assert list(node.input) == ["q", "a_h", "a_w"] and list(node.output) == ["out"]
    attrs = {attr.name: attr for attr in node.attribute}
    assert attrs["plugin_namespace"].s == b"seg_tsam"


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed: the 'missing tensorrt' path cannot be exercised")
def test_register_returns_false_with_a_logged_reason_without_tensorrt(caplog):
    with caplog.at_level(logging.INFO, logger=qbp.__name__):
        assert qbp.register_query_blur_plugin() is False
        assert qbp.register_query_blur_plugin() is False  # idempotent, still no exception
    assert "tensorrt package is not installed" in caplog.text
    assert qbp.query_blur_plugin_unavailable_reason() == "the tensorrt package is not installed"


@pytest.mark.skipif(HAS_TRITON, reason="triton is installed: the 'missing triton' path cannot be exercised")
def test_kernel_loader_raises_runtime_error_without_triton():
    with pytest.raises(RuntimeError, match="triton"):
        qbk.load_triton_kernel()


def operands(batch=2, height=3, width=4, channels=5, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, height * width, channels, generator=gen).to(device, dtype)
    a_h = torch.randn(batch, height, height, generator=gen).to(device, dtype)
    a_w = torch.randn(batch, width, width, generator=gen).to(device, dtype)
    return q, a_h, a_w


def test_cpu_tensors_are_refused_with_a_clear_error():
    q, a_h, a_w = operands()
    with pytest.raises(ValueError, match="CUDA tensors.*apply_blur_matrices"):
        qbk.triton_query_blur(q, a_h, a_w)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, h, w: (q[0], h, w), r"queries must be \(B, h·w, C\)"),
        (lambda q, h, w: (q, h[:, :2], w), r"must be \(B, h, h\) and \(B, w, w\)"),
        (lambda q, h, w: (q, h, w[0]), r"must be \(B, h, h\) and \(B, w, w\)"),
        (lambda q, h, w: (q, h[:1], w), "blur matrices hold 1/2 rows, the queries 2"),
        (lambda q, h, w: (q[:, :-1], h, w), "3×4 grid .12 tokens., but the queries have 11 tokens"),
        (lambda q, h, w: (q.double(), h.double(), w.double()), "float16 or float32"),
        (lambda q, h, w: (q.bfloat16(), h.bfloat16(), w.bfloat16()), "float16 or float32"),
        (lambda q, h, w: (q, h.half(), w), "blur matrices are torch.float16/torch.float32"),
    ],
)
def test_operand_errors_are_clear_value_errors(change, message):
    with pytest.raises(ValueError, match=message):
        qbk.triton_query_blur(*change(*operands()))


def test_block_sizes_respect_the_dot_minimum():
    assert [qbk._block(n, 64) for n in (1, 2, 15, 16, 17, 33, 64, 65, 200)] == [16, 16, 16, 16, 32, 64, 64, 64, 64]


# --- CUDA + triton: the kernel against the reference ----------------------------------------------------------

needs_kernel = pytest.mark.skipif(
    not (HAS_CUDA and HAS_TRITON),
    reason=f"needs a CUDA device and triton (cuda available: {HAS_CUDA}, triton installed: {HAS_TRITON})",
)

#: (h, w, C): square, non-square, odd, 1×1, 1×n, n×1, block-boundary and > 64-wide grids (two column
#: blocks), with channel counts below, at and off multiples of the 16/32-wide channel blocks.
RANDOM_CASES = [
    (8, 8, 16), (6, 10, 5), (7, 5, 33), (1, 1, 1), (1, 1, 40), (1, 9, 5), (9, 1, 33), (17, 33, 1),
    (64, 64, 320), (5, 100, 24), (80, 3, 70),
]
SEG_GRIDS = [(8, 8), (7, 5), (1, 1), (1, 9), (9, 1), (64, 64), (5, 100)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected| (0 for an all-zero reference)."""
    scale = expected.abs().max().item()
    return (actual.double() - expected.double()).abs().max().item() / (scale or 1.0)


@needs_kernel
@pytest.mark.parametrize("height, width, channels", RANDOM_CASES, ids=lambda v: str(v))
def test_kernel_matches_reference_on_random_matrices_fp32(height, width, channels):
    """Dense, non-symmetric random matrices: every weight counts, and A_w vs A_wᵀ would differ."""
    q, a_h, a_w = operands(3, height, width, channels, device="cuda")
    expected = apply_blur_matrices(q.double(), a_h.double(), a_w.double())
    actual = qbk.triton_query_blur(q, a_h, a_w)
    assert actual.shape == q.shape and actual.dtype == q.dtype
    assert relative_error(actual, expected) <= 1e-4


@needs_kernel
@pytest.mark.parametrize("grid", SEG_GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_kernel_matches_reference_on_seg_rows(grid, dtype):
    """A SEG call: rows 1 and 3 of 4 blurred (σ ∈ {0.5, 2, 10, ∞}), the others identity, left bit for bit."""
    batch, channels, blurred = 4, 40, [1, 3]
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(batch, grid[0] * grid[1], channels, generator=gen).to("cuda", dtype)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-3
    for sigma in (0.5, 2.0, 10.0, float("inf")):
        a_h, a_w = blur_matrix_inputs([0], grid, batch, blurred, sigma, dtype=dtype, device="cuda").values()
        actual = qbk.triton_query_blur(q, a_h, a_w)
        expected = apply_blur_matrices(q.double(), a_h.double(), a_w.double())
        assert relative_error(actual, expected) <= tolerance, f"σ={sigma}"
        for row in set(range(batch)) - set(blurred):
            assert torch.equal(actual[row], q[row]), f"σ={sigma}: identity row {row} changed"


@needs_kernel
def test_kernel_fp16_random_matrices_against_fp32_reference():
    q, a_h, a_w = operands(2, 12, 20, 70, dtype=torch.float16, device="cuda")
    a_h, a_w = a_h / 12, a_w / 20  # keep sums near the inputs' scale, as blur matrices do
    expected = apply_blur_matrices(q.float(), a_h.float(), a_w.float())
    actual = qbk.triton_query_blur(q, a_h, a_w)
    assert (actual.float() - expected).abs().max().item() <= 2e-3 * expected.abs().max().item()


@needs_kernel
def test_out_argument_and_non_contiguous_inputs():
    q, a_h, a_w = operands(2, 6, 7, 24, device="cuda")
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, channel-major storage
    a_h_t = a_h.transpose(1, 2).contiguous().transpose(1, 2)
    out = torch.full_like(q, float("nan"))
    result = qbk.triton_query_blur(q_strided, a_h_t, a_w, out=out)
    assert result is out
    assert relative_error(out, apply_blur_matrices(q.double(), a_h.double(), a_w.double())) <= 1e-4
    with pytest.raises(ValueError, match="out must be"):
        qbk.triton_query_blur(q, a_h, a_w, out=torch.empty_like(q, dtype=torch.float16))


@needs_kernel
def test_kernel_runs_on_the_current_stream():
    q, a_h, a_w = operands(2, 16, 16, 64, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = qbk.triton_query_blur(q, a_h, a_w)
    stream.synchronize()
    assert relative_error(out, apply_blur_matrices(q.double(), a_h.double(), a_w.double())) <= 1e-4


# --- TensorRT plugin ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registered_plugin(trt):
    """``trt`` (conftest: TensorRT, CUDA, onnx) with the plugin registered, or a skip saying why."""
    reason = qbp.query_blur_plugin_unavailable_reason()
    if reason is not None:
        pytest.skip(f"needs TensorRT ≥ 10.6 with tensorrt.plugin and triton: {reason}")
    assert qbp.register_query_blur_plugin() is True
    assert qbp.register_query_blur_plugin() is True  # idempotent
    return trt


def write_query_blur_onnx(path: Path, height: int, width: int, channels: int, dtype: torch.dtype) -> Path:
    """One ``seg_tsam::query_blur`` node; the batch is dynamic (``B``) so the build takes a profile."""
    import onnx
    from onnx import TensorProto, helper

    elem = TensorProto.FLOAT if dtype == torch.float32 else TensorProto.FLOAT16
    inputs = [
        helper.make_tensor_value_info("queries", elem, ["B", height * width, channels]),
        helper.make_tensor_value_info("a_h", elem, ["B", height, height]),
        helper.make_tensor_value_info("a_w", elem, ["B", width, width]),
    ]
    output = helper.make_tensor_value_info("blurred", elem, ["B", height * width, channels])
    node = qbp.query_blur_onnx_node("queries", "a_h", "a_w", "blurred")
    graph = helper.make_graph([node], "query_blur_plugin_test", inputs, [output])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(qbp.PLUGIN_DOMAIN,
                                                                               qbp.PLUGIN_OPSET_VERSION)]
    )
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_plugin_engine_matches_reference(registered_plugin, tmp_path, dtype):
    from seg_tsam.export.engine_build import BuildOptions, build_engine

    trt = registered_plugin
    height, width, channels, batch = 12, 10, 40, 3
    onnx_path = write_query_blur_onnx(tmp_path / "query_blur.onnx", height, width, channels, dtype)
    dims = {"queries": (height * width, channels), "a_h": (height, height), "a_w": (width, width)}
    shapes = {name: tuple((b, *rest) for b in (1, batch, 4)) for name, rest in dims.items()}
    report = build_engine(onnx_path, tmp_path / "query_blur.engine", lambda names: shapes,
                          options=BuildOptions(show_tqdm=False))

    gen = torch.Generator().manual_seed(2)
    q = torch.randn(batch, height * width, channels, generator=gen).to("cuda", dtype)
    a_h, a_w = blur_matrix_inputs([0], (height, width), batch, [1, 2], 2.0, dtype=dtype, device="cuda").values()
    a_h[2] = torch.randn(height, height, generator=gen) / height  # dense and non-symmetric: a transposed A_w shows
    a_w[2] = torch.randn(width, width, generator=gen) / width
    feeds = {"queries": q, "a_h": a_h, "a_w": a_w}

    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)  # must outlive the engine
    engine = runtime.deserialize_cuda_engine(report.engine_path.read_bytes())
    assert engine is not None
    context = engine.create_execution_context()
    for name, tensor in feeds.items():
        assert context.set_input_shape(name, tuple(tensor.shape)), name
        context.set_tensor_address(name, tensor.data_ptr())
    out = torch.full_like(q, float("nan"))
    context.set_tensor_address("blurred", out.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()

    expected = apply_blur_matrices(q.double(), a_h.double(), a_w.double())
    assert relative_error(out, expected) <= (1e-4 if dtype == torch.float32 else 2e-3)
    assert torch.equal(out[0], q[0])  # identity row untouched
