"""T-SAM's text side on the Forge family: the host's own CLIP text encoders as prompt encoders.

Forge Neo and Forge encode prompts with ``ClassicTextProcessingEngine`` objects (one per CLIP:
``text_processing_engine`` for SD1, ``text_processing_engine_l``/``_g`` for SDXL), reForge with
AUTOMATIC1111's prompt-encoder wrappers around the same ``transformers`` CLIP models. Both have
the A1111 interface T-SAM needs: ``tokenize_line`` (75-token chunks with emphasis, ``BREAK``,
comma backtracking and textual-inversion placeholders), ``id_end``/``id_pad``, a ``fixes`` slot
read by the embedding layer, and ``encode_with_transformers(ids)``. :class:`HostClipEncoder`
runs that last one as the host does (its device, dtype and embedding handling) while
:func:`..text_attention.recorded_self_attention` reads every layer's probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..text_attention import recorded_self_attention
from ..text_targets import chunk_token_ids


class HostClipEncoder:
    """One host prompt encoder as a :class:`~..text_targets.PromptEncoder`.

    ``wrapper`` has ``tokenize_line``, ``id_end``, ``id_pad`` and ``encode_with_transformers``;
    ``transformer`` is the ``transformers`` CLIP model it runs; ``fixes_holder.fixes`` is where the
    host's embedding layer reads the textual-inversion vectors of the chunks being encoded;
    ``device`` is where the host puts token ids (``None``: the host moves them itself).
    """

    def __init__(self, wrapper: Any, *, transformer: nn.Module, fixes_holder: Any, tokenizer: Any,
                 device: torch.device | None = None):
        self.wrapper = wrapper
        self.transformer = transformer
        self.fixes_holder = fixes_holder
        self.tokenizer = tokenizer
        self.device = device
        self.end_id = int(wrapper.id_end)
        self.pad_id = int(wrapper.id_pad)

    def chunks(self, text: str) -> list:
        return self.wrapper.tokenize_line(text)[0]

    def attentions(self, chunks: Sequence) -> list[torch.Tensor]:
        ids = chunk_token_ids(chunks, self.end_id, self.pad_id, self.device)
        self.fixes_holder.fixes = [chunk.fixes for chunk in chunks]  # read (and cleared) by the embedding layer
        try:
            with torch.no_grad(), recorded_self_attention(self.transformer) as records:
                self.wrapper.encode_with_transformers(ids)
        finally:
            self.fixes_holder.fixes = None
        return records

    def token_text(self, token_id: int) -> str:
        return str(self.tokenizer.convert_ids_to_tokens(int(token_id))).replace("</w>", "")


def classic_engine_encoder(engine: Any) -> HostClipEncoder:
    """Forge Neo's and Forge's ``ClassicTextProcessingEngine``."""
    return HostClipEncoder(engine, transformer=engine.text_encoder.transformer, fixes_holder=engine.embeddings,
                           tokenizer=engine.tokenizer)


def a1111_wrapper_encoder(embedder: Any, device: torch.device) -> HostClipEncoder:
    """reForge's AUTOMATIC1111-style prompt-encoder wrapper (``FrozenCLIPEmbedderWithCustomWords``
    subclasses around ``transformers`` CLIP models); its encoder uses the ids' device."""
    wrapped = embedder.wrapped
    return HostClipEncoder(embedder, transformer=wrapped.transformer, fixes_holder=embedder.hijack,
                           tokenizer=getattr(embedder, "tokenizer", None) or wrapped.tokenizer, device=device)
