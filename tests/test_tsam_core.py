"""T-SAM core math against independent loop references written here."""

from __future__ import annotations

import math

import pytest
import torch

from seg_tsam.extension.adapters.diffusers import tiny_models
from seg_tsam.extension.core import tsam
from seg_tsam.extension.core.settings import SettingsError

# --------------------------------------------------------------------------------------------
# Loop references
# --------------------------------------------------------------------------------------------


def reference_target(attentions, row: int, eos: int, power: float) -> torch.Tensor:
    """T by loops: mean over layers and heads, tokens 1…eos−1, power, row / (rowsum + 1e-7)."""
    values = [layer[row].double().tolist() for layer in attentions]  # [layer][head][query][key]
    layers, heads, tokens = len(values), len(values[0]), eos - 1
    out = [[0.0] * tokens for _ in range(tokens)]
    for i in range(tokens):
        for j in range(tokens):
            total = 0.0
            for layer in range(layers):
                for head in range(heads):
                    total += values[layer][head][i + 1][j + 1]
            out[i][j] = (total / (layers * heads)) ** power
        row_sum = sum(out[i])
        out[i] = [value / (row_sum + 1e-7) for value in out[i]]
    return torch.tensor(out, dtype=torch.float64).reshape(tokens, tokens)


def reference_smooth(grid: torch.Tensor) -> torch.Tensor:
    """3×3 smoothing by explicit sums: weights exp(−(d/2σ)²) (σ = 0.5) normalised, reflect indices.

    An axis of one token has nothing to reflect and is not smoothed along (weight 1 at d = 0).
    """
    height, width = grid.shape

    def axis_weights(size: int) -> dict[int, float]:
        if size == 1:
            return {-1: 0.0, 0: 1.0, 1: 0.0}
        raw = {d: math.exp(-((d / (2 * 0.5)) ** 2)) for d in (-1, 0, 1)}
        return {d: w / sum(raw.values()) for d, w in raw.items()}

    def reflect(index: int, size: int) -> int:
        if index < 0:
            return -index
        if index >= size:
            return 2 * (size - 1) - index
        return index

    weights_y, weights_x = axis_weights(height), axis_weights(width)
    out = torch.zeros(height, width, dtype=torch.float64)
    for y in range(height):
        for x in range(width):
            total = 0.0
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    weight = weights_y[dy] * weights_x[dx]
                    if weight:
                        total += weight * float(grid[reflect(y + dy, height), reflect(x + dx, width)])
            out[y, x] = total
    return out


def reference_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().tolist(), b.flatten().tolist()
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def random_target(tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    raw = torch.rand(tokens, tokens, generator=generator, dtype=torch.float64).tril()
    return raw / raw.sum(dim=-1, keepdim=True)


def random_similarity(tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    raw = torch.rand(tokens, tokens, generator=generator, dtype=torch.float64)
    symmetric = (raw + raw.T) / 2
    symmetric.fill_diagonal_(1.0)
    return symmetric


# --------------------------------------------------------------------------------------------
# T
# --------------------------------------------------------------------------------------------


def test_target_equals_loop_over_encoder_attentions():
    encoder, tokenizer = tiny_models.tiny_text_encoder(32), tiny_models.tiny_tokenizer()
    prompts = ["a red car and a blue clock", "dog"]
    ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    eos = [int((row == tokenizer.eos_token_id).nonzero()[0]) for row in ids]
    with torch.no_grad():
        attentions = encoder(ids, output_attentions=True).attentions
    targets = tsam.text_attention_targets(attentions, eos, power=3.0)
    assert [tuple(t.shape) for t in targets] == [(20, 20), (3, 3)]
    for row, target in enumerate(targets):
        expected = reference_target(attentions, row, eos[row], 3.0)
        torch.testing.assert_close(target.double(), expected, rtol=1e-5, atol=1e-7)
        assert torch.all(target.triu(1) == 0), "the encoder is causal: T must be lower triangular"


@pytest.mark.parametrize("power", [1.0, 4.0])
def test_target_on_random_attentions(power):
    generator = torch.Generator().manual_seed(3)
    attentions = tuple(torch.rand(2, 3, 9, 9, generator=generator).softmax(-1) for _ in range(4))
    targets = tsam.text_attention_targets(attentions, torch.tensor([6, 9 - 1]), power=power)
    for row, eos in enumerate([6, 8]):
        expected = reference_target(attentions, row, eos, power)
        torch.testing.assert_close(targets[row].double(), expected, rtol=1e-5, atol=1e-7)


def test_target_rejects_bad_eos_and_empty_attentions():
    with pytest.raises(ValueError, match="output_attentions"):
        tsam.mean_text_attention(())
    with pytest.raises(ValueError, match="EOS position"):
        tsam.prompt_token_target(torch.rand(5, 5), 5)


def test_empty_prompt_has_empty_target_and_zero_loss():
    target = tsam.prompt_token_target(torch.rand(77, 77), 1)
    assert target.shape == (0, 0)
    assert float(tsam.official_loss(target, target)) == 0.0
    assert float(tsam.paper_loss(target, target)) == 0.0


def test_combine_encoders_averages_and_checks_shapes():
    a, b = random_target(4, 0), random_target(4, 1)
    torch.testing.assert_close(tsam.combine_encoder_targets([a, b]), (a + b) / 2)
    torch.testing.assert_close(tsam.combine_encoder_targets([a, b]).sum(-1), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="tokenised the prompt differently"):
        tsam.combine_encoder_targets([a, random_target(5, 2)])


def test_chunk_targets_sit_after_each_chunks_bos():
    chunks = tsam.chunk_targets([random_target(75, 0), random_target(3, 1)])
    assert [(chunk.offset, chunk.tokens) for chunk in chunks] == [(1, 75), (78, 3)]


# --------------------------------------------------------------------------------------------
# S
# --------------------------------------------------------------------------------------------


def test_smoothing_weights_are_attend_and_excite_kernel():
    taps = tsam.smoothing_taps(0.5, 3)
    e = math.exp(-1.0)
    torch.testing.assert_close(taps, torch.tensor([e, 1.0, e], dtype=torch.float64) / (1 + 2 * e))
    documented = torch.tensor([0.2119416, 0.5761169, 0.2119416], dtype=torch.float64)
    torch.testing.assert_close(taps, documented, atol=1e-7, rtol=0)


@pytest.mark.parametrize("grid", [(4, 4), (5, 3), (2, 7), (1, 4)])
def test_similarity_equals_per_token_loop(grid):
    height, width = grid
    tokens, context = 5, 12
    generator = torch.Generator().manual_seed(height * 10 + width)
    probabilities = torch.rand(height * width, context, generator=generator, dtype=torch.float64).softmax(-1)
    chunk = tsam.ChunkTarget(offset=3, matrix=random_target(tokens, 0))
    maps, similarity = tsam.chunk_similarity(probabilities, grid, chunk)

    reference_maps = []
    for token in range(tokens):
        grid_map = torch.zeros(height, width, dtype=torch.float64)
        for y in range(height):
            for x in range(width):
                grid_map[y, x] = probabilities[y * width + x, chunk.offset + token]  # row-major query order
        reference_maps.append(reference_smooth(grid_map))
    for token in range(tokens):
        torch.testing.assert_close(maps[token], reference_maps[token], rtol=1e-12, atol=1e-14)
    for r in range(tokens):
        for c in range(tokens):
            expected = 1.0 if r == c else reference_cosine(reference_maps[r], reference_maps[c])
            assert abs(float(similarity[r, c]) - expected) < 1e-12


def test_smoothing_matches_reflect_conv2d():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 6, 5, generator=generator, dtype=torch.float64)
    taps = tsam.smoothing_taps(0.5, 3)
    kernel = (taps[:, None] * taps[None, :]).expand(3, 1, 3, 3)
    padded = torch.nn.functional.pad(maps.unsqueeze(0), (1, 1, 1, 1), mode="reflect")
    expected = torch.nn.functional.conv2d(padded, kernel, groups=3)[0]
    torch.testing.assert_close(tsam.smooth_maps(maps), expected)


def test_token_maps_rejects_columns_outside_the_context():
    probabilities = torch.rand(16, 77)
    with pytest.raises(ValueError, match="only 77 tokens"):
        tsam.token_maps(probabilities, (4, 4), tsam.ChunkTarget(78, random_target(3, 0)))
    with pytest.raises(ValueError, match="does not hold"):
        tsam.token_maps(probabilities, (4, 5), tsam.ChunkTarget(1, random_target(3, 0)))


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def loop_official_loss(target, similarity) -> float:
    tokens = target.shape[0]
    total = 0.0
    for r in range(1, tokens):
        t = [float(target[r, c]) for c in range(r)]
        s = [float(similarity[r, c]) for c in range(r)]
        norms = math.sqrt(sum(a * a for a in t)) * math.sqrt(sum(b * b for b in s))
        cosine = sum(a * b for a, b in zip(t, s)) / norms
        total += 0.2 * r * (1.0 - cosine)
    return total


def loop_paper_loss(target, similarity) -> float:
    tokens = target.shape[0]
    total = 0.0
    for i in range(2, tokens + 1):  # 1-indexed prompt tokens; the official sum starts at the second
        row_sum = sum(float(similarity[i - 1, k - 1]) for k in range(1, i + 1))
        for j in range(1, i + 1):
            total += (i / tokens) * abs(float(target[i - 1, j - 1]) - float(similarity[i - 1, j - 1]) / row_sum)
    return total


@pytest.mark.parametrize("tokens", [2, 3, 7, 12])
def test_official_loss_equals_loop(tokens):
    target, similarity = random_target(tokens, tokens), random_similarity(tokens, 100 + tokens)
    expected = loop_official_loss(target, similarity)
    assert abs(float(tsam.official_loss(target, similarity)) - expected) < 1e-12
    assert abs(float(tsam.alignment_loss(target, similarity, "official")) - expected) < 1e-12


@pytest.mark.parametrize("tokens", [1, 2, 5, 12])
def test_paper_loss_equals_loop(tokens):
    target, similarity = random_target(tokens, tokens), random_similarity(tokens, 100 + tokens)
    expected = loop_paper_loss(target, similarity)
    assert abs(float(tsam.paper_loss(target, similarity)) - expected) < 1e-12
    assert abs(float(tsam.alignment_loss(target, similarity, "paper")) - expected) < 1e-12


def test_official_loss_is_zero_when_rows_are_parallel():
    target = random_target(6, 0)
    similarity = target + target.T  # row r's entries before r are T[r, :r] (times 1)
    similarity.fill_diagonal_(1.0)
    assert abs(float(tsam.official_loss(target, similarity))) < 1e-12


def test_unknown_loss_mode():
    with pytest.raises(ValueError, match="official, paper"):
        tsam.alignment_loss(random_target(3, 0), random_similarity(3, 0), "l2")


def test_prompt_loss_sums_its_chunks():
    generator = torch.Generator().manual_seed(1)
    probabilities = torch.rand(9, 154, generator=generator, dtype=torch.float64).softmax(-1)
    prompt = tsam.chunk_targets([random_target(4, 0), random_target(5, 1)])
    separate = sum(float(tsam.prompt_loss(probabilities, (3, 3), (chunk,))) for chunk in prompt)
    assert abs(float(tsam.prompt_loss(probabilities, (3, 3), prompt)) - separate) < 1e-12
    loss, maps = tsam.prompt_loss_and_maps(probabilities, (3, 3), prompt)
    assert maps.shape == (9, 3, 3)


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("total", [1, 20, 50, 51])
def test_step_size_is_scaled_sqrt_linspace(total):
    expected = 5.0 * torch.linspace(1.0, 0.5, total, dtype=torch.float64).sqrt()
    for step in range(total):
        assert abs(tsam.step_size(5.0, step, total) - float(expected[step])) < 1e-12


def test_official_schedule_at_50_steps():
    active = [step for step in range(50) if tsam.is_active_step(step, 50, tsam.DEFAULT_ACTIVE_FRACTION)]
    assert active == list(range(30))
    assert tsam.refinement_step_indices(tsam.DEFAULT_REFINEMENT_FRACTIONS, 50) == {0, 10, 20}
    counts = [
        tsam.updates_at_step(
            step, 50, active_fraction=0.6, iterations=1,
            refinement_fractions=tsam.DEFAULT_REFINEMENT_FRACTIONS, refinement_iterations=20,
        )
        for step in range(50)
    ]
    assert counts == [21 if step in (0, 10, 20) else 1 if step < 30 else 0 for step in range(50)]


def test_official_update_count_on_a_51_timestep_schedule():
    """PNDM yields 51 timesteps for 50 steps; the official code still updates at i < 30 only, with
    α from a 51-entry linspace."""
    settings = tsam.TsamSettings(enabled=True)
    plans = [settings.step_plan(step, 51, 50) for step in range(51)]
    assert [step for step, plan in enumerate(plans) if plan.updates] == list(range(30))
    assert [plan.updates for plan in plans[:30]] == [21 if step in (0, 10, 20) else 1 for step in range(30)]
    expected = 5.0 * torch.linspace(1.0, 0.5, 51, dtype=torch.float64).sqrt()
    assert all(abs(plans[step].step_size - float(expected[step])) < 1e-12 for step in range(30))
    assert tsam.active_step_count(50, 0.6) == 30 and tsam.active_step_count(51, 0.6) == 31
    assert tsam.active_step_count(20, 0.6) == 12 and tsam.active_step_count(7, 0.0) == 0


def test_schedule_scales_to_other_step_counts():
    assert [s for s in range(20) if tsam.is_active_step(s, 20, 0.6)] == list(range(12))
    assert tsam.refinement_step_indices(tsam.DEFAULT_REFINEMENT_FRACTIONS, 20) == {0, 4, 8}
    assert tsam.refinement_step_indices(tsam.DEFAULT_REFINEMENT_FRACTIONS, 51) == {0, 10, 20}
    settings = tsam.TsamSettings(enabled=True, refinement_iterations=3, iterations=2)
    plans = [settings.step_plan(step, 20) for step in range(20)]
    assert [plan.updates for plan in plans] == [5 if s in (0, 4, 8) else 2 if s < 12 else 0 for s in range(20)]
    assert plans[4].step_size == pytest.approx(5.0 * math.sqrt(1 - 0.5 * 4 / 19))
    assert plans[15].step_size == 0.0


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


def test_settings_defaults_are_the_official_ones():
    settings = tsam.TsamSettings()
    assert (settings.strength, settings.active_fraction, settings.iterations, settings.loss, settings.power) == (
        5.0, 0.6, 1, "official", 3.0,
    )
    assert settings.refinement_fractions == (0.0, 0.2, 0.4)
    assert settings.refinement_steps == "0,0.2,0.4"
    assert not settings.has_effect
    assert settings.step_plan(0, 20).updates == 0


def test_settings_round_trip_through_a_dict():
    settings = tsam.TsamSettings.from_mapping(
        {"strength": "10", "refinement_steps": [0.4, 0.0], "iterations": 2.0, "loss": "paper", "power": 4}
    )
    assert settings.enabled and settings.strength == 10.0 and settings.iterations == 2
    assert settings.refinement_steps == "0,0.4"
    assert tsam.TsamSettings.from_mapping(settings.to_dict()) == settings
    assert tsam.TsamSettings(refinement_steps="none").refinement_fractions == ()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"strength": -1}, "strength"),
        ({"strength": "strong"}, "strength"),
        ({"active_fraction": 1.5}, "active_fraction"),
        ({"iterations": 2.5}, "iterations: expected a whole number"),
        ({"iterations": 0}, "iterations: must be in"),
        ({"refinement_iterations": -1}, "refinement_iterations"),
        ({"refinement_steps": "0,1.2"}, "refinement_steps"),
        ({"refinement_steps": 3}, "refinement_steps"),
        ({"loss": "l2"}, "loss: must be one of official, paper"),
        ({"power": 0}, "power"),
        ({"power": float("nan")}, "power: NaN"),
        ({"show_maps": "yes"}, "show_maps"),
        ({"enabled": 1}, "enabled"),
        ({"scale": 3}, "unknown T-SAM setting"),
    ],
)
def test_settings_errors_name_the_field(values, message):
    with pytest.raises(SettingsError, match=message):
        tsam.TsamSettings.from_mapping(values)


def test_the_described_cost_is_the_default_schedule_s():
    """The accordion says the defaults make 90 updates in 50 steps: 30 regular + 3 × 20 refinement."""
    settings = tsam.TsamSettings(enabled=True)
    assert sum(settings.step_plan(step, 50).updates for step in range(50)) == 90
    assert "90 updates for 50 steps" in tsam.TsamSettings.DESCRIPTION
