"""Static checks that an exported ONNX graph suits TensorRT's ONNX parser.

:func:`check_onnx_for_tensorrt` looks at the graph only (no weights, no runtime) and reports:

- ``opset``: the default-domain opset is outside the range the parser supports;
- ``unsupported-op``: an operator the parser does not import (or one from another domain,
  which TensorRT would try to load as a plugin);
- ``data-dependent-shape``: a shape-defining input (a Reshape target, an Expand/Tile/Slice/
  ConstantOfShape/Range/Resize/Pad extent, …) computed from some graph input's *values*. The
  dataflow is traced back: allowed sources are initializers, ``Constant`` nodes and
  ``Shape``/``Size`` of any tensor (dims, never values). Ops whose output size depends on
  data (``NonZero``, ``Unique``, ``Compress``, ``NonMaxSuppression``) are reported too;
- ``not-constant``: an input the parser requires to be an initializer (e.g. ``axes``) is not;
- ``control-flow``: ``If``/``Loop``/``Scan`` (a per-sample ``If`` cannot be expressed in
  TensorRT; the export never needs one, so any is worth a look).

The API is raise-or-list: the report lists every finding; ``raise_on_failure=True`` (or
:meth:`OnnxCheckReport.raise_if_failed`) raises :class:`OnnxCheckError` carrying the report.
``onnx`` is imported inside the functions that need it.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

#: Opsets TensorRT 10's ONNX parser imports ("TensorRT 10.0 supports operators in the inclusive
#: range of opset 9 to opset 20"), and the highest the legacy TorchScript exporter writes.
SUPPORTED_OPSETS = range(9, 21)

# Operators marked "Y" in onnx/onnx-tensorrt docs/operators.md ("Supported ONNX Operators",
# TensorRT 10.0, opset 9-20), as of the ONNX-TensorRT 10.1 GA release (commit 96e78110, June
# 2024). Data, not code: extend it when moving to a newer parser's table.
TENSORRT_SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast
CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid HardSwish
Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu
Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid
Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

_REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
               "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")

#: Input positions that define an output's shape or extent (ONNX operator specs).
SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "ConstantOfShape": (0,),
    "Range": (0, 1, 2), "Resize": (2, 3), "Upsample": (1,), "Pad": (1, 3), "Squeeze": (1,),
    "Unsqueeze": (1,), "Split": (1,), "TopK": (1,), "OneHot": (1,), "CenterCropPad": (1,),
    "Col2Im": (1, 2), "Loop": (0,), **{op: (1,) for op in _REDUCE_OPS},
}

#: Input positions the parser requires to be initializers (restrictions in the same table).
CONSTANT_INPUTS: dict[str, tuple[int, ...]] = {
    "Slice": (3,), "Squeeze": (1,), "Unsqueeze": (1,), "Pad": (3,), "CumSum": (1,), "OneHot": (1,),
    "Dropout": (2,), **{op: (1,) for op in _REDUCE_OPS},
}

#: Operators whose output shape depends on input values.
DATA_DEPENDENT_OUTPUT_OPS = frozenset({"NonZero", "Unique", "Compress", "NonMaxSuppression"})
#: Operators whose output depends only on the *shape* of their inputs.
SHAPE_OF_OPS = frozenset({"Shape", "Size"})
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class Finding:
    kind: str  #: "opset", "unsupported-op", "data-dependent-shape", "not-constant", "control-flow"
    node: str
    op_type: str
    message: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.op_type} {self.node!r}: {self.message}"


@dataclass(frozen=True)
class OnnxCheckReport:
    opset: int | None
    op_counts: dict[str, int]
    findings: tuple[Finding, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.findings

    def summary(self) -> str:
        if self.ok:
            return f"ONNX graph OK for TensorRT: opset {self.opset}, {sum(self.op_counts.values())} nodes"
        lines = [f"{len(self.findings)} problem(s) for TensorRT (opset {self.opset}):"]
        lines += [f"  {finding}" for finding in self.findings[:50]]
        if len(self.findings) > 50:
            lines.append(f"  … and {len(self.findings) - 50} more")
        return "\n".join(lines)

    def raise_if_failed(self) -> OnnxCheckReport:
        if not self.ok:
            raise OnnxCheckError(self)
        return self


class OnnxCheckError(ValueError):
    """The graph failed :func:`check_onnx_for_tensorrt`; ``.report`` holds every finding."""

    def __init__(self, report: OnnxCheckReport):
        super().__init__(report.summary())
        self.report = report


def check_onnx_for_tensorrt(model: Any, *, raise_on_failure: bool = False) -> OnnxCheckReport:
    """Check an ``onnx.ModelProto`` or a path to one (external data is not loaded)."""
    if isinstance(model, (str, os.PathLike)):
        import onnx

        model = onnx.load(os.fspath(model), load_external_data=False)
    opset = next((entry.version for entry in model.opset_import if entry.domain in _DEFAULT_DOMAINS), None)
    findings: list[Finding] = []
    if opset is None or opset not in SUPPORTED_OPSETS:
        supported = f"{SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1}"
        findings.append(Finding("opset", "<model>", "-",
                                f"default-domain opset {opset} is outside {supported}, what TensorRT's parser imports"))
    nodes = list(_all_nodes(model.graph))
    findings += _operator_findings(nodes)
    findings += _dataflow_findings(model.graph)
    op_counts = dict(Counter(node.op_type for node in nodes))
    report = OnnxCheckReport(opset, op_counts, tuple(findings))
    return report.raise_if_failed() if raise_on_failure else report


def _all_nodes(graph) -> Iterator[Any]:
    """Every node, including those in If/Loop/Scan bodies."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _all_nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_nodes(subgraph)


def _node_label(node) -> str:
    return node.name or (node.output[0] if node.output else "<unnamed>")


def _operator_findings(nodes: list) -> list[Finding]:
    findings = []
    for node in nodes:
        label = _node_label(node)
        if node.domain not in _DEFAULT_DOMAINS:
            findings.append(Finding("unsupported-op", label, node.op_type,
                                    f"domain {node.domain!r}: TensorRT would need a plugin named {node.op_type!r}"))
        elif node.op_type not in TENSORRT_SUPPORTED_OPS:
            findings.append(Finding("unsupported-op", label, node.op_type, "not in TensorRT's ONNX operator table"))
        if node.op_type in CONTROL_FLOW_OPS:
            findings.append(Finding("control-flow", label, node.op_type,
                                    "control flow in the graph (not expected in a UNet export)"))
        if node.op_type in DATA_DEPENDENT_OUTPUT_OPS:
            findings.append(Finding("data-dependent-shape", label, node.op_type,
                                    "output shape depends on input values"))
    return findings


def _dataflow_findings(graph) -> list[Finding]:
    """Trace which tensors depend on graph-input values and flag those used as shapes.

    ``origin[t]`` is the tensor ``t`` was computed from on a path back to a graph input (the
    input itself maps to ``None``), so a finding can show that path.
    """
    initializers = {tensor.name for tensor in graph.initializer}
    constants = set(initializers)
    origin: dict[str, str | None] = {value.name: None for value in graph.input if value.name not in initializers}
    findings = []
    for node in graph.node:
        label = _node_label(node)
        if node.op_type == "Constant" or (node.op_type == "Identity" and node.input[0] in constants):
            constants.update(node.output)
            continue
        for position in SHAPE_INPUTS.get(node.op_type, ()):
            if position < len(node.input) and node.input[position] in origin:
                path = " <- ".join(_path_back(origin, node.input[position]))
                findings.append(Finding("data-dependent-shape", label, node.op_type,
                                        f"input {position} depends on graph input values: {path}"))
        for position in CONSTANT_INPUTS.get(node.op_type, ()):
            name = node.input[position] if position < len(node.input) else ""
            if name and name not in constants:
                findings.append(Finding("not-constant", label, node.op_type,
                                        f"input {position} ({name!r}) must be an initializer or Constant for TensorRT"))
        if node.op_type in SHAPE_OF_OPS:
            continue  # dims only: never value-dependent
        source = next((name for name in node.input if name in origin), None)
        if source is not None:
            origin.update({output: source for output in node.output if output})
    return findings


def _path_back(origin: dict[str, str | None], tensor: str, limit: int = 12) -> list[str]:
    path = [tensor]
    while origin.get(path[-1]) is not None and len(path) < limit:
        path.append(origin[path[-1]])
    if origin.get(path[-1]) is not None:
        path.append("…")
    return path
