"""Run the WebUI's UNet calls on an exported SEG UNet (TensorRT engine or ONNX Runtime session).

The WebUI's "SD Unet" replacement (``modules.sd_unet``) is called as ``forward(x, timesteps,
context, **extra)`` *instead of* the PyTorch UNet, so SEG's hooks on the PyTorch modules never
fire. :class:`ReplacementUNet` therefore asks, for every call, which rows SEG blurs with which
σ (:class:`~seg_tsam.extension.core.query_blur_patch.ActiveBlur`), builds the exported graph's
blur-matrix inputs for exactly that (identity for every other row) and runs all rows, cond,
uncond and SEG twins, in one session call.

Whenever a session cannot take a call (size, batch or token count outside an engine's profile,
a checkpoint or SEG layer set the export was not made for, an input it does not have such as
ControlNet's, gradients wanted by T-SAM, a hypernetwork), the call runs on the PyTorch UNet
instead, and a notice says why (once per reason).

LoRA: the WebUI applies LoRA networks by changing the PyTorch UNet's weights. Every call says
which weights the UNet should have (:class:`UNetWeights`, a cheap key); when the chosen session
holds others, it takes them from the PyTorch UNet first (:meth:`UNetSession.load_weights`: a
TensorRT refit, a new ONNX Runtime session), once per change of LoRA set or multiplier.

Nothing here imports the WebUI, tensorrt or onnxruntime: the WebUI glue
(``extension/webui/unet_options.py``) passes the callables, and the sessions
(:mod:`.ort_session`, :mod:`.trt_runtime`) import their runtimes when created.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..extension.core.query_blur_patch import ActiveBlur
from .profiles import EngineCall
from .seg_unet import CONTEXT, SAMPLE, TIMESTEP, blur_matrix_inputs


class EngineCannotRun(RuntimeError):
    """This call is outside what the exported UNet takes; the message says why (shown to the user)."""


#: The weights key of the checkpoint's own weights: what an export holds when it is loaded.
CHECKPOINT_WEIGHTS: Hashable = ()


@dataclass(frozen=True)
class UNetWeights:
    """The weights the PyTorch UNet is to have for a call: the checkpoint's, or with LoRA networks.

    ``key`` names them and is compared on every call (equal keys, equal weights;
    :data:`CHECKPOINT_WEIGHTS` for the checkpoint's own). ``applied()`` puts them on the PyTorch
    UNet's modules and returns it: that costs a pass over the model, so it is called only when a
    session has to take them.
    """

    key: Hashable
    applied: Callable[[], torch.nn.Module]


def fallback_note(label: str, calls: int, fallbacks: Counter[str]) -> str | None:
    """What a generation's infotext says when some of its ``calls`` UNet calls ran on PyTorch
    instead of the export ``label`` (``fallbacks``: calls per reason), or ``None`` when none did."""
    fell_back = sum(fallbacks.values())
    if not fell_back:
        return None
    reasons = "; ".join(f"{reason} ({count}×)" for reason, count in fallbacks.most_common())
    return f"{fell_back} of {calls} UNet calls ran on PyTorch instead of {label}: {reasons}"


def _checkpoint_weights() -> UNetWeights:
    def unexpected() -> torch.nn.Module:
        raise AssertionError("a session starts with the checkpoint's weights; nothing to apply")

    return UNetWeights(CHECKPOINT_WEIGHTS, unexpected)


class UNetSession(Protocol):
    """A loaded exported SEG UNet: named tensors in, ``out_sample`` out."""

    input_names: tuple[str, ...]
    levels: tuple[int, ...]  #: token-grid levels with ``blur_h_<l>``/``blur_w_<l>`` inputs
    weights_key: Hashable  #: the key of the weights it holds (:data:`CHECKPOINT_WEIGHTS` once loaded)

    def run(self, named: Mapping[str, torch.Tensor]) -> torch.Tensor: ...

    def load_weights(self, weights: UNetWeights) -> None:
        """Hold ``weights`` from now on, or raise :class:`EngineCannotRun` (keeping ``weights_key``
        true to what it holds)."""


#: ``(call, blur, extra input names) -> session``, or raise :class:`EngineCannotRun`.
SessionChooser = Callable[[EngineCall, "ActiveBlur | None", Sequence[str]], UNetSession]
#: The PyTorch UNet: ``(x, timesteps, context, *args, **kwargs) -> output``.
Fallback = Callable[..., torch.Tensor]


def session_inputs(session: UNetSession, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                   extra: Mapping[str, torch.Tensor], blur: ActiveBlur | None) -> dict[str, torch.Tensor]:
    """The named inputs of one call: the WebUI's tensors plus the blur matrices of ``blur``.

    Rows outside ``blur.rows`` (all rows when ``blur`` is ``None``) get identity matrices, which
    leave them exactly as the plain UNet computes them. Matrices are float32 on ``x``'s device;
    sessions cast inputs to the dtypes their graph declares.
    """
    rows, sigma = (blur.rows, blur.sigma) if blur is not None else ((), 0.0)
    named = {SAMPLE: x, TIMESTEP: timesteps.reshape(-1).expand(x.shape[0]), CONTEXT: context, **extra}
    named.update(blur_matrix_inputs(session.levels, (x.shape[2], x.shape[3]), x.shape[0], rows, sigma,
                                    dtype=torch.float32, device=x.device))
    return named


def check_layers(blur: ActiveBlur | None, exported_layer_names: frozenset[str], exported_spec: str) -> None:
    """Raise :class:`EngineCannotRun` if SEG blurs other layers than the export has blur inputs for."""
    if blur is not None and blur.layer_names != exported_layer_names:
        raise EngineCannotRun(f"SEG blurs the layers {blur.layer_spec!r} but the export has SEG in "
                              f"{exported_spec!r}; export again with these layers or set SEG layers to it")


def check_extra_inputs(extra_names: Sequence[str], input_names: Sequence[str]) -> None:
    """Raise :class:`EngineCannotRun` if the call has inputs (ControlNet's …) the graph does not take."""
    unknown = sorted(set(extra_names) - set(input_names))
    if unknown:
        raise EngineCannotRun(f"the call has inputs the export does not take: {', '.join(unknown)}")


class ReplacementUNet:
    """One UNet replacement's forward: the session when it can take the call, else PyTorch.

    ``blur`` returns the SEG blur for the current call (``None``: SEG is not blurring);
    ``choose_session`` returns the session for a call or raises :class:`EngineCannotRun`;
    ``fallback`` runs the PyTorch UNet; ``notice`` receives each distinct fallback reason once;
    ``weights`` says which weights the UNet has for this call (default: always the checkpoint's),
    or raises :class:`EngineCannotRun` when no export can have them (hypernetworks …). Weights a
    session refused once are not offered to a session again: they run on PyTorch.
    """

    def __init__(self, *, choose_session: SessionChooser, blur: Callable[[], ActiveBlur | None],
                 fallback: Fallback, notice: Callable[[str], None],
                 weights: Callable[[], UNetWeights] = _checkpoint_weights):
        self.choose_session = choose_session
        self.blur = blur
        self.fallback = fallback
        self.notice = notice
        self.weights = weights
        self.fallbacks: Counter[str] = Counter()  #: calls that ran on PyTorch, per reason
        self.session_calls = 0  #: calls the session ran (the rest ran on PyTorch)
        self.weight_loads = 0  #: times a session took new weights (LoRA changes)
        self._refused_weights: dict[Hashable, str] = {}

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, *args: Any,
                **kwargs: Any) -> torch.Tensor:
        try:
            session, named = self._prepare(x, timesteps, context, args, kwargs)
        except EngineCannotRun as reason:
            self._fall_back(str(reason))
            return self.fallback(x, timesteps, context, *args, **kwargs)
        output = session.run(named)
        self.session_calls += 1
        return output.to(device=x.device, dtype=x.dtype)

    def _prepare(self, x, timesteps, context, args: tuple, kwargs: dict) -> tuple[UNetSession, dict]:
        if args:
            raise EngineCannotRun(f"the call has {len(args)} positional extra input(s)")
        if torch.is_grad_enabled() and (x.requires_grad or context.requires_grad):
            raise EngineCannotRun("this call needs gradients (T-SAM), which the export cannot give")
        if context is None or x.dim() != 4:
            raise EngineCannotRun("the call is not a text-conditioned image UNet call")
        weights = self.weights()
        if weights.key in self._refused_weights:
            raise EngineCannotRun(self._refused_weights[weights.key])
        blur = self.blur()
        if blur is not None and blur.batch != x.shape[0]:
            raise EngineCannotRun(f"SEG asked for a batch of {blur.batch}, the call has {x.shape[0]} rows")
        extra = {name: value for name, value in kwargs.items() if value is not None}
        call = EngineCall(rows=x.shape[0], latent_height=x.shape[2], latent_width=x.shape[3], tokens=context.shape[1])
        session = self.choose_session(call, blur, tuple(extra))
        if session.weights_key != weights.key:
            self._load_weights(session, weights)
        return session, session_inputs(session, x, timesteps, context, extra, blur)

    def _load_weights(self, session: UNetSession, weights: UNetWeights) -> None:
        try:
            session.load_weights(weights)
        except EngineCannotRun as reason:
            self._refused_weights[weights.key] = str(reason)
            raise
        self.weight_loads += 1

    @property
    def fallback_calls(self) -> int:
        return sum(self.fallbacks.values())

    @property
    def notices(self) -> frozenset[str]:
        """The distinct fallback reasons given so far."""
        return frozenset(self.fallbacks)

    def _fall_back(self, reason: str) -> None:
        """Count a call that runs on PyTorch; a reason is told (``notice``) the first time only."""
        if reason not in self.fallbacks:
            self.notice(reason)
        self.fallbacks[reason] += 1
