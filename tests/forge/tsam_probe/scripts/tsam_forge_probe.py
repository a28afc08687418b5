"""Test-only extension for T-SAM on the Forge family: checks that need the host's process.

Install beside this extension (``tests/forge/test_live_forge_tsam.py`` skips these checks
without it). Routes:

- ``GET /tsam-probe/gradient?size=N``: on the loaded model's real UNet (inference weights, the
  host's transformer blocks), T-SAM's pass (``tsam_unet.alignment_session``) against the host:
  the UNet output with every attention replaced vs. the host's own attention, the host's own
  float32 round-off (row 0 of a batch of 2 vs. that row alone), the summed loss, and the analytic
  derivative of the summed loss along its gradient vs. central differences at two step sizes; plus
  whether the weights are the host's inference tensors again afterwards;
- ``GET /tsam-probe/costs?size=N``: parameter bytes, the time to alias the inference weights vs.
  to clone them, the bytes T-SAM's saved-activation copies take and one update's time;
- ``POST /tsam-probe/sampler-mode`` ``{"mode": "noise"|"prehook"|null, "eps": e}``, then a
  generation, then ``GET /tsam-probe/sampler-steps``: with "prehook", T-SAM's own step driver
  (``TsamSteps``) scales the denoiser's ``x`` in place by ``1 + e`` at step 0 and records the steps
  it sees, and whether the sampler's step-0 callback reports the very tensor it updated; with
  "noise", the starting noise is scaled instead. Equal results (or that callback) mean the in-place
  update reached the sampler's own latent.
"""

import sys
import time

import torch
from modules import script_callbacks, scripts, shared

SAMPLER_CHECK = {"mode": None, "eps": 0.0, "steps": [], "callback_got_the_update": False}


def _ours(name):
    return sys.modules[f"seg_tsam.extension.{name}"]


def _inputs(model, size, batch=2):
    """Fixed random inputs for the loaded model's UNet: latent, σ, conditioning keywords."""
    unet = model.diffusion_model
    generator = torch.Generator().manual_seed(0)
    device = next(unet.parameters()).device
    context_dim = next(m.to_k.in_features for n, m in unet.named_modules() if n.endswith("attn2"))
    kwargs = {"c_crossattn": torch.randn(batch, 77, context_dim, generator=generator).to(device)}
    if getattr(unet, "num_classes", None) is not None:  # SDXL's vector
        first = next(m for m in unet.label_emb.modules() if hasattr(m, "in_features"))
        kwargs["y"] = torch.randn(batch, first.in_features, generator=generator).to(device)
    x = torch.randn(batch, 4, size, size, generator=generator).to(device)
    targets = [_ours("core.tsam").chunk_targets([torch.rand(6, 6, generator=generator).tril().to(device)])
               for _ in range(batch)]
    return x, torch.full((batch,), 3.0, device=device), kwargs, targets, generator


def _gradient(size, steps):
    tsam_unet, descent = _ours("adapters.forge.tsam_unet"), _ours("core.tsam_descent")
    copy = _ours("webui.forge_host").TRANSFORMER_BLOCKS_ADD_IN_PLACE
    model = shared.sd_model.forge_objects.unet.model
    unet = model.diffusion_model
    sampling = getattr(model, "predictor", None) or model.model_sampling
    x, sigma, kwargs, targets, _ = _inputs(model, size)
    result = {"inference_weights": all(p.is_inference() for p in unet.parameters()), "copies": copy}
    with torch.inference_mode():
        host = model.apply_model(x, sigma, transformer_options={}, **kwargs)
        # The host's own float32 round-off for this call: row 0 of the batch of 2 against that row alone.
        alone = model.apply_model(x[:1], sigma[:1], transformer_options={}, **{k: v[:1] for k, v in kwargs.items()})
        result["host_batch_roundoff"] = float((host[:1] - alone).abs().max() / alone.abs().max())
        with torch.inference_mode(False):
            c_in = sampling.calculate_input(sigma, torch.ones_like(x)).clone()
            z, sigma, kwargs = x * c_in, sigma.clone(), {k: v.clone() for k, v in kwargs.items()}
        with tsam_unet.alignment_session(unet, copy_saved_activations=copy) as capture:
            def run(model_input):
                return model.apply_model(model_input / c_in, sigma, transformer_options=capture.transformer_options({}),
                                         **kwargs)

            with torch.inference_mode(False):
                options = tsam_unet.PatcherCrossAttentionCapture(unet).transformer_options({})
                replaced = model.apply_model(z / c_in, sigma, transformer_options=options, **kwargs)
                result["replaced_vs_host_max_relative"] = float((replaced - host).abs().max() / host.abs().max())
                alignment, gradient = descent.alignment_gradient(capture, run, z, targets, "paper")
                result["loss"] = float(alignment.losses.sum())
                # Along the gradient: the largest derivative, so float32 losses resolve it.
                direction = gradient / gradient.norm()
                result["analytic"] = float((gradient * direction).sum())
                result["numeric"] = {}
                for epsilon in steps:
                    plus = descent.alignment_losses(capture, run, z + epsilon * direction, targets, "paper")
                    minus = descent.alignment_losses(capture, run, z - epsilon * direction, targets, "paper")
                    result["numeric"][str(epsilon)] = float(plus.losses.sum() - minus.losses.sum()) / (2 * epsilon)
            result["level"], result["layers"] = capture.level, len(capture._recorder.layer_names)
    result["inference_weights_after"] = all(p.is_inference() for p in unet.parameters())
    return result


def _costs(size):
    tsam_unet, descent = _ours("adapters.forge.tsam_unet"), _ours("core.tsam_descent")
    model = shared.sd_model.forge_objects.unet.model
    unet = model.diffusion_model
    parameters = list(unet.parameters())
    sampling = getattr(model, "predictor", None) or model.model_sampling
    x, sigma, kwargs, targets, _ = _inputs(model, size, batch=1)
    result = {"parameter_MB": round(sum(p.numel() * p.element_size() for p in parameters) / 2**20, 1),
              "inference_weights": all(p.is_inference() for p in parameters)}
    with torch.inference_mode():
        start = time.perf_counter()
        with tsam_unet.autograd_parameters(unet) as replaced:
            result["aliased"] = replaced
        result["alias_ms"] = round((time.perf_counter() - start) * 1000, 1)
        with torch.inference_mode(False):
            start = time.perf_counter()
            clones = [p.clone() for p in parameters]
            result["clone_ms"] = round((time.perf_counter() - start) * 1000, 1)
            del clones
            c_in = sampling.calculate_input(sigma, torch.ones_like(x)).clone()
            z, sigma, kwargs = x * c_in, sigma.clone(), {k: v.clone() for k, v in kwargs.items()}
        with tsam_unet.alignment_session(unet, copy_saved_activations=False) as capture:
            def run(model_input):
                return model.apply_model(model_input / c_in, sigma, transformer_options=capture.transformer_options({}),
                                         **kwargs)

            with torch.inference_mode(False), tsam_unet.saved_activation_copies() as copies:
                start = time.perf_counter()
                descent.alignment_gradient(capture, run, z, targets, "official")
                result["update_ms"] = round((time.perf_counter() - start) * 1000, 1)
        result["saved_activation_copies_MB"] = round(copies.bytes / 2**20, 2)
    return result


class SamplerCheck(scripts.Script):
    def title(self):
        return "T-SAM probe sampler check"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process_before_every_sampling(self, p, *args, **kwargs):
        mode = SAMPLER_CHECK["mode"]
        if mode == "noise":
            kwargs["x"].mul_(1 + SAMPLER_CHECK["eps"])
        elif mode == "prehook" and not getattr(p, "is_hr_pass", False):
            settings = _ours("core.tsam").TsamSettings(enabled=True, active_fraction=1.0, refinement_steps="none")
            generation = _scaling_class()(settings, reconstruct_cond=None)
            generation.__enter__()
            generation.attach(p.sampler, [[""]] * p.batch_size)
            p.tsam_probe_generation = generation

    def postprocess(self, p, processed, *args):
        generation = getattr(p, "tsam_probe_generation", None)
        if generation is not None:
            generation.__exit__(None, None, None)


def _scaling_class():
    class Scaling(_ours("adapters.tsam_steps").TsamSteps):
        def aligned_latent(self, denoiser, x, sigma, cond, image_cond, *, step, total, step_size, iterations):
            SAMPLER_CHECK["steps"].append(step)
            if step == 0:
                self.updated = x
            return x * (1 + SAMPLER_CHECK["eps"]) if step == 0 else None

        def _count_steps(self, sampler):
            super()._count_steps(sampler)
            counting = sampler.callback_state

            def callback_state(d):
                if int(d["i"]) == 0 and d.get("x") is getattr(self, "updated", None):
                    SAMPLER_CHECK["callback_got_the_update"] = True
                return counting(d)

            sampler.callback_state = callback_state
            self._stack.callback(setattr, sampler, "callback_state", counting)  # then T-SAM's own restore runs

    return Scaling


def _routes(demo, app):
    @app.get("/tsam-probe/gradient")
    def gradient(size: int = 8, steps: str = "4,2,1"):
        return _gradient(size, [float(step) for step in steps.split(",")])

    @app.get("/tsam-probe/costs")
    def costs(size: int = 8):
        return _costs(size)

    @app.post("/tsam-probe/sampler-mode")
    def sampler_mode(body: dict):
        SAMPLER_CHECK.update(mode=body.get("mode"), eps=float(body.get("eps", 0.0)), steps=[],
                             callback_got_the_update=False)
        return {}

    @app.get("/tsam-probe/sampler-steps")
    def sampler_steps():
        return {"steps": SAMPLER_CHECK["steps"], "callback_got_the_update": SAMPLER_CHECK["callback_got_the_update"]}


script_callbacks.on_app_started(_routes)
