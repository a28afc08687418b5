"""SEG's rows in one AUTOMATIC1111 denoiser call, laid out ``[cond rows…, uncond rows…]``."""

from __future__ import annotations


class StepRows:
    """SEG bookkeeping for one WebUI denoiser call, rows laid out ``[cond rows…, uncond rows…]``.

    The WebUI may split those rows over several model calls (``batch_cond_uncond`` off, cond
    and uncond of different token lengths) and may drop the uncond rows (skip-early-CFG,
    negative-guidance minimum σ). Calls always cover the rows in order, so a running offset
    tells which global rows each call holds. SEG rows are copies of the cond rows (mode
    ``cond``, or when the uncond rows were dropped) or of the uncond rows (mode ``uncond``).
    """

    def __init__(self, cond_rows: int, images: int, mode: str):
        if mode not in ("cond", "uncond"):
            raise ValueError(f"unknown SEG mode {mode!r}")
        self.cond_rows, self.images, self.mode = cond_rows, images, mode
        self.offset = 0
        self.blurred: dict[int, object] = {}

    def next_call(self, rows: int) -> range:
        """The global rows of the next model call of ``rows`` rows."""
        call = range(self.offset, self.offset + rows)
        self.offset += rows
        return call

    def candidates_in(self, call: range) -> list[int]:
        """Positions, within ``call``, of the rows that may need a SEG copy."""
        wanted = range(self.cond_rows) if self.mode == "cond" else range(self.cond_rows, self.cond_rows + self.images)
        return [row - call.start for row in call if row in wanted]

    @property
    def uncond_ran(self) -> bool:
        return self.offset >= self.cond_rows + self.images

    @property
    def blurs_uncond(self) -> bool:
        return self.mode == "uncond" and self.uncond_ran

    def required(self) -> range:
        """The global rows whose blurred prediction the combination needs."""
        if self.blurs_uncond:
            return range(self.cond_rows, self.cond_rows + self.images)
        return range(self.cond_rows)

    def missing(self) -> list[int]:
        return [row for row in self.required() if row not in self.blurred]
