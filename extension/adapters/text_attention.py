"""Reading a Hugging Face CLIP text encoder's self-attention and leaving it exactly as it was.

Shared by every host whose text encoders are ``transformers`` CLIP models (diffusers, and the
WebUIs' SD1.x/SDXL CLIP-L): eager attention while reading (only eager returns probabilities),
and no output-capturing hooks left behind by transformers ≥ 5.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
