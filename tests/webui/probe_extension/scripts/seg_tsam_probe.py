"""Test-only WebUI extension: lets the live tests see what HTTP alone does not show.

Routes (added only when this folder is linked into the WebUI's ``extensions/`` by the tests):
- ``GET /seg-tsam-probe/state``: hooks on the current UNet's modules, instance-level ``forward``
  replacements anywhere in the model, and a fingerprint (hash
  of the bytes of a fixed plain UNet forward), to prove the model is untouched;
- ``POST /seg-tsam-probe/reset`` and ``GET /seg-tsam-probe/denoised``: the denoised output of
  every CFG step since the reset (recorded with ``on_cfg_after_cfg``), to compare two paths.
- ``GET /seg-tsam-probe/replacement``: the active "SD Unet" replacement and, for this extension's,
  how many calls ran on the export and on the PyTorch fallback, and the fallback notices;
  ``POST /seg-tsam-probe/release-unet`` deactivates it (``sd_unet.apply_unet("None")``).
- ``POST /seg-tsam-probe/onnx-vs-unet`` ``{"file": "Unet-seg-onnx/…onnx"}``: runs the exported file
  with this extension's ONNX Runtime session, the WebUI's own UNet with SEG's hooks, and a float64
  copy of that UNet with the same hooks, on the same inputs (odd latent, mixed blurred rows, σ 2
  and ∞); returns each pair's largest difference relative to the output's largest value.
- ``POST /seg-tsam-probe/write-lora``: writes a random LoRA/LoCon file (kohya key names, rank 4)
  for the loaded checkpoint's UNet into the WebUI's Lora folder, returns its name for ``<lora:…>``.
- An "SD Unet" option ``[probe] passthrough`` that runs the checkpoint's UNet: a replacement that
  is not this extension's, to test that SEG and T-SAM refuse it clearly.
"""

import copy
import hashlib
import math
import os
import types

import torch
from modules import devices, paths, script_callbacks, sd_hijack, sd_unet, shared

PASSTHROUGH = "[probe] passthrough"

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


def _replacement():
    current = sd_unet.current_unet
    if current is None:
        return {"label": None}
    runtime = getattr(current, "runtime", None)
    counts = {}
    if runtime is not None:
        counts = {"session_calls": runtime.session_calls, "fallback_calls": runtime.fallback_calls,
                  "weight_loads": runtime.weight_loads, "notices": sorted(runtime.notices)}
    return {"label": current.option.label, **counts}


def _example_call(generator, batch, latent):
    unet = _unet()
    context_dim = shared.sd_model.cond_stage_model_empty_prompt
    context_dim = (context_dim["crossattn"] if isinstance(context_dim, dict) else context_dim).shape[-1]
    x = torch.randn(batch, 4, *latent, generator=generator)
    timesteps = torch.linspace(900.0, 30.0, batch)
    context = torch.randn(batch, 77, context_dim, generator=generator)
    extra = {}
    if getattr(unet, "num_classes", None) == "sequential":
        extra["y"] = torch.randn(batch, unet.label_emb[0][0].in_features, generator=generator)
    return x, timesteps, context, extra


def _float64_twin(unet):
    """A float64 copy of the UNet, the reference that measures float32 round-off. ldm/sgm cast to
    float32 in three places (the ``dtype`` attribute, ``GroupNorm32``, the timestep embedding);
    on the copy they keep float64."""
    twin = copy.deepcopy(unet).double()
    twin.dtype = torch.float64
    for module in twin.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.forward = types.MethodType(torch.nn.GroupNorm.forward, module)
    to_double = lambda module, args: tuple(arg.double() for arg in args)  # noqa: E731
    twin.time_embed.register_forward_pre_hook(to_double)
    if hasattr(twin, "label_emb"):
        twin.label_emb.register_forward_pre_hook(to_double)
    return twin


def _onnx_vs_unet(file):
    """The export under ONNX Runtime and the WebUI's float32 UNet (with SEG's hooks), each against
    a float64 evaluation of the same UNet and hooks: the export's error and PyTorch's own."""
    from seg_tsam.export.ort_session import OnnxRuntimeSession
    from seg_tsam.export.unet_runtime import session_inputs
    from seg_tsam.extension.adapters.unet_layers import self_attention_layers
    from seg_tsam.extension.core.query_blur_patch import QueryBlurPatch

    sd_unet.apply_unet("None")
    session = OnnxRuntimeSession(f"{paths.models_path}/{file}")
    unet = _unet()
    twin = _float64_twin(unet)

    def chosen(model):
        return [layer for layer in self_attention_layers(model) if layer.name in session.layer_names]

    generator = torch.Generator("cpu").manual_seed(3)
    errors = {"onnx_vs_float64": 0.0, "pytorch_vs_float64": 0.0, "onnx_vs_pytorch": 0.0}
    for rows, sigma in (([1], 2.0), ([0, 2], math.inf)):
        x, timesteps, context, extra = _example_call(generator, 3, (9, 7))
        with torch.no_grad(), QueryBlurPatch(chosen(unet), session.layer_spec) as patch, patch.blurring(rows, 3, sigma):
            pytorch = unet(x, timesteps, context, **extra)
            onnx = session.run(session_inputs(session, x, timesteps, context, extra, patch.active_blur()))
        with torch.no_grad(), QueryBlurPatch(chosen(twin), session.layer_spec) as patch, patch.blurring(rows, 3, sigma):
            exact = twin(x.double(), timesteps.double(), context.double(), **{k: v.double() for k, v in extra.items()})
        scale = float(exact.abs().max())
        for key, (a, b) in {"onnx_vs_float64": (onnx, exact), "pytorch_vs_float64": (pytorch, exact),
                            "onnx_vs_pytorch": (onnx, pytorch)}.items():
            errors[key] = max(errors[key], float((a.double() - b.double()).abs().max()) / scale)
    return {**errors, "layers": sorted(session.layer_names)}


def _write_lora(rank=4, strength=0.3):
    """LoRA on every transformer-block Linear, LoCon on every resnet Conv2d of the UNet; each
    update ``up @ down`` is about ``strength`` × its weight's standard deviation per element."""
    from safetensors.torch import save_file

    generator = torch.Generator("cpu").manual_seed(7)
    tensors = {}
    for name, module in _unet().named_modules():
        linear = isinstance(module, torch.nn.Linear) and "transformer_blocks" in name
        conv = isinstance(module, torch.nn.Conv2d) and ("in_layers" in name or "out_layers" in name)
        if not (linear or conv):
            continue
        weight = module.weight.detach().float().cpu()
        fan_in = weight[0].numel()
        down = torch.randn(rank, *weight.shape[1:], generator=generator) / math.sqrt(fan_in)
        up = torch.randn(weight.shape[0], rank, *([1, 1] if conv else []), generator=generator)
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.lora_up.weight"] = (up * strength * float(weight.std()) / math.sqrt(rank)).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    lora_name = f"seg_tsam_probe_{shared.sd_model.sd_checkpoint_info.model_name}"
    folder = shared.cmd_opts.lora_dir
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, lora_name + ".safetensors"))
    return {"name": lora_name, "modules": len(tensors) // 3}


class _Passthrough(sd_unet.SdUnet):
    def forward(self, x, timesteps, context, *args, **kwargs):
        original = sd_hijack.sgm_original_forward if shared.sd_model.is_sdxl else sd_hijack.ldm_original_forward
        unet = _unet().to(x.device)
        return original(unet, x, timesteps, context, *args, **kwargs)


class _PassthroughOption(sd_unet.SdUnetOption):
    label = PASSTHROUGH
    model_name = None

    def create_unet(self):
        return _Passthrough()


def _routes_replacement(demo, app):
    @app.get("/seg-tsam-probe/replacement")
    def replacement():
        return _replacement()

    @app.post("/seg-tsam-probe/release-unet")
    def release():
        sd_unet.apply_unet("None")
        return _replacement()

    @app.post("/seg-tsam-probe/write-lora")
    def write_lora():
        return _write_lora()

    @app.post("/seg-tsam-probe/onnx-vs-unet")
    def onnx_vs_unet(body: dict):
        return _onnx_vs_unet(body["file"])


script_callbacks.on_cfg_after_cfg(_record)
script_callbacks.on_app_started(_routes_replacement)
script_callbacks.on_list_unets(lambda options: options.append(_PassthroughOption()))
script_callbacks.on_app_started(_routes)
