"""Random-weight SD1 and SDXL checkpoints for the Forge family of WebUIs (test hosts).

Run with the WebUI's own venv python, from the WebUI's root folder:

    python make_tiny_checkpoints.py --out DIR [--only forge-sd1 forge-sdxl] [--seed 0]
    python make_tiny_checkpoints.py --check FILE...      (only run the host's detection)

Building needs a host with Forge's ``backend/`` (Forge Neo, lllyasviel Forge); ``--check`` also
works in reForge (``ldm_patched``). The checkpoints are made of the host's own classes:

* The Forge family does not read a .yaml beside the checkpoint: it recognises the model family
  from the UNet's tensor shapes, then builds the VAE and text encoders from full-size configs it
  ships (``backend/huggingface/<repo>/``) and loads them with ``strict=False``, so undersized
  parts would stay uninitialised. Hence the A1111 tiny checkpoints (64-channel UNet) do not load.
* What detection pins, and so what is kept: SD1 (``SD15``) model_channels 320, context_dim 768,
  convolutional proj_in, no ``label_emb``; SDXL (``SDXL``) model_channels 320, input
  transformer depths exactly [0, 0, 2, 2, 10, 10], context_dim 2048, adm_in_channels 2816, linear
  proj_in. Everything else is free and made small: every level has channel multiplier 1, SD1 has
  two levels with one res block each, the decoder one transformer per block, the middle one.
* VAE (83M), CLIP-L (123M) and SDXL's CLIP-G (695M) keep the shipped configs' full sizes.

The state dicts come from the host's IntegratedUNet2DConditionModel and IntegratedAutoencoderKL
and transformers' CLIP text models; the keys are put into the original (ldm/sgm) layout by the
detected model config's own ``process_*_state_dict_for_saving`` (SDXL's CLIP-G goes to open_clip
layout, as in real SDXL files), so loading takes the same conversion path as a real checkpoint.
Each file is checked with the host's detection before it is written. Weights are saved as fp16;
~70-120 s and ~7 GB of memory on 2 CPU cores for both.
"""

import argparse
import os
import sys
import time

import torch

ROOT = os.getcwd()

# The UNet variants. Keys are IntegratedUNet2DConditionModel's constructor arguments.
UNETS = {
    "forge-sd1": dict(
        family="SD15", repo="runwayml/stable-diffusion-v1-5",
        unet=dict(in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 1], num_res_blocks=[1, 1],
                  transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
                  num_heads=8, num_head_channels=-1, context_dim=768, use_spatial_transformer=True,
                  use_linear_in_transformer=False, adm_in_channels=None),
    ),
    "forge-sdxl": dict(
        family="SDXL", repo="stabilityai/stable-diffusion-xl-base-1.0",
        unet=dict(in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 1, 1], num_res_blocks=[2, 2, 2],
                  transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[1] * 9,
                  transformer_depth_middle=1, num_heads=-1, num_head_channels=64, context_dim=2048,
                  use_spatial_transformer=True, use_linear_in_transformer=True, adm_in_channels=2816,
                  num_classes="sequential"),
    ),
}


def host_kind():
    """neo, forge or reforge, from the folder layout of the current directory."""
    if os.path.isdir(os.path.join(ROOT, "modules_forge", "packages", "huggingface_guess")):
        return "neo"
    if os.path.isdir(os.path.join(ROOT, "repositories", "huggingface_guess")):
        return "forge"
    if os.path.isfile(os.path.join(ROOT, "ldm_patched", "modules", "model_detection.py")):
        return "reforge"
    sys.exit(f"{ROOT} is not the root of Forge Neo, Forge or reForge: run from the WebUI's folder")


def prepare_imports(kind):
    """The hosts' backends parse the command line when imported: give them only the CPU flag."""
    sys.argv = [sys.argv[0], "--cpu" if kind == "neo" else "--always-cpu"]
    sys.path.insert(0, ROOT)
    if kind == "neo":
        sys.path.insert(0, os.path.join(ROOT, "modules_forge", "packages"))
    elif kind == "forge":
        sys.path.insert(0, os.path.join(ROOT, "repositories", "huggingface_guess"))
        sys.path.insert(0, os.path.join(ROOT, "packages_3rdparty"))  # gguf (modules_forge/initialization.py)
    else:  # reForge parses no arguments unless told; its modules_forge/initialization.py does this:
        from ldm_patched.modules import args_parser

        args_parser.args, _ = args_parser.parser.parse_known_args()


def detect(kind, state_dict):
    """The model config the host's own detection picks for state_dict (None if none)."""
    if kind == "reforge":
        from ldm_patched.modules import model_detection

        prefix = model_detection.unet_prefix_from_state_dict(state_dict)
        return model_detection.model_config_from_unet(state_dict, prefix)
    from huggingface_guess import detection

    return detection.model_config_from_unet(state_dict, detection.unet_prefix_from_state_dict(state_dict))


def family(config):
    return type(config).__name__ if config is not None else "nothing"


def give_values(model):
    """Default initialisation, plus: weights left at zero (output projections) get small random
    values, else the network's output would not depend on its input; norm layers get random
    scale and offset (with zero offsets the empty prompt's embedding has mean exactly 0, and the
    WebUIs' emphasis rescaling divides by it); anything left uninitialised is redrawn."""
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor):
                continue
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                weight.normal_(1.0, 0.1)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.1)
            elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not weight.any():
                weight.normal_(0.0, 0.02)
        for name, param in model.named_parameters():
            if not torch.isfinite(param).all() or param.abs().max() > 1e4:
                param.normal_(0.0, 0.02)
    return model.state_dict()


def build(name, kind):
    """The full checkpoint state dict for UNETS[name], in the original key layout."""
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = UNETS[name]
    configs = os.path.join(ROOT, "backend", "huggingface", *spec["repo"].split("/"))

    unet = give_values(IntegratedUNet2DConditionModel(**spec["unet"]))
    unet = {"model.diffusion_model." + k: v for k, v in unet.items()}
    config = detect(kind, unet)  # the UNet alone decides the family
    if family(config) != spec["family"]:
        sys.exit(f"{name}: the UNet is detected as {family(config)}, not {spec['family']}")

    state_dict = config.process_unet_state_dict_for_saving({k[len("model.diffusion_model."):]: v for k, v in unet.items()})
    del unet

    vae = IntegratedAutoencoderKL.from_config(IntegratedAutoencoderKL.load_config(os.path.join(configs, "vae")))
    state_dict.update(config.process_vae_state_dict_for_saving(give_values(vae)))
    del vae

    # Text encoders under the names the model configs use internally (clip_l / clip_g + ".transformer.").
    encoders = {"clip_l": (CLIPTextModel, "text_encoder")}
    if spec["family"] == "SDXL":
        encoders["clip_g"] = (CLIPTextModelWithProjection, "text_encoder_2")
    text = {}
    for short, (cls, folder) in encoders.items():
        model = cls(CLIPTextConfig.from_pretrained(os.path.join(configs, folder)))
        text.update({f"{short}.transformer.{k}": v for k, v in give_values(model).items()})
        del model
    state_dict.update(config.process_clip_state_dict_for_saving(text))
    return state_dict


def write(path, state_dict):
    from safetensors.torch import save_file

    tmp = path + ".partial"
    save_file(state_dict, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def check(kind, paths):
    from safetensors.torch import load_file

    expected = {name + ".safetensors": spec["family"] for name, spec in UNETS.items()}
    bad = 0
    for path in paths:
        state_dict = load_file(path)
        got = family(detect(kind, state_dict))
        want = expected.get(os.path.basename(path))
        ok = want is None or got == want
        bad += not ok
        print(f"{path}: {kind} detects {got}" + ("" if ok else f", expected {want}"))
    return 1 if bad else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="folder for forge-sd1.safetensors and forge-sdxl.safetensors")
    parser.add_argument("--only", nargs="+", choices=list(UNETS), help="build only these")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first file (each file: seed + its index)")
    parser.add_argument("--check", nargs="+", metavar="FILE", help="run the host's detection on existing files")
    args = parser.parse_args()
    if bool(args.out) == bool(args.check):
        parser.error("give --out or --check")

    kind = host_kind()
    prepare_imports(kind)
    if args.check:
        return check(kind, args.check)
    if kind == "reforge":
        sys.exit("building needs Forge's backend/ (Forge Neo or Forge); reForge can --check the files")

    os.makedirs(args.out, exist_ok=True)
    for index, name in enumerate(UNETS):  # a file's seed does not depend on --only
        if args.only and name not in args.only:
            continue
        started = time.time()
        torch.manual_seed(args.seed + index)
        state_dict = build(name, kind)
        state_dict = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
        got = family(detect(kind, state_dict))
        if got != UNETS[name]["family"]:
            sys.exit(f"{name}: the whole file is detected as {got}, not {UNETS[name]['family']}; not written")
        path = os.path.join(args.out, name + ".safetensors")
        write(path, state_dict)
        values = sum(v.numel() for v in state_dict.values())
        print(f"{path}: {kind} detects {got}; {len(state_dict)} tensors, {values / 1e6:.0f}M values, "
              f"{os.path.getsize(path) / 2**30:.2f} GiB, {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
