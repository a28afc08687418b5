"""Where diffusers' SEG rows go: copies of the cond rows (mode ``cond``) or of the uncond rows
(mode ``uncond``) appended after the base batch. With no uncond rows (CFG off) the only prediction
is the cond one, so that is what gets blurred (paper Eq. 9).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SegRows:
    """The SEG rows appended after a batch of ``base_rows`` rows."""

    source: tuple[int, ...]  #: row of the base batch each SEG row copies
    blurs_uncond: bool  #: True when the copies are uncond rows (mode "uncond")

    @property
    def count(self) -> int:
        return len(self.source)


def plan_seg_rows(cond_rows: list[int], uncond_rows: list[int], mode: str) -> SegRows:
    """Pick the rows to copy for the SEG pass.

    ``cond_rows``/``uncond_rows`` are positions in the base batch, in image order for uncond.
    """
    if mode == "uncond" and uncond_rows:
        return SegRows(tuple(uncond_rows), blurs_uncond=True)
    if mode not in ("cond", "uncond"):
        raise ValueError(f"unknown SEG mode {mode!r}")
    return SegRows(tuple(cond_rows), blurs_uncond=False)
