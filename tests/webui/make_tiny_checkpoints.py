"""Build tiny random-weight SD1, SDXL and SD2 (v-prediction) checkpoints for WebUI integration tests.

Real Stable Diffusion checkpoints are gigabytes and cannot be downloaded here, yet the
WebUI only needs a state dict that matches a model config. This script takes the WebUI's own
configs (``configs/v1-inference.yaml`` for SD1, generative-models'
``configs/inference/sd_xl_base.yaml`` for SDXL, stablediffusion's
``configs/stable-diffusion/v2-inference-v.yaml`` for SD2), shrinks them, instantiates the
models with ldm's / sgm's ``instantiate_from_config`` and writes

    OUT/tiny-sd1.safetensors   + OUT/tiny-sd1.yaml
    OUT/tiny-sdxl.safetensors  + OUT/tiny-sdxl.yaml
    OUT/tiny-sd2v.safetensors  + OUT/tiny-sd2v.yaml

The WebUI uses a ``.yaml`` lying next to a checkpoint as that checkpoint's config, so they
load as ordinary SD1 / SDXL / SD2 models (``is_sd1`` / ``is_sdxl`` / ``is_sd2``). tiny-sd2v
keeps the SD2 config's ``parameterization: "v"``, so the WebUI samples it with the
v-prediction denoisers (k-diffusion's ``CompVisVDenoiser``, ``CompVisTimestepsVDenoiser``
for DDIM/PLMS/UniPC).

What is shrunk, and what is kept on purpose:
  * UNet: 64 channels, 2 levels, 1 res block per level, but SpatialTransformers at both
    levels and in the middle block (attn1/attn2 everywhere a real model has them). The SDXL
    UNet has transformer_depth [1, 2] (middle block depth 2), so a level and "mid" hold
    several attn1 modules, as in the real SDXL.
  * Autoencoder: 32 base channels but still 4 levels (the WebUI assumes a factor of 8).
  * SD1 text encoder and SDXL's first one: the real CLIP ViT-L/14 text model shape (its
    tokenizer and config come from the offline HF cache), with random weights.
  * SDXL's second text encoder: open_clip's small ``ViT-S-32-alt`` text tower instead of
    ViT-bigG; the UNet's context_dim and adm_in_channels follow from it.
  * SD2's text encoder (ldm's ``FrozenOpenCLIPEmbedder``, penultimate layer): the same small
    ``ViT-S-32-alt`` text tower instead of ViT-H-14, so context_dim is its width (256). The
    UNet keeps SD2's ``use_linear_in_transformer`` and ``num_head_channels`` (32 here).
  * Weights are random (seeded) but not degenerate: see undo_degenerate_init.

Run with the WebUI venv's python from the WebUI root (or pass --webui), with HF_HOME pointing
at the offline cache that holds openai/clip-vit-large-patch14's tokenizer files and config:

    python make_tiny_checkpoints.py --out DIR [--webui WEBUI_ROOT] [--seed 0] [--only NAME ...]

Each checkpoint gets its own seed (--seed plus its position in MODELS), so building a subset
with --only gives the same files as building all of them.
"""

import argparse
import os
import sys
from unittest import mock

import torch
from omegaconf import OmegaConf

# Small open_clip architecture standing in for ViT-bigG (SDXL's second encoder) and ViT-H (SD2).
SMALL_OPEN_CLIP = "ViT-S-32-alt"


def shrink_autoencoder(ddconfig):
    ddconfig.ch = 32
    ddconfig.ch_mult = [1, 1, 2, 2]  # 4 levels: latents stay 1/8 of the image size
    ddconfig.num_res_blocks = 1


def shrink_unet(unet):
    unet.model_channels = 64
    unet.channel_mult = [1, 2]
    unet.num_res_blocks = 1
    unet.attention_resolutions = [1, 2]  # a SpatialTransformer at both levels


def sd1_config(root):
    cfg = OmegaConf.load(os.path.join(root, "configs", "v1-inference.yaml"))
    unet = cfg.model.params.unet_config.params
    shrink_unet(unet)
    unet.num_heads = 8
    unet.transformer_depth = 1
    shrink_autoencoder(cfg.model.params.first_stage_config.params.ddconfig)
    return cfg


def sdxl_config(root):
    import open_clip

    path = os.path.join(root, "repositories", "generative-models", "configs", "inference", "sd_xl_base.yaml")
    cfg = OmegaConf.load(path)
    embedders = cfg.model.params.conditioner_config.params.emb_models
    clip_g = embedders[1].params
    clip_g.arch = SMALL_OPEN_CLIP
    clip_g.version = None  # no pretrained tag: nothing to download
    arch = open_clip.get_model_config(SMALL_OPEN_CLIP)

    unet = cfg.model.params.network_config.params
    shrink_unet(unet)
    unet.num_head_channels = 32
    unet.transformer_depth = [1, 2]  # the middle block takes the last value: 2
    # Cross-attention context: CLIP-L hidden states (768) concatenated with the second
    # encoder's penultimate layer. Vector conditioning: its pooled output plus the size and
    # crop embeddings (two numbers each, `outdim` channels per number).
    unet.context_dim = 768 + arch["text_cfg"]["width"]
    size_embeddings = sum(2 * e.params.outdim for e in embedders if e.target.endswith("ConcatTimestepEmbedderND"))
    unet.adm_in_channels = arch["embed_dim"] + size_embeddings
    shrink_autoencoder(cfg.model.params.first_stage_config.params.ddconfig)
    return cfg


def sd2v_config(root):
    import open_clip

    path = os.path.join(root, "repositories", "stable-diffusion-stability-ai", "configs", "stable-diffusion", "v2-inference-v.yaml")
    cfg = OmegaConf.load(path)
    assert cfg.model.params.parameterization == "v", path
    encoder = cfg.model.params.cond_stage_config
    assert encoder.target.endswith(".FrozenOpenCLIPEmbedder"), encoder.target
    encoder.params.arch = SMALL_OPEN_CLIP
    encoder.params.version = None  # no pretrained tag: nothing to download
    arch = open_clip.get_model_config(SMALL_OPEN_CLIP)

    unet = cfg.model.params.unet_config.params
    shrink_unet(unet)
    unet.num_head_channels = 32  # SD2 sets head size, not head count: 2 heads, then 4
    unet.transformer_depth = 1
    assert unet.use_linear_in_transformer
    unet.context_dim = arch["text_cfg"]["width"]  # the encoder's penultimate hidden states
    shrink_autoencoder(cfg.model.params.first_stage_config.params.ddconfig)
    return cfg


def clip_text_model_from_config_only():
    """Make CLIPTextModel.from_pretrained build a randomly initialised model from the
    cached config instead of loading (unavailable) pretrained weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    def from_config(cls, name, *args, **kwargs):
        return cls(CLIPTextConfig.from_pretrained(name))

    return mock.patch.object(CLIPTextModel, "from_pretrained", classmethod(from_config))


def undo_degenerate_init(model):
    """Fresh initialisation leaves two things no trained model has, and the WebUI trips on both:
    * the UNet zero-initialises its output convolutions and the transformers' proj_out, so
      it would predict exactly zero: give those layers default random weights;
    * every LayerNorm has bias 0, so a text encoder's output has mean exactly 0 for the empty
      prompt, and the WebUI's prompt-emphasis rescaling (divide by the mean) makes NaNs:
      give all normalisation layers random scales and offsets."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and not module.weight.any():
            module.reset_parameters()
        elif isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and module.weight is not None:
            with torch.no_grad():
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)


def build(cfg, instantiate_from_config):
    with clip_text_model_from_config_only():
        model = instantiate_from_config(cfg.model)
    undo_degenerate_init(model)
    return model, model.model.diffusion_model  # ldm and sgm wrap the UNet the same way


def save(model, cfg, out_dir, name):
    from safetensors.torch import save_file

    state_dict = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state_dict, os.path.join(out_dir, name + ".safetensors"))
    OmegaConf.save(cfg, os.path.join(out_dir, name + ".yaml"))
    params = sum(v.numel() for v in state_dict.values())
    print(f"{name}: {len(state_dict)} tensors, {params / 1e6:.1f}M values")


# name -> (config builder, which package's instantiate_from_config). The order fixes the seeds.
MODELS = {
    "tiny-sd1": (sd1_config, "ldm"),
    "tiny-sdxl": (sdxl_config, "sgm"),
    "tiny-sd2v": (sd2v_config, "ldm"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for the checkpoints and YAMLs")
    parser.add_argument("--webui", default=os.getcwd(), help="WebUI root (default: current directory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", choices=list(MODELS), metavar="NAME",
                        help=f"build only these ({', '.join(MODELS)}; default: all)")
    args = parser.parse_args()

    root = os.path.abspath(args.webui)
    sys.path[:0] = [
        os.path.join(root, "repositories", "stable-diffusion-stability-ai"),
        os.path.join(root, "repositories", "generative-models"),
    ]
    # ldm imports a module that newer pytorch_lightning releases moved; the WebUI aliases it too.
    import pytorch_lightning.utilities.rank_zero

    sys.modules.setdefault("pytorch_lightning.utilities.distributed", pytorch_lightning.utilities.rank_zero)
    import ldm.util
    import sgm.util

    instantiators = {"ldm": ldm.util.instantiate_from_config, "sgm": sgm.util.instantiate_from_config}
    os.makedirs(args.out, exist_ok=True)
    for index, (name, (make_config, package)) in enumerate(MODELS.items()):
        if args.only and name not in args.only:
            continue
        torch.manual_seed(args.seed + index)
        cfg = make_config(root)
        model, unet = build(cfg, instantiators[package])
        attn1 = [n for n, _ in unet.named_modules() if n.endswith("attn1")]
        print(f"{name}: UNet attn1 modules: {', '.join(attn1)}")
        save(model, cfg, args.out, name)


if __name__ == "__main__":
    main()
