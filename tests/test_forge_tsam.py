"""T-SAM's Forge-family adapter (Forge Neo, Forge, reForge), without a WebUI.

The hosts' own code is exercised only by the live Forge suites. Here the adapter's pieces are
checked against independent references:

- the inference-weight aliases and the saved-activation copies against the same computation on a
  normal copy of the module, written out of place;
- plain attention and the recorded probabilities against a per-head softmax loop;
- the CLIP self-attention read by pre-hooks against transformers' own ``output_attentions``;
- the whole update through a small UNet that follows the hosts' calling conventions (ComfyUI-style
  ``transformer_options`` with ``block``/``block_index`` and ``patches_replace``, residual ``x += n``
  after ``LayerNorm``, a default attention kernel without backward, weights loaded under inference
  mode, a ``KModel``-like ``apply_model`` that scales its input itself) against finite differences.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seg_tsam.extension.adapters import text_targets
from seg_tsam.extension.adapters.diffusers import tiny_models
from seg_tsam.extension.adapters.forge import tsam_sampling, tsam_text, tsam_unet
from seg_tsam.extension.adapters.forge.tsam_sampling import ForgeTsamGeneration
from seg_tsam.extension.adapters.text_attention import recorded_self_attention
from seg_tsam.extension.adapters.unet_layers import cross_attention_layers
from seg_tsam.extension.core import tsam, tsam_descent
from seg_tsam.extension.core.attention_capture import explicit_attention
from seg_tsam.extension.core.tsam import TsamSettings

# --------------------------------------------------------------------------------------------
# A UNet with the hosts' calling conventions
# --------------------------------------------------------------------------------------------


class FusedWithoutBackward(torch.autograd.Function):
    """Stands for a host attention kernel that has no backward (sage, flash, …)."""

    @staticmethod
    def forward(ctx, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("this attention kernel has no backward")


class CrossAttention(nn.Module):
    def __init__(self, dim, context_dim, heads=2):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        split = lambda t: t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        out = FusedWithoutBackward.apply(split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context)))
        return self.to_out(out.transpose(1, 2).reshape(x.shape))


class BasicTransformerBlock(nn.Module):
    """Forge Neo's/Forge's block: replacements looked up by ``(block, number, depth)``, then the
    residual added **in place** after ``LayerNorm`` saved ``x``."""

    def __init__(self, dim, context_dim, heads=2):
        super().__init__()
        self.n_heads = heads
        self.attn1, self.attn2 = CrossAttention(dim, dim, heads), CrossAttention(dim, context_dim, heads)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def _attention(self, kind, n, context, options):
        block = options.get("block")
        key = (block[0], block[1], options.get("block_index", 0))
        module = getattr(self, kind)
        replace = options.get("patches_replace", {}).get(kind, {})
        if key in replace:
            extra = {k: v for k, v in options.items() if k not in ("patches", "patches_replace")} | {"n_heads": self.n_heads}
            return module.to_out(replace[key](module.to_q(n), module.to_k(context), module.to_v(context), extra))
        return module(n, context)

    def forward(self, x, context, transformer_options):
        n = self.norm1(x)
        n = self._attention("attn1", n, n, transformer_options)
        x += n
        n = self._attention("attn2", self.norm2(x), context, transformer_options)
        x += n
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, dim, context_dim, depth=1):
        super().__init__()
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim, context_dim) for _ in range(depth)])
        self.runs = 0

    def forward(self, h, context, options):
        self.runs += 1
        batch, channels, height, width = h.shape
        x = self.proj_in(h).flatten(2).transpose(1, 2)  # (B, h·w, C)
        for index, block in enumerate(self.transformer_blocks):
            options["block_index"] = index
            x = block(x, context, options)
        return h + x.transpose(1, 2).reshape(batch, channels, height, width)


class Downsample(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.op = nn.Conv2d(dim, dim, 3, stride=2, padding=1)

    def forward(self, h, context, options):
        return self.op(h)


class Upsample(nn.Module):
    def __init__(self):
        super().__init__()
        self.size = None

    def forward(self, h, context, options):
        return F.interpolate(h, size=self.size, mode="nearest")


class TimestepSequential(nn.ModuleList):
    def forward(self, h, context, options):
        for layer in self:
            h = layer(h, context, options)
        return h


class PatcherUNet(nn.Module):
    """Levels 0, 1, 2 in; middle at 2 (depth 2); out 2, 1 (with upsamplings). ``forward`` writes
    ``block`` into the options it gets, like the hosts' UNets."""

    def __init__(self, dim=8, context_dim=6):
        super().__init__()
        self.conv_in = nn.Conv2d(4, dim, 3, padding=1)
        self.input_blocks = nn.ModuleList([
            TimestepSequential([SpatialTransformer(dim, context_dim)]),
            TimestepSequential([Downsample(dim)]),
            TimestepSequential([SpatialTransformer(dim, context_dim)]),
            TimestepSequential([Downsample(dim)]),
            TimestepSequential([SpatialTransformer(dim, context_dim)]),
        ])
        self.middle_block = TimestepSequential([SpatialTransformer(dim, context_dim, depth=2)])
        self.output_blocks = nn.ModuleList([
            TimestepSequential([SpatialTransformer(dim, context_dim), Upsample()]),
            TimestepSequential([SpatialTransformer(dim, context_dim), Upsample()]),
            TimestepSequential([SpatialTransformer(dim, context_dim)]),
        ])
        self.conv_out = nn.Conv2d(dim, 4, 3, padding=1)

    def forward(self, x, timesteps, context, transformer_options):
        options = transformer_options
        h = self.conv_in(x) * (1 + timesteps.view(-1, 1, 1, 1) / 1000)
        sizes = []
        for number, block in enumerate(self.input_blocks):
            options["block"] = ("input", number)
            sizes.append(h.shape[-2:])
            h = block(h, context, options)
        options["block"] = ("middle", 0)
        h = self.middle_block(h, context, options)
        self.output_blocks[0][1].size, self.output_blocks[1][1].size = sizes[3], sizes[1]
        for number, block in enumerate(self.output_blocks):
            options["block"] = ("output", number)
            h = block(h, context, options)
        return self.conv_out(h)


class Predictor:
    """An eps predictor: ``calculate_input`` scales by ``1/sqrt(σ² + σ_data²)``."""

    sigma_data = 1.0

    def calculate_input(self, sigma, noise):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1))
        return noise / (sigma**2 + self.sigma_data**2) ** 0.5

    def timestep(self, sigma):
        return sigma * 10

    def calculate_denoised(self, sigma, output, x):
        return x - output * sigma.view(-1, 1, 1, 1)


class KModel(nn.Module):
    """The hosts' ``apply_model(x, σ, c_crossattn=…, transformer_options=…)``: scales x itself."""

    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet
        self.predictor = Predictor()
        self.calls = 0

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        self.calls += 1
        xc = self.predictor.calculate_input(t, x)
        out = self.diffusion_model(xc, self.predictor.timestep(t), c_crossattn, transformer_options)
        return self.predictor.calculate_denoised(t, out, x)


def patcher_unet(dtype=torch.float64, inference=False) -> PatcherUNet:
    torch.manual_seed(0)
    unet = PatcherUNet().to(dtype)
    if inference:  # the hosts move the model under inference mode: its weights become inference tensors
        with torch.inference_mode():
            unet = unet.to(torch.float64 if dtype == torch.float32 else torch.float32).to(dtype)  # lossless
    return unet.eval().requires_grad_(False)


def _fingerprint(unet, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 7, 5, generator=generator, dtype=dtype)
    context = torch.randn(2, 10, 6, generator=generator, dtype=dtype)
    with torch.no_grad():
        return unet(x, torch.tensor([300.0, 30.0], dtype=dtype), context, {})


# --------------------------------------------------------------------------------------------
# The UNet pass: keys, plain attention, inference weights, in-place additions
# --------------------------------------------------------------------------------------------


def test_replacement_keys_are_the_hosts_block_numbers_and_depths():
    key = tsam_unet.attention_replace_key
    assert key("input_blocks.7.1.transformer_blocks.0.attn2") == ("input", 7, 0)
    assert key("middle_block.1.transformer_blocks.9.attn1") == ("middle", 0, 9)
    assert key("output_blocks.11.1.transformer_blocks.2.attn2") == ("output", 11, 2)
    with pytest.raises(ValueError):
        key("out.2.attn2")
    names = tsam_unet.transformer_attention_names(patcher_unet())
    assert len(names["attn1"]) == len(names["attn2"]) == 8
    assert "middle_block.0.transformer_blocks.1.attn2" in names["attn2"]


def _per_head_softmax(q, k, v, heads):
    """Independent reference: one head at a time, the softmax written out."""
    batch, queries, inner = q.shape
    d = inner // heads
    outs, probabilities = [], []
    for head in range(heads):
        columns = slice(head * d, (head + 1) * d)
        scores = q[..., columns] @ k[..., columns].transpose(-1, -2) / math.sqrt(d)
        weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        weights = weights / weights.sum(dim=-1, keepdim=True)
        probabilities.append(weights)
        outs.append(weights @ v[..., columns])
    return torch.cat(outs, dim=-1), torch.stack(probabilities, dim=1)


def test_plain_and_explicit_attention_equal_a_per_head_softmax():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 12, 8, generator=generator, dtype=torch.float64)
    k, v = torch.randn(2, 77, 8, generator=generator, dtype=torch.float64), torch.randn(2, 77, 8, generator=generator,
                                                                                         dtype=torch.float64)
    reference_out, reference_probabilities = _per_head_softmax(q, k, v, heads=2)
    assert torch.allclose(tsam_unet.plain_attention(q, k, v, 2), reference_out, atol=1e-12)
    out, probabilities = explicit_attention(q, k, v, 2)
    assert torch.allclose(out, reference_out, atol=1e-12) and torch.allclose(probabilities, reference_probabilities,
                                                                             atol=1e-12)


def test_inference_weights_get_storage_aliases_and_come_back_untouched():
    unet = patcher_unet(inference=True)
    originals = {name: parameter for name, parameter in unet.named_parameters()}
    assert all(parameter.is_inference() for parameter in originals.values())
    before = _fingerprint(unet)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    context = torch.randn(1, 10, 6, dtype=torch.float64)

    def loss():
        return unet.conv_in(x).sum()

    with pytest.raises(RuntimeError, match="Inference tensors"):
        loss().backward()
    with tsam_unet.autograd_parameters(unet) as replaced:
        assert replaced == len(originals)
        for name, parameter in unet.named_parameters():
            assert not parameter.is_inference() and parameter is not originals[name]
            assert parameter.data_ptr() == originals[name].data_ptr()  # the same memory: nothing copied
        (gradient,) = torch.autograd.grad(loss(), x)
    reference = patcher_unet()  # the same weights, loaded normally
    x_ref = x.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference.conv_in(x_ref).sum(), x_ref)
    assert torch.equal(gradient, expected)
    assert all(parameter is originals[name] for name, parameter in unet.named_parameters())
    assert torch.equal(_fingerprint(unet), before)

    with pytest.raises(KeyError):
        with tsam_unet.autograd_parameters(unet):
            raise KeyError("boom")
    assert all(parameter is originals[name] for name, parameter in unet.named_parameters())
    del context


def test_saved_activation_copies_make_in_place_residuals_differentiable():
    """The host block adds in place after LayerNorm saved x: backward fails without copies; with
    them the gradient is that of the same block written out of place."""
    torch.manual_seed(0)
    block = BasicTransformerBlock(8, 6).double()
    options = {"block": ("input", 1), "block_index": 0,
               "patches_replace": {kind: {("input", 1, 0): tsam_unet._plain} for kind in ("attn1", "attn2")}}
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    context = torch.randn(2, 10, 6, dtype=torch.float64)

    def out_of_place(x):
        n = block.norm1(x)
        x = x + block.attn1.to_out(tsam_unet.plain_attention(block.attn1.to_q(n), block.attn1.to_k(n),
                                                             block.attn1.to_v(n), 2))
        n = block.norm2(x)
        x = x + block.attn2.to_out(tsam_unet.plain_attention(block.attn2.to_q(n), block.attn2.to_k(context),
                                                             block.attn2.to_v(context), 2))
        return block.ff(block.norm3(x)) + x

    leaf = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="inplace operation"):
        block(leaf * 1.0, context, dict(options)).sum().backward()
    leaf = x.clone().requires_grad_(True)
    with tsam_unet.saved_activation_copies() as copies:
        out = block(leaf * 1.0, context, dict(options))
    (gradient,) = torch.autograd.grad(out.square().sum(), leaf)
    reference = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(out_of_place(reference).square().sum(), reference)
    assert torch.allclose(gradient, expected, atol=1e-12)
    assert copies.tensors > 0 and copies.bytes > 0


# --------------------------------------------------------------------------------------------
# The capture through the host's options
# --------------------------------------------------------------------------------------------


def test_capture_options_replace_every_attention_and_keep_the_hosts():
    unet = patcher_unet()
    theirs = {("input", 0, 0): "their attn2 patch", ("output", 99, 0): "elsewhere"}
    base = {"patches_replace": {"attn2": theirs}, "patches": {"attn2_patch": ["p"]}, "their_key": 1}
    capture = tsam_unet.PatcherCrossAttentionCapture(unet)
    options = capture.transformer_options(base)
    assert base["patches_replace"]["attn2"] is theirs and theirs[("input", 0, 0)] == "their attn2 patch"
    assert options["patches"] is base["patches"] and options["their_key"] == 1
    assert options["patches_replace"]["attn2"][("output", 99, 0)] == "elsewhere"  # not a block of this UNet
    for kind in ("attn1", "attn2"):
        keys = {tsam_unet.attention_replace_key(n) for n in tsam_unet.transformer_attention_names(unet)[kind]}
        assert keys <= set(options["patches_replace"][kind])
    assert capture.level == 2
    assert [layer.name for layer in cross_attention_layers(unet) if layer.level == 2] == [
        "input_blocks.4.0.transformer_blocks.0.attn2", "middle_block.0.transformer_blocks.0.attn2",
        "middle_block.0.transformer_blocks.1.attn2", "output_blocks.0.0.transformer_blocks.0.attn2"]


def test_capture_records_the_coarse_softmax_keeps_the_output_and_stops_early():
    unet = patcher_unet()
    x = torch.randn(2, 4, 7, 5, dtype=torch.float64)
    context = torch.randn(2, 10, 6, dtype=torch.float64)
    t = torch.tensor([300.0, 30.0], dtype=torch.float64)
    capture = tsam_unet.PatcherCrossAttentionCapture(unet, stop_early=False)
    coarse = [layer.module for layer in cross_attention_layers(unet) if layer.level == 2]
    inputs = {}

    def keep_input(module, args, output):
        inputs[id(module)] = args[0]

    handles = [m.to_q.register_forward_hook(keep_input) for m in coarse]
    with capture, torch.no_grad():
        outputs = []
        probabilities = capture.probabilities(lambda: outputs.append(unet(x, t, context,
                                                                          capture.transformer_options({}))), (2, 2))
    for handle in handles:
        handle.remove()
    expected = [_per_head_softmax(m.to_q(inputs[id(m.to_q)]), m.to_k(context), m.to_v(context), 2)[1].mean(dim=1)
                for m in coarse]
    assert torch.allclose(probabilities, torch.stack(expected).mean(dim=0), atol=1e-12)
    # Plain attention everywhere gives the host's output (its fused kernel is SDPA too).
    assert torch.allclose(outputs[0], unet(x, t, context, {}), atol=1e-12)
    with tsam_unet.PatcherCrossAttentionCapture(unet) as stopping, torch.no_grad():
        last = unet.output_blocks[1][0]
        runs = last.runs
        stopping.probabilities(lambda: unet(x, t, context, stopping.transformer_options({})), (2, 2))
        assert last.runs == runs  # the forward ended after output_blocks.0, the last level-2 layer


def _targets(power=3.0):
    generator = torch.Generator().manual_seed(3)
    return [tsam.chunk_targets([torch.rand(4, 4, generator=generator, dtype=torch.float64).tril()]),
            tsam.chunk_targets([torch.rand(3, 3, generator=generator, dtype=torch.float64).tril()])]


@pytest.mark.parametrize("loss", ["official", "paper"])
def test_gradient_through_inference_weights_matches_finite_differences(loss):
    """The session on a UNet with inference weights, in-place residuals and a kernel without
    backward: the gradient of the summed loss equals central differences."""
    unet = patcher_unet(inference=True)
    before = _fingerprint(unet)
    z = torch.randn(2, 4, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    context = torch.randn(2, 10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([300.0, 30.0], dtype=torch.float64)
    targets = _targets()
    with tsam_unet.alignment_session(unet, copy_saved_activations=True) as capture:
        def run_unet(model_input):
            return unet(model_input, t, context, capture.transformer_options({}))

        _, gradient = tsam_descent.alignment_gradient(capture, run_unet, z, targets, loss)
        direction = torch.randn(z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        epsilon = 1e-6

        def total(model_input):
            return float(tsam_descent.alignment_losses(capture, run_unet, model_input, targets, loss).losses.sum())

        numeric = (total(z + epsilon * direction) - total(z - epsilon * direction)) / (2 * epsilon)
    analytic = float((gradient * direction).sum())
    assert abs(numeric - analytic) <= 1e-4 * abs(analytic)
    assert torch.equal(_fingerprint(unet), before)
    assert all(parameter.is_inference() for parameter in unet.parameters())


# --------------------------------------------------------------------------------------------
# The sampling loop: the update reaches the sampler, in the right space
# --------------------------------------------------------------------------------------------


class Denoiser(nn.Module):
    """The hosts' ``CFGDenoiser.forward`` signature around a ``KModel``: denoised = apply_model(cond)."""

    def __init__(self, model, steps):
        super().__init__()
        self.model, self.steps, self.step = model, steps, 0

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        out = self.model.apply_model(x, sigma, c_crossattn=cond["text"], transformer_options={})
        self.step += 1
        return out


class Sampler:
    def __init__(self, denoiser):
        self.model_wrap_cfg = denoiser
        self.steps_seen = []

    def callback_state(self, d):
        self.steps_seen.append(d["i"])


SIGMAS = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.0], dtype=torch.float64)


def sample_euler(model, x, sigmas, extra_args, callback):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones([x.shape[0]]), **extra_args)
        callback({"x": x, "i": i})
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def reconstruct(cond, step):
    """Two images, one ``AND`` part each (the WebUI's ``reconstruct_multicond_batch``)."""
    return [[(0, 1.0)], [(1, 1.0)]], cond["text"]


def multicond(text):
    schedule = SimpleNamespace(end_at_step=99)
    return {"text": text, "batch": [[SimpleNamespace(schedules=[schedule])]] * text.shape[0]}


class Cond(dict):
    @property
    def batch(self):
        return self["batch"]


def _generation(model, settings, targets=None, copy=True):
    patcher = SimpleNamespace(model=model, model_options={"transformer_options": {"from_the_host": 1}})
    generation = ForgeTsamGeneration(settings, reconstruct_cond=reconstruct, unet_patcher=lambda: patcher,
                                     text_encoders=lambda: [], copy_saved_activations=copy)
    generation._targets = targets or {}
    return generation


def test_update_reaches_the_samplers_latent_under_inference_mode_and_leaves_the_model_as_it_was():
    """A whole generation run under inference mode like the hosts': T-SAM changes the result, the
    weights are the same objects with the same bytes afterwards, no hook is left."""
    unet = patcher_unet(dtype=torch.float32, inference=True)
    before = _fingerprint(unet, torch.float32)
    model = KModel(unet)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, 5, generator=generator)
    text = torch.randn(2, 10, 6, generator=generator)
    settings = TsamSettings(enabled=True, strength=500.0, active_fraction=0.5, refinement_steps="none",
                            loss="paper", power=4.0, show_maps=True)
    target = text_targets.TextTarget(tsam.chunk_targets([torch.rand(5, 5, generator=generator).tril()]),
                                     tuple("abcde"), (5,))

    def run(generation):
        denoiser = Denoiser(model, steps=4)
        sampler = Sampler(denoiser)
        with torch.inference_mode():
            cond = Cond(multicond(text))
            extra = {"cond": cond, "uncond": None, "cond_scale": 1.0, "s_min_uncond": 0.0, "image_cond": None}
            if generation is None:
                return sample_euler(denoiser, x.clone(), SIGMAS.float(), extra, sampler.callback_state), sampler
            with generation:
                generation.attach(sampler, [["prompt"], ["prompt"]])
                return sample_euler(denoiser, x.clone(), SIGMAS.float(), extra, sampler.callback_state), sampler

    plain, _ = run(None)
    generation = _generation(model, settings, {"prompt": target})
    aligned, sampler = run(generation)
    assert generation.steps_aligned == 2 and sampler.steps_seen == [0, 1, 2, 3]
    assert not torch.allclose(aligned, plain, atol=1e-4)
    assert [record.step_before for record in generation.maps] == [0, 0]
    assert [record.step_after for record in generation.maps] == [1, 1]
    assert all(record.loss_after is not None for record in generation.maps)
    assert not sampler.model_wrap_cfg._forward_pre_hooks and "callback_state" not in sampler.__dict__
    assert all(parameter.is_inference() for parameter in unet.parameters())
    assert torch.equal(_fingerprint(unet, torch.float32), before)


def test_the_gradient_step_is_taken_on_the_unet_input_and_mapped_back(monkeypatch):
    """``z = c_in·x`` with ``c_in`` from the model's own ``calculate_input``; ``x' = z'/c_in``."""
    seen = {}

    def fake_descend(capture, run_unet, z, targets, mode, *, step_size, iterations, should_stop, on_iteration, where):
        seen["z"], seen["options"] = z.clone(), capture.transformer_options({"x": 1})
        seen["denoised"] = run_unet(z)
        return tsam_descent.Descent(z - 0.25, torch.tensor([True, False]), z.new_zeros((0, 2)), None)

    monkeypatch.setattr(tsam_descent, "descend", fake_descend)
    model = KModel(patcher_unet())
    calls = []
    model.apply_model = lambda x, t, **kwargs: calls.append((x, t, kwargs)) or x
    target = text_targets.TextTarget((), ())
    generation = _generation(model, TsamSettings(enabled=True), {"a": target})
    generation._image_texts = [["a"], ["a"]]
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    sigma = torch.tensor([14.6, 14.6], dtype=torch.float64)
    denoiser = SimpleNamespace(step=0)
    text = torch.randn(2, 10, 6, dtype=torch.float64)
    updated = generation.aligned_latent(denoiser, x, sigma, Cond(multicond(text)), torch.zeros(2, 5, 1, 1),
                                        step=0, total=4, step_size=3.0, iterations=2)
    c_in = 1 / (14.6**2 + 1) ** 0.5
    assert torch.allclose(seen["z"], x * c_in)
    unet_input, unet_sigma, kwargs = calls[0]
    assert torch.allclose(unet_input, x) and torch.equal(unet_sigma, sigma)  # apply_model scales x itself
    assert torch.equal(kwargs["c_crossattn"], text) and "c_concat" not in kwargs  # (2, 5, 1, 1): not an inpainting model
    options = kwargs["transformer_options"]
    assert options["from_the_host"] == 1 and options["cond_or_uncond"] == [0] and "patches_replace" in options
    assert torch.allclose(updated[0], (x[0] * c_in - 0.25) / c_in)
    assert torch.equal(updated[1], x[1])
    assert updated.dtype == x.dtype


def test_timestep_samplers_feed_the_unet_x_unscaled():
    """DDIM/PLMS: the denoiser gets a timestep and multiplies x by sqrt(σ_t² + 1) before the
    model divides by the same: the UNet input is x itself."""
    alphas_cumprod = torch.linspace(0.9991, 0.0047, 1000, dtype=torch.float64)
    denoiser = SimpleNamespace(classic_ddim_eps_estimation=True,
                               inner_model=SimpleNamespace(inner_model=SimpleNamespace(alphas_cumprod=alphas_cumprod)))
    timesteps = torch.tensor([999.0, 500.2], dtype=torch.float64)
    sigma, scale = tsam_sampling.unet_sigma_and_scale(denoiser, timesteps)
    expected = ((1 - alphas_cumprod[[999, 500]]) / alphas_cumprod[[999, 500]]) ** 0.5
    assert torch.allclose(sigma, expected)
    c_in = Predictor().calculate_input(sigma, torch.ones(2, 1, 1, 1, dtype=torch.float64)).flatten()
    assert torch.allclose(c_in * scale, torch.ones(2, dtype=torch.float64))
    plain = SimpleNamespace()
    assert tsam_sampling.unet_sigma_and_scale(plain, timesteps)[0] is timesteps


def test_conditioning_layouts():
    x = torch.zeros(2, 4, 8, 8)
    text = torch.zeros(2, 77, 8)
    assert tsam_sampling.unet_conditioning(text, torch.zeros(2, 5, 1, 1), x).keys() == {"c_crossattn"}
    inpaint = torch.zeros(2, 5, 8, 8)
    assert tsam_sampling.unet_conditioning(text, inpaint, x)["c_concat"] is inpaint
    sdxl = {"crossattn": text, "vector": torch.zeros(2, 2816)}
    assert tsam_sampling.unet_conditioning(sdxl, None, x) == {"c_crossattn": text, "y": sdxl["vector"]}
    options = tsam_sampling.cond_row_options({"cond_mark": None, "keep": 1}, 2, torch.ones(2))
    assert options["cond_indices"] == [0, 1] and options["uncond_indices"] == [] and options["keep"] == 1
    assert options["cond_mark"].tolist() == [0.0, 0.0] and options["cond_or_uncond"] == [0]
    assert "cond_mark" not in tsam_sampling.cond_row_options({}, 2, torch.ones(2))  # reForge sets none


# --------------------------------------------------------------------------------------------
# Text side
# --------------------------------------------------------------------------------------------


def test_recorded_self_attention_equals_transformers_own_attentions():
    encoder = tiny_models.tiny_text_encoder()
    ids = torch.tensor([[512, 5, 6, 7, *[513] * 73], [512, *range(10, 85), 513]])
    with torch.no_grad():
        expected = encoder(input_ids=ids, output_attentions=True).attentions
        with recorded_self_attention(encoder) as records:
            encoder(input_ids=ids, output_hidden_states=True)
    assert len(records) == len(expected) == 2
    for ours, theirs in zip(records, expected):
        assert torch.allclose(ours, theirs.float(), atol=1e-6)
    assert not any(m._forward_pre_hooks for m in encoder.modules())


class Chunk:
    def __init__(self, tokens, fixes=()):
        self.tokens, self.multipliers, self.fixes = list(tokens), [1.0] * len(tokens), list(fixes)


class ClassicEngine:
    """Forge's ``ClassicTextProcessingEngine`` interface: ``tokenize_line``, ``id_end``/``id_pad``,
    ``embeddings.fixes``, ``encode_with_transformers`` calling the CLIP model its own way."""

    def __init__(self, chunk_ids, pad=513, seed=0):
        self.text_encoder = SimpleNamespace(transformer=tiny_models.tiny_text_encoder(seed=seed))
        self.tokenizer = SimpleNamespace(convert_ids_to_tokens=lambda token: f"t{token}</w>")
        self.embeddings = SimpleNamespace(fixes=None)
        self.id_end, self.id_pad = 513, pad
        self.chunk_ids = chunk_ids
        self.encoded, self.fixes_seen = [], []

    def tokenize_line(self, text):
        return [Chunk([512, *ids, *[513] * (76 - len(ids))]) for ids in self.chunk_ids], 0

    def encode_with_transformers(self, tokens):
        self.encoded.append(tokens)
        self.fixes_seen.append(self.embeddings.fixes)
        return self.text_encoder.transformer(tokens, output_hidden_states=True).hidden_states[-1]


def test_host_encoder_reads_t_through_the_hosts_own_encoding():
    chunk_ids = [list(range(10, 85)), [7, 8, 9]]  # 78 prompt tokens: two chunks
    engine = ClassicEngine(chunk_ids, pad=0)
    encoder = tsam_text.classic_engine_encoder(engine)
    target = text_targets.text_target([encoder], "ignored", power=3.0)
    assert engine.embeddings.fixes is None and engine.fixes_seen == [[[], []]]
    assert engine.encoded[0][1, 5:].tolist() == [0] * 72  # after the EOS: the pad id, as the host encodes
    assert [chunk.offset for chunk in target.target] == [1, 78]
    assert target.chunk_sizes == (75, 3) and target.labels[:2] == ("t10", "t11")
    transformer = engine.text_encoder.transformer
    with torch.no_grad():
        attentions = transformer(input_ids=engine.encoded[0], output_attentions=True).attentions
    mean = torch.stack(attentions).double().mean(dim=(0, 2))  # (chunks, 77, 77)
    for row, (chunk, ids) in enumerate(zip(target.target, chunk_ids)):
        powered = mean[row, 1 : len(ids) + 1, 1 : len(ids) + 1] ** 3
        assert torch.allclose(chunk.matrix.double(), powered / (powered.sum(dim=-1, keepdim=True) + 1e-7), atol=1e-6)
    assert not any(m._forward_pre_hooks for m in transformer.modules())


def test_attach_computes_every_text_once_and_sdxl_averages_its_two_encoders():
    first, second = ClassicEngine([[5, 6, 7]]), ClassicEngine([[5, 6, 7]], seed=1)
    encoders = [tsam_text.classic_engine_encoder(first), tsam_text.classic_engine_encoder(second)]
    loads = []
    generation = ForgeTsamGeneration(TsamSettings(enabled=True), reconstruct_cond=reconstruct,
                                     unet_patcher=lambda: None, text_encoders=lambda: loads.append(1) or encoders,
                                     copy_saved_activations=False)
    sampler = Sampler(Denoiser(None, steps=4))
    with generation:
        generation.attach(sampler, [["a cat", "a dog"], ["a cat"]])
        assert loads == [1] and len(first.encoded) == 2 and set(generation._targets) == {"a cat", "a dog"}
        alone = [text_targets.text_target([encoder], "a cat", power=3.0).target[0].matrix for encoder in encoders]
        assert torch.allclose(generation._targets["a cat"].target[0].matrix, (alone[0] + alone[1]) / 2)
    assert generation._targets == {}
