"""T-SAM on the WebUI's ldm/sgm models: T from its text encoders, S from the UNet's coarse attn2.

The WebUI runs the CompVis ``ldm`` code for SD1.x/SD2.x and Stability's ``sgm`` code for
SDXL. This module is their counterpart of ``diffusers_tsam.py``; the math is the core's
(:mod:`..core.tsam`). It imports no WebUI module: it works on the objects the WebUI hands
out (the UNet, the hijacked text encoders and their ``PromptChunk`` lists).

**Which cross-attention layers (S).** Every ``attn2`` of the UNet has a resolution level:
the number of stride-2 downsamplings before it (ceil halvings of the latent, so the token
grid of level ``l`` is :func:`grid_at_level` of the latent), read from the UNet's layer
table (:func:`..unet_layers.cross_attention_layers`). The default level is 2, latent/4:
the official code's 16×16 maps of SD1.5 at 512² (5 layers: ``input_blocks.7/8`` and
``output_blocks.3/4/5``; SDXL: ``input_blocks.7/8``, the middle block and
``output_blocks.0/1/2``). A UNet without cross-attention at that level (e.g. a tiny test
UNet with two levels) falls back to the **coarsest level that has cross-attention**.
:class:`LdmCrossAttentionCapture` replaces the ``forward`` of just those modules, on the
instance, by an explicit-softmax attention that records the probabilities with gradient;
every other module keeps the WebUI's current attention optimisation. The capture restores
the modules on exit, and may end the UNet forward right after the last captured layer.
The loss, gradient and descent on top of the capture are the core's
(:mod:`..core.tsam_descent`), shared with diffusers.

**Text side (T).** Each image's T comes from the prompt text the WebUI encoded for it,
chunked by the encoder wrapper's own ``tokenize_line`` (75-token ``PromptChunk``s, ``BREAK``,
comma backtracking, textual-inversion placeholders), so chunk ``c``'s tokens sit at context
columns ``77c + 1 …`` exactly as in the conditioning the UNet sees.

- Hugging Face CLIP (SD1.x CLIP-L, SDXL's CLIP-L; ``wrapped.transformer`` is a
  ``CLIPTextModel``): called with ``output_attentions=True`` (transformers 4.30 in the
  WebUI always runs eager attention, so these are the causal probabilities).
- OpenCLIP (SD2.x ViT-H, SDXL's ViT-bigG; ``wrapped.model.transformer.resblocks``): its
  blocks call ``nn.MultiheadAttention`` with ``need_weights=False``, so a forward pre-hook
  on each block's ``attn`` recomputes the probabilities from the module's input and
  ``in_proj`` weights (``softmax(q·kᵀ/√d + causal mask)``, per head) while the WebUI's own
  ``encode_with_transformers`` runs. The hooks only read; they are removed right after.

T is the mean over every encoder layer that runs in the encoder call (all layers; SD2's
"penultimate" call stops before the last block, which then does not count) and all heads.
SDXL: T of each encoder, then their average (:func:`..text_targets.text_target`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...core.attention_capture import AttentionCapture, explicit_attention, frozen_parameters
from ...core.layers import AttentionLayer
from .. import text_targets
from ..text_attention import no_new_capture_hooks
from ..text_targets import TextTarget, chunk_token_ids
from ..unet_layers import TSAM_LEVEL, coarse_level, cross_attention_layers

logger = logging.getLogger("seg_tsam")

_MISSING = object()


# --------------------------------------------------------------------------------------------
# UNet: explicit cross-attention probabilities with gradient
# --------------------------------------------------------------------------------------------

#: ``(context) → (context for keys, context for values)``: the WebUI's hypernetworks hook here.
ContextTransform = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def cross_attention_with_probabilities(
    attention: nn.Module,
    x: torch.Tensor,
    context: torch.Tensor | None,
    context_transform: ContextTransform | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ldm/sgm ``CrossAttention`` computed explicitly: ``(output (B, N, C), probabilities (B, H, N, M))``.

    Same math as every attention optimisation of the WebUI: ``to_q``/``to_k``/``to_v``,
    ``softmax(q·kᵀ/√d)·v`` per head, ``to_out``. The scores and the softmax are in float32
    (float64 for a float64 model) with autocast off, whatever the model's dtype.
    """
    context = x if context is None else context
    context_k, context_v = context_transform(context) if context_transform is not None else (context, context)
    out, probabilities = explicit_attention(attention.to_q(x), attention.to_k(context_k), attention.to_v(context_v),
                                            attention.heads)
    return attention.to_out(out), probabilities


class LdmCrossAttentionCapture(AttentionCapture):
    """Context manager: explicit attention on the coarse ``attn2`` modules, and nothing else.

    On enter each chosen module gets an instance-level ``forward`` (explicit softmax, same
    output); on exit (also after an exception) the instance attribute is removed again, so
    the class-level forward the WebUI's optimisation installed is back, bit for bit. Inside,
    :meth:`probabilities` runs one UNet forward and returns the coarse cross-attention
    probabilities, mean over heads and layers, with gradient.
    """

    def __init__(
        self,
        unet: nn.Module,
        *,
        level: int | None = None,
        stop_early: bool = True,
        context_transform: ContextTransform | None = None,
    ):
        layers = cross_attention_layers(unet)
        level = coarse_level(layers, TSAM_LEVEL if level is None else level)
        self.layers = tuple(layer for layer in layers if layer.level == level)
        self.context_transform = context_transform
        super().__init__(
            [layer.name for layer in self.layers], level=level, stop_early=stop_early,
            missing_hint=" (a replacement UNet such as a TensorRT engine is not supported)",
        )

    def _patch_layers(self) -> Iterator[Callable[[], None]]:
        for layer in self.layers:
            module, previous = layer.module, layer.module.__dict__.get("forward", _MISSING)
            module.forward = self._capturing_forward(layer)
            yield lambda module=module, previous=previous: _set_instance_forward(module, previous)

    def _capturing_forward(self, layer: AttentionLayer):
        def forward(x, context=None, mask=None, additional_tokens=None, n_times_crossframe_attn_in_self=0, **kwargs):
            if mask is not None or additional_tokens is not None or n_times_crossframe_attn_in_self or kwargs:
                raise NotImplementedError(f"T-SAM: {layer.name} was called with masks or extra tokens")
            out, probabilities = cross_attention_with_probabilities(layer.module, x, context, self.context_transform)
            self._record(layer.name, probabilities)
            return out

        return forward


def _set_instance_forward(module: nn.Module, forward: object) -> None:
    """Give ``module`` the instance-level ``forward`` it had (``_MISSING``: none, the class's runs)."""
    if forward is _MISSING:
        module.__dict__.pop("forward", None)
    else:
        module.forward = forward


@contextlib.contextmanager
def _no_gradient_checkpointing(unet: nn.Module) -> Iterator[None]:
    """ldm/sgm blocks with ``checkpoint``/``use_checkpoint`` set run their forward without
    gradient; the WebUI turns that off at load, this makes sure of it for the T-SAM pass only."""
    flipped = []
    for module in unet.modules():
        for attribute in ("checkpoint", "use_checkpoint"):
            if module.__dict__.get(attribute) is True:
                setattr(module, attribute, False)
                flipped.append((module, attribute))
    try:
        yield
    finally:
        for module, attribute in flipped:
            setattr(module, attribute, True)


@contextlib.contextmanager
def alignment_session(
    unet: nn.Module, *, level: int | None = None, context_transform: ContextTransform | None = None
) -> Iterator[LdmCrossAttentionCapture]:
    """Everything one T-SAM update changes on the UNet, undone on exit: frozen weights, no
    gradient checkpointing, explicit attention on the coarse ``attn2`` layers."""
    capture = LdmCrossAttentionCapture(unet, level=level, context_transform=context_transform)
    with frozen_parameters(unet), _no_gradient_checkpointing(unet), capture:
        yield capture


# --------------------------------------------------------------------------------------------
# Text side: the WebUI's encoder wrappers → T per prompt
# --------------------------------------------------------------------------------------------


def text_embedders(cond_stage_model: nn.Module) -> list[nn.Module]:
    """The WebUI's prompt-encoder wrappers of a model: one (SD1.x, SD2.x) or two (SDXL's conditioner)."""
    embedders = getattr(cond_stage_model, "embedders", None)
    candidates = list(embedders) if embedders is not None else [cond_stage_model]
    found = [embedder for embedder in candidates if hasattr(embedder, "tokenize_line") and hasattr(embedder, "wrapped")]
    if not found:
        raise ValueError("T-SAM: no WebUI prompt encoder (SD1.x/SD2.x/SDXL CLIP or OpenCLIP) in this model")
    for embedder in found:
        encoder_kind(embedder)  # raises for an encoder we cannot read attentions from
    return found


def encoder_kind(embedder: nn.Module) -> str:
    """``"hf_clip"`` (a transformers CLIP text model) or ``"open_clip"`` (OpenCLIP resblocks)."""
    wrapped = embedder.wrapped
    if hasattr(getattr(wrapped, "transformer", None), "config"):  # transformers' CLIPTextModel
        return "hf_clip"
    if hasattr(getattr(getattr(wrapped, "model", None), "transformer", None), "resblocks"):
        return "open_clip"
    raise ValueError(f"T-SAM: text encoder {type(wrapped).__name__} is not supported (CLIP or OpenCLIP only)")


def _parameter_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def multihead_attention_probabilities(
    attention: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal probabilities ``(N, heads, L, S)`` of an ``nn.MultiheadAttention`` call, from its
    inputs and ``in_proj`` weights (the module itself returns none with ``need_weights=False``).

    ``attn_mask`` (float, added; or bool, True = masked) is applied on top of the causal mask.
    """
    if not attention._qkv_same_embed_dim:
        raise ValueError("T-SAM: OpenCLIP attention with separate q/k/v projections is not supported")
    if not attention.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)  # (L, N, E) → (N, L, E)
    embed, heads = attention.embed_dim, attention.num_heads
    weight, bias = attention.in_proj_weight, attention.in_proj_bias
    q = F.linear(query, weight[:embed], None if bias is None else bias[:embed])  # (N, L, E)
    k = F.linear(key, weight[embed : 2 * embed], None if bias is None else bias[embed : 2 * embed])  # (N, S, E)
    batch, length, _ = q.shape
    head_dim = embed // heads
    q = q.view(batch, length, heads, head_dim).transpose(1, 2)  # (N, H, L, d)
    k = k.view(batch, k.shape[1], heads, head_dim).transpose(1, 2)  # (N, H, S, d)
    exact = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(device_type=q.device.type, enabled=False):
        scores = (q.to(exact) @ k.to(exact).transpose(-1, -2)) * head_dim**-0.5  # (N, H, L, S)
        future = torch.ones(length, k.shape[2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, -math.inf)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(attn_mask, -math.inf)
            else:
                scores = scores + attn_mask.to(exact)
        return scores.softmax(dim=-1)


def _hf_clip_attentions(embedder: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    transformer = embedder.wrapped.transformer
    with no_new_capture_hooks(transformer):  # transformers ≥ 5 would leave hooks behind; 4.30 installs none
        outputs = transformer(input_ids=ids, output_attentions=True)
    attentions = getattr(outputs, "attentions", None)
    if not attentions or attentions[0] is None:
        raise RuntimeError("T-SAM: the CLIP text model returned no attention maps (it needs eager attention)")
    return list(attentions)


def _open_clip_attentions(embedder: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    records: list[torch.Tensor] = []

    def record(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
        query = args[0] if args else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs.get("key", query)
        attn_mask = args[5] if len(args) > 5 else kwargs.get("attn_mask")
        records.append(multihead_attention_probabilities(module, query, key, attn_mask))

    blocks = embedder.wrapped.model.transformer.resblocks
    handles = [block.attn.register_forward_pre_hook(record, with_kwargs=True) for block in blocks]
    try:
        embedder.encode_with_transformers(ids)
    finally:
        for handle in handles:
            handle.remove()
    return records


def chunk_attentions(embedder: nn.Module, chunks: Sequence) -> list[torch.Tensor]:
    """Per encoder layer that ran, ``(chunks, heads, 77, 77)`` attention probabilities of the
    WebUI's ``PromptChunk``s (textual-inversion vectors placed as the WebUI places them)."""
    ids = chunk_token_ids(chunks, embedder.id_end, embedder.id_pad, _parameter_device(embedder.wrapped))
    reader = _hf_clip_attentions if encoder_kind(embedder) == "hf_clip" else _open_clip_attentions
    embedder.hijack.fixes = [chunk.fixes for chunk in chunks]  # read (and cleared) by the embedding layer
    try:
        with torch.no_grad():
            return reader(embedder, ids)
    finally:
        embedder.hijack.fixes = None


def _token_text(embedder: nn.Module, token_id: int) -> str:
    tokenizer = getattr(embedder, "tokenizer", None) or getattr(embedder.wrapped, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "convert_ids_to_tokens"):
        text = tokenizer.convert_ids_to_tokens(int(token_id))
    else:  # OpenCLIP: the WebUI tokenises with open_clip's simple tokenizer
        import open_clip.tokenizer  # noqa: PLC0415  (present wherever an OpenCLIP model runs)

        text = open_clip.tokenizer._tokenizer.decoder.get(int(token_id), "?")
    return str(text).replace("</w>", "")


class LdmPromptEncoder:
    """One of the WebUI's prompt-encoder wrappers as a :class:`~..text_targets.PromptEncoder`."""

    def __init__(self, embedder: nn.Module):
        self.embedder = embedder
        self.end_id = embedder.id_end

    def chunks(self, text: str) -> list:
        return self.embedder.tokenize_line(text)[0]

    def attentions(self, chunks: Sequence) -> list[torch.Tensor]:
        return chunk_attentions(self.embedder, chunks)

    def token_text(self, token_id: int) -> str:
        return _token_text(self.embedder, token_id)


def text_target(embedders: Sequence[nn.Module], text: str, *, power: float) -> TextTarget:
    """T of ``text`` from the WebUI's encoder wrappers (:func:`..text_targets.text_target`)."""
    return text_targets.text_target([LdmPromptEncoder(embedder) for embedder in embedders], text, power=power)
