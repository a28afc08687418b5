"""A SEG-capable UNet for export: the query blur of chosen layers driven by runtime matrix inputs.

:class:`SegExportUNet` wraps a UNet (diffusers' ``UNet2DConditionModel`` or the WebUI's ldm/sgm
``UNetModel``) and takes, besides the usual inputs, two batch-first matrices per token-grid
*level* used by the chosen SEG layers: ``blur_h_<level>`` ``(B, h, h)`` and ``blur_w_<level>``
``(B, w, w)``. In each chosen layer the query rows become ``Q'[b] = A_h[b] · Q[b] · A_w[b]ᵀ``
(per channel), exactly the core's matrix form of the SEG blur (DESIGN §1.1). So one exported
graph serves every σ (σ = ∞ is ``1/n`` everywhere) and cond/uncond/SEG rows in one call
(identity matrices leave a row untouched, bit for bit). ``h`` and ``w`` are read from the
matrices' *shapes*, never from tensor values, so the graph has no value-dependent shapes.

A level is the number of stride-2 downsamplings between the latent and a layer's token grid,
read from the UNet's layer table (:func:`~seg_tsam.extension.adapters.unet_layers.attention_layers`);
the grid at level ``l`` of an ``H × W`` latent is ``H`` and ``W`` halved ``l`` times with ceil
(:func:`grid_at_level`), which is what a stride-2, padding-1 convolution does, for any size.
:func:`blur_matrix_inputs` builds a call's matrices on the host from the core's
:func:`~seg_tsam.extension.core.blur.blur_matrices`.

The hooks that apply the blur are the core's :class:`QueryBlurPatch` (the one owner of
attention patches) in its matrix form, installed for the duration of one ``forward`` only, so
the wrapped UNet is untouched between calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..extension.adapters.unet_layers import downsampling_count, self_attention_layers
from ..extension.core.blur import blur_matrices
from ..extension.core.layers import AttentionLayer, grid_at_level, select_layers
from ..extension.core.query_blur_patch import QueryBlurPatch
from .profiles import TOKENS_PER_CHUNK

FLAVOURS = ("diffusers", "ldm", "sgm")

SAMPLE = "sample"
TIMESTEP = "timestep"
CONTEXT = "encoder_hidden_states"
OUTPUT = "out_sample"


def blur_input_names(level: int) -> tuple[str, str]:
    """The names of the ``(A_h, A_w)`` inputs for token-grid level ``level``."""
    return f"blur_h_{level}", f"blur_w_{level}"


# --- flavour adapters: how to call each kind of UNet -----------------------------------------


def _context_width(unet: nn.Module) -> int:
    """The text-context width the cross-attentions expect (``attn2.to_k`` input features)."""
    for name, module in unet.named_modules():
        if name.endswith(".attn2") and isinstance(getattr(module, "to_k", None), nn.Linear):
            return module.to_k.in_features
    raise ValueError("the UNet has no cross-attention (attn2.to_k) to take the context width from")


class DiffusersUNetCall:
    """``unet(sample, timestep, encoder_hidden_states, added_cond_kwargs={"text_embeds", "time_ids"})``."""

    flavour = "diffusers"

    def __init__(self, unet: nn.Module):
        config = unet.config
        if getattr(config, "class_embed_type", None) is not None:
            raise ValueError(f"diffusers UNets with class_embed_type={config.class_embed_type!r} are not supported")
        embed_type = getattr(config, "addition_embed_type", None)
        if embed_type not in (None, "text_time"):
            raise ValueError(f"diffusers UNets with addition_embed_type={embed_type!r} are not supported")
        self.sdxl = embed_type == "text_time"
        self.in_channels = int(config.in_channels)
        self.context_width = _context_width(unet)
        if self.sdxl:
            time_width = 6 * int(config.addition_time_embed_dim)
            self.extra_widths = {"text_embeds": int(config.projection_class_embeddings_input_dim) - time_width,
                                 "time_ids": 6}
        else:
            self.extra_widths = {}

    @property
    def extra_names(self) -> tuple[str, ...]:
        return tuple(self.extra_widths)

    def __call__(self, unet: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        added = {name: inputs[name] for name in self.extra_names} if self.sdxl else None
        return unet(inputs[SAMPLE], inputs[TIMESTEP], inputs[CONTEXT], added_cond_kwargs=added, return_dict=False)[0]


class OpenAIUNetCall:
    """The WebUI's ldm (SD1.x/2.x) and sgm (SDXL) ``UNetModel``: ``unet(x, timesteps, context[, y])``.

    Precision note: these UNets compute the timestep embedding and ``GroupNorm32`` in float32
    and ldm casts its input to ``unet.dtype``; the WebUI makes fp16 work with autocast and a
    cast of ``timestep_embedding``. An fp16 export of these flavours therefore needs that
    environment (or a CUDA device) and is not covered by the CPU tests.
    """

    def __init__(self, unet: nn.Module, flavour: str):
        self.flavour = flavour
        num_classes = getattr(unet, "num_classes", None)
        if num_classes not in (None, "sequential"):
            raise ValueError(
                f"{flavour} UNets with num_classes={num_classes!r} are not supported (SD uses None or 'sequential')"
            )
        self.in_channels = int(unet.in_channels)
        self.context_width = _context_width(unet)
        self.extra_widths = {"y": unet.label_emb[0][0].in_features} if num_classes == "sequential" else {}

    @property
    def extra_names(self) -> tuple[str, ...]:
        return tuple(self.extra_widths)

    def __call__(self, unet: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.extra_widths:
            return unet(inputs[SAMPLE], inputs[TIMESTEP], inputs[CONTEXT], inputs["y"])
        return unet(inputs[SAMPLE], inputs[TIMESTEP], inputs[CONTEXT])


UNetCall = DiffusersUNetCall | OpenAIUNetCall


def unet_call(unet: nn.Module, flavour: str) -> UNetCall:
    """The call adapter for ``flavour`` ("diffusers", "ldm" or "sgm")."""
    if flavour == "diffusers":
        return DiffusersUNetCall(unet)
    if flavour in ("ldm", "sgm"):
        return OpenAIUNetCall(unet, flavour)
    raise ValueError(f"unknown UNet flavour {flavour!r}; expected one of {FLAVOURS}")


# --- the chosen layers as the export reports them ---------------------------------------------


@dataclass(frozen=True)
class BlurSite:
    """A chosen SEG layer and the token-grid level its queries live on."""

    layer: AttentionLayer
    level: int


def _parameter(unet: nn.Module) -> torch.Tensor:
    try:
        return next(unet.parameters())
    except StopIteration:
        raise ValueError("the UNet has no parameters") from None


def example_conditioning(
    call: UNetCall,
    batch: int,
    latent_size: tuple[int, int],
    tokens: int,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> dict[str, torch.Tensor]:
    """Random inputs of the right shapes for the UNet (no blur matrices). Timesteps stay float32."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    inputs = {
        SAMPLE: randn(batch, call.in_channels, *latent_size),
        TIMESTEP: torch.full((batch,), 500.0, device=device),
        CONTEXT: randn(batch, tokens, call.context_width),
    }
    inputs.update({name: randn(batch, width) for name, width in call.extra_widths.items()})
    return inputs


# --- the wrapper -----------------------------------------------------------------------------


class SegExportUNet(nn.Module):
    """A UNet whose chosen SEG layers blur their queries with runtime ``(A_h, A_w)`` inputs.

    ``forward(*inputs)`` takes tensors in the order of :attr:`input_names`: ``sample``,
    ``timestep`` (float, ``(B,)``), ``encoder_hidden_states``, the flavour's extra
    conditioning (diffusers SDXL: ``text_embeds``, ``time_ids``; sgm: ``y``), then
    ``blur_h_<level>``, ``blur_w_<level>`` for each level in :attr:`levels`. It returns the
    UNet's output. Rows whose matrices are identities are exactly the plain UNet's rows.
    """

    def __init__(self, unet: nn.Module, *, flavour: str, layers: str = "mid"):
        super().__init__()
        self.unet = unet
        self.flavour = flavour
        self.layer_spec = layers
        self.call = unet_call(unet, flavour)
        self.layers = tuple(select_layers(self_attention_layers(unet), layers))
        self.sites = tuple(BlurSite(layer, layer.level) for layer in self.layers)
        self.levels = tuple(sorted({layer.level for layer in self.layers}))
        self.downsamplings = downsampling_count(unet)
        blur_names = tuple(name for level in self.levels for name in blur_input_names(level))
        self.conditioning_names = (SAMPLE, TIMESTEP, CONTEXT, *self.call.extra_names)
        self.input_names = (*self.conditioning_names, *blur_names)
        self.output_names = (OUTPUT,)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        named = dict(zip(self.input_names, inputs))
        matrices = {level: tuple(named[name] for name in blur_input_names(level)) for level in self.levels}
        with QueryBlurPatch(self.layers, self.layer_spec) as patch, patch.applying_matrices(matrices):
            return self.call(self.unet, named)

    def run(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``forward`` with inputs by name (extra names are an error, missing ones too)."""
        unknown = set(inputs) - set(self.input_names)
        missing = [name for name in self.input_names if name not in inputs]
        if unknown or missing:
            raise KeyError(f"inputs: missing {missing}, unknown {sorted(unknown)}")
        return self(*(inputs[name] for name in self.input_names))

    def general_latent_size(self) -> tuple[int, int]:
        """``(2·2^n + 1, 3·2^n + 1)`` for ``n`` downsamplings: odd at every level, a non-square grid.

        Traced at such a size, size-dependent branches take their general form at every level
        (diffusers' ``forward_upsample_size``, the WebUI's resizing ``cat`` before each skip
        concatenation), which is right for every size, even or odd.
        """
        scale = 2**self.downsamplings
        return 2 * scale + 1, 3 * scale + 1

    def example_inputs(
        self,
        *,
        batch: int = 2,
        latent_size: tuple[int, int] | None = None,
        tokens: int = TOKENS_PER_CHUNK,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Inputs in :attr:`input_names` order: random conditioning, identity blur matrices.

        ``latent_size`` defaults to :meth:`general_latent_size`.
        """
        parameter = _parameter(self.unet)
        dtype = dtype or parameter.dtype
        latent_size = latent_size or self.general_latent_size()
        inputs = example_conditioning(self.call, batch, latent_size, tokens, dtype, parameter.device)
        identities = blur_matrix_inputs(self.levels, latent_size, batch, [], 0.0, dtype=dtype, device=parameter.device)
        inputs.update(identities)
        return tuple(inputs[name] for name in self.input_names)


# --- host side: the matrices for one call ------------------------------------------------------


def blur_matrix_inputs(
    levels: Sequence[int],
    latent_size: tuple[int, int],
    batch: int,
    blurred_rows: Sequence[int],
    sigma: float,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """The ``blur_h_<level>``/``blur_w_<level>`` inputs for one call of ``batch`` rows.

    Rows in ``blurred_rows`` get the σ blur (core :func:`blur_matrices`: σ = 0 identity,
    σ > 9999 or ∞ the exact ``1/n`` mean matrix); every other row the identity, which leaves
    it exactly untouched. ``latent_size`` is the call's ``(H, W)`` latent.
    """
    if batch < 1:
        raise ValueError(f"batch must be ≥ 1, got {batch}")
    rows = sorted({int(row) for row in blurred_rows})
    if rows and (rows[0] < 0 or rows[-1] >= batch):
        raise ValueError(f"blurred rows {rows} outside a batch of {batch}")
    inputs = {}
    for level in levels:
        height, width = grid_at_level(latent_size, level)
        for name, side, matrix in zip(
            blur_input_names(level), (height, width), blur_matrices(height, width, sigma, device=device, dtype=dtype)
        ):
            stack = torch.eye(side, dtype=dtype, device=device).repeat(batch, 1, 1)  # (B, n, n)
            stack[rows] = matrix
            inputs[name] = stack
    return inputs
