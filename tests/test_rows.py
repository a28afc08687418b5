"""Row bookkeeping for the WebUI's batched, chunked and uncond-skipping denoiser calls."""

from __future__ import annotations

import pytest

from seg_tsam.extension.adapters.a1111.step_rows import StepRows
from seg_tsam.extension.adapters.diffusers.rows import plan_seg_rows


def test_diffusers_plan():
    assert plan_seg_rows([2, 3], [0, 1], "cond").source == (2, 3)
    assert plan_seg_rows([2, 3], [0, 1], "uncond").source == (0, 1)
    assert plan_seg_rows([0, 1], [], "uncond").source == (0, 1)  # no CFG: blur the cond rows
    with pytest.raises(ValueError):
        plan_seg_rows([0], [], "both")


def simulate(calls, cond_rows=3, images=2, mode="cond"):
    """Feed call sizes in order; return the candidate global rows per call and the final state."""
    step = StepRows(cond_rows, images, mode)
    seen = []
    for size in calls:
        call = step.next_call(size)
        seen.append([call.start + local for local in step.candidates_in(call)])
    return seen, step


@pytest.mark.parametrize(
    "calls, mode, expected_candidates, required",
    [
        ([5], "cond", [[0, 1, 2]], range(3)),                      # one batched call
        ([2, 2, 1], "cond", [[0, 1], [2], []], range(3)),          # batch_cond_uncond off, batch size 2
        ([3, 2], "cond", [[0, 1, 2], []], range(3)),               # token lengths differ: cond, then uncond
        ([5], "uncond", [[3, 4]], range(3, 5)),
        ([3, 2], "uncond", [[], [3, 4]], range(3, 5)),
        ([3], "uncond", [[]], range(3)),                           # uncond skipped: blur cond instead
        ([3], "cond", [[0, 1, 2]], range(3)),
    ],
)
def test_calls_map_to_global_rows(calls, mode, expected_candidates, required):
    seen, step = simulate(calls, mode=mode)
    assert seen == expected_candidates
    assert step.required() == required
    assert step.missing() == list(required)
    for row in required:
        step.blurred[row] = object()
    assert step.missing() == []
