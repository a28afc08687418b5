"""T-SAM's gradient pass through a Forge-family UNet (Forge Neo, Forge, reForge), pure torch.

Three things stand between these hosts' UNets and a gradient with respect to their input, and
each is lifted for the duration of one T-SAM update only:

1. **Inference tensors.** The hosts load and move the UNet under ``torch.inference_mode()``, so
   its weights are inference tensors, which autograd refuses to save for backward (even with
   inference mode off). :func:`autograd_parameters` gives every such parameter and buffer a
   normal tensor that shares its storage (no copy, no extra memory) and puts the original
   ``Parameter`` objects back on exit, so the model is exactly as it was.
2. **In-place residual additions.** Forge Neo's and Forge's transformer blocks add the attention
   output to ``x`` in place (``x += n``) after ``LayerNorm`` saved ``x`` for backward, so backward
   fails ("modified by an inplace operation"). :func:`saved_activation_copies` makes autograd
   keep its own copy of every saved tensor of the graph (those that require gradients), so later
   in-place additions do not touch what backward reads. reForge's blocks add out of place and do
   not need it.
3. **Attention kernels without backward** (sage, flash, some xformers builds) and T-SAM's need
   for probabilities. The hosts let a call replace the attention of any transformer block through
   ``transformer_options["patches_replace"]``: :class:`PatcherCrossAttentionCapture` builds, for
   each T-SAM call, options in which every ``attn1``/``attn2`` runs plain scaled-dot-product
   attention (differentiable on every device), and the coarse ``attn2`` layers an explicit softmax
   that records its probabilities (:func:`..core.attention_capture.explicit_attention`). Nothing
   is installed on the model for this: the replacements travel in the call's options.

A replacement receives the projected ``q``, ``k``, ``v`` (``(B, N, heads·d)``, heads not split)
and ``extra_options["n_heads"]``, and returns ``(B, N, heads·d)``; the host applies ``to_out``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...core.attention_capture import AttentionCapture, explicit_attention, frozen_parameters
from ..unet_layers import TSAM_LEVEL, coarse_level, cross_attention_layers

#: ``(block name, number, depth)``: the hosts' key of a transformer block's attention replacement.
ReplaceKey = tuple[str, int, int]
_ATTENTION_NAME = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\..*transformer_blocks\.(\d+)\.(attn[12])$")
_BLOCK_NAMES = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


# --------------------------------------------------------------------------------------------
# 1. Inference-tensor weights
# --------------------------------------------------------------------------------------------


def _storage_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A normal tensor on ``tensor``'s storage (same memory, same values): call outside inference mode."""
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


@contextlib.contextmanager
def autograd_parameters(module: nn.Module) -> Iterator[int]:
    """Inside, every inference-tensor parameter (plain ``Parameter``s; quantised parameter
    subclasses are left alone) and buffer of ``module`` is replaced by a normal tensor sharing its
    storage, which autograd may save; on exit the original objects are put back. Yields how many
    were replaced. Nothing is copied: the replacements read the same memory."""
    replaced: list[tuple[dict, str, torch.Tensor]] = []
    try:
        with torch.inference_mode(False):
            for submodule in module.modules():
                for name, parameter in list(submodule._parameters.items()):
                    if type(parameter) is nn.Parameter and parameter.is_inference():
                        replaced.append((submodule._parameters, name, parameter))
                        submodule._parameters[name] = nn.Parameter(_storage_alias(parameter), requires_grad=False)
                for name, buffer in list(submodule._buffers.items()):
                    if type(buffer) is torch.Tensor and buffer.is_inference():
                        replaced.append((submodule._buffers, name, buffer))
                        submodule._buffers[name] = _storage_alias(buffer)
        yield len(replaced)
    finally:
        for table, name, original in reversed(replaced):
            table[name] = original


# --------------------------------------------------------------------------------------------
# 2. In-place additions after a save
# --------------------------------------------------------------------------------------------


@dataclass
class SavedCopies:
    """What :func:`saved_activation_copies` copied so far."""

    tensors: int = 0
    bytes: int = 0


@contextlib.contextmanager
def saved_activation_copies() -> Iterator[SavedCopies]:
    """Inside, autograd saves a copy of every tensor of the graph (one that requires gradients)
    it keeps for backward, so an in-place update of that tensor later in the forward cannot
    invalidate it. Constants (weights, the text conditioning) are saved as they are. Costs one
    copy of each saved activation (counted in the yielded :class:`SavedCopies`)."""
    copies = SavedCopies()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.requires_grad:
            return tensor
        copies.tensors += 1
        copies.bytes += tensor.numel() * tensor.element_size()
        return tensor.detach().clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield copies


# --------------------------------------------------------------------------------------------
# 3. Plain attention everywhere, probabilities at the coarse attn2
# --------------------------------------------------------------------------------------------


def attention_replace_key(name: str) -> ReplaceKey:
    """The hosts' replacement key of a transformer attention: ``input_blocks.7.1.transformer_blocks.0.attn2``
    → ``("input", 7, 0)``; the middle block is ``("middle", 0, depth)``."""
    match = _ATTENTION_NAME.match(name)
    if match is None:
        raise ValueError(f"T-SAM: {name!r} is not a transformer attention of an input/middle/output block")
    block, number, depth = match.group(1), int(match.group(2)), int(match.group(3))
    return _BLOCK_NAMES[block], 0 if block == "middle_block" else number, depth


def transformer_attention_names(unet: nn.Module) -> dict[str, list[str]]:
    """``{"attn1": [...], "attn2": [...]}``: every transformer block attention of ``unet`` by kind."""
    names: dict[str, list[str]] = {"attn1": [], "attn2": []}
    for name, _ in unet.named_modules():
        match = _ATTENTION_NAME.match(name)
        if match is not None:
            names[match.group(4)].append(name)
    return names


def plain_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    """``softmax(q·kᵀ/√d)·v`` per head with PyTorch's scaled-dot-product attention (differentiable
    on every device and dtype), on projected ``(B, N, H·d)`` tensors → ``(B, N, H·d)``."""
    batch, queries, inner = query.shape
    head_dim = inner // heads
    query = query.view(batch, queries, heads, head_dim).transpose(1, 2)  # (B, H, N, d)
    key = key.view(batch, key.shape[1], heads, head_dim).transpose(1, 2)  # (B, H, M, d)
    value = value.view(batch, value.shape[1], heads, head_dim).transpose(1, 2)  # (B, H, M, d)
    out = F.scaled_dot_product_attention(query, key, value)  # (B, H, N, d)
    return out.transpose(1, 2).reshape(batch, queries, inner)


#: A host attention replacement: ``(q, k, v, extra_options) -> out``.
Replacement = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]


def _plain(query, key, value, extra_options) -> torch.Tensor:
    return plain_attention(query, key, value, int(extra_options["n_heads"]))


class PatcherCrossAttentionCapture(AttentionCapture):
    """T-SAM's capture on a Forge-family UNet: per-call attention replacements, nothing on the model.

    :meth:`transformer_options` turns the host's options into those of a T-SAM call: every
    ``attn1``/``attn2`` plain attention (:func:`plain_attention`), the coarse ``attn2`` layers
    (level 2, else the coarsest with cross-attention) an explicit softmax that records its
    probabilities. Inside the ``with`` block, :meth:`probabilities` runs one UNet forward and
    returns them, mean over heads and layers, with gradient; the forward may stop right after the
    last coarse layer.
    """

    def __init__(self, unet: nn.Module, *, level: int | None = None, stop_early: bool = True):
        cross = cross_attention_layers(unet)
        level = coarse_level(cross, TSAM_LEVEL if level is None else level)
        captured = [layer.name for layer in cross if layer.level == level]
        super().__init__(captured, level=level, stop_early=stop_early,
                         missing_hint=" (the host did not route the call through its attention replacements)")
        self._replacements: dict[str, dict[ReplaceKey, Replacement]] = {}
        for kind, names in transformer_attention_names(unet).items():
            self._replacements[kind] = {
                attention_replace_key(name): self._recording(name) if name in captured else _plain for name in names
            }

    def _patch_layers(self) -> Iterator[Callable[[], None]]:
        yield lambda: None  # nothing to install: the replacements travel in each call's options

    def _recording(self, name: str) -> Replacement:
        def attention(query, key, value, extra_options):
            out, probabilities = explicit_attention(query, key, value, int(extra_options["n_heads"]))
            self._record(name, probabilities)
            return out

        return attention

    def transformer_options(self, base: dict) -> dict:
        """A new options dict for one T-SAM UNet call: ``base`` (the host's) with every transformer
        attention replaced. ``base`` and its nested dicts are not changed (the UNet writes into the
        dict it gets, so give each call a new one)."""
        options = dict(base)
        replace = {kind: dict(entries) for kind, entries in base.get("patches_replace", {}).items()}
        for kind, entries in self._replacements.items():
            replace[kind] = {**replace.get(kind, {}), **entries}
        options["patches_replace"] = replace
        return options


@contextlib.contextmanager
def alignment_session(unet: nn.Module, *, copy_saved_activations: bool,
                      level: int | None = None) -> Iterator[PatcherCrossAttentionCapture]:
    """Everything one T-SAM update needs from the UNet, undone on exit: normal tensors for its
    inference weights, no weight gradients, saved-activation copies where the host adds in place
    (``copy_saved_activations``), and the capture."""
    capture = PatcherCrossAttentionCapture(unet, level=level)
    with contextlib.ExitStack() as stack:
        stack.enter_context(autograd_parameters(unet))
        stack.enter_context(frozen_parameters(unet))
        if copy_saved_activations:
            stack.enter_context(saved_activation_copies())
        yield stack.enter_context(capture)
