"""The one owner of the hooks that change attention queries: SEG's blur, eager or exported.

Two kinds of torch hooks, installed together on ``__enter__`` and removed on ``__exit__``
(also when the generation raises or is interrupted), so afterwards the model runs exactly
as if it had never been touched:

- a forward **pre**-hook on each layer's spatial transformer records the ``(h, w)`` of the
  feature map entering it: the exact token grid, for any size (odd latents, 1920×1080 …);
- a forward hook on each layer's query projection (``to_q``) changes the query rows inside
  the ordinary batched call. Every attention kernel (SDPA, xformers, sub-quadratic, split,
  plain) calls ``to_q`` first, so changing its output works under all.

What the hooks apply is the current request, one of two forms of the same blur:

- :class:`SigmaBlur` (:meth:`QueryBlurPatch.blurring`): the rows the caller marks get the
  core's σ blur on the recorded grid; every other row is untouched. The eager SEG path.
- :class:`MatrixBlur` (:meth:`QueryBlurPatch.applying_matrices`): runtime ``(A_h, A_w)``
  matrices per row and per grid level, ``Q'[b] = A_h[b] · Q[b] · A_w[b]ᵀ``; the grid comes
  from the matrices' shapes, so this form traces into an export graph without
  value-dependent shapes. Identity rows stay exactly as they were.

Without a request the hooks return ``None`` and change nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .blur import apply_blur_matrices, blur_queries, check_blur_operands
from .layers import AttentionLayer


@dataclass(frozen=True)
class ActiveBlur:
    """What a replacement UNet (an exported engine) needs to reproduce the hooks' blur for one call."""

    rows: tuple[int, ...]  #: the batch rows whose queries are blurred
    batch: int  #: the UNet batch these rows refer to
    sigma: float
    layer_spec: str  #: the SEG layer spec the layers were selected with ("mid", "d2,m0" …)
    layer_names: frozenset[str]  #: the module paths of the blurred ``attn1`` layers


@dataclass
class SigmaBlur:
    """Blur the queries of ``rows`` (of a ``batch``-row call) with σ on each layer's recorded grid."""

    rows: torch.Tensor  #: indices of the batch rows to blur
    batch: int  #: the UNet batch these indices refer to
    sigma: float
    rows_on_device: dict = field(default_factory=dict)  #: rows moved to each device, once per request

    def changes_nothing(self) -> bool:
        return self.rows.numel() == 0 or self.sigma == 0.0  # σ = 0 is the identity

    def rows_for(self, device: torch.device) -> torch.Tensor:
        if device not in self.rows_on_device:
            self.rows_on_device[device] = self.rows.to(device)
        return self.rows_on_device[device]

    def apply(self, layer: AttentionLayer, queries: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor | None:
        if self.changes_nothing():
            return None
        if queries.shape[0] != self.batch:
            raise RuntimeError(f"SEG: {layer.name} ran with batch {queries.shape[0]}, expected {self.batch}")
        if grid is None:
            raise RuntimeError(f"SEG: no token grid recorded for {layer.name}")
        rows = self.rows_for(queries.device)
        blurred = blur_queries(queries.index_select(0, rows), grid, self.sigma)
        return queries.index_copy(0, rows, blurred.to(queries.dtype))


@dataclass(frozen=True)
class MatrixBlur:
    """Every row's queries become ``A_h[b] · Q[b] · A_w[b]ᵀ`` with the ``(A_h, A_w)`` of the layer's level."""

    matrices: Mapping[int, tuple[torch.Tensor, torch.Tensor]]  #: level → ``(B, h, h)``, ``(B, w, w)``

    def apply(self, layer: AttentionLayer, queries: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        a_h, a_w = self.matrices[layer.level]
        if not torch.jit.is_tracing():  # the checks would freeze the example's sizes into a traced graph
            check_blur_operands(layer.name, queries, a_h, a_w)
        return apply_blur_matrices(queries, a_h, a_w)


@dataclass
class _PatchState:
    grids: dict[int, tuple[int, int]] = field(default_factory=dict)
    request: SigmaBlur | MatrixBlur | None = None


class QueryBlurPatch:
    """Context manager installing the SEG hooks on ``layers``; see the module docstring."""

    def __init__(self, layers: Sequence[AttentionLayer], layer_spec: str = ""):
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

    def _require_installed(self) -> None:
        if not self._handles:
            raise RuntimeError("QueryBlurPatch used outside its with-block")

    def request_blur(self, rows: torch.Tensor | Sequence[int], batch: int, sigma: float) -> None:
        """Blur the queries of ``rows`` in the next UNet calls of batch ``batch``, until :meth:`clear_request`."""
        self._require_installed()
        rows = torch.as_tensor(list(rows) if isinstance(rows, range) else rows, dtype=torch.long).reshape(-1)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= batch):
            raise ValueError(f"blur rows {rows.tolist()} outside a batch of {batch}")
        self._state.request = SigmaBlur(rows, batch, float(sigma))

    def request_matrices(self, matrices: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Apply runtime blur matrices (``level → (A_h, A_w)``, one pair per row) in the next UNet calls."""
        self._require_installed()
        missing = sorted({layer.level for layer in self.layers} - set(matrices))
        if missing:
            raise KeyError(f"no blur matrices for level(s) {missing} of the patched layers")
        self._state.request = MatrixBlur(dict(matrices))

    def clear_request(self) -> None:
        self._state.request = None

    def active_blur(self) -> ActiveBlur | None:
        """The σ blur the next UNet call gets, or ``None`` when it changes nothing (no rows, σ = 0).

        A replacement UNet, on which these hooks never fire, applies the same blur from this.
        """
        request = self._state.request
        if isinstance(request, MatrixBlur):
            raise RuntimeError("the patch applies caller-given blur matrices; pass those to a replacement UNet")
        if request is None or request.changes_nothing():
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

    @contextlib.contextmanager
    def applying_matrices(self, matrices: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
        """Within this block, UNet calls get every row's queries multiplied by that row's matrices."""
        self.request_matrices(matrices)
        try:
            yield
        finally:
            self.clear_request()

    def recorded_grid(self, layer: AttentionLayer) -> tuple[int, int] | None:
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

    def _blur_output(self, layer: AttentionLayer):
        key = id(layer.grid_source)

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            request = self._state.request
            return None if request is None else request.apply(layer, output, self._state.grids.get(key))

        return hook
