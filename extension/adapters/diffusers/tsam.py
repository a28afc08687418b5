"""T-SAM on diffusers: T from a pipeline's text encoders, S from the UNet's coarse cross-attention.

Pieces, each usable alone:

- :func:`pipeline_prompt_targets` — T for each prompt, with the pipeline's own tokenizer(s)
  and text encoder(s), 75-token chunks like the WebUI.
- :class:`CrossAttentionCapture` — the single owner of the explicit-softmax processors on the
  coarse ``attn2`` layers; everything it changes is restored on exit.
- :func:`alignment_losses`, :func:`alignment_gradient`, :func:`tsam_update` — the loss of
  the cond rows, its gradient with respect to the UNet input, and the update.
- :func:`model_input_scale` — ``c_in`` of the scheduler, to map an updated UNet input back to
  the scheduler's latent.

The optimisation pass runs the cond rows only, one per image (as the official code does);
images never mix inside the UNet, so one batched backward of the summed loss gives every
image exactly its own gradient.

Space and scale: T-SAM's step size was tuned in the space of the UNet input ``z`` of the
VP schedulers (DDIM/PNDM, where ``z`` is the latent itself). Euler-type schedulers keep
``x = z·sqrt(σ²+1)`` and feed the UNet ``z = c_in·x`` with ``c_in = 1/sqrt(σ²+1)``
(``scheduler.scale_model_input``). So the gradient is taken with respect to ``z`` (what the
UNet sees), ``z' = z − α·∇_z L``, and the scheduler's latent becomes ``x' = z' / c_in``.
(Stepping ``x`` with ``∇_x L = c_in·∇_z L`` and the same α would be off by ``1/c_in² = σ²+1``.)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...core import tsam, tsam_descent
from ...core.attention_capture import AttentionCapture, frozen_parameters
from ...core.layers import AttentionLayer
from ...core.tsam import PromptTarget, TsamSettings
from ...core.tsam_descent import UnetCall
from ..text_attention import eager_attention, no_new_capture_hooks
from ..unet_layers import cross_attention_layers
from .conditioning import RowConditioning, is_sdxl

logger = logging.getLogger("seg_tsam")

#: The official code reads 16×16 maps from SD1.5 at 512²: the latent (64²) halved twice.
DEFAULT_LEVEL = 2


# --------------------------------------------------------------------------------------------
# Which attn2 layers, and their grid
# --------------------------------------------------------------------------------------------


def coarse_cross_attention_layers(unet: nn.Module, level: int = DEFAULT_LEVEL) -> list[AttentionLayer]:
    """The ``attn2`` layers at ``level`` (SD1.x: 5 layers at latent/4; SDXL: down 2, mid, up 0).

    Levels come from the UNet's layer table (:mod:`..unet_layers`).
    """
    layers = cross_attention_layers(unet)
    chosen = [layer for layer in layers if layer.level == level]
    if not chosen:
        levels = sorted({layer.level for layer in layers})
        raise ValueError(f"T-SAM: this UNet has no cross-attention at level {level} (levels with some: {levels})")
    return chosen


# --------------------------------------------------------------------------------------------
# Capturing cross-attention probabilities with gradient
# --------------------------------------------------------------------------------------------


class _CapturingProcessor(nn.Module):
    """Explicit-softmax cross-attention that hands its probabilities to a capture.

    Same math as diffusers' ``AttnProcessor``: ``softmax(q·kᵀ·scale + mask)·v``, with the
    softmax in float32 (or float64) at least. An ``nn.Module`` so that swapping it in and out
    with ``Attention.set_processor`` restores the module's child list exactly, whether the
    original processor is a module or not.
    """

    def __init__(self, capture: CrossAttentionCapture, name: str):
        super().__init__()
        self._capture = capture
        self._name = name

    def forward(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if isinstance(encoder_hidden_states, tuple):
            raise ValueError("T-SAM does not support extra image tokens (IP-Adapter) in cross-attention")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)  # (B, N, C)
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])  # (B, H, 1|N, M)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, N, d)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, M, d)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, M, d)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        exact = torch.promote_types(query.dtype, torch.float32)
        scores = (query.to(exact) @ key.to(exact).transpose(-1, -2)) * attn.scale  # (B, H, N, M)
        if attention_mask is not None:
            scores = scores + attention_mask.to(exact)
        probabilities = scores.softmax(dim=-1)
        self._capture._record(self._name, probabilities)

        out = probabilities.to(value.dtype) @ value  # (B, H, N, d)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)  # (B, N, H·d)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class CrossAttentionCapture(AttentionCapture):
    """Context manager: explicit-softmax processors on the coarse ``attn2`` layers, and nothing else.

    Inside the ``with`` block, :meth:`probabilities` runs a UNet forward and returns the
    coarse cross-attention probabilities, mean over heads and layers, **with** gradient. On
    exit (also after an exception) every processor is put back as it was. Outside
    :meth:`probabilities` the installed processors compute plain attention and record nothing.

    With ``stop_early`` the forward is ended (by a private exception, caught here) as soon
    as every captured layer ran: the loss does not depend on the rest of the UNet.
    """

    def __init__(self, unet: nn.Module, *, level: int = DEFAULT_LEVEL, stop_early: bool = True):
        self.layers = tuple(coarse_cross_attention_layers(unet, level))
        super().__init__([layer.name for layer in self.layers], level=level, stop_early=stop_early)

    def _patch_layers(self) -> Iterator[Callable[[], None]]:
        for layer in self.layers:
            module, original = layer.module, layer.module.processor
            module.set_processor(_CapturingProcessor(self, layer.name))
            yield lambda module=module, original=original: module.set_processor(original)


# --------------------------------------------------------------------------------------------
# Loss, gradient, update
# --------------------------------------------------------------------------------------------


def _autograd_ready(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A copy of an inference-mode tensor (autograd cannot save those), else the tensor itself."""
    return tensor.clone() if tensor is not None and tensor.is_inference() else tensor


def _check_batch(model_input: torch.Tensor, cond: RowConditioning, targets: Sequence[PromptTarget]) -> None:
    images = model_input.shape[0]
    if cond.text.shape[0] != images or len(targets) != images:
        raise ValueError(
            f"T-SAM: {images} latents, {cond.text.shape[0]} cond rows and {len(targets)} targets; "
            "give one cond row and one target per image"
        )


def _prepared(cond: RowConditioning, timestep):
    cond = RowConditioning(_autograd_ready(cond.text), _autograd_ready(cond.pooled), _autograd_ready(cond.time_ids))
    return cond, (_autograd_ready(timestep) if torch.is_tensor(timestep) else timestep)


@contextlib.contextmanager
def _alignment_session(
    unet: nn.Module,
    model_input: torch.Tensor,
    timestep: torch.Tensor | float,
    cond: RowConditioning,
    targets: Sequence[PromptTarget],
    level: int,
    stop_early: bool,
) -> Iterator[tuple[CrossAttentionCapture, UnetCall]]:
    """After checking the batch: the capture installed and the UNet's weights frozen (both undone
    on exit), with the cond rows' UNet call on ``z``, given to the UNet in ``model_input``'s dtype
    (the descent keeps ``z`` in float32)."""
    _check_batch(model_input, cond, targets)
    cond, timestep = _prepared(cond, timestep)
    kwargs, dtype = cond.unet_kwargs(), model_input.dtype
    with frozen_parameters(unet), CrossAttentionCapture(unet, level=level, stop_early=stop_early) as capture:
        yield capture, lambda z: unet(z.to(dtype), timestep, **kwargs, return_dict=False)


def alignment_losses(
    unet: nn.Module,
    model_input: torch.Tensor,
    timestep: torch.Tensor | float,
    cond: RowConditioning,
    targets: Sequence[PromptTarget],
    *,
    loss: str = "official",
    level: int = DEFAULT_LEVEL,
    stop_early: bool = True,
) -> torch.Tensor:
    """The T-SAM loss of each image, ``(B,)``, without gradient. ``model_input`` is what the UNet sees."""
    with _alignment_session(unet, model_input, timestep, cond, targets, level, stop_early) as (capture, run_unet):
        return tsam_descent.alignment_losses(capture, run_unet, model_input, targets, loss).losses


def alignment_gradient(
    unet: nn.Module,
    model_input: torch.Tensor,
    timestep: torch.Tensor | float,
    cond: RowConditioning,
    targets: Sequence[PromptTarget],
    *,
    loss: str = "official",
    level: int = DEFAULT_LEVEL,
    stop_early: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(losses (B,), ∇ loss w.r.t. model_input)``; the loss is in float32 (float64 for a float64 UNet)."""
    with _alignment_session(unet, model_input, timestep, cond, targets, level, stop_early) as (capture, run_unet):
        alignment, gradient = tsam_descent.alignment_gradient(capture, run_unet, model_input, targets, loss)
    return alignment.losses, gradient


@dataclass(frozen=True)
class TsamUpdate:
    """Result of :func:`tsam_update`."""

    model_input: torch.Tensor  #: the updated UNet input z (same dtype as given)
    losses: torch.Tensor  #: (iterations, B) loss before each update
    maps: list[torch.Tensor] | None  #: per image (tokens, h, w) smoothed maps of the last forward


def tsam_update(
    unet: nn.Module,
    model_input: torch.Tensor,
    timestep: torch.Tensor | float,
    cond: RowConditioning,
    targets: Sequence[PromptTarget],
    settings: TsamSettings,
    *,
    step_size: float,
    iterations: int = 1,
    level: int = DEFAULT_LEVEL,
    stop_early: bool = True,
) -> TsamUpdate:
    """``iterations`` T-SAM steps ``z ← z − α·∇_z L`` on the UNet input ``z`` of every image.

    Only the cond rows run (``cond`` has one row per image and ``targets[i]`` is image
    ``i``'s T). The update is computed in float32 and cast back once at the end. An image whose loss or
    gradient is not finite keeps its ``z`` for that iteration (logged on ``seg_tsam``). The
    UNet is restored exactly when this returns or raises. For Euler-type schedulers map the
    result back with ``model_input / model_input_scale(...)`` (see the module docstring).
    """
    where = f"at timestep {timestep.tolist() if torch.is_tensor(timestep) else timestep} "
    with _alignment_session(unet, model_input, timestep, cond, targets, level, stop_early) as (capture, run_unet):
        descent = tsam_descent.descend(capture, run_unet, model_input, targets, settings.loss,
                                       step_size=step_size, iterations=iterations, where=where)
    maps = descent.last.maps if settings.show_maps and descent.last is not None else None
    return TsamUpdate(descent.model_input.to(model_input.dtype), descent.losses, maps)


def model_input_scale(scheduler, timestep: torch.Tensor | float, like: torch.Tensor) -> float:
    """``c_in`` with ``scheduler.scale_model_input(x, t) = c_in·x`` (1 for DDIM/PNDM, ``1/sqrt(σ²+1)`` for Euler).

    The scheduler's latent after an update of its UNet input ``z'`` is ``z' / c_in``. Call it
    after the step's own ``scale_model_input`` (Euler-type schedulers set their step index
    there). Assumes, as every SD scheduler of diffusers does, that the scaling is one scalar
    factor per step; ``like`` gives the device of the probe.
    """
    probe = torch.ones(1, dtype=torch.float32, device=like.device)
    return float(scheduler.scale_model_input(probe, timestep).reshape(-1)[0])


# --------------------------------------------------------------------------------------------
# T from a pipeline's text encoders
# --------------------------------------------------------------------------------------------


def split_prompt_tokens(token_ids: Sequence[int], chunk_length: int = tsam.CHUNK_PROMPT_TOKENS) -> list[list[int]]:
    """Consecutive ``chunk_length``-token chunks; an empty prompt is one empty chunk."""
    ids = list(token_ids)
    return [ids[start : start + chunk_length] for start in range(0, len(ids), chunk_length)] or [[]]


def encoder_chunk_targets(
    tokenizer,
    text_encoder: nn.Module,
    prompts: Sequence[str],
    *,
    power: float = 3.0,
    device: torch.device | str | None = None,
) -> list[list[torch.Tensor]]:
    """T of every 75-token chunk of every prompt from one encoder: ``[prompt][chunk] → (L, L)``.

    Each chunk is encoded alone as ``BOS, tokens, EOS, padding`` (77 ids), as the WebUI
    does; the encoder runs once for all chunks, with eager attention and no gradient. The
    ids go to ``device`` (default: the encoder's parameters' device).
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    chunks_per_prompt = [
        split_prompt_tokens(tokenizer(prompt, add_special_tokens=False, truncation=False, verbose=False).input_ids)
        for prompt in prompts
    ]
    rows, eos_positions = [], []
    for chunks in chunks_per_prompt:
        for chunk in chunks:
            padding = [pad] * (tsam.CHUNK_PROMPT_TOKENS - len(chunk))
            rows.append([bos, *chunk, eos, *padding])  # 77 ids
            eos_positions.append(len(chunk) + 1)
    device = device if device is not None else next(text_encoder.parameters()).device
    ids = torch.tensor(rows, dtype=torch.long, device=device)  # (chunks, 77)
    with no_new_capture_hooks(text_encoder), eager_attention(text_encoder), torch.no_grad():
        attentions = text_encoder(ids, output_attentions=True).attentions
    if not attentions:
        raise RuntimeError("T-SAM: the text encoder returned no attention maps (it needs eager attention)")
    flat = tsam.text_attention_targets(attentions, eos_positions, power=power)
    targets, start = [], 0
    for chunks in chunks_per_prompt:
        targets.append(flat[start : start + len(chunks)])
        start += len(chunks)
    return targets


def pipeline_encoders(pipe) -> list[tuple[object, nn.Module]]:
    """``(tokenizer, text encoder)`` pairs of a pipeline: one for SD1.x/SD2.x, two for SDXL."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if is_sdxl(pipe) and getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return [(tokenizer, encoder) for tokenizer, encoder in pairs if tokenizer is not None and encoder is not None]


def pipeline_prompt_targets(
    pipe, prompts: Sequence[str], *, power: float = 3.0, max_chunks: int | None = None
) -> list[PromptTarget]:
    """T-SAM targets of ``prompts`` (one per image) from the pipeline's own text encoders.

    A prompt is tokenised without truncation and cut into consecutive 75-token chunks, each
    encoded alone (BOS + chunk + EOS + padding), so chunk ``c``'s tokens sit at context
    columns ``77c + 1 …`` of a WebUI-style concatenated conditioning. (The WebUI's own
    chunker also moves words after the last comma within 20 tokens and honours ``BREAK``; a
    WebUI adapter must take the chunk boundaries from the WebUI's tokenisation instead.)
    Diffusers' ``encode_prompt`` truncates to one chunk: pass ``max_chunks=1`` (or
    ``cond.text.shape[1] // 77``) to keep only the chunks the conditioning has.

    SDXL: T of each encoder, then their average (:func:`tsam.combine_encoder_targets`).
    """
    device = getattr(pipe, "_execution_device", None)  # where offloaded encoders run
    per_encoder = [
        encoder_chunk_targets(tokenizer, encoder, prompts, power=power, device=device)
        for tokenizer, encoder in pipeline_encoders(pipe)
    ]
    targets = []
    for prompt_index in range(len(prompts)):
        chunk_lists = [encoder_targets[prompt_index] for encoder_targets in per_encoder]
        if len({len(chunks) for chunks in chunk_lists}) != 1:
            raise ValueError(f"T-SAM: the text encoders split prompt {prompt_index} into different chunk counts")
        combined = [tsam.combine_encoder_targets(chunk_set) for chunk_set in zip(*chunk_lists)]
        if max_chunks is not None:
            combined = combined[:max_chunks]
        targets.append(tsam.chunk_targets(combined))
    return targets
