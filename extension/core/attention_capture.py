"""Collect attention probabilities of chosen layers during one UNet forward (pure torch).

Framework adapters (diffusers processors, the WebUI's ldm/sgm modules) decide *how* a layer's
probabilities are computed and hand them to a :class:`ProbabilityRecorder`; this module
holds what is common: the grid check, the mean over heads and layers, and ending the
forward as soon as every needed layer ran (the loss does not depend on the rest of the UNet).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn


class _ForwardStopped(Exception):
    """Raised after the last recorded layer to end the UNet forward early (caught by the recorder)."""


class ProbabilityRecorder:
    """Records ``(B, heads, N, M)`` probabilities per layer name during :meth:`run`."""

    def __init__(self, layer_names: Sequence[str], *, level: int, stop_early: bool = True, missing_hint: str = ""):
        self.layer_names = tuple(layer_names)
        self.level = level
        self.stop_early = stop_early
        self.missing_hint = missing_hint
        self._grid: tuple[int, int] | None = None
        self._records: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self._grid, self._records = None, {}

    def run(self, forward: Callable[[], object], grid: tuple[int, int]) -> torch.Tensor:
        """Run ``forward`` and return the ``(B, h·w, M)`` probabilities, mean over heads and layers.

        ``grid`` is the expected ``(h, w)`` of the recorded layers; a layer that runs with
        another query count raises instead of giving wrong maps.
        """
        self._grid, self._records = grid, {}
        try:
            forward()
        except _ForwardStopped:
            pass
        finally:
            records = self._records
            self.reset()
        missing = [name for name in self.layer_names if name not in records]
        if missing:
            raise RuntimeError(f"T-SAM: the UNet forward did not run cross-attention layer(s) {missing}{self.missing_hint}")
        return torch.stack([records[name] for name in self.layer_names]).mean(dim=0)  # (B, N, M)

    def record(self, name: str, probabilities: torch.Tensor) -> None:
        """Called by a layer with its ``(B, heads, N, M)`` probabilities; a no-op outside :meth:`run`."""
        if self._grid is None:
            return  # not capturing (an ordinary forward, or a recomputation in backward)
        height, width = self._grid
        queries = probabilities.shape[-2]
        if queries != height * width:
            raise RuntimeError(
                f"T-SAM: {name} ran with {queries} query tokens, expected a {height}×{width} grid "
                f"(latent halved {self.level} times)"
            )
        self._records[name] = probabilities.mean(dim=1)  # (B, N, M), mean over heads
        if self.stop_early and len(self._records) == len(self.layer_names):
            raise _ForwardStopped


@contextlib.contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """No weight gradients: ``requires_grad`` off where it is on, and back on afterwards."""
    trainable = [parameter for parameter in module.parameters() if parameter.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
