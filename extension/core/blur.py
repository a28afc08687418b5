"""Gaussian blur of attention queries over the token grid (SEG, Hong 2024, arXiv 2408.00760).

The blur is the official SEG operator (kernel size ``ceil(6σ)`` made odd, integer taps,
weights ``exp(-x²/2σ²)`` normalised, reflect padding ``k//2``, separable), with one fix:
the kernel is clamped per axis, so reflect padding never exceeds an axis (the reference
clamps by the width only and crashes on tall/wide grids).

Because padding followed by convolution is linear, the blur along an axis of ``n`` tokens is
an ``n × n`` matrix ``A_n`` whose rows hold the taps folded through the reflection. The 2D
blur of a per-channel grid ``Q`` is then ``A_h · Q · A_wᵀ``: two small matmuls, which is
also how the ONNX export feeds σ to an engine at run time. ``σ = 0`` is the identity and
``σ > 9999`` (or ``inf``) the exact spatial mean (``A_n = 1/n``).
"""

from __future__ import annotations

import functools
import math

import torch

#: σ above this counts as infinite blur (the official code's threshold).
INFINITE_SIGMA_THRESHOLD = 9999.0


def is_infinite_sigma(sigma: float) -> bool:
    return sigma > INFINITE_SIGMA_THRESHOLD


def kernel_size(sigma: float) -> int:
    """Smallest odd integer ≥ ceil(6σ) (the official formula ``ceil(6σ) + 1 - ceil(6σ) % 2``)."""
    span = math.ceil(6.0 * sigma)
    return span + 1 - span % 2


def axis_kernel_size(size: int, axis_len: int) -> int:
    """Clamp a kernel size to an axis of ``axis_len`` tokens: ``n + 1`` for even ``n``, ``n`` for odd.

    Either way the reflect padding ``k // 2`` stays below ``n``, as reflection requires.
    """
    return min(size, axis_len - (axis_len % 2 - 1))


def gaussian_taps(sigma: float, size: int) -> torch.Tensor:
    """Normalised Gaussian weights at integer offsets ``-(size-1)/2 … (size-1)/2`` (float64).

    A σ so small that ``2σ²`` underflows to 0 (σ < ~1e-162) has every off-centre weight 0, as
    all σ below ~0.026 already do: the identity, not ``0/0``.
    """
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    if 2.0 * sigma**2 == 0.0:
        return (offsets == 0).to(torch.float64)
    weights = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    return weights / weights.sum()


def reflect_convolution_matrix(axis_len: int, taps: torch.Tensor) -> torch.Tensor:
    """The ``(n, n)`` matrix of a 1D convolution with odd-length ``taps`` after reflect padding.

    Row ``i`` holds the weight of every input token in output ``i``, the taps folded through
    the reflection (``F.pad(mode="reflect")``: the edge is not repeated). The radius must be
    below ``n``, as reflection requires.
    """
    radius = (taps.numel() - 1) // 2
    if radius >= axis_len:
        raise ValueError(f"a kernel of radius {radius} cannot be reflect-padded on {axis_len} tokens")
    sources = (torch.arange(axis_len).unsqueeze(1) + torch.arange(-radius, radius + 1)).abs()  # (n, k)
    sources = torch.where(sources > axis_len - 1, 2 * (axis_len - 1) - sources, sources)
    matrix = torch.zeros(axis_len, axis_len, dtype=taps.dtype, device=taps.device)
    return matrix.scatter_add_(1, sources.to(taps.device), taps.expand(axis_len, -1).clone())


@functools.lru_cache(maxsize=512)
def _blur_matrix_float64(axis_len: int, sigma: float) -> torch.Tensor:
    if sigma == 0.0:
        return torch.eye(axis_len, dtype=torch.float64)
    if is_infinite_sigma(sigma):
        return torch.full((axis_len, axis_len), 1.0 / axis_len, dtype=torch.float64)
    return reflect_convolution_matrix(axis_len, gaussian_taps(sigma, axis_kernel_size(kernel_size(sigma), axis_len)))


def blur_matrix(
    axis_len: int,
    sigma: float,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The ``(n, n)`` matrix of the reflect-padded Gaussian blur along an axis of ``n`` tokens.

    Row ``i`` holds the weights output token ``i`` gives every input token. ``σ = 0`` gives the
    identity, infinite σ gives ``1/n`` everywhere (every token becomes the mean).
    """
    if axis_len < 1:
        raise ValueError(f"axis length must be ≥ 1, got {axis_len}")
    if not sigma >= 0.0:  # also rejects NaN
        raise ValueError(f"blur sigma must be ≥ 0 (or inf), got {sigma}")
    return _blur_matrix_float64(int(axis_len), float(sigma)).to(device=device, dtype=dtype)


def blur_matrices(
    height: int,
    width: int,
    sigma: float,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_h, A_w)`` such that the blurred grid is ``A_h · Q · A_wᵀ`` for every channel."""
    return (
        blur_matrix(height, sigma, device=device, dtype=dtype),
        blur_matrix(width, sigma, device=device, dtype=dtype),
    )


@functools.lru_cache(maxsize=256)
def _cached_matrices(
    height: int, width: int, sigma: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    return blur_matrices(height, width, sigma, device=device, dtype=dtype)


def blur_grid(grid: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur a ``(rows, h, w, C)`` grid over ``h`` and ``w``, independently per row and channel."""
    if grid.dim() != 4:
        raise ValueError(f"expected a (rows, h, w, C) grid, got shape {tuple(grid.shape)}")
    if not sigma >= 0.0:
        raise ValueError(f"blur sigma must be ≥ 0 (or inf), got {sigma}")
    if sigma == 0.0:
        return grid
    rows, height, width, channels = grid.shape
    if is_infinite_sigma(sigma):
        # Exactly the spatial mean, not a matmul with 1/n (which would round differently).
        return grid.mean(dim=(1, 2), keepdim=True).expand_as(grid)
    a_h, a_w = _cached_matrices(height, width, float(sigma), grid.device, grid.dtype)
    out = a_h @ grid.reshape(rows, height, width * channels)  # (h,h) @ (rows, h, w·C)
    out = a_w @ out.reshape(rows * height, width, channels)  # (w,w) @ (rows·h, w, C)
    return out.reshape(rows, height, width, channels)


def blur_queries(queries: torch.Tensor, grid_size: tuple[int, int], sigma: float) -> torch.Tensor:
    """Blur ``(rows, N, C)`` queries whose ``N = h·w`` tokens are a row-major ``(h, w)`` grid."""
    rows, tokens, channels = queries.shape
    height, width = grid_size
    if height * width != tokens:
        raise ValueError(f"grid {height}×{width} does not hold {tokens} tokens")
    blurred = blur_grid(queries.reshape(rows, height, width, channels), sigma)
    return blurred.reshape(rows, tokens, channels)


def apply_blur_matrices(queries: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    """``Q'[b] = A_h[b] · Q[b] · A_w[b]ᵀ`` per channel for ``(B, h·w, C)`` row-major queries.

    The runtime form of the blur: ``a_h`` is ``(B, h, h)``, ``a_w`` is ``(B, w, w)``, one pair
    per row, so one call blurs some rows with any σ and leaves identity rows exactly as they
    were. ``h`` and ``w`` come from the matrices' shapes: two batched matmuls and reshapes,
    nothing derived from values, so a traced graph (the ONNX export) holds no value-dependent shape.
    """
    batch, height, width = a_h.shape[0], a_h.shape[-1], a_w.shape[-1]
    grid = queries.reshape(batch, height, -1)  # (B, h, w·C)
    grid = torch.matmul(a_h, grid)  # (B, h, h) @ (B, h, w·C) -> (B, h, w·C)
    grid = grid.reshape(batch, height, width, -1)  # (B, h, w, C)
    grid = torch.matmul(a_w.unsqueeze(1), grid)  # (B, 1, w, w) @ (B, h, w, C) -> (B, h, w, C)
    return grid.reshape(queries.shape)  # (B, h·w, C)


def check_blur_operands(name: str, queries: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> None:
    """Eager-mode guard for :func:`apply_blur_matrices`: a clear error instead of a wrong reshape.

    Skip it while tracing: its comparisons would freeze the example's sizes into the graph.
    """
    batch, tokens = queries.shape[0], queries.shape[1]
    if a_h.dim() != 3 or a_w.dim() != 3 or a_h.shape[1] != a_h.shape[2] or a_w.shape[1] != a_w.shape[2]:
        raise ValueError(
            f"{name}: blur matrices must be (B, h, h) and (B, w, w), got {tuple(a_h.shape)}, {tuple(a_w.shape)}"
        )
    if a_h.shape[0] != batch or a_w.shape[0] != batch:
        raise ValueError(f"{name}: blur matrices hold {a_h.shape[0]}/{a_w.shape[0]} rows, the batch has {batch}")
    if a_h.shape[1] * a_w.shape[1] != tokens:
        raise ValueError(
            f"{name}: blur matrices for a {a_h.shape[1]}×{a_w.shape[1]} grid, but the layer has {tokens} tokens"
        )
    if a_h.dtype != queries.dtype or a_w.dtype != queries.dtype:
        raise ValueError(f"{name}: blur matrices are {a_h.dtype}/{a_w.dtype}, the queries {queries.dtype}")
