"""The capture base shared by the diffusers and WebUI T-SAM adapters: patches undone in reverse,
also after a failure half-way, and the recorded probabilities averaged over heads and layers."""

from __future__ import annotations

import pytest
import torch

from seg_tsam.extension.core.attention_capture import AttentionCapture


class LoggingCapture(AttentionCapture):
    """Patches ``count`` pretend layers, logging each patch and undo; patching ``fail_at`` raises."""

    def __init__(self, count: int, fail_at: int | None = None, *, stop_early: bool = True):
        super().__init__([f"layer{i}" for i in range(count)], level=1, stop_early=stop_early)
        self.count, self.fail_at, self.log = count, fail_at, []

    def _patch_layers(self):
        for index in range(self.count):
            if index == self.fail_at:
                raise RuntimeError(f"cannot patch layer{index}")
            self.log.append(f"patch {index}")
            yield lambda index=index: self.log.append(f"undo {index}")


def test_patches_are_undone_in_reverse():
    capture = LoggingCapture(3)
    with capture:
        assert capture.log == ["patch 0", "patch 1", "patch 2"]
    assert capture.log[3:] == ["undo 2", "undo 1", "undo 0"]


def test_a_failure_half_way_undoes_what_was_patched():
    capture = LoggingCapture(3, fail_at=2)
    with pytest.raises(RuntimeError, match="cannot patch layer2"):
        capture.__enter__()
    assert capture.log == ["patch 0", "patch 1", "undo 1", "undo 0"]
    capture.fail_at = None
    with capture:  # nothing left half-installed: it installs again
        pass
    assert capture.log[4:] == ["patch 0", "patch 1", "patch 2", "undo 2", "undo 1", "undo 0"]


def test_an_error_inside_the_block_still_undoes():
    capture = LoggingCapture(2)
    with pytest.raises(KeyError), capture:
        raise KeyError("generation failed")
    assert capture.log == ["patch 0", "patch 1", "undo 1", "undo 0"]


def test_misuse_is_refused():
    capture = LoggingCapture(1)
    with pytest.raises(RuntimeError, match="outside its with-block"):
        capture.probabilities(lambda: None, (1, 1))
    with capture, pytest.raises(RuntimeError, match="already installed"):
        capture.__enter__()
    assert capture.log == ["patch 0", "undo 0"]


def test_probabilities_are_the_mean_over_heads_and_layers():
    generator = torch.Generator().manual_seed(0)
    per_layer = [torch.rand(2, 3, 4, 5, generator=generator, dtype=torch.float64) for _ in range(2)]  # (B, H, N, M)
    capture = LoggingCapture(2, stop_early=False)

    def forward():
        capture._record("layer1", per_layer[1])  # order of the calls does not matter
        capture._record("layer0", per_layer[0])

    expected = sum(p.sum(dim=1) for p in per_layer) / (2 * 3)
    with capture:
        assert torch.allclose(capture.probabilities(forward, (2, 2)), expected, atol=1e-15)
        with pytest.raises(RuntimeError, match=r"did not run cross-attention layer\(s\) \['layer1'\]"):
            capture.probabilities(lambda: capture._record("layer0", per_layer[0]), (2, 2))
