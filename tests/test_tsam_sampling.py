"""T-SAM's WebUI runtime and its ldm/sgm adapter, without the WebUI.

The WebUI's objects are stood in for by small fakes with the same calling conventions:
a k-diffusion-style Euler loop that calls ``model(x, sigma, **extra_args)`` and then its
per-step callback, a ``CFGDenoiser``-like module with the WebUI's ``forward`` signature, an
ldm-like UNet (``input_blocks``/``middle_block``/``output_blocks`` with ``Downsample``/
``Upsample`` and ``transformer_blocks.N.attn2`` modules), and the WebUI's prompt-encoder
wrapper interface around the real CLIP text model class.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seg_tsam.extension.adapters import text_targets, tsam_steps, unet_layers
from seg_tsam.extension.adapters.a1111 import ldm_tsam
from seg_tsam.extension.adapters.text_targets import TextTarget
from seg_tsam.extension.adapters.diffusers import tiny_models
from seg_tsam.extension.core import tsam, tsam_descent
from seg_tsam.extension.core.tsam import TsamSettings
from seg_tsam.extension.adapters.a1111 import tsam_sampling
from seg_tsam.extension.adapters.a1111.tsam_sampling import TsamGeneration

# --------------------------------------------------------------------------------------------
# A k-diffusion-style sampler around a CFGDenoiser-like module
# --------------------------------------------------------------------------------------------


class FakeCfgDenoiser(nn.Module):
    """The WebUI ``CFGDenoiser.forward`` signature; returns a fixed function of ``x`` as x0."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps
        self.step = 0
        self.calls: list[torch.Tensor] = []

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        self.calls.append(x.clone())
        self.step += 1
        return 0.5 * x + 0.1


class FakeSampler:
    def __init__(self, steps: int):
        self.model_wrap_cfg = FakeCfgDenoiser(steps)
        self.steps_seen: list[int] = []

    def callback_state(self, d):
        self.steps_seen.append(d["i"])


SIGMAS = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.0])
EXTRA_ARGS = {"cond": None, "image_cond": None, "uncond": None, "cond_scale": 7.0, "s_min_uncond": 0.0}


def sample_euler(model, x, sigmas, extra_args, callback, second_order=False):
    """k-diffusion's ``sample_euler`` calling pattern (Heun's extra call with ``second_order``):
    the latent is a local variable passed to the model, then updated from the model output."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if second_order and sigmas[i + 1] > 0:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            d = (d + (x_2 - denoised_2) / sigmas[i + 1]) / 2
        callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        x = x + d * dt
    return x


class ShiftingGeneration(TsamGeneration):
    """The real hooks and bookkeeping, with the T-SAM update replaced by ``x + 1``."""

    def __init__(self, settings):
        super().__init__(settings, reconstruct_cond=None)  # aligned_latent, which reads the cond, is replaced
        self.updated_steps: list[int] = []

    def aligned_latent(self, denoiser, x, sigma, cond, image_cond, *, step, total, step_size, iterations):
        self.updated_steps.append(step)
        return x + 1.0


ACTIVE_HALF = TsamSettings(enabled=True, active_fraction=0.5, refinement_steps="none")  # steps 0, 1 of 4


def run(generation: TsamGeneration | None, second_order=False):
    sampler = FakeSampler(steps=4)
    x = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    if generation is None:
        return sample_euler(sampler.model_wrap_cfg, x, SIGMAS, EXTRA_ARGS, sampler.callback_state, second_order), \
            sampler
    with generation:
        generation.attach(sampler, [["a"], ["b"]])
        out = sample_euler(sampler.model_wrap_cfg, x, SIGMAS, EXTRA_ARGS, sampler.callback_state, second_order)
    return out, sampler


def reference_with_updates_on_the_sampler_latent(steps_updated, second_order=False):
    """The same loop, with ``x += 1`` applied to the sampler's own variable before those steps."""
    sampler = FakeSampler(steps=4)
    model = sampler.model_wrap_cfg
    x = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0))

    def updating_model(latent, sigma, **kwargs):
        step = len(sampler.steps_seen)
        if step in steps_updated and step not in updating_model.done:
            updating_model.done.add(step)
            latent += 1.0
        return model(latent, sigma, **kwargs)

    updating_model.done = set()
    return sample_euler(updating_model, x, SIGMAS, EXTRA_ARGS, sampler.callback_state, second_order)


@pytest.mark.parametrize("second_order", [False, True], ids=["euler", "heun"])
def test_update_reaches_the_samplers_own_latent(second_order):
    """Fails if only a copy of ``x`` were updated: the result would then equal the plain run."""
    generation = ShiftingGeneration(ACTIVE_HALF)
    out, sampler = run(generation, second_order)
    plain, _ = run(None, second_order)
    reference = reference_with_updates_on_the_sampler_latent({0, 1}, second_order)
    assert generation.updated_steps == [0, 1]  # first call of each active step only (Heun calls twice)
    assert generation.steps_aligned == 2
    assert torch.equal(out, reference)
    assert not torch.allclose(out, plain)
    # The denoiser itself saw the updated latent at the first call of step 0.
    start = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampler.model_wrap_cfg.calls[0], start + 1.0)


def test_hooks_are_removed_after_the_generation_and_after_an_error():
    generation = ShiftingGeneration(ACTIVE_HALF)
    _, sampler = run(generation)
    denoiser = sampler.model_wrap_cfg
    assert not denoiser._forward_pre_hooks and "callback_state" not in sampler.__dict__

    failing = FakeSampler(steps=4)
    with pytest.raises(RuntimeError, match="boom"):
        with ShiftingGeneration(ACTIVE_HALF) as broken:
            broken.attach(failing, [["a"], ["b"]])
            assert failing.model_wrap_cfg._forward_pre_hooks and "callback_state" in failing.__dict__
            raise RuntimeError("boom")
    assert not failing.model_wrap_cfg._forward_pre_hooks and "callback_state" not in failing.__dict__


def test_inactive_generation_changes_nothing():
    out, _ = run(ShiftingGeneration(TsamSettings(enabled=True, active_fraction=0.0)))
    plain, _ = run(None)
    assert torch.equal(out, plain)


def test_interrupt_stops_updates():
    generation = ShiftingGeneration(ACTIVE_HALF)
    generation.should_stop = lambda: True
    out, _ = run(generation)
    assert generation.updated_steps == [] and torch.equal(out, run(None)[0])


# --------------------------------------------------------------------------------------------
# The mapping between the sampler's x and the UNet input z
# --------------------------------------------------------------------------------------------


class EpsWrapper(nn.Module):
    """k-diffusion's CompVisDenoiser scalings: ``(c_out, c_in)``, ``c_in = 1/sqrt(σ²+1)``."""

    def __init__(self, sd_model):
        super().__init__()
        self.inner_model = sd_model

    def get_scalings(self, sigma):
        return -sigma, 1 / (sigma**2 + 1) ** 0.5

    def sigma_to_t(self, sigma):
        return sigma * 10


class TimestepWrapper(nn.Module):
    """The WebUI's ``CompVisTimestepsDenoiser``: no scalings, the argument is the timestep."""

    def __init__(self, sd_model):
        super().__init__()
        self.inner_model = sd_model


def fake_sd_model():
    return SimpleNamespace(
        cond_stage_model=object(),
        model=SimpleNamespace(conditioning_key="crossattn", diffusion_model=nn.Linear(1, 1)),
        apply_model=lambda *args: None,
    )


@pytest.mark.parametrize("wrapper_class", [EpsWrapper, TimestepWrapper], ids=["k-diffusion", "timesteps"])
def test_gradient_step_is_taken_on_c_in_x_and_mapped_back(monkeypatch, wrapper_class):
    seen = {}

    def fake_descend(capture, run_unet, z, targets, mode, *, step_size, iterations, should_stop, on_iteration, where):
        seen["z"], seen["step_size"], seen["iterations"] = z.clone(), step_size, iterations
        changed = torch.tensor([True, False])
        return tsam_descent.Descent(z - 0.25, changed, z.new_zeros((0, 2)), None)

    monkeypatch.setattr(tsam_descent, "descend", fake_descend)
    monkeypatch.setattr(ldm_tsam, "alignment_session", lambda *args, **kwargs: _null_context())
    generation = TsamGeneration(TsamSettings(enabled=True), reconstruct_cond=lambda cond, step: (
        [[(0, 1.0)], [(1, 1.0)]], torch.zeros(2, 77, 8)))
    generation._image_texts = [["a"], ["b"]]
    generation._target = lambda sd_model, text: TextTarget((), ())
    denoiser = SimpleNamespace(inner_model=wrapper_class(fake_sd_model()), step=0)
    cond = SimpleNamespace(batch=[[SimpleNamespace(schedules=[SimpleNamespace(end_at_step=4)])]] * 2)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    sigma = torch.tensor([14.6, 14.6], dtype=torch.float64)

    updated = generation.aligned_latent(denoiser, x, sigma, cond, torch.zeros(2, 5, 1, 1),
                                        step=0, total=4, step_size=3.0, iterations=2)

    c_in = 1 / (14.6**2 + 1) ** 0.5 if wrapper_class is EpsWrapper else 1.0
    assert torch.allclose(seen["z"], x * c_in)
    assert (seen["step_size"], seen["iterations"]) == (3.0, 2)
    assert torch.allclose(updated[0], (x[0] * c_in - 0.25) / c_in)  # x' = z'/c_in
    assert torch.equal(updated[1], x[1])  # an image whose update was skipped keeps its latent exactly
    assert updated.dtype == x.dtype


class _null_context:
    def __enter__(self):
        return None

    def __exit__(self, *args):
        return None


def test_each_image_uses_the_text_of_its_active_prompt_editing_entry():
    generation = TsamGeneration(TsamSettings(enabled=True), reconstruct_cond=None)
    generation._image_texts = [["a cat", "a dog"], ["a car"]]
    schedules = [SimpleNamespace(end_at_step=3), SimpleNamespace(end_at_step=10)]
    cond = SimpleNamespace(batch=[[SimpleNamespace(schedules=schedules)], [SimpleNamespace(schedules=schedules[1:])]])
    assert generation._text_at(0, cond, step=2) == "a cat"
    assert generation._text_at(0, cond, step=4) == "a dog"
    assert generation._text_at(1, cond, step=0) == "a car"


def test_unet_condition_layouts():
    text, image = torch.zeros(1, 77, 8), torch.zeros(1, 5, 1, 1)
    assert tsam_sampling.unet_condition(text, image, "crossattn") == {"c_crossattn": [text], "c_concat": [image]}
    assert tsam_sampling.unet_condition(text, image, "crossattn-adm") == {"c_crossattn": [text], "c_adm": image}
    sdxl = {"crossattn": text, "vector": torch.zeros(1, 4)}
    assert tsam_sampling.unet_condition(sdxl, image, "crossattn") == {**sdxl, "c_concat": [image]}
    rows = tsam_steps.select_rows({"crossattn": torch.arange(3.0).view(3, 1), "vector": torch.arange(3.0)}, [2, 0])
    assert rows["crossattn"].flatten().tolist() == [2.0, 0.0] and rows["vector"].tolist() == [2.0, 0.0]


# --------------------------------------------------------------------------------------------
# ldm adapter: an ldm-like UNet
# --------------------------------------------------------------------------------------------


class CrossAttention(nn.Module):
    """ldm's CrossAttention layout; its forward stands for the WebUI's fused optimisation (SDPA)."""

    def __init__(self, dim, context_dim, heads=2):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None, mask=None):
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        split = lambda t: t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))  # (B, H, N, d)
        return self.to_out(out.transpose(1, 2).reshape(x.shape))


class Block(nn.Module):
    def __init__(self, dim, context_dim):
        super().__init__()
        self.attn2 = CrossAttention(dim, context_dim)


class SpatialTransformer(nn.Module):
    def __init__(self, dim, context_dim):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([Block(dim, context_dim)])
        self.runs = 0

    def forward(self, h, context):
        self.runs += 1
        batch, channels, height, width = h.shape
        tokens = h.flatten(2).transpose(1, 2)  # (B, h·w, C)
        tokens = tokens + self.transformer_blocks[0].attn2(tokens, context=context)
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)


class Downsample(nn.Module):
    def forward(self, h, context):
        return h[..., ::2, ::2]  # ceil halving, like a stride-2 convolution with padding 1


class Upsample(nn.Module):
    def __init__(self):
        super().__init__()
        self.size = None

    def forward(self, h, context):
        return F.interpolate(h, size=self.size, mode="nearest")


class Sequential(nn.ModuleList):
    def forward(self, h, context):
        for layer in self:
            h = layer(h, context)
        return h


class LdmLikeUNet(nn.Module):
    """Levels: in 0 (attn), down, in 1 (attn); middle 1 (attn); out 1 (attn) + up, out 0 (attn)."""

    def __init__(self, dim=8, context_dim=6):
        super().__init__()
        self.input_blocks = nn.ModuleList([
            Sequential([SpatialTransformer(dim, context_dim)]),
            Sequential([Downsample()]),
            Sequential([SpatialTransformer(dim, context_dim)]),
        ])
        self.middle_block = Sequential([SpatialTransformer(dim, context_dim)])
        self.output_blocks = nn.ModuleList([
            Sequential([SpatialTransformer(dim, context_dim), Upsample()]),
            Sequential([SpatialTransformer(dim, context_dim)]),
        ])

    def forward(self, x, context):
        self.output_blocks[0][1].size = x.shape[-2:]
        h = x
        for block in (*self.input_blocks, self.middle_block, *self.output_blocks):
            h = block(h, context)
        return h


def ldm_like_unet(dtype=torch.float64):
    torch.manual_seed(0)
    return LdmLikeUNet().to(dtype)


def test_levels_and_the_coarse_fallback():
    layers = ldm_tsam.cross_attention_layers(ldm_like_unet())
    assert [(layer.name, layer.level) for layer in layers] == [
        ("input_blocks.0.0.transformer_blocks.0.attn2", 0),
        ("input_blocks.2.0.transformer_blocks.0.attn2", 1),
        ("middle_block.0.transformer_blocks.0.attn2", 1),
        ("output_blocks.0.0.transformer_blocks.0.attn2", 1),
        ("output_blocks.1.0.transformer_blocks.0.attn2", 0),
    ]
    assert unet_layers.coarse_level(layers) == 1  # no level 2 here: the coarsest with cross-attention
    assert unet_layers.coarse_level(layers, preferred=0) == 0
    with pytest.raises(ValueError, match="no cross-attention"):
        unet_layers.coarse_level([])


def test_capture_keeps_the_output_records_the_softmax_and_restores():
    unet = ldm_like_unet()
    x = torch.randn(2, 8, 5, 3, dtype=torch.float64)
    context = torch.randn(2, 10, 6, dtype=torch.float64)
    inputs = {}
    coarse = [module for name, module in unet.named_modules() if name.endswith("attn2")][1:4]

    def keep_input(module, args, kwargs):
        inputs[id(module)] = args[0]

    handles = [module.register_forward_pre_hook(keep_input, with_kwargs=True) for module in coarse]
    with torch.no_grad():
        reference_out = unet(x, context)
    for handle in handles:
        handle.remove()

    expected = []
    for module in coarse:  # softmax(q·kᵀ/√d), mean over heads, computed here independently
        q = module.to_q(inputs[id(module)]).view(2, -1, 2, 4).transpose(1, 2)
        k = module.to_k(context).view(2, -1, 2, 4).transpose(1, 2)
        expected.append(torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1).mean(dim=1))
    capture = ldm_tsam.LdmCrossAttentionCapture(unet, stop_early=False)
    with capture, torch.no_grad():
        outputs = []
        probabilities = capture.probabilities(lambda: outputs.append(unet(x, context)), (3, 2))
    assert torch.allclose(outputs[0], reference_out, atol=1e-12)
    assert torch.allclose(probabilities, torch.stack(expected).mean(dim=0), atol=1e-12)
    assert all("forward" not in layer.module.__dict__ for layer in capture.layers)
    assert [type(m).forward for m in coarse] == [CrossAttention.forward] * 3


def test_capture_gives_back_a_forward_another_extension_set_on_the_instance():
    unet = ldm_like_unet()
    x, context = torch.randn(1, 8, 4, 4, dtype=torch.float64), torch.randn(1, 10, 6, dtype=torch.float64)
    capture = ldm_tsam.LdmCrossAttentionCapture(unet)
    theirs, calls = capture.layers[0].module, []

    def their_forward(*args, **kwargs):
        calls.append(1)
        return CrossAttention.forward(theirs, *args, **kwargs)

    theirs.forward = their_forward
    with capture, torch.no_grad():
        capture.probabilities(lambda: unet(x, context), (2, 2))
    assert not calls  # the capture's forward ran instead
    assert theirs.__dict__["forward"] is their_forward
    assert all("forward" not in layer.module.__dict__ for layer in capture.layers[1:])


def test_capture_stops_after_the_last_coarse_layer_and_checks_the_grid():
    unet = ldm_like_unet()
    x, context = torch.randn(1, 8, 4, 4, dtype=torch.float64), torch.randn(1, 10, 6, dtype=torch.float64)
    last = unet.output_blocks[1][0]
    with ldm_tsam.LdmCrossAttentionCapture(unet) as capture:
        capture.probabilities(lambda: unet(x, context), (2, 2))
        assert last.runs == 0  # the level-0 output block never ran
        with pytest.raises(RuntimeError, match="expected a 3×3 grid"):
            capture.probabilities(lambda: unet(x, context), (3, 3))


def _targets():
    generator = torch.Generator().manual_seed(3)
    return [
        tsam.chunk_targets([torch.rand(4, 4, generator=generator, dtype=torch.float64).tril()]),
        tsam.chunk_targets([torch.rand(3, 3, generator=generator, dtype=torch.float64).tril()]),
    ]


@pytest.mark.parametrize("loss", ["official", "paper"])
def test_gradient_matches_finite_differences(loss):
    unet = ldm_like_unet()
    z = torch.randn(2, 8, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    context = torch.randn(2, 10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    run_unet = lambda model_input: unet(model_input, context)  # noqa: E731
    targets = _targets()
    with ldm_tsam.alignment_session(unet) as capture:
        _, gradient = tsam_descent.alignment_gradient(capture, run_unet, z, targets, loss)
        direction = torch.randn(z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        epsilon = 1e-6

        def total(model_input):
            return float(tsam_descent.alignment_losses(capture, run_unet, model_input, targets, loss).losses.sum())

        numeric = (total(z + epsilon * direction) - total(z - epsilon * direction)) / (2 * epsilon)
    analytic = float((gradient * direction).sum())
    assert abs(numeric - analytic) <= 1e-3 * abs(analytic)
    assert all(parameter.requires_grad for parameter in unet.parameters())


def test_descent_decreases_the_loss_and_skips_non_finite_images(caplog):
    unet = ldm_like_unet()
    z = torch.randn(2, 8, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    context = torch.randn(2, 10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with ldm_tsam.alignment_session(unet) as capture:
        descent = tsam_descent.descend(capture, lambda m: unet(m, context), z, _targets(), "official",
                                   step_size=20.0, iterations=4)
        assert (descent.losses[-1] < descent.losses[0]).all() and descent.changed.all()
        broken = z.clone()
        broken[1, 0, 0, 0] = float("nan")
        with caplog.at_level(logging.WARNING, logger="seg_tsam"):
            skipped = tsam_descent.descend(capture, lambda m: unet(m, context), broken, _targets(), "official",
                                       step_size=20.0, iterations=1, where="at step 3 ")
    assert skipped.changed.tolist() == [True, False]
    torch.testing.assert_close(skipped.model_input[1], broken[1], rtol=0, atol=0, equal_nan=True)
    assert "non-finite loss or gradient for image 1 at step 3" in caplog.text


# --------------------------------------------------------------------------------------------
# ldm adapter: text side
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_probabilities_equal_torch(batch_first):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, batch_first=batch_first).double().eval()
    tokens = torch.randn(7, 3, 16, dtype=torch.float64)  # (L, N, E)
    query = tokens.transpose(0, 1) if batch_first else tokens
    causal = torch.full((7, 7), float("-inf"), dtype=torch.float64).triu(1)
    _, expected = attention(query, query, query, attn_mask=causal, need_weights=True, average_attn_weights=False)
    ours = ldm_tsam.multihead_attention_probabilities(attention, query, query, causal)
    assert torch.allclose(ours, expected, atol=1e-12)
    # The causal mask is applied even when the call passes none.
    assert torch.allclose(ldm_tsam.multihead_attention_probabilities(attention, query, query), expected, atol=1e-12)


class Chunk:
    def __init__(self, tokens, fixes=()):
        self.tokens, self.multipliers, self.fixes = list(tokens), [1.0] * len(tokens), list(fixes)


class FakeTokenizer:
    def convert_ids_to_tokens(self, token_id):
        return f"t{token_id}</w>"


class FakeEmbedder(nn.Module):
    """The WebUI's prompt-encoder wrapper interface (``tokenize_line``, ``wrapped.transformer``,
    ``hijack.fixes``, ``id_end``/``id_pad``) around the real CLIP text model class."""

    BOS, EOS = 512, 513

    def __init__(self, chunk_ids):
        super().__init__()
        self.wrapped = nn.Module()
        self.wrapped.transformer = tiny_models.tiny_text_encoder()
        self.tokenizer = FakeTokenizer()
        self.hijack = SimpleNamespace(fixes=None)
        self.id_end = self.id_pad = self.EOS
        self.chunk_ids = chunk_ids

    def tokenize_line(self, text):
        chunks = [Chunk([self.BOS, *ids, *[self.EOS] * (76 - len(ids))]) for ids in self.chunk_ids]
        return chunks, sum(len(ids) for ids in self.chunk_ids)


def test_text_target_uses_the_webui_chunks_and_equals_a_direct_computation():
    chunk_ids = [list(range(10, 85)), [7, 8, 9]]  # a 78-token prompt: 75 + 3
    embedder = FakeEmbedder(chunk_ids)
    target = ldm_tsam.text_target([embedder], "ignored", power=3.0)
    assert embedder.hijack.fixes is None
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in embedder.wrapped.transformer.modules())
    assert [chunk.offset for chunk in target.target] == [1, 78]
    assert target.chunk_sizes == (75, 3) and target.labels[:2] == ("t10", "t11") and target.labels[-1] == "t9"
    for chunk, ids in zip(target.target, chunk_ids):
        row = torch.tensor([[512, *ids, *[513] * (76 - len(ids))]])
        with torch.no_grad():
            attentions = embedder.wrapped.transformer(input_ids=row, output_attentions=True).attentions
        mean = torch.stack(attentions).double().mean(dim=(0, 2))[0]  # (77, 77)
        powered = mean[1 : len(ids) + 1, 1 : len(ids) + 1] ** 3
        expected = powered / (powered.sum(dim=-1, keepdim=True) + 1e-7)
        assert torch.allclose(chunk.matrix.double(), expected, atol=1e-6)


def test_two_encoders_are_averaged_and_must_chunk_alike():
    first, second = FakeEmbedder([[5, 6, 7]]), FakeEmbedder([[5, 6, 7]])
    second.wrapped.transformer = tiny_models.tiny_text_encoder(seed=1)
    combined = ldm_tsam.text_target([first, second], "x", power=3.0)
    alone = [ldm_tsam.text_target([e], "x", power=3.0).target[0].matrix for e in (first, second)]
    assert torch.allclose(combined.target[0].matrix, (alone[0] + alone[1]) / 2)
    with pytest.raises(ValueError, match="chunk"):
        ldm_tsam.text_target([first, FakeEmbedder([[5, 6]])], "x", power=3.0)


def test_labels_name_textual_inversion_vectors():
    embedder = FakeEmbedder([[5, 0, 0, 6]])
    chunk = Chunk([512, 5, 0, 0, 6, *[513] * 72], fixes=[(1, SimpleNamespace(name="style", vectors=2))])
    assert text_targets.chunk_labels(ldm_tsam.LdmPromptEncoder(embedder), chunk) == ["t5", "<style>", "<style>", "t6"]


def test_progress_counts_every_latent_update_and_clears_at_the_end():
    """ACTIVE_HALF on 4 steps: steps 0 and 1 update once each (2 updates); the user sees 0/2, 1/2,
    then the text cleared; a Heun run (two calls per step) reports the same."""
    for second_order in (False, True):
        reports: list[str] = []
        generation = ShiftingGeneration(ACTIVE_HALF)
        generation.report = reports.append
        run(generation, second_order)
        assert [text.split(",")[0] for text in reports] == ["T-SAM: 0/2 latent updates", "T-SAM: 1/2 latent updates",
                                                            "T-SAM: 1/2 latent updates", ""], reports
        assert "s left" in reports[1] and reports[-1] == ""
