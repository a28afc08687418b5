"""Test-only WebUI extension: lets the live tests see what HTTP alone does not show.

Routes (added only when this folder is linked into the WebUI's ``extensions/`` by the tests):
- ``GET /seg-tsam-probe/state``: hooks on the current UNet's modules, instance-level ``forward``
  replacements anywhere in the model, and a fingerprint (hash
  of the bytes of a fixed plain UNet forward), to prove the model is untouched;
- ``POST /seg-tsam-probe/reset`` and ``GET /seg-tsam-probe/denoised``: the denoised output of
  every CFG step since the reset (recorded with ``on_cfg_after_cfg``), to compare two paths.
"""

import hashlib

import torch
from modules import devices, script_callbacks, shared

_denoised = []


def _record(params):
    _denoised.append(params.x.detach().float().cpu().clone())


def _unet():
    return shared.sd_model.model.diffusion_model


def _hook_count():
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in _unet().modules())


def _forward_overrides():
    """Modules of the whole model whose ``forward`` is replaced on the instance (not the class)."""
    return sum("forward" in module.__dict__ for module in shared.sd_model.modules())


def _fingerprint():
    """Hash of a fixed forward of the UNet (plain call, no denoiser), bit-exact."""
    unet = _unet()
    generator = torch.Generator("cpu").manual_seed(0)
    context_dim = shared.sd_model.cond_stage_model_empty_prompt
    context_dim = (context_dim["crossattn"] if isinstance(context_dim, dict) else context_dim).shape[-1]
    x = torch.randn(2, 4, 9, 7, generator=generator)
    context = torch.randn(2, 77, context_dim, generator=generator)
    kwargs = {}
    if getattr(unet, "num_classes", None) == "sequential":
        kwargs["y"] = torch.randn(2, unet.label_emb[0][0].in_features, generator=generator)  # SDXL's vector
    kwargs = {key: value.to(devices.device, devices.dtype_unet) for key, value in kwargs.items()}
    with torch.no_grad():
        out = unet(x.to(devices.device, devices.dtype_unet), torch.tensor([500, 200], device=devices.device),
                   context=context.to(devices.device, devices.dtype_unet), **kwargs)
    return hashlib.sha256(out.float().cpu().numpy().tobytes()).hexdigest()


def _routes(demo, app):
    @app.get("/seg-tsam-probe/state")
    def state():
        return {"unet_hooks": _hook_count(), "forward_overrides": _forward_overrides(), "fingerprint": _fingerprint(),
                "checkpoint": shared.sd_model.sd_checkpoint_info.name_for_extra}

    @app.post("/seg-tsam-probe/reset")
    def reset():
        _denoised.clear()
        return {}

    @app.get("/seg-tsam-probe/denoised")
    def denoised():
        return {"steps": [step.tolist() for step in _denoised]}


script_callbacks.on_cfg_after_cfg(_record)
script_callbacks.on_app_started(_routes)
