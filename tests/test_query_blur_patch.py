"""QueryBlurPatch's two requests: runtime matrices per level equal the σ blur on the same rows."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from seg_tsam.extension.core.blur import blur_matrices
from seg_tsam.extension.core.layers import AttentionLayer, grid_at_level
from seg_tsam.extension.core.query_blur_patch import QueryBlurPatch


class GridSource(nn.Module):
    """Stands for a spatial transformer: takes ``(B, C, h, w)``, hands ``(B, h·w, C)`` tokens on."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.flatten(2).transpose(1, 2)


class TwoLevels(nn.Module):
    """Queries at level 0 and at level 1 (ceil halving); each ``to_q`` output is returned, so a
    blur in one layer never feeds the other and both modes see the same projection inputs."""

    def __init__(self, channels: int = 6):
        super().__init__()
        self.sources = nn.ModuleList([GridSource(), GridSource()])
        self.to_q = nn.ModuleList([nn.Linear(channels, channels), nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        inputs = (x, x[..., ::2, ::2])
        return [proj(source(features)) for source, proj, features in zip(self.sources, self.to_q, inputs)]

    def layers(self) -> list[AttentionLayer]:
        return [
            AttentionLayer(f"level{level}.attn1", "self", "down", level, level, self.to_q[level], self.to_q[level],
                           self.sources[level])
            for level in (0, 1)
        ]


def row_matrices(latent, levels, batch, rows, sigma) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per level, identity for every row and the core's σ matrices for ``rows``."""
    matrices = {}
    for level in levels:
        height, width = grid_at_level(latent, level)
        a_h, a_w = blur_matrices(height, width, sigma)
        stacks = [torch.eye(side).repeat(batch, 1, 1) for side in (height, width)]
        for stack, matrix in zip(stacks, (a_h, a_w)):
            stack[rows] = matrix
        matrices[level] = tuple(stacks)
    return matrices


@pytest.mark.parametrize("sigma", [0.7, 1.3, math.inf])
def test_matrix_request_equals_the_sigma_blur_and_leaves_other_rows_bit_identical(sigma):
    torch.manual_seed(0)
    model, latent, batch, rows = TwoLevels(), (7, 5), 4, [1, 3]
    x = torch.randn(batch, 6, *latent)
    layers = model.layers()
    with torch.no_grad():
        plain = model(x)
        with QueryBlurPatch(layers) as patch:
            with patch.blurring(rows, batch, sigma):
                by_sigma = model(x)
            with patch.applying_matrices(row_matrices(latent, (0, 1), batch, rows, sigma)):
                by_matrices = model(x)
            assert patch.recorded_grid(layers[1]) == grid_at_level(latent, 1)
    others = [row for row in range(batch) if row not in rows]
    for level, (reference, blurred, untouched) in enumerate(zip(by_sigma, by_matrices, plain)):
        height, width = grid_at_level(latent, level)
        # Both are convex combinations of the same h·w query values, each summed with at most
        # h·w roundings: they differ by at most h·w·eps·max|q| (two γ_n bounds of u = eps/2).
        bound = height * width * torch.finfo(torch.float32).eps * float(untouched.abs().max())
        torch.testing.assert_close(blurred[rows], reference[rows], atol=bound, rtol=0)
        assert not torch.equal(blurred[rows], untouched[rows])  # the blur did something
        assert torch.equal(blurred[others], untouched[others])  # identity rows: exactly untouched


def test_matrix_requests_need_every_patched_level_and_a_matching_grid():
    model, latent = TwoLevels(), (7, 5)
    x = torch.randn(2, 6, *latent)
    with QueryBlurPatch(model.layers()) as patch:
        with pytest.raises(KeyError, match=r"level\(s\) \[1\]"):
            patch.request_matrices(row_matrices(latent, (0,), 2, [0], 1.0))
        wrong_size = row_matrices((9, 5), (0, 1), 2, [0], 1.0)
        with patch.applying_matrices(wrong_size), pytest.raises(ValueError, match="9×5 grid"):
            model(x)
        with patch.applying_matrices(row_matrices(latent, (0, 1), 2, [0], 1.0)):
            with pytest.raises(RuntimeError, match="blur matrices"):
                patch.active_blur()
    with pytest.raises(RuntimeError, match="outside its with-block"):
        patch.request_matrices(row_matrices(latent, (0, 1), 2, [0], 1.0))
