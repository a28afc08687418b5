"""Per-row UNet conditioning of a diffusers pipeline (text states; SDXL's pooled text and time ids)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowConditioning:
    """Per-row UNet conditioning: text states and, for SDXL, pooled text and time ids."""

    text: torch.Tensor  #: (rows, tokens, dim)
    pooled: torch.Tensor | None = None  #: (rows, dim), SDXL only
    time_ids: torch.Tensor | None = None  #: (rows, 6), SDXL only

    def take(self, rows: Sequence[int]) -> RowConditioning:
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.text.device)
        pick = lambda tensor: None if tensor is None else tensor.index_select(0, index)  # noqa: E731
        return RowConditioning(pick(self.text), pick(self.pooled), pick(self.time_ids))

    def unet_kwargs(self) -> dict:
        kwargs: dict = {"encoder_hidden_states": self.text}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs


def concat_rows(parts: Sequence[RowConditioning]) -> RowConditioning:
    cat = lambda tensors: None if tensors[0] is None else torch.cat(tensors)  # noqa: E731
    return RowConditioning(
        cat([part.text for part in parts]), cat([part.pooled for part in parts]), cat([part.time_ids for part in parts])
    )


def is_sdxl(pipe) -> bool:
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"
