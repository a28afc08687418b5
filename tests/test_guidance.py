"""The guidance combination against per-row loops of the formulas (DESIGN §1.1)."""

from __future__ import annotations

import pytest
import torch

from seg_tsam.extension.core.guidance import seg_guidance, single_conds

CFG, SEG = 7.0, 3.0


def random_rows(n):
    return torch.randn(n, 4, 3, 5, dtype=torch.float64)


def test_official_formula_single_cond():
    torch.manual_seed(0)
    uncond, cond, cond_blurred = random_rows(2), random_rows(2), random_rows(2)
    out = seg_guidance(cond=cond, uncond=uncond, conds_list=single_conds(2), cfg_scale=CFG,
                       seg_scale=SEG, cond_blurred=cond_blurred)
    # The official code's form: ε_text + (w−1)(ε_text − ε_uncond) + s(ε_text − ε_ptb)
    expected = cond + (CFG - 1) * (cond - uncond) + SEG * (cond - cond_blurred)
    torch.testing.assert_close(out, expected)


def test_and_prompts_weight_each_seg_term_like_its_cond():
    torch.manual_seed(1)
    conds_list = [[(0, 1.0)], [(1, 0.7), (2, 0.3)], [(3, 0.5), (4, -0.25), (5, 1.2)]]
    cond, cond_blurred, uncond = random_rows(6), random_rows(6), random_rows(3)
    out = seg_guidance(cond=cond, uncond=uncond, conds_list=conds_list, cfg_scale=CFG,
                       seg_scale=SEG, cond_blurred=cond_blurred)
    for image, conds in enumerate(conds_list):
        expected = uncond[image].clone()
        for row, weight in conds:
            expected += weight * (CFG * (cond[row] - uncond[image]) + SEG * (cond[row] - cond_blurred[row]))
        torch.testing.assert_close(out[image], expected)


def test_without_cfg_seg_alone():
    torch.manual_seed(2)
    cond, cond_blurred = random_rows(2), random_rows(2)
    out = seg_guidance(cond=cond, uncond=None, conds_list=single_conds(2), cfg_scale=CFG,
                       seg_scale=SEG, cond_blurred=cond_blurred)
    torch.testing.assert_close(out, cond + SEG * (cond - cond_blurred))


def test_without_cfg_and_prompts_use_the_first_cond_as_base():
    torch.manual_seed(3)
    conds_list = [[(0, 0.6), (1, 0.4)]]
    cond, cond_blurred = random_rows(2), random_rows(2)
    out = seg_guidance(cond=cond, uncond=None, conds_list=conds_list, cfg_scale=CFG,
                       seg_scale=SEG, cond_blurred=cond_blurred)
    base = cond[0]
    expected = base + 0.6 * (cond[0] - base) + 0.4 * (cond[1] - base)
    expected = expected + SEG * (0.6 * (cond[0] - cond_blurred[0]) + 0.4 * (cond[1] - cond_blurred[1]))
    torch.testing.assert_close(out[0], expected)


@pytest.mark.parametrize("conds_list", [single_conds(2), [[(0, 1.0)], [(1, 0.5), (2, 0.5)]]])
def test_uncond_mode_paper_eq10(conds_list):
    torch.manual_seed(4)
    n_cond = sum(len(c) for c in conds_list)
    cond, uncond, uncond_blurred = random_rows(n_cond), random_rows(2), random_rows(2)
    out = seg_guidance(cond=cond, uncond=uncond, conds_list=conds_list, cfg_scale=CFG,
                       seg_scale=SEG, uncond_blurred=uncond_blurred)
    for image, conds in enumerate(conds_list):
        expected = uncond[image] + SEG * (uncond[image] - uncond_blurred[image])
        for row, weight in conds:
            expected = expected + weight * CFG * (cond[row] - uncond[image])
        torch.testing.assert_close(out[image], expected)


def test_plain_cfg_when_no_blurred_rows():
    torch.manual_seed(5)
    cond, uncond = random_rows(2), random_rows(2)
    out = seg_guidance(cond=cond, uncond=uncond, conds_list=single_conds(2), cfg_scale=CFG, seg_scale=SEG)
    torch.testing.assert_close(out, uncond + CFG * (cond - uncond))


def test_x0_space_matches_eps_space():
    """x0 = x − σ·ε is affine, so guiding x0 predictions equals converting the guided ε."""
    torch.manual_seed(6)
    x, sigma = random_rows(1), 2.5
    eps = {name: random_rows(1) for name in ("u", "c", "cb")}
    x0 = {name: x - sigma * value for name, value in eps.items()}
    kwargs = dict(conds_list=single_conds(1), cfg_scale=CFG, seg_scale=SEG)
    guided_eps = seg_guidance(cond=eps["c"], uncond=eps["u"], cond_blurred=eps["cb"], **kwargs)
    guided_x0 = seg_guidance(cond=x0["c"], uncond=x0["u"], cond_blurred=x0["cb"], **kwargs)
    torch.testing.assert_close(guided_x0, x - sigma * guided_eps)


def test_rejects_both_blurred_kinds():
    rows = random_rows(1)
    with pytest.raises(ValueError, match="not both"):
        seg_guidance(cond=rows, uncond=rows, conds_list=single_conds(1), cfg_scale=1, seg_scale=1,
                     cond_blurred=rows, uncond_blurred=rows)
