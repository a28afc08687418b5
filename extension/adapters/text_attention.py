"""Reading a Hugging Face CLIP text encoder's self-attention and leaving it exactly as it was.

Shared by every host whose text encoders are ``transformers`` CLIP models (diffusers, the
WebUIs' SD1.x/SDXL CLIP-L, the Forge family's CLIP-L and CLIP-G). Two ways:

- ``output_attentions=True`` with eager attention (only eager returns probabilities), and no
  output-capturing hooks left behind by transformers ≥ 5 (:func:`eager_attention`,
  :func:`no_new_capture_hooks`);
- :func:`recorded_self_attention`: forward pre-hooks that only read each attention layer's
  input and recompute its causal probabilities, while the host runs the encoder its own way
  (its device and dtype handling, its textual-inversion embeddings). Nothing about the model
  or its configuration changes, so it reads every transformers version alike (the Forge family
  ships 4.46, 4.48 and 4.56, each choosing the attention implementation differently).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def eager_attention(text_encoder: nn.Module) -> Iterator[None]:
    """Eager attention while inside (only eager returns probabilities), the previous setting after."""
    config = getattr(text_encoder, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if previous in (None, "eager") or not hasattr(text_encoder, "set_attn_implementation"):
        yield  # older transformers: always explicit attention
        return
    text_encoder.set_attn_implementation("eager")
    try:
        yield
    finally:
        text_encoder.set_attn_implementation(previous)


#: Set by transformers ≥ 5 on a model whose output-capturing hooks it installed.
_TRANSFORMERS_CAPTURE_FLAG = "_output_capturing_hooks_installed"
_MISSING = object()


@contextlib.contextmanager
def no_new_capture_hooks(text_encoder: nn.Module) -> Iterator[None]:
    """Undo the output-capturing hooks that transformers ≥ 5 installs for good on the first
    ``output_attentions`` call, so the encoder is left exactly as it was.

    Those hooks are transformers' own (inert outside a capturing call); they are removed
    only together with the flag that tells transformers they exist, so a later
    ``output_hidden_states``/``output_attentions`` call reinstalls them. Without that flag
    (older transformers install none) nothing is touched.
    """
    modules = list(text_encoder.modules())
    flags = [module.__dict__.get(_TRANSFORMERS_CAPTURE_FLAG, _MISSING) for module in modules]
    hook_keys = [(set(module._forward_hooks), set(module._forward_pre_hooks)) for module in modules]
    try:
        yield
    finally:
        changed = [
            (module, flag)
            for module, flag in zip(modules, flags)
            if module.__dict__.get(_TRANSFORMERS_CAPTURE_FLAG, _MISSING) is not flag
        ]
        if changed:
            for module, (forward_keys, pre_keys) in zip(modules, hook_keys):
                for key in set(module._forward_hooks) - forward_keys:
                    del module._forward_hooks[key]
                    module._forward_hooks_with_kwargs.pop(key, None)
                    module._forward_hooks_always_called.pop(key, None)
                for key in set(module._forward_pre_hooks) - pre_keys:
                    del module._forward_pre_hooks[key]
                    module._forward_pre_hooks_with_kwargs.pop(key, None)
            for module, flag in changed:
                if flag is _MISSING:
                    del module.__dict__[_TRANSFORMERS_CAPTURE_FLAG]
                else:
                    module.__dict__[_TRANSFORMERS_CAPTURE_FLAG] = flag


def _is_clip_attention(module: nn.Module) -> bool:
    """A transformers CLIP attention layer (``q_proj``/``k_proj``/``v_proj``/``out_proj``, ``num_heads``)."""
    return all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads"))


def clip_attention_probabilities(attention: nn.Module, hidden_states: torch.Tensor,
                                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal probabilities ``(B, heads, T, T)`` of a CLIP attention layer on its input
    ``hidden_states`` (after ``layer_norm1``): ``softmax(q·kᵀ·scale + causal mask [+ mask])`` per
    head, in float32 (float64 for float64 inputs), as transformers' eager attention computes them.

    ``attention_mask``, if the encoder passes one, is applied on top: additive when float, True =
    attend when bool (transformers' conventions).
    """
    batch, tokens, _ = hidden_states.shape
    heads = int(attention.num_heads)
    query, key = attention.q_proj(hidden_states), attention.k_proj(hidden_states)  # (B, T, H·d)
    head_dim = query.shape[-1] // heads
    scale = float(getattr(attention, "scale", head_dim**-0.5))
    query = query.view(batch, tokens, heads, head_dim).transpose(1, 2)  # (B, H, T, d)
    key = key.view(batch, tokens, heads, head_dim).transpose(1, 2)  # (B, H, T, d)
    exact = torch.promote_types(query.dtype, torch.float32)
    with torch.autocast(device_type=query.device.type, enabled=False):
        scores = (query.to(exact) @ key.to(exact).transpose(-1, -2)) * scale  # (B, H, T, T)
        future = torch.ones(tokens, tokens, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, -math.inf)
        if isinstance(attention_mask, torch.Tensor):
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, -math.inf)
            else:
                scores = scores + attention_mask.to(exact)
        return scores.softmax(dim=-1)


@contextlib.contextmanager
def recorded_self_attention(text_model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While inside, every call of one of ``text_model``'s CLIP attention layers appends its
    ``(B, heads, T, T)`` probabilities (:func:`clip_attention_probabilities`) to the yielded list,
    in call order (one entry per layer for one encoder call). The pre-hooks only read; they are
    removed on exit, also after an exception."""
    records: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden_states = args[0] if args else kwargs["hidden_states"]
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        records.append(clip_attention_probabilities(module, hidden_states, mask))

    layers = [module for module in text_model.modules() if _is_clip_attention(module)]
    if not layers:
        raise ValueError(f"T-SAM: {type(text_model).__name__} has no CLIP attention layers to read")
    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()
