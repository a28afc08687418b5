"""T of a prompt text from a host's own prompt encoders, chunked exactly as the host encodes it.

Every WebUI (AUTOMATIC1111, the Forge family) encodes a prompt as 77-token chunks (BOS, 75
prompt tokens, EOS and padding) with its own ``tokenize_line`` (emphasis, ``BREAK``, comma
backtracking, textual-inversion placeholders), and concatenates the chunks' states, so chunk
``c``'s tokens sit at context columns ``77c + 1 …``. A host adapter wraps each of its encoders
in a :class:`PromptEncoder`; this module turns their chunks and self-attention into a
:class:`TextTarget` with the core's math (:mod:`..core.tsam`). With several encoders (SDXL's
two) each chunk's T is their average.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..core import tsam
from ..core.tsam import ChunkTarget, PromptTarget


class PromptEncoder(Protocol):
    """One text encoder of a host, as T-SAM reads it."""

    end_id: int  #: the end-of-text token id (a chunk's EOS is its first one after BOS)

    def chunks(self, text: str) -> Sequence[Any]:
        """The host's prompt chunks of ``text``: each has ``.tokens`` (77 ids) and ``.fixes``
        (``(offset, embedding)`` of textual-inversion vectors)."""

    def attentions(self, chunks: Sequence[Any]) -> list[torch.Tensor]:
        """Per encoder layer, the ``(chunks, heads, 77, 77)`` self-attention probabilities."""

    def token_text(self, token_id: int) -> str:
        """A token's display text."""


@dataclass(frozen=True)
class TextTarget:
    """T of one prompt text and the labels of its prompt tokens (chunks concatenated)."""

    target: PromptTarget
    labels: tuple[str, ...]
    chunk_sizes: tuple[int, ...] = field(default=())

    def to(self, device: torch.device) -> TextTarget:
        moved = tuple(ChunkTarget(chunk.offset, chunk.matrix.to(device)) for chunk in self.target)
        return TextTarget(moved, self.labels, self.chunk_sizes)


def chunk_eos_position(tokens: Sequence[int], end_id: int) -> int:
    """Position of a 77-token chunk's EOS: the first end-of-text id after BOS."""
    try:
        return list(tokens).index(end_id, 1)
    except ValueError:
        raise ValueError("T-SAM: a prompt chunk without an end-of-text token") from None


def chunk_token_ids(chunks: Sequence[Any], end_id: int, pad_id: int, device: torch.device | None = None) -> torch.Tensor:
    """``(chunks, 77)`` ids as the hosts encode them: after the EOS, ``pad_id`` when it differs
    from ``end_id`` (OpenCLIP-style vocabularies)."""
    ids = torch.tensor([list(chunk.tokens) for chunk in chunks], dtype=torch.long, device=device)
    if end_id != pad_id:
        for row, chunk in enumerate(chunks):
            ids[row, chunk_eos_position(chunk.tokens, end_id) + 1 :] = pad_id
    return ids


def chunk_labels(encoder: PromptEncoder, chunk: Any) -> list[str]:
    """Display labels of a chunk's prompt tokens (positions ``1 … eos−1``); embedding vectors
    are labelled with the embedding's name."""
    eos = chunk_eos_position(chunk.tokens, encoder.end_id)
    labels = [encoder.token_text(token) for token in chunk.tokens[1:eos]]
    for offset, embedding in chunk.fixes:
        for position in range(offset, min(offset + int(getattr(embedding, "vectors", 1)), len(labels))):
            labels[position] = f"<{getattr(embedding, 'name', 'emb')}>"
    return labels


def text_target(encoders: Sequence[PromptEncoder], text: str, *, power: float) -> TextTarget:
    """T of ``text``, chunked exactly as the host encodes it.

    Each encoder gives one ``(L, L)`` T per chunk (:func:`tsam.text_attention_targets`); with
    several encoders (SDXL) each chunk's T is their average. Encoders that chunk the text
    differently raise (SDXL's two tokenisers agree on every prompt in practice).
    """
    per_encoder, labels, sizes = [], None, None
    for encoder in encoders:
        chunks = encoder.chunks(text)
        eos_positions = [chunk_eos_position(chunk.tokens, encoder.end_id) for chunk in chunks]
        per_encoder.append(tsam.text_attention_targets(encoder.attentions(chunks), eos_positions, power=power))
        if labels is None:
            labels = [label for chunk in chunks for label in chunk_labels(encoder, chunk)]
            sizes = tuple(position - 1 for position in eos_positions)
    layouts = {tuple(matrix.shape[0] for matrix in targets) for targets in per_encoder}
    if len(layouts) != 1:
        raise ValueError(f"T-SAM: the text encoders chunk {text!r} differently ({sorted(layouts)} tokens per chunk)")
    combined = [tsam.combine_encoder_targets(list(chunk_set)) for chunk_set in zip(*per_encoder)]
    return TextTarget(tsam.chunk_targets(combined), tuple(labels), sizes)
