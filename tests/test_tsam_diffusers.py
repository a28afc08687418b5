"""T-SAM on diffusers: targets from the pipeline's encoders, captured maps, gradient, update, cleanup."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

from seg_tsam.extension.adapters.diffusers import tsam as diffusers_tsam
from seg_tsam.extension.adapters.diffusers import tiny_models
from seg_tsam.extension.adapters.diffusers.conditioning import RowConditioning
from seg_tsam.extension.core import tsam
from seg_tsam.extension.core.layers import grid_at_level


def reference_target(attentions, row: int, eos: int, power: float) -> torch.Tensor:
    """T by loops: mean over layers and heads, tokens 1…eos−1, power, row / (rowsum + 1e-7)."""
    values = [layer[row].double().tolist() for layer in attentions]  # [layer][head][query][key]
    tokens = eos - 1
    out = []
    for i in range(tokens):
        row_values = []
        for j in range(tokens):
            total = sum(head[i + 1][j + 1] for layer in values for head in layer)
            row_values.append((total / (len(values) * len(values[0]))) ** power)
        out.append([value / (sum(row_values) + 1e-7) for value in row_values])
    return torch.tensor(out, dtype=torch.float64).reshape(tokens, tokens)


TIMESTEP = torch.tensor(801)
LONG_PROMPT = "a photo of a red car parked next to a blue clock tower, " * 2  # 86 tokens


def encode_chunk_rows(tokenizer, chunks):
    rows = []
    for chunk in chunks:
        ids = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
        rows.append(ids + [tokenizer.pad_token_id] * (77 - len(ids)))
    return torch.tensor(rows)


def webui_conditioning(pipe, prompt):
    """WebUI-style text states: every 75-token chunk encoded alone, states concatenated."""
    ids = pipe.tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids
    chunks = [ids[i : i + 75] for i in range(0, len(ids), 75)]
    with torch.no_grad():
        states = pipe.text_encoder(encode_chunk_rows(pipe.tokenizer, chunks)).last_hidden_state  # (chunks, 77, C)
    return states.reshape(1, -1, states.shape[-1])  # (1, 77·chunks, C)


def sd1_conditioning(pipe, prompts):
    return RowConditioning(pipe.encode_prompt(prompts, "cpu", 1, False)[0])


def sdxl_conditioning(pipe, prompts, size=(128, 128)):
    cond, _, pooled, _ = pipe.encode_prompt(
        prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=cond.dtype).repeat(len(prompts), 1)
    return RowConditioning(cond, pooled, time_ids)


def latents(batch, height=16, width=16, seed=0, dtype=torch.float32):
    return torch.randn(batch, 4, height, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def unet_state(unet):
    """Everything T-SAM could leave behind: processors, hooks, grad flags, child modules."""
    return {
        "processors": {name: id(processor) for name, processor in unet.attn_processors.items()},
        "hooks": {
            name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for name, m in unet.named_modules()
        },
        "requires_grad": [parameter.requires_grad for parameter in unet.parameters()],
        "modules": [name for name, _ in unet.named_modules()],
        "state_keys": list(unet.state_dict()),
    }


# --------------------------------------------------------------------------------------------
# T from the pipeline's encoders
# --------------------------------------------------------------------------------------------


def test_pipeline_targets_equal_direct_computation(tiny_sd_pipe):
    prompts = ["a red car and a blue clock", LONG_PROMPT, ""]
    targets = diffusers_tsam.pipeline_prompt_targets(tiny_sd_pipe, prompts)
    tokenizer, encoder = tiny_sd_pipe.tokenizer, tiny_sd_pipe.text_encoder
    for prompt, target in zip(prompts, targets):
        ids = tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids
        chunks = [ids[i : i + 75] for i in range(0, len(ids), 75)] or [[]]
        expected_layout = [(77 * index + 1, len(chunk)) for index, chunk in enumerate(chunks)]
        assert [(chunk.offset, chunk.tokens) for chunk in target] == expected_layout
        for chunk_target, chunk in zip(target, chunks):
            with torch.no_grad():  # each chunk alone: independent of how the code batches them
                attentions = encoder(encode_chunk_rows(tokenizer, [chunk]), output_attentions=True).attentions
            expected = reference_target(attentions, 0, len(chunk) + 1, 3.0)
            torch.testing.assert_close(chunk_target.matrix.double(), expected, rtol=1e-5, atol=1e-7)
    assert len(targets[1]) == 2 and targets[1][1].tokens == 86 - 75
    limited = diffusers_tsam.pipeline_prompt_targets(tiny_sd_pipe, [LONG_PROMPT], max_chunks=1)
    assert len(limited[0]) == 1


def test_sdxl_targets_average_both_encoders(tiny_sdxl_pipe):
    prompts = ["a cat on a mat", "two dogs"]
    targets = diffusers_tsam.pipeline_prompt_targets(tiny_sdxl_pipe, prompts, power=4.0)
    pipe = tiny_sdxl_pipe
    one = diffusers_tsam.encoder_chunk_targets(pipe.tokenizer, pipe.text_encoder, prompts, power=4.0)
    two = diffusers_tsam.encoder_chunk_targets(pipe.tokenizer_2, pipe.text_encoder_2, prompts, power=4.0)
    for index in range(2):
        assert not torch.allclose(one[index][0], two[index][0])
        torch.testing.assert_close(targets[index][0].matrix, (one[index][0] + two[index][0]) / 2)


def test_eager_attention_is_set_and_restored():
    tokenizer = tiny_models.tiny_tokenizer()
    eager = tiny_models.tiny_text_encoder(32)
    sdpa, twin = tiny_models.tiny_text_encoder(32), tiny_models.tiny_text_encoder(32)
    sdpa.set_attn_implementation("sdpa")
    twin.set_attn_implementation("sdpa")
    prompts = ["a red car", "a blue clock"]
    from_sdpa = diffusers_tsam.encoder_chunk_targets(tokenizer, sdpa, prompts)
    from_eager = diffusers_tsam.encoder_chunk_targets(tokenizer, eager, prompts)
    for a, b in zip(from_sdpa, from_eager):
        torch.testing.assert_close(a[0], b[0])
    assert sdpa.config._attn_implementation == "sdpa"
    ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(sdpa(ids).last_hidden_state, twin(ids).last_hidden_state)


# --------------------------------------------------------------------------------------------
# Layers and captured maps
# --------------------------------------------------------------------------------------------


def test_coarse_layers_of_real_sd15_and_sdxl_layouts():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # real block layout, no memory
        sd15 = UNet2DConditionModel(**tiny_models.SD15_UNET_CONFIG)
    names = [layer.name for layer in diffusers_tsam.coarse_cross_attention_layers(sd15)]
    assert names == [  # the official code's five 16×16 layers at 512²
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2",
        "down_blocks.2.attentions.1.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.2.transformer_blocks.0.attn2",
    ]
    assert grid_at_level((64, 64), 2) == (16, 16)
    assert grid_at_level((135, 240), 2) == (34, 60)  # 1080×1920 on SDXL: ceil-halvings
    with pytest.raises(ValueError, match="no cross-attention at level 5"):
        diffusers_tsam.coarse_cross_attention_layers(sd15, 5)


@pytest.mark.parametrize("size", [(16, 16), (13, 11)])
def test_captured_probabilities_equal_softmax_of_the_layers(size):
    """The capture's maps equal softmax(q·kᵀ·scale) of the same layers, recorded independently."""
    unet = tiny_models.tiny_unet(tiny_models.TINY_SD1_UNET_CONFIG)
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(5))
    z = latents(1, *size)
    layers = diffusers_tsam.coarse_cross_attention_layers(unet, 1)
    seen = {}

    def keep(name, kind):
        def hook(module, args, output):
            seen[(name, kind)] = output.detach()

        return hook

    handles = [
        layer.module.to_q.register_forward_hook(keep(layer.name, "q")) for layer in layers
    ] + [layer.module.to_k.register_forward_hook(keep(layer.name, "k")) for layer in layers]
    try:
        with diffusers_tsam.CrossAttentionCapture(unet, level=1, stop_early=False) as capture, torch.no_grad():
            grid = grid_at_level(size, 1)
            captured = capture.probabilities(lambda: unet(z, TIMESTEP, encoder_hidden_states=context), grid)
    finally:
        for handle in handles:
            handle.remove()
    expected = 0
    for layer in layers:
        q, k = seen[(layer.name, "q")], seen[(layer.name, "k")]  # (1, N, C), (1, 77, C)
        head_dim = q.shape[-1] // layer.module.heads
        q = q.reshape(1, -1, layer.module.heads, head_dim).transpose(1, 2)  # (1, heads, N, d)
        k = k.reshape(1, -1, layer.module.heads, head_dim).transpose(1, 2)  # (1, heads, 77, d)
        expected = expected + ((q @ k.transpose(-1, -2)) * layer.module.scale).softmax(-1).mean(1) / len(layers)
    assert captured.shape == (1, grid[0] * grid[1], 77)
    torch.testing.assert_close(captured, expected, rtol=1e-5, atol=1e-7)


def test_capturing_processor_keeps_the_unet_output():
    unet = tiny_models.tiny_unet(tiny_models.TINY_SD1_UNET_CONFIG)
    cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    z = latents(1)
    with torch.no_grad():
        plain = unet(z, TIMESTEP, encoder_hidden_states=cond).sample
        with diffusers_tsam.CrossAttentionCapture(unet, level=1):
            explicit = unet(z, TIMESTEP, encoder_hidden_states=cond).sample
    torch.testing.assert_close(explicit, plain, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Gradient and update
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["official", "paper"])
def test_gradient_matches_central_finite_differences(tiny_sd_pipe, loss):
    unet = tiny_models.tiny_unet(tiny_models.TINY_SD1_UNET_CONFIG).double()
    cond = RowConditioning(sd1_conditioning(tiny_sd_pipe, ["a red car and a blue clock"]).text.double())
    targets = diffusers_tsam.pipeline_prompt_targets(tiny_sd_pipe, ["a red car and a blue clock"])
    z = latents(1, 12, 10, seed=2, dtype=torch.float64)
    options = dict(loss=loss, level=1)  # level 1 of the tiny UNet: down_blocks.1 and up_blocks.1 (3 layers)
    losses, gradient = diffusers_tsam.alignment_gradient(unet, z, TIMESTEP, cond, targets, **options)
    assert float(gradient.norm()) > 0
    if loss == "official":  # stopping the forward after the last captured layer changes nothing
        _, full = diffusers_tsam.alignment_gradient(unet, z, TIMESTEP, cond, targets, stop_early=False, **options)
        torch.testing.assert_close(gradient, full, rtol=1e-10, atol=1e-14)

    # along the gradient plus a random component: checks its length and its direction
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    direction = gradient / gradient.norm() + noise / noise.norm()
    h = 1e-4 * float(z.norm())
    up = diffusers_tsam.alignment_losses(unet, z + h * direction, TIMESTEP, cond, targets, **options)
    down = diffusers_tsam.alignment_losses(unet, z - h * direction, TIMESTEP, cond, targets, **options)
    numeric = float(up - down) / (2 * h)
    analytic = float((gradient * direction).sum())
    assert abs(numeric - analytic) <= 1e-3 * abs(analytic), (numeric, analytic)
    assert float(up) > float(losses[0]) > float(down)


def float64_copy(pipe, cond: RowConditioning):
    """The pipeline's UNet and a conditioning in float64: T-SAM's decrease per step (~1e-7 on the
    tiny SDXL model, whose gradient is ~1e-5) is far below float32 forward noise (~1e-7 relative
    to a loss of 0.5), but 1e8 times above float64's."""
    as64 = lambda tensor: None if tensor is None else tensor.double()  # noqa: E731
    return copy.deepcopy(pipe.unet).double(), RowConditioning(as64(cond.text), as64(cond.pooled), as64(cond.time_ids))


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_one_step_decreases_the_loss_to_first_order(tiny_sd_pipe, tiny_sdxl_pipe, kind):
    """``L(z − h·g) = L(z) − h‖g‖² + O(h²)`` per image, in float64.

    The relative error ``e(h)`` of the first-order prediction ``h‖g_i‖²`` is ``O(h)``, so halving
    the step halves it: ``e(h/2)/e(h) = ½ + O(h)``. The ``O(h)`` there is of the size of ``e(h)``
    itself (the next Taylor term relative to the one before), which bounds the ratio's distance
    from ½. A wrong gradient (sign, scale, another image's) fails the first check; a gradient of
    the wrong function leaves ``e`` constant instead of halving.
    """
    pipe = tiny_sd_pipe if kind == "sd1" else tiny_sdxl_pipe
    prompts = ["a red car and a blue clock", "a small cat on a green mat"]
    unet, cond = float64_copy(pipe, sd1_conditioning(pipe, prompts) if kind == "sd1" else sdxl_conditioning(pipe, prompts))
    targets = diffusers_tsam.pipeline_prompt_targets(pipe, prompts)
    z = latents(2, seed=4, dtype=torch.float64)
    before, gradient = diffusers_tsam.alignment_gradient(unet, z, TIMESTEP, cond, targets)
    predicted_per_unit_step = (gradient**2).flatten(1).sum(dim=1)  # ‖g_i‖² per image
    step = 2.5e-3 * float(z.norm()) / float(gradient.norm())  # moves z by 0.25 % of |z|
    errors = []
    for halvings in range(3):
        h = step / 2**halvings
        result = diffusers_tsam.tsam_update(unet, z, TIMESTEP, cond, targets, tsam.TsamSettings(enabled=True),
                                            step_size=h)
        assert torch.equal(result.model_input, z - h * gradient)
        assert torch.equal(result.losses, before.unsqueeze(0))
        after = diffusers_tsam.alignment_losses(unet, result.model_input, TIMESTEP, cond, targets)
        decrease = before - after
        assert torch.all(decrease > 0), (h, before, after)
        errors.append(decrease / (h * predicted_per_unit_step) - 1)
    for coarse, fine in zip(errors, errors[1:]):
        assert torch.all((fine / coarse - 0.5).abs() <= coarse.abs()), errors


def test_update_under_inference_mode_and_in_bfloat16(tiny_sd_pipe):
    """The WebUI samples under inference mode; half-precision UNets keep their dtype, the loss is float32."""
    unet = tiny_models.tiny_unet(tiny_models.TINY_SD1_UNET_CONFIG).to(torch.bfloat16)
    prompts = ["a red car and a blue clock"]
    targets = diffusers_tsam.pipeline_prompt_targets(tiny_sd_pipe, prompts)
    settings = tsam.TsamSettings(enabled=True)
    with torch.inference_mode():
        cond = RowConditioning(sd1_conditioning(tiny_sd_pipe, prompts).text.to(torch.bfloat16))
        z = latents(1, seed=11).to(torch.bfloat16)
        result = diffusers_tsam.tsam_update(unet, z, TIMESTEP, cond, targets, settings, step_size=500.0)
    assert result.model_input.dtype == torch.bfloat16 and result.losses.dtype == torch.float32
    assert torch.isfinite(result.model_input).all() and not torch.equal(result.model_input, z)


def test_batch_rows_use_their_own_targets(tiny_sd_pipe):
    prompts = ["a red car and a blue clock", "a dog"]
    cond = sd1_conditioning(tiny_sd_pipe, prompts)
    targets = diffusers_tsam.pipeline_prompt_targets(tiny_sd_pipe, prompts)
    z = latents(2, seed=6)
    settings = tsam.TsamSettings(enabled=True, show_maps=True)
    both = diffusers_tsam.tsam_update(
        tiny_sd_pipe.unet, z, TIMESTEP, cond, targets, settings, step_size=50.0, iterations=2
    )
    for image in range(2):
        alone = diffusers_tsam.tsam_update(
            tiny_sd_pipe.unet, z[image : image + 1], TIMESTEP, cond.take([image]), [targets[image]], settings,
            step_size=50.0, iterations=2,
        )
        torch.testing.assert_close(both.model_input[image], alone.model_input[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(both.losses[:, image], alone.losses[:, 0], rtol=1e-5, atol=1e-7)
    assert [maps.shape for maps in both.maps] == [(20, 4, 4), (4, 4, 4)]
    # swapping the targets changes both updates: each row really reads its own T
    swapped = diffusers_tsam.tsam_update(
        tiny_sd_pipe.unet, z, TIMESTEP, cond, targets[::-1], settings, step_size=50.0, iterations=2
    )
    for image in range(2):
        assert not torch.allclose(swapped.model_input[image], both.model_input[image])


def test_long_prompt_uses_every_chunk(tiny_sd_pipe):
    cond = RowConditioning(webui_conditioning(tiny_sd_pipe, LONG_PROMPT))  # (1, 154, 32)
    (target,) = diffusers_tsam.pipeline_prompt_targets(tiny_sd_pipe, [LONG_PROMPT])
    assert cond.text.shape[1] == 154 and len(target) == 2
    z = latents(1, seed=7)
    whole = diffusers_tsam.alignment_losses(tiny_sd_pipe.unet, z, TIMESTEP, cond, [target])
    parts = [diffusers_tsam.alignment_losses(tiny_sd_pipe.unet, z, TIMESTEP, cond, [(chunk,)]) for chunk in target]
    assert all(float(part) > 0 for part in parts)
    torch.testing.assert_close(whole, parts[0] + parts[1])
    result = diffusers_tsam.tsam_update(
        tiny_sd_pipe.unet, z, TIMESTEP, cond, [target], tsam.TsamSettings(enabled=True), step_size=5.0
    )
    assert torch.isfinite(result.model_input).all() and not torch.equal(result.model_input, z)
    truncated = sd1_conditioning(tiny_sd_pipe, [LONG_PROMPT])  # diffusers truncates to 77 tokens
    with pytest.raises(ValueError, match="only 77 tokens"):
        diffusers_tsam.alignment_losses(tiny_sd_pipe.unet, z, TIMESTEP, truncated, [target])


def test_non_finite_gradient_skips_that_image_and_logs(tiny_sd_pipe, caplog):
    prompts = ["a red car", "a blue clock"]
    cond = sd1_conditioning(tiny_sd_pipe, prompts)
    targets = diffusers_tsam.pipeline_prompt_targets(tiny_sd_pipe, prompts)
    broken = tsam.chunk_targets([torch.full_like(targets[1][0].matrix, float("nan"))])
    z = latents(2, seed=8)
    with caplog.at_level(logging.WARNING, logger="seg_tsam"):
        result = diffusers_tsam.tsam_update(
            tiny_sd_pipe.unet, z, TIMESTEP, cond, [targets[0], broken], tsam.TsamSettings(enabled=True), step_size=5.0
        )
    assert torch.equal(result.model_input[1], z[1])
    assert not torch.equal(result.model_input[0], z[0]) and torch.isfinite(result.model_input).all()
    assert any("update skipped" in record.getMessage() and record.name == "seg_tsam" for record in caplog.records)


# --------------------------------------------------------------------------------------------
# Cleanup
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_unet_is_untouched_after_update(tiny_sd_pipe, tiny_sdxl_pipe, fresh_unet_factory, kind):
    pipe = tiny_sd_pipe if kind == "sd1" else tiny_sdxl_pipe
    prompts = ["a red car and a blue clock"]
    cond = sd1_conditioning(pipe, prompts) if kind == "sd1" else sdxl_conditioning(pipe, prompts)
    targets = diffusers_tsam.pipeline_prompt_targets(pipe, prompts)
    unet, twin = fresh_unet_factory(kind), fresh_unet_factory(kind)
    unet.conv_in.requires_grad_(False)  # a mix of flags must come back as it was
    twin.conv_in.requires_grad_(False)
    before = unet_state(unet)
    z = latents(1, seed=9)
    settings = tsam.TsamSettings(enabled=True)
    diffusers_tsam.tsam_update(unet, z, TIMESTEP, cond, targets, settings, step_size=5.0)
    assert unet_state(unet) == before
    with torch.no_grad():
        kwargs = cond.unet_kwargs()
        assert torch.equal(unet(z, TIMESTEP, **kwargs).sample, twin(z, TIMESTEP, **kwargs).sample)


def test_unet_is_untouched_after_an_error_inside_it(tiny_sd_pipe, fresh_unet_factory):
    prompts = ["a red car and a blue clock"]
    cond = sd1_conditioning(tiny_sd_pipe, prompts)
    targets = diffusers_tsam.pipeline_prompt_targets(tiny_sd_pipe, prompts)
    unet, twin = fresh_unet_factory("sd1"), fresh_unet_factory("sd1")
    before = unet_state(unet)
    installed = []

    def fail(module, args, output):  # runs between the captured layers (level 1: down 1 … up 1)
        installed.append(type(unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.processor).__name__)
        raise RuntimeError("boom inside the UNet")

    handle = unet.mid_block.register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            diffusers_tsam.tsam_update(
                unet, latents(1), TIMESTEP, cond, targets, tsam.TsamSettings(enabled=True), step_size=5.0, level=1
            )
    finally:
        handle.remove()
    assert installed == ["_CapturingProcessor"]
    assert unet_state(unet) == before
    z = latents(1, seed=10)
    with torch.no_grad():
        kwargs = cond.unet_kwargs()
        assert torch.equal(unet(z, TIMESTEP, **kwargs).sample, twin(z, TIMESTEP, **kwargs).sample)


def encoder_state(encoder):
    return [
        (name, len(m._forward_hooks), len(m._forward_pre_hooks), sorted(k for k in vars(m) if k.startswith("_output")))
        for name, m in encoder.named_modules()
    ]


@pytest.mark.parametrize("used_before", [False, True])
def test_text_encoder_is_untouched_after_targets(tiny_sd_pipe, used_before):
    encoder, twin = tiny_models.tiny_text_encoder(32), tiny_models.tiny_text_encoder(32)
    ids = tiny_sd_pipe.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    if used_before:  # e.g. SDXL's encode_prompt asks for hidden states: transformers' own hooks exist already
        with torch.no_grad():
            encoder(ids, output_hidden_states=True)
            twin(ids, output_hidden_states=True)
    before = encoder_state(encoder)
    diffusers_tsam.encoder_chunk_targets(tiny_sd_pipe.tokenizer, encoder, [LONG_PROMPT, "a cat"])
    assert encoder_state(encoder) == before
    with torch.no_grad():
        assert torch.equal(encoder(ids).last_hidden_state, twin(ids).last_hidden_state)
        mine, theirs = encoder(ids, output_hidden_states=True), twin(ids, output_hidden_states=True)
    assert len(mine.hidden_states) == len(theirs.hidden_states) == 3  # transformers' capturing still works
    assert all(torch.equal(a, b) for a, b in zip(mine.hidden_states, theirs.hidden_states))


# --------------------------------------------------------------------------------------------
# Mapping back to the scheduler's latent
# --------------------------------------------------------------------------------------------


def test_model_input_scale_is_c_in():
    from diffusers import DDIMScheduler

    euler = tiny_models.sd_scheduler()
    euler.set_timesteps(10)
    timestep = euler.timesteps[0]
    x = latents(1) * euler.init_noise_sigma
    model_input = euler.scale_model_input(x, timestep)
    c_in = diffusers_tsam.model_input_scale(euler, timestep, x)
    sigma = float(euler.sigmas[0])
    assert c_in == pytest.approx(1 / math.sqrt(sigma**2 + 1), rel=1e-6)
    torch.testing.assert_close(model_input / c_in, x, rtol=1e-5, atol=1e-5)
    ddim = DDIMScheduler()
    ddim.set_timesteps(10)
    assert diffusers_tsam.model_input_scale(ddim, ddim.timesteps[0], x) == 1.0


def test_generate_runs_tsam_and_off_changes_nothing(tiny_sd_pipe, fresh_unet_factory):
    """Through the generation entry point: T-SAM on changes the result, off (or strength 0) does
    not, it combines with SEG, and the UNet is untouched afterwards."""
    from seg_tsam.extension.adapters.diffusers.pipeline import generate
    from seg_tsam.extension.core.settings import SegSettings
    from seg_tsam.extension.core.tsam import TsamSettings

    kwargs = dict(steps=3, height=40, width=48, output_type="latent", seed=5)
    plain = generate(tiny_sd_pipe, "a red cat and a blue dog", **kwargs)
    off = generate(tiny_sd_pipe, "a red cat and a blue dog", tsam=TsamSettings(enabled=False), **kwargs)
    zero = generate(tiny_sd_pipe, "a red cat and a blue dog", tsam=TsamSettings(enabled=True, strength=0), **kwargs)
    on = generate(tiny_sd_pipe, "a red cat and a blue dog", tsam=TsamSettings(enabled=True, refinement_iterations=2), **kwargs)
    both = generate(tiny_sd_pipe, "a red cat and a blue dog", seg=SegSettings(enabled=True),
                    tsam=TsamSettings(enabled=True, refinement_iterations=2), **kwargs)
    assert torch.equal(plain, off) and torch.equal(plain, zero)
    assert (on - plain).abs().max() > 1e-4
    assert (both - on).abs().max() > 1e-4 and torch.isfinite(both).all()
    probe = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 77, tiny_sd_pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        assert torch.equal(tiny_sd_pipe.unet(probe, 10, context).sample, fresh_unet_factory("sd1")(probe, 10, context).sample)


@pytest.mark.parametrize("scheduler_name", ["euler", "pndm"])
def test_default_settings_update_30_of_50_steps_whatever_the_timestep_count(tiny_sd_pipe, monkeypatch, scheduler_name):
    """The official code updates the latent at steps i < 30 of 50 (plus refinement iterations at
    steps 0, 10, 20), also on PNDM, which yields 51 timesteps for 50 steps. Default settings but
    for 2 refinement iterations instead of 20 (only their placement is checked; CI time)."""
    from diffusers import PNDMScheduler

    from seg_tsam.extension.adapters.diffusers import pipeline as diffusers_pipeline

    pipe = copy.copy(tiny_sd_pipe)
    if scheduler_name == "pndm":
        pipe.scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, skip_prk_steps=True)
    updates = []
    real_update = diffusers_pipeline.tsam_update

    def counting_update(unet, model_input, timestep, *args, iterations, **kwargs):
        updates.append((int(timestep), iterations))
        return real_update(unet, model_input, timestep, *args, iterations=iterations, **kwargs)

    monkeypatch.setattr(diffusers_pipeline, "tsam_update", counting_update)
    diffusers_pipeline.generate(pipe, "a red cat and a blue dog", tsam=tsam.TsamSettings(enabled=True, refinement_iterations=2), steps=50,
                                height=40, width=40, output_type="latent")
    schedule = [int(t) for t in pipe.scheduler.timesteps]
    assert len(schedule) == (51 if scheduler_name == "pndm" else 50)
    assert [timestep for timestep, _ in updates] == schedule[:30]
    assert [iterations for _, iterations in updates] == [3 if i in (0, 10, 20) else 1 for i in range(30)]
