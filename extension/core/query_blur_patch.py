"""The one owner of SEG's hooks on a UNet: blur the query rows of chosen self-attention layers.

Two kinds of torch hooks, installed together on ``__enter__`` and removed on ``__exit__``
(also when the generation raises or is interrupted), so afterwards the model runs exactly
as if it had never been touched:

- a forward **pre**-hook on each layer's spatial transformer records the ``(h, w)`` of the
  feature map entering it: the exact token grid, for any size (odd latents, 1920×1080 …);
- a forward hook on each layer's query projection (``to_q``) blurs the rows the caller
  marked, inside the ordinary batched call. Every attention kernel (SDPA, xformers,
  sub-quadratic, split, plain) calls ``to_q`` first, so blurring its output works under all.

Between :meth:`QueryBlurPatch.blurring` blocks the hooks return ``None`` and change nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .blur import blur_queries


@dataclass(frozen=True)
class SelfAttentionLayer:
    """One ``attn1`` module, located by an adapter."""

    name: str  #: module path in the UNet, e.g. ``mid_block.attentions.0.transformer_blocks.0.attn1``
    stage: str  #: "down", "mid" or "up"
    query_proj: nn.Module  #: the query projection whose output gets blurred
    grid_source: nn.Module  #: the spatial transformer whose (B, C, h, w) input gives the grid


@dataclass(frozen=True)
class ActiveBlur:
    """What a replacement UNet (an exported engine) needs to reproduce the hooks' blur for one call."""

    rows: tuple[int, ...]  #: the batch rows whose queries are blurred
    batch: int  #: the UNet batch these rows refer to
    sigma: float
    layer_spec: str  #: the SEG layer spec the layers were selected with ("mid", "d2,m0" …)
    layer_names: frozenset[str]  #: the module paths of the blurred ``attn1`` layers


@dataclass
class _BlurRequest:
    rows: torch.Tensor  #: indices of the batch rows to blur
    batch: int  #: the UNet batch these indices refer to
    sigma: float
    rows_on_device: dict = field(default_factory=dict)  #: rows moved to each device, once per request

    def rows_for(self, device: torch.device) -> torch.Tensor:
        if device not in self.rows_on_device:
            self.rows_on_device[device] = self.rows.to(device)
        return self.rows_on_device[device]


@dataclass
class _PatchState:
    grids: dict[int, tuple[int, int]] = field(default_factory=dict)
    request: _BlurRequest | None = None


class QueryBlurPatch:
    """Context manager installing the SEG hooks on ``layers``; see the module docstring."""

    def __init__(self, layers: Sequence[SelfAttentionLayer], layer_spec: str = ""):
        if not layers:
            raise ValueError("no self-attention layers selected for SEG")
        self.layers = tuple(layers)
        self.layer_spec = layer_spec  #: how ``layers`` were chosen; reported by :meth:`active_blur`
        self._state = _PatchState()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> QueryBlurPatch:
        if self._handles:
            raise RuntimeError("QueryBlurPatch is already installed")
        try:
            for source in {id(layer.grid_source): layer.grid_source for layer in self.layers}.values():
                self._handles.append(source.register_forward_pre_hook(self._record_grid(source), with_kwargs=True))
            for layer in self.layers:
                self._handles.append(layer.query_proj.register_forward_hook(self._blur_output(layer)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._state = _PatchState()

    def request_blur(self, rows: torch.Tensor | Sequence[int], batch: int, sigma: float) -> None:
        """Blur the queries of ``rows`` in the next UNet calls of batch ``batch``, until :meth:`clear_request`."""
        if not self._handles:
            raise RuntimeError("QueryBlurPatch used outside its with-block")
        rows = torch.as_tensor(list(rows) if isinstance(rows, range) else rows, dtype=torch.long).reshape(-1)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= batch):
            raise ValueError(f"blur rows {rows.tolist()} outside a batch of {batch}")
        self._state.request = _BlurRequest(rows, batch, float(sigma))

    def clear_request(self) -> None:
        self._state.request = None

    def active_blur(self) -> ActiveBlur | None:
        """The blur the next UNet call gets, or ``None`` when it changes nothing (no rows, σ = 0).

        A replacement UNet, on which these hooks never fire, applies the same blur from this.
        """
        request = self._state.request
        if request is None or request.rows.numel() == 0 or request.sigma == 0.0:
            return None
        return ActiveBlur(tuple(request.rows.tolist()), request.batch, request.sigma, self.layer_spec,
                          frozenset(layer.name for layer in self.layers))

    @contextlib.contextmanager
    def blurring(self, rows: torch.Tensor | Sequence[int], batch: int, sigma: float) -> Iterator[None]:
        """Within this block, UNet calls of batch ``batch`` get the queries of ``rows`` blurred."""
        self.request_blur(rows, batch, sigma)
        try:
            yield
        finally:
            self.clear_request()

    def recorded_grid(self, layer: SelfAttentionLayer) -> tuple[int, int] | None:
        """The ``(h, w)`` token grid ``layer`` saw in the latest forward (``None`` before any)."""
        return self._state.grids.get(id(layer.grid_source))

    def _record_grid(self, source: nn.Module):
        key = id(source)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            features = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
            if features is None or features.dim() != 4:
                raise RuntimeError(f"SEG: expected a (B, C, h, w) input to {type(module).__name__}")
            self._state.grids[key] = (int(features.shape[-2]), int(features.shape[-1]))

        return hook

    def _blur_output(self, layer: SelfAttentionLayer):
        key = id(layer.grid_source)

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            request = self._state.request
            if request is None or request.rows.numel() == 0 or request.sigma == 0.0:
                return None  # σ = 0 is the identity
            if output.shape[0] != request.batch:
                raise RuntimeError(
                    f"SEG: {layer.name} ran with batch {output.shape[0]}, expected {request.batch}"
                )
            grid = self._state.grids.get(key)
            if grid is None:
                raise RuntimeError(f"SEG: no token grid recorded for {layer.name}")
            rows = request.rows_for(output.device)
            blurred = blur_queries(output.index_select(0, rows), grid, request.sigma)
            return output.index_copy(0, rows, blurred.to(output.dtype))

        return hook
