"""The query blur against references built here, independently of the matrix construction."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seg_tsam.extension.core import blur


def reference_blur(grid: torch.Tensor, sigma: float) -> torch.Tensor:
    """Depthwise 2D convolution with explicit reflect padding, in float64, for a (R, h, w, C) grid.

    Kernel: taps at integer offsets within ±(k−1)/2, weights exp(−x²/2σ²), where k is the
    smallest odd integer ≥ ceil(6σ), clamped per axis to n+1 (even n) or n (odd n).
    """
    rows, height, width, channels = grid.shape
    grid = grid.double()
    if sigma == 0:
        return grid.clone()
    if sigma > 9999:
        return grid.mean(dim=(1, 2), keepdim=True).expand_as(grid)

    def taps(axis_len: int) -> torch.Tensor:
        k = math.ceil(6 * sigma)
        if k % 2 == 0:
            k += 1
        k = min(k, axis_len + 1 if axis_len % 2 == 0 else axis_len)
        x = torch.arange(k, dtype=torch.float64) - (k - 1) // 2
        weights = torch.exp(-(x**2) / (2 * sigma**2))
        return weights / weights.sum()

    kernel_h, kernel_w = taps(height), taps(width)
    kernel = torch.outer(kernel_h, kernel_w)[None, None].repeat(rows * channels, 1, 1, 1)
    images = grid.double().permute(0, 3, 1, 2).reshape(1, rows * channels, height, width)
    pad_h, pad_w = len(kernel_h) // 2, len(kernel_w) // 2
    padded = F.pad(images, (pad_w, pad_w, pad_h, pad_h), mode="reflect") if pad_h or pad_w else images
    out = F.conv2d(padded, kernel, groups=rows * channels)
    return out.reshape(rows, channels, height, width).permute(0, 2, 3, 1)


GRIDS = [(8, 8), (6, 9), (7, 5), (1, 12), (12, 1), (3, 2), (1, 1), (2, 40), (33, 60)]
SIGMAS = [0.0, 0.1, 0.5, 1.0, 2.0, 3.3, 10.0, 100.0, 9999.0, math.inf]


@pytest.mark.parametrize("grid_size", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("sigma", SIGMAS)
def test_blur_matches_padded_convolution(grid_size, sigma):
    torch.manual_seed(0)
    grid = torch.randn(2, *grid_size, 5)
    out = blur.blur_grid(grid, sigma)
    assert out.shape == grid.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference_blur(grid, sigma), atol=1e-5, rtol=0)


def test_per_pixel_sum_on_a_wide_grid_with_large_sigma():
    """Large σ on 4×11: k = 61 clamps to 5 rows and 11 columns; check one pixel by hand."""
    torch.manual_seed(1)
    grid = torch.randn(1, 4, 11, 1, dtype=torch.float64)
    sigma = 10.0
    out = blur.blur_grid(grid.float(), sigma)

    def axis_weights(k):
        x = torch.arange(k, dtype=torch.float64) - (k - 1) // 2
        w = torch.exp(-(x**2) / (2 * sigma**2))
        return w / w.sum()

    def reflect(i, n):
        i = abs(i)
        return 2 * (n - 1) - i if i > n - 1 else i

    w_h, w_w = axis_weights(5), axis_weights(11)
    i, j = 0, 10  # a corner: every tap is reflected on one side
    expected = sum(
        w_h[a] * w_w[b] * grid[0, reflect(i + a - 2, 4), reflect(j + b - 5, 11), 0]
        for a in range(5)
        for b in range(11)
    )
    assert abs(out[0, i, j, 0].item() - expected.item()) < 1e-6


@pytest.mark.parametrize("sigma, size", [(1, 7), (2, 13), (5, 31), (10, 61), (100, 601), (0.5, 3), (0, 1)])
def test_kernel_size_formula(sigma, size):
    assert blur.kernel_size(sigma) == size


@pytest.mark.parametrize("axis_len, clamped", [(1, 1), (2, 3), (5, 5), (8, 9), (34, 35), (60, 61)])
def test_axis_clamp_keeps_padding_inside_the_axis(axis_len, clamped):
    size = blur.axis_kernel_size(601, axis_len)
    assert size == clamped and size // 2 < max(axis_len, 2)


def test_infinite_sigma_is_exactly_the_mean():
    grid = torch.randn(3, 5, 7, 4)
    out = blur.blur_grid(grid, math.inf)
    assert torch.equal(out, grid.mean(dim=(1, 2), keepdim=True).expand_as(grid))
    assert torch.equal(blur.blur_grid(grid, 1e6), out)


def test_zero_sigma_is_identity():
    grid = torch.randn(2, 4, 6, 3)
    assert torch.equal(blur.blur_grid(grid, 0.0), grid)


@pytest.mark.parametrize("sigma", [0.0, 0.7, 3.0, math.inf])
def test_matrix_form_equals_operator(sigma):
    """Q' = A_h · Q · A_wᵀ per channel, with the matrices the export will feed to an engine."""
    torch.manual_seed(2)
    grid = torch.randn(2, 6, 9, 3, dtype=torch.float64)
    a_h, a_w = blur.blur_matrices(6, 9, sigma, dtype=torch.float64)
    expected = torch.einsum("ik,rklc,jl->rijc", a_h, grid, a_w)
    torch.testing.assert_close(blur.blur_grid(grid, sigma), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(a_h.sum(1), torch.ones(6, dtype=torch.float64))  # row-stochastic


@pytest.mark.parametrize("sigma", [1.5, math.inf])
def test_blurring_queries_equals_blurring_logits(sigma):
    """The paper's identity (BQ)Kᵀ = B(QKᵀ): blur the logits along the query axis instead."""
    torch.manual_seed(3)
    height, width, dim, keys = 5, 7, 8, 11
    queries = torch.randn(2, height * width, dim, dtype=torch.float64)
    key_matrix = torch.randn(2, keys, dim, dtype=torch.float64)
    logits_from_blurred = blur.blur_queries(queries, (height, width), sigma) @ key_matrix.transpose(1, 2)
    blurred_logits = blur.blur_queries(queries @ key_matrix.transpose(1, 2), (height, width), sigma)
    torch.testing.assert_close(logits_from_blurred, blurred_logits, atol=1e-10, rtol=0)
    a_h, a_w = blur.blur_matrices(height, width, sigma, dtype=torch.float64)
    dense = torch.kron(a_h, a_w)  # B as an (HW × HW) matrix over row-major tokens
    torch.testing.assert_close(logits_from_blurred, dense @ (queries @ key_matrix.transpose(1, 2)), atol=1e-10, rtol=0)


def test_queries_must_fit_the_grid():
    with pytest.raises(ValueError, match="does not hold"):
        blur.blur_queries(torch.randn(1, 10, 4), (3, 4), 1.0)


@pytest.mark.parametrize("sigma", [-1.0, float("nan")])
def test_bad_sigma_is_rejected(sigma):
    with pytest.raises(ValueError, match="sigma"):
        blur.blur_matrix(4, sigma)
    with pytest.raises(ValueError, match="sigma"):
        blur.blur_grid(torch.zeros(1, 2, 2, 1), sigma)


def test_half_precision_follows_the_input_dtype():
    grid = torch.randn(1, 4, 6, 8)
    out = blur.blur_grid(grid.half(), 2.0)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), blur.blur_grid(grid, 2.0), atol=1e-2, rtol=1e-2)
