"""``./dev run``: generate an image with SEG through diffusers and write a PNG.

With no ``--model`` it uses a tiny random-weight SD1.x pipeline built on the spot (the image
is noise, but the whole path runs offline); otherwise a hub id, a diffusers folder or a
single ``.safetensors`` checkpoint (SD1.x/SD2.x or SDXL, detected from its keys).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .adapters.diffusers.pipeline import generate
from .core.settings import SegSettings, SettingsError
from .core.tsam import TsamSettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="./dev run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub id, diffusers folder or .safetensors file (default: tiny random model)")
    parser.add_argument("--prompt", default="a photo of a cat sitting on a wooden table")
    parser.add_argument("--negative", default="")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cfg", type=float, default=5.0, help="CFG scale; ≤ 1 disables CFG (SEG alone)")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's native size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seg-scale", default=3.0, help="SEG scale s (default 3)")
    parser.add_argument("--sigma", default="inf", help="blur σ in tokens, or 'inf' for the mean query (default)")
    parser.add_argument("--layers", default="mid", help="e.g. mid, down,up or d4,d5,m0-9 (default mid)")
    parser.add_argument("--mode", default="cond", choices=["cond", "uncond"])
    parser.add_argument("--start", type=float, default=0.0, help="active from this fraction of the steps")
    parser.add_argument("--end", type=float, default=1.0, help="active until this fraction of the steps")
    parser.add_argument("--no-seg", action="store_true", help="plain CFG, for comparison")
    parser.add_argument("--tsam", action="store_true", help="also run T-SAM syntactic alignment (official defaults)")
    parser.add_argument("--tsam-strength", default=5.0, help="T-SAM step-size scale (default 5)")
    parser.add_argument("--tsam-loss", default="official", choices=["official", "paper"])
    parser.add_argument("--baseline", help="also write the same image without SEG to this path")
    parser.add_argument("--out", default="seg.png")
    return parser


def load_pipeline(model: str | None, device: torch.device):
    """The pipeline to run: tiny random weights, a single checkpoint file, or ``from_pretrained``."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if model is None:
        from .adapters.diffusers.tiny_models import tiny_sd_pipeline

        return tiny_sd_pipeline().to(device)
    if Path(model).is_file():
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from safetensors import safe_open

        with safe_open(model, framework="pt") as checkpoint:
            is_xl = any(key.startswith("conditioner.embedders.1") for key in checkpoint.keys())
        pipeline_class = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
        return pipeline_class.from_single_file(model, torch_dtype=dtype).to(device)
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model, torch_dtype=dtype).to(device)


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    if text is None:
        return None, None
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--size must look like 768x512, got {text!r}") from None
    return width, height


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        seg = SegSettings(enabled=not args.no_seg, scale=args.seg_scale, sigma=args.sigma, layers=args.layers,
                          mode=args.mode, start=args.start, end=args.end)
        tsam = TsamSettings(enabled=args.tsam, strength=args.tsam_strength, loss=args.tsam_loss)
    except SettingsError as error:
        raise SystemExit(f"invalid setting: {error}") from None
    width, height = parse_size(args.size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(args.model, device)
    common = dict(negative_prompt=args.negative, steps=args.steps, guidance_scale=args.cfg,
                  height=height, width=width, seed=args.seed)
    started = time.perf_counter()
    image = generate(pipe, args.prompt, seg=seg, tsam=tsam, **common)[0]
    elapsed = time.perf_counter() - started
    image.save(args.out)
    label = "SEG off" if args.no_seg else f"SEG {seg.to_dict()}"
    if args.tsam:
        label += f", T-SAM {tsam.to_dict()}"
    print(f"wrote {args.out} ({image.width}x{image.height}, {label}, {elapsed:.1f} s on {device})")
    if args.baseline:
        generate(pipe, args.prompt, seg=None, **common)[0].save(args.baseline)
        print(f"wrote {args.baseline} (same seed, SEG and T-SAM off)")
    if args.model is None:
        print("note: no --model given, so this used a tiny random-weight model; the image is noise", file=sys.stderr)


if __name__ == "__main__":
    main()
