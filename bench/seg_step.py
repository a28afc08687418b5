"""Cost of one SEG-guided denoising step next to a plain CFG step (random-weight UNets).

Run from the repository root (no timing assertions; it only prints):

    .venv/bin/python bench/seg_step.py --models tiny,sd15                    # CPU
    python bench/seg_step.py --models sd15,sdxl --device cuda                # GPU, fp16

Each step is ``guided_prediction`` (extension/adapters/diffusers/pipeline.py) on random latents
and random text states, timed round-robin over the variants (the order rotates every round),
median over ``--repeats`` rounds after ``--warmup`` rounds. First table, absolute times in ms:

- CFG: uncond + cond rows, one UNet call, no SEG.
- SEG b. σ=inf / SEG b. σ=S: CFG + SEG with the SEG rows batched into the same UNet call,
  blur σ = inf (the default: mean query) or σ = ``--sigma``.
- SEG b. no blur: the same batched rows and installed hooks, but no rows marked for blurring,
  so every ``to_q`` hook returns at once: the step minus the blur.
- SEG sep.: CFG call plus a separate call for the SEG rows (σ = inf).
Second table, ratios (each the median over rounds of the ratio within a round): ``batched/CFG``
and ``sep./CFG`` are SEG step (σ=inf) over CFG step; ``blur share`` is 1 − t(no blur)/t(batched σ),
the blur's share of a batched SEG step (noise can make it negative); ``blur fn`` is
``blur_queries`` alone on the real per-layer query shapes of the SEG rows, summed over the
selected layers, in ms. The line per model shows the UNet rows of each call and the worst
max/min spread of any variant's timings: a large spread means a busy machine.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch

from bench_setup import CONFIGS, DEFAULT_SIZE, table  # also registers the seg_tsam package

from seg_tsam.extension.adapters.diffusers import tiny_models as tm  # noqa: E402
from seg_tsam.extension.adapters.diffusers.conditioning import RowConditioning  # noqa: E402
from seg_tsam.extension.adapters.diffusers.pipeline import guided_prediction  # noqa: E402
from seg_tsam.extension.adapters.unet_layers import self_attention_layers  # noqa: E402
from seg_tsam.extension.core.blur import blur_queries  # noqa: E402
from seg_tsam.extension.core.layers import select_layers  # noqa: E402
from seg_tsam.extension.core.query_blur_patch import QueryBlurPatch  # noqa: E402
from seg_tsam.extension.core.settings import SegSettings, format_sigma  # noqa: E402


class _NoBlur:
    """Stands in for the patch in ``guided_prediction``: marks no rows, so the hooks stay idle."""

    @contextlib.contextmanager
    def blurring(self, rows, batch: int, sigma: float):
        yield


def elapsed_ms(fn: Callable[[], object], sync: Callable[[], None], inner: int = 1) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    sync()
    return (time.perf_counter() - start) * 1e3 / inner


def bench_model(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    config, heavy_cpu = CONFIGS[name], name != "tiny" and device.type == "cpu"
    repeats = args.repeats or (5 if heavy_cpu else 20)
    warmup = args.warmup if args.warmup is not None else 2 - heavy_cpu
    height = args.height or DEFAULT_SIZE[name][device.type == "cuda"]
    width = args.width or DEFAULT_SIZE[name][device.type == "cuda"]
    if name == "sdxl" and device.type == "cpu" and (not args.allow_cpu_sdxl or height * width > 512 * 512):
        raise SystemExit("sdxl on CPU needs --allow-cpu-sdxl and at most 512×512 pixels")
    unet = tm.tiny_unet(config).to(device)
    if dtype != torch.float32:
        unet = unet.to(dtype)  # random weights: diffusers' "keep in float32" warning does not apply
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    b, dim = args.batch, config["cross_attention_dim"]
    latents, extra = rand(b, 4, height // 8, width // 8), {}
    if config.get("addition_embed_type") == "text_time":
        time_ids = torch.tensor([[height, width, 0, 0, height, width]] * b, device=device, dtype=dtype)
        extra = dict(pooled=rand(b, 1280), time_ids=time_ids)
    cond, uncond = RowConditioning(rand(b, 77, dim), **extra), RowConditioning(rand(b, 77, dim), **extra)
    seg_inf = SegSettings(enabled=True, sigma="inf", layers=args.layers)
    seg_sig = SegSettings(enabled=True, sigma=args.sigma, layers=args.layers)
    sig = f"σ={format_sigma(seg_sig.sigma)}"
    layers = select_layers(self_attention_layers(unet), args.layers)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timestep = torch.tensor(500.0, device=device)

    with torch.inference_mode(), QueryBlurPatch(layers) as patch:
        def step(p, seg, batched=True) -> Callable[[], object]:
            return lambda: guided_prediction(unet, p, latents, timestep, cond, uncond, cfg_scale=7.5, seg=seg,
                                             batch_seg_rows=batched)

        variants = {"CFG": step(None, None), "SEG b. σ=inf": step(patch, seg_inf),
                    f"SEG b. {sig}": step(patch, seg_sig), "SEG b. no blur": step(_NoBlur(), seg_inf),
                    "SEG sep.": step(patch, seg_inf, batched=False)}
        # One untimed pass per variant records the UNet batch of every call (proves the rows ran)
        # and the query shape and token grid of the SEG rows at each selected layer.
        calls, shapes, rows = [], {}, {}
        hooks = [unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))]
        for layer in layers:
            at = shapes.setdefault(layer.name, {})
            hooks.append(layer.grid_source.register_forward_pre_hook(
                lambda m, a, k, at=at: at.update(grid=tuple(a[0].shape[-2:])), with_kwargs=True))
            hooks.append(layer.query_proj.register_forward_hook(
                lambda m, a, out, at=at: at.update(q=(b, *out.shape[1:]))))
        for key, fn in variants.items():
            calls.clear()
            fn()
            rows[key] = "+".join(map(str, calls))
        for hook in hooks:
            hook.remove()
        times: dict[str, list[float]] = {key: [] for key in variants}
        keys = list(variants)
        for round_ in range(warmup + repeats):  # round-robin, the order rotating every round
            for key in keys[round_ % len(keys):] + keys[: round_ % len(keys)]:
                elapsed = elapsed_ms(variants[key], sync)
                if round_ >= warmup:
                    times[key].append(elapsed)
        queries = [(rand(*at["q"]), at["grid"]) for at in shapes.values()]
        blur_fn = []
        for sigma in (seg_inf.sigma, seg_sig.sigma):
            run_blur = lambda: [blur_queries(q, grid, sigma) for q, grid in queries]  # noqa: E731
            run_blur()
            blur_fn.append(statistics.median(elapsed_ms(run_blur, sync, inner=20) for _ in range(5)))
    del unet
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # Ratios pair the variants of one round (run back to back), then take the median over rounds.
    paired = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
    grids = ", ".join(sorted({f"{at['grid'][0]}×{at['grid'][1]}" for at in shapes.values()}))
    print(f"{name}: {height}×{width} px, {len(layers)} SEG layer(s) on grid(s) {grids}, warm-up+repeats "
          f"{warmup}+{repeats}, worst max/min {max(max(v) / min(v) for v in times.values()):.2f}; "
          "UNet rows per call: " + "; ".join(f"{key} {value}" for key, value in rows.items()))
    ms = [f"{statistics.median(times[key]):.1f}" for key in keys]
    ratios = [f"{paired('SEG b. σ=inf', 'CFG'):.3f}", f"{paired('SEG sep.', 'CFG'):.3f}",
              f"{1 - paired('SEG b. no blur', 'SEG b. σ=inf'):+.1%}",
              f"{1 - paired('SEG b. no blur', f'SEG b. {sig}'):+.1%}",
              f"{blur_fn[0]:.3f}", f"{blur_fn[1]:.3f}"]
    return dict(name=name, size=f"{height}×{width}", keys=keys, sig=sig, ms=ms, ratios=ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,sd15", help="comma list of tiny, sd15, sdxl")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                        help="auto: float16 on cuda, float32 on cpu")
    parser.add_argument("--height", type=int, help="pixels; default per model (sd15: 256 on cpu, 512 on cuda)")
    parser.add_argument("--width", type=int)
    parser.add_argument("--batch", type=int, default=1, help="images per step")
    parser.add_argument("--repeats", type=int, help="timed rounds; default 20 (5 for sd15/sdxl on cpu)")
    parser.add_argument("--warmup", type=int, help="untimed rounds; default 2 (1 for sd15/sdxl on cpu)")
    parser.add_argument("--sigma", default="10", help="the finite σ compared with σ=inf")
    parser.add_argument("--layers", default="mid", help="SEG layer spec, e.g. mid or d4,d5,m0-9")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--allow-cpu-sdxl", action="store_true", help="permit sdxl on cpu (≤ 512×512)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype_name = args.dtype if args.dtype != "auto" else ("float16" if device.type == "cuda" else "float32")
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"device {device}{gpu}, torch {torch.__version__}, {dtype_name}, {args.threads} threads, "
          f"batch {args.batch} image(s), layers {args.layers!r}, cfg 7.5, SEG mode cond\n")
    results = [bench_model(name.strip(), args, device, getattr(torch, dtype_name)) for name in args.models.split(",")]
    keys, sig = results[0]["keys"], results[0]["sig"]
    table(["model", "size", *(f"{key} (ms)" for key in keys)], [[r["name"], r["size"], *r["ms"]] for r in results])
    table(["model", "batched/CFG", "sep./CFG", "blur share σ=inf", f"blur share {sig}", "blur fn σ=inf (ms)",
           f"blur fn {sig} (ms)"], [[r["name"], *r["ratios"]] for r in results])


if __name__ == "__main__":
    main()
