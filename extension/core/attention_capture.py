"""Collect attention probabilities of chosen layers during one UNet forward (pure torch).

Framework adapters (diffusers processors, the WebUI's ldm/sgm modules) decide *how* a layer's
probabilities are computed and hand them to a :class:`ProbabilityRecorder`; this module
holds what is common: the grid check, the mean over heads and layers, and ending the
forward as soon as every needed layer ran (the loss does not depend on the rest of the UNet).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn


def explicit_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q·kᵀ/√d)·v`` per head, from projected ``(B, N, H·d)`` queries and ``(B, M, H·d)``
    keys and values: ``(output (B, N, H·d), probabilities (B, H, N, M))``.

    The scores and the softmax are in float32 (float64 for float64 inputs) with autocast off,
    whatever the model's dtype; the output is in the values' dtype.
    """
    batch, queries, inner = query.shape
    head_dim = inner // heads
    query = query.view(batch, queries, heads, head_dim).transpose(1, 2)  # (B, H, N, d)
    key = key.view(batch, key.shape[1], heads, head_dim).transpose(1, 2)  # (B, H, M, d)
    value = value.view(batch, value.shape[1], heads, head_dim).transpose(1, 2)  # (B, H, M, d)
    exact = torch.promote_types(query.dtype, torch.float32)
    with torch.autocast(device_type=query.device.type, enabled=False):
        scores = (query.to(exact) @ key.to(exact).transpose(-1, -2)) * head_dim**-0.5  # (B, H, N, M)
        probabilities = scores.softmax(dim=-1)
    out = probabilities.to(value.dtype) @ value  # (B, H, N, d)
    return out.transpose(1, 2).reshape(batch, queries, inner), probabilities  # (B, N, H·d)


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


#: Undoes one layer's patch.
Undo = Callable[[], None]


class AttentionCapture:
    """Base of the adapters' capture context managers: patch each captured layer on enter so it
    hands its probabilities to the recorder, and undo every patch (in reverse) on exit, also
    after an exception, so the model is back as it was, bit for bit.

    A subclass implements :meth:`_patch_layers`: patch one layer, then yield the function that
    undoes that patch, layer after layer (a failure half-way undoes the layers done so far).
    Inside the ``with`` block, :meth:`probabilities` runs one UNet forward and returns the
    captured probabilities, mean over heads and layers, with gradient.
    """

    def __init__(self, layer_names: Sequence[str], *, level: int, stop_early: bool = True, missing_hint: str = ""):
        self.level = level  #: the captured layers' grid is the latent halved ``level`` times
        self._recorder = ProbabilityRecorder(layer_names, level=level, stop_early=stop_early,
                                             missing_hint=missing_hint)
        self._undo: list[Undo] = []

    def _patch_layers(self) -> Iterable[Undo]:
        raise NotImplementedError

    def _record(self, name: str, probabilities: torch.Tensor) -> None:
        """For the patched layers: hand over ``(B, heads, N, M)`` probabilities."""
        self._recorder.record(name, probabilities)

    def __enter__(self):
        if self._undo:
            raise RuntimeError(f"{type(self).__name__} is already installed")
        try:
            for undo in self._patch_layers():
                self._undo.append(undo)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def _restore(self) -> None:
        while self._undo:
            self._undo.pop()()
        self._recorder.reset()

    def probabilities(self, forward: Callable[[], object], grid: tuple[int, int]) -> torch.Tensor:
        """Run ``forward`` (a UNet call) and return ``(B, h·w, context)`` probabilities.

        ``grid`` is the expected ``(h, w)`` of the captured layers; a layer that runs with
        another query count raises instead of giving wrong maps.
        """
        if not self._undo:
            raise RuntimeError(f"{type(self).__name__}.probabilities used outside its with-block")
        return self._recorder.run(forward, grid)


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
