"""Classifier-free guidance with the SEG term, on predictions of any space (ε, x0 or v).

Rows follow the WebUI's AND-prompt convention: ``conds_list[i]`` lists ``(cond_row, weight)``
for image ``i``; ``uncond`` has one row per image. CFG is the WebUI's
``u_i + Σ_k w_k·cfg·(c_k − u_i)``; without an uncond row the first cond of the image is the
base and the scale is 1, as the WebUI does when it skips the uncond pass.

SEG adds (Hong 2024):

- mode ``cond`` (the official code): ``s · Σ_k w_k (c_k − c̃_k)``, ``c̃`` = cond with blurred
  queries. With one cond of weight 1 this is ``ε_u + w(ε_c − ε_u) + s(ε_c − ε̃_c)``.
- mode ``uncond`` (paper Eq. 10): ``s · (u_i − ũ_i)``, ``ũ`` = uncond with blurred queries.

Every formula is affine with weights summing to 1 (CFG) or 0 (SEG term), so it holds in x0
space too: ``x0 = x − σ·ε`` maps it exactly, which is why the WebUI's denoised outputs can be
combined directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CondsList = Sequence[Sequence[tuple[int, float]]]


def single_conds(batch: int) -> list[list[tuple[int, float]]]:
    """``conds_list`` for one cond row per image, weight 1 (no AND prompts)."""
    return [[(i, 1.0)] for i in range(batch)]


def cfg_combine(
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    conds_list: CondsList,
    cfg_scale: float,
) -> torch.Tensor:
    """The WebUI's CFG combination; ``uncond=None`` means no CFG (uncond skipped)."""
    if uncond is None:
        base = torch.stack([cond[conds[0][0]] for conds in conds_list])
        cfg_scale = 1.0
    else:
        base = uncond
    out = base.clone()
    for image, conds in enumerate(conds_list):
        for row, weight in conds:
            out[image] += (cond[row] - base[image]) * (weight * cfg_scale)
    return out


def seg_cond_term(
    cond: torch.Tensor, cond_blurred: torch.Tensor, conds_list: CondsList, seg_scale: float
) -> torch.Tensor:
    """``s · Σ_k w_k (c_k − c̃_k)`` per image; ``cond_blurred`` row ``k`` matches ``cond`` row ``k``."""
    difference = cond - cond_blurred
    return torch.stack(
        [sum(difference[row] * (weight * seg_scale) for row, weight in conds) for conds in conds_list]
    )


def seg_uncond_term(uncond: torch.Tensor, uncond_blurred: torch.Tensor, seg_scale: float) -> torch.Tensor:
    """``s · (u − ũ)`` per image (paper Eq. 10)."""
    return (uncond - uncond_blurred) * seg_scale


def seg_guidance(
    *,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    conds_list: CondsList,
    cfg_scale: float,
    seg_scale: float,
    cond_blurred: torch.Tensor | None = None,
    uncond_blurred: torch.Tensor | None = None,
) -> torch.Tensor:
    """CFG plus the SEG term of whichever blurred rows are given (cond or uncond mode).

    Give ``cond_blurred`` (one row per cond row) for mode ``cond``, ``uncond_blurred`` (one row
    per image) for mode ``uncond``, neither for plain CFG.
    """
    if cond_blurred is not None and uncond_blurred is not None:
        raise ValueError("give blurred cond rows or blurred uncond rows, not both")
    out = cfg_combine(cond, uncond, conds_list, cfg_scale)
    if cond_blurred is not None:
        out = out + seg_cond_term(cond, cond_blurred, conds_list, seg_scale)
    elif uncond_blurred is not None:
        if uncond is None:
            raise ValueError("uncond mode needs the uncond rows")
        out = out + seg_uncond_term(uncond, uncond_blurred, seg_scale)
    return out
