"""Test-only extension for the Forge family (Forge Neo, lllyasviel Forge, reForge): lets the live
tests see what HTTP alone does not show. Imports nothing AUTOMATIC1111-only (no ``sd_hijack``,
no ``ldm``): the UNet is reached through ``shared.sd_model.forge_objects``.

Routes (added only when this folder is linked into the WebUI's ``extensions/`` by the tests):
- ``GET /seg-tsam-probe/state``: torch hooks on the host's UNet modules
  (``forge_objects.unet.model``), instance-level ``forward`` replacements there, a fingerprint
  (sha256 of the bytes of a fixed plain forward of the UNet), a summary of what is set on the
  patchers' ``model_options`` (the current ``forge_objects`` and, where present,
  ``forge_objects_original`` and ``forge_objects_after_applying_lora``), the loaded checkpoint
  and the host;
- ``POST /seg-tsam-probe/reset`` and ``GET /seg-tsam-probe/denoised``: the denoised output of
  every CFG step since the reset (recorded with ``on_cfg_after_cfg``), to compare two paths.
"""

import hashlib
import importlib.util

import torch
from modules import script_callbacks, shared

_denoised = []


def _record(params):
    _denoised.append(params.x.detach().float().cpu().clone())


def _host():
    if importlib.util.find_spec("ldm_patched") is not None:
        return "reforge"
    from modules_forge import forge_version

    return "neo" if getattr(forge_version, "version", "") == "neo" else "forge"


def _kmodel():
    """The host's model behind the UNet patcher (``KModel`` / ``BaseModel``), or None before a model is loaded."""
    objects = getattr(shared.sd_model, "forge_objects", None)
    unet = getattr(objects, "unet", None)
    return getattr(unet, "model", None)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _forward_overrides(model):
    """Modules whose ``forward`` is replaced on the instance (not the class)."""
    return sum("forward" in module.__dict__ for module in model.modules())


def _in_features(module):
    """The input width of the first linear layer in ``module`` (the hosts' own Linear classes
    need not derive from ``torch.nn.Linear``)."""
    return next(m.in_features for m in module.modules() if hasattr(m, "in_features"))


def _fingerprint(kmodel):
    """Hash of a fixed forward of the UNet (plain call: no patcher, no denoiser), bit-exact."""
    unet = kmodel.diffusion_model
    parameter = next(unet.parameters())
    dtype = getattr(kmodel, "computation_dtype", None) or getattr(kmodel, "manual_cast_dtype", None)
    if dtype is None:
        dtype = kmodel.get_dtype() if hasattr(kmodel, "get_dtype") else parameter.dtype
    device = parameter.device
    context_dim = next(m.to_k.in_features for name, m in unet.named_modules() if name.endswith("attn2"))
    generator = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, context_dim, generator=generator)  # SD1 768, SDXL 2048
    kwargs = {}
    if getattr(unet, "num_classes", None) is not None:  # SDXL's vector (2816)
        kwargs["y"] = torch.randn(2, _in_features(unet.label_emb), generator=generator).to(device, dtype)
    timesteps = torch.tensor([500.0, 200.0], device=device)
    with torch.no_grad():
        # transformer_options passed explicitly: the hosts write into it (the default dict is shared)
        out = unet(x.to(device, dtype), timesteps, context=context.to(device, dtype), transformer_options={}, **kwargs)
    return hashlib.sha256(out.float().cpu().numpy().tobytes()).hexdigest()


def _patcher_summary(objects):
    """What is set on a ``forge_objects``' UNet patcher: the one wrapper slot, post-CFG functions, replaces."""
    unet = getattr(objects, "unet", None)
    if unet is None:
        return None
    options = unet.model_options
    transformer = options.get("transformer_options", {})
    replace = transformer.get("patches_replace", {})
    return {
        "model_function_wrapper": options.get("model_function_wrapper") is not None,
        "sampler_cfg_function": options.get("sampler_cfg_function") is not None,
        "sampler_post_cfg_function": len(options.get("sampler_post_cfg_function", [])),
        "sampler_pre_cfg_function": len(options.get("sampler_pre_cfg_function", [])),
        "patches_replace": sorted(f"{kind}:{key}" for kind, entries in replace.items() for key in entries),
        "patches": {kind: len(entries) for kind, entries in sorted(transformer.get("patches", {}).items())},
        "disable_cfg1_optimization": bool(options.get("disable_cfg1_optimization", False)),
    }


def _state():
    model = shared.sd_model
    kmodel = _kmodel()
    info = getattr(model, "sd_checkpoint_info", None)
    state = {"host": _host(), "checkpoint": getattr(info, "name_for_extra", None)}
    if kmodel is None:  # no model loaded yet (Forge and Neo load on the first generation)
        return {**state, "unet_hooks": None, "forward_overrides": None, "fingerprint": None, "patcher": None}
    patcher = {"current": _patcher_summary(model.forge_objects)}
    for key, attribute in (("original", "forge_objects_original"), ("after_lora", "forge_objects_after_applying_lora")):
        objects = getattr(model, attribute, None)
        if objects is not None:
            patcher[key] = _patcher_summary(objects)
    return {**state, "unet_hooks": _hook_count(kmodel), "forward_overrides": _forward_overrides(kmodel),
            "fingerprint": _fingerprint(kmodel), "patcher": patcher}


def _routes(demo, app):
    @app.get("/seg-tsam-probe/state")
    def state():
        return _state()

    @app.post("/seg-tsam-probe/reset")
    def reset():
        _denoised.clear()
        return {}

    @app.get("/seg-tsam-probe/denoised")
    def denoised():
        return {"steps": [step.tolist() for step in _denoised]}


script_callbacks.on_cfg_after_cfg(_record)
script_callbacks.on_app_started(_routes)
