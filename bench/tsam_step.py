"""Cost of T-SAM next to plain sampling (random-weight UNets), measured side by side in one run.

Run from the repository root (no timing assertions; it only prints):

    .venv/bin/python bench/tsam_step.py --models tiny,sd15                 # CPU
    python bench/tsam_step.py --models sd15,sdxl --device cuda            # GPU, fp16 UNet

Per model, timed round-robin (median over ``--repeats`` rounds after ``--warmup``):

- cond fwd: one UNet forward of the cond rows (batch = images), no gradient;
- CFG step: one forward of uncond + cond rows (what a plain sampling step costs);
- T-SAM iter: one ``tsam_update`` iteration: forward with gradient through the coarse
  cross-attention (explicit softmax there only, forward stopped after the last needed layer),
  loss, backward to the UNet input, update.

``iter/cond`` = T-SAM iter / cond fwd. ``schedule`` = (N·CFG step + U·T-SAM iter) / (N·CFG step),
the wall-time ratio of a whole ``--steps``-step generation with the official schedule (U =
updates it makes: 1 per active step plus the refinement loops), composed from the measured parts.
For the tiny model the same ratio is also measured end to end with ``generate`` (``e2e``).
Peak memory: CUDA ``max_memory_allocated`` for the CFG step and the T-SAM iteration (on CPU
not measured: the process RSS says nothing about one step).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_setup import CONFIGS, DEFAULT_SIZE  # also registers the seg_tsam package

from seg_tsam.extension.adapters.diffusers import tiny_models as tm  # noqa: E402
from seg_tsam.extension.adapters.diffusers.conditioning import RowConditioning  # noqa: E402
from seg_tsam.extension.adapters.diffusers.pipeline import generate  # noqa: E402
from seg_tsam.extension.adapters.diffusers.tsam import tsam_update  # noqa: E402
from seg_tsam.extension.core import tsam  # noqa: E402


def conditioning(unet, rows: int, tokens: int, device, dtype) -> RowConditioning:
    text = torch.randn(rows, tokens, unet.config.cross_attention_dim, device=device, dtype=dtype)
    if unet.config.addition_embed_type != "text_time":
        return RowConditioning(text)
    pooled_dim = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
    return RowConditioning(text, torch.randn(rows, pooled_dim, device=device, dtype=dtype),
                           torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * rows, device=device, dtype=dtype))


def random_target(prompt_tokens: int) -> tsam.PromptTarget:
    """A causal, row-normalised T over ``prompt_tokens`` tokens (its values do not change the cost)."""
    matrix = torch.rand(prompt_tokens, prompt_tokens).tril() + 1e-3
    return tsam.chunk_targets([matrix / matrix.sum(-1, keepdim=True)])


def median_times(variants: dict, repeats: int, warmup: int, sync) -> dict[str, float]:
    times = {name: [] for name in variants}
    for round_index in range(warmup + repeats):
        names = list(variants)
        for name in names[round_index % len(names):] + names[: round_index % len(names)]:
            sync()
            start = time.perf_counter()
            variants[name]()
            sync()
            if round_index >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_memory(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def end_to_end_ratio(steps: int, settings: tsam.TsamSettings) -> float:
    pipe = tm.tiny_sd_pipeline()
    kwargs = dict(steps=steps, height=128, width=128, output_type="latent", seed=0)

    def timed(**extra) -> float:
        start = time.perf_counter()
        generate(pipe, "a red cat and a blue dog on a table", **kwargs, **extra)
        return time.perf_counter() - start

    timed()  # warm-up
    return timed(tsam=settings) / timed()


def bench_model(name: str, args, device, dtype) -> dict:
    torch.manual_seed(0)
    unet = tm.tiny_unet(CONFIGS[name]).to(device, dtype)
    height, width = args.height or DEFAULT_SIZE[name][device.type == "cuda"], args.width or DEFAULT_SIZE[name][device.type == "cuda"]
    latent = torch.randn(args.batch, 4, height // 8, width // 8, device=device, dtype=dtype)
    cond = conditioning(unet, args.batch, 77, device, dtype)
    both = conditioning(unet, 2 * args.batch, 77, device, dtype)
    targets = [random_target(args.prompt_tokens)] * args.batch
    settings = tsam.TsamSettings(enabled=True)
    timestep = torch.tensor(900, device=device)

    def cond_forward():
        with torch.no_grad():
            unet(latent, timestep, **cond.unet_kwargs())

    def cfg_step():
        with torch.no_grad():
            unet(latent.repeat(2, 1, 1, 1), timestep, **both.unet_kwargs())

    def tsam_iteration():
        tsam_update(unet, latent, timestep, cond, targets, settings, step_size=5.0, iterations=1)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    heavy = name != "tiny" and device.type == "cpu"
    times = median_times({"cond fwd": cond_forward, "CFG step": cfg_step, "T-SAM iter": tsam_iteration},
                         args.repeats or (3 if heavy else 10), 1 if heavy else 2, sync)
    updates = sum(settings.step_plan(step, args.steps).updates for step in range(args.steps))
    schedule = (args.steps * times["CFG step"] + updates * times["T-SAM iter"]) / (args.steps * times["CFG step"])
    return dict(name=name, size=f"{width}×{height}", updates=updates, schedule=schedule, **times,
                mem_cfg=peak_memory(cfg_step, device), mem_tsam=peak_memory(tsam_iteration, device),
                e2e=end_to_end_ratio(args.steps, settings) if name == "tiny" else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,sd15")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 or float16 (default: fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--batch", type=int, default=1, help="images per step")
    parser.add_argument("--prompt-tokens", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50, help="schedule length for the 'schedule' ratio")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    print(f"device {device}, torch {torch.__version__}, {dtype}, {args.threads} threads, batch {args.batch}, "
          f"{args.prompt_tokens} prompt tokens, official schedule over {args.steps} steps")
    rows = [bench_model(name, args, device, dtype) for name in args.models.split(",")]
    print("\n| model | size | cond fwd (ms) | CFG step (ms) | T-SAM iter (ms) | iter/cond | updates | schedule | e2e | peak MiB CFG / T-SAM |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        memory = "n/a" if r["mem_cfg"] is None else f"{r['mem_cfg']:.0f} / {r['mem_tsam']:.0f}"
        e2e = "" if r["e2e"] is None else f"{r['e2e']:.2f}"
        print(f"| {r['name']} | {r['size']} | {r['cond fwd']:.1f} | {r['CFG step']:.1f} | {r['T-SAM iter']:.1f} | "
              f"{r['T-SAM iter'] / r['cond fwd']:.2f} | {r['updates']} | {r['schedule']:.2f} | {e2e} | {memory} |")


if __name__ == "__main__":
    main()
