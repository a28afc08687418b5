"""The SEG query blur on a GPU: standard ops (two batched matmuls) vs. the fused Triton kernel.

Run from the repository root on a machine with CUDA and triton (no timing assertions; it only
prints, and exits with status 2 when CUDA or triton is missing):

    python bench/query_blur_kernel.py                         # fp16, SD1.5 512² and SDXL 1024² shapes
    python bench/query_blur_kernel.py --dtype fp32 --sigma inf,2 --blurred-rows all

For every self-attention query shape of SD1.5 at 512×512 (token grids 64×64 C=320, 32×32 C=640,
16×16 C=1280, 8×8 C=1280) and SDXL at 1024×1024 (64×64 C=640, 32×32 C=1280), with ``--batch``
rows of which ``--blurred-rows`` get the σ blur and the others the identity (as in a batched
SEG call: the default batch 6 = 2 images × uncond/cond/SEG, SEG rows 2 and 5), it times

- standard: ``apply_blur_matrices`` (extension/core/blur.py), the ops the exported graph holds;
- triton: ``triton_query_blur`` (trt_plugins/query_blur_kernel.py), what the TensorRT plugin runs;

side by side in one run: CUDA events around ``--inner`` back-to-back calls, the two variants
alternating over ``--repeats`` rounds after ``--warmup`` untimed rounds, median per call. The
table gives both times, triton/standard (below 1 means the kernel is faster) and each variant's
max absolute error against a float64 evaluation of the same inputs. This measures the op alone, not
inside a TensorRT engine (where the standard ops may fuse differently): a win here is the
precondition for trying the plugin in an engine, not proof that the engine gets faster.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from collections.abc import Callable

from bench_setup import table  # also registers the seg_tsam package, so it comes before seg_tsam imports
import torch
from seg_tsam.export.seg_unet import blur_matrix_inputs
from seg_tsam.extension.core.blur import apply_blur_matrices
from seg_tsam.extension.core.settings import format_sigma

#: (model, token grid h × w, channels) of every self-attention layer's queries.
SHAPES = {
    "sd15": [((64, 64), 320), ((32, 32), 640), ((16, 16), 1280), ((8, 8), 1280)],
    "sdxl": [((64, 64), 640), ((32, 32), 1280)],
}
SIZE = {"sd15": "512²", "sdxl": "1024²"}
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def time_ms(fn: Callable[[], object], inner: int) -> float:
    """Milliseconds per call of ``fn``, from CUDA events around ``inner`` back-to-back calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / inner


def parse_rows(spec: str, batch: int) -> list[int]:
    if spec == "all":
        return list(range(batch))
    rows = sorted({int(part) for part in spec.split(",") if part.strip()})
    if rows and (rows[0] < 0 or rows[-1] >= batch):
        raise SystemExit(f"--blurred-rows {spec!r} outside a batch of {batch}")
    return rows


def bench_shape(grid: tuple[int, int], channels: int, sigma: float, rows: list[int], args: argparse.Namespace,
                blur: Callable[..., torch.Tensor]) -> list[str]:
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(args.batch, grid[0] * grid[1], channels, generator=gen).to(device, dtype)
    a_h, a_w = blur_matrix_inputs([0], grid, args.batch, rows, sigma, dtype=dtype, device=device).values()
    variants = {"standard": lambda: apply_blur_matrices(queries, a_h, a_w), "triton": lambda: blur(queries, a_h, a_w)}

    reference = apply_blur_matrices(queries.double(), a_h.double(), a_w.double())
    errors = {key: (fn().double() - reference).abs().max().item() for key, fn in variants.items()}
    times: dict[str, list[float]] = {key: [] for key in variants}
    keys = list(variants)
    with torch.inference_mode():
        for round_ in range(args.warmup + args.repeats):
            for key in keys if round_ % 2 == 0 else keys[::-1]:  # alternate which runs first
                elapsed = time_ms(variants[key], args.inner)
                if round_ >= args.warmup:
                    times[key].append(elapsed)
    standard, triton_ms = statistics.median(times["standard"]), statistics.median(times["triton"])
    ratio = statistics.median(t / s for t, s in zip(times["triton"], times["standard"]))
    return [f"{grid[0]}×{grid[1]}", str(channels), format_sigma(sigma), f"{standard:.4f}", f"{triton_ms:.4f}",
            f"{ratio:.2f}", f"{errors['standard']:.2e}", f"{errors['triton']:.2e}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="a CUDA device (cuda, cuda:1, …): the kernel is GPU-only")
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--models", default="sd15,sdxl", help="comma list of sd15 (512²), sdxl (1024²)")
    parser.add_argument("--batch", type=int, default=6, help="rows per call (default 6: 2 images × 3 SEG rows)")
    parser.add_argument("--blurred-rows", default="2,5", help="rows given the σ blur, or 'all'; the rest: identity")
    parser.add_argument("--sigma", default="inf,2,10", help="comma list of σ (inf = the mean, SEG's default)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds (the first also compiles the kernel)")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds")
    parser.add_argument("--inner", type=int, default=20, help="calls per timed block")
    args = parser.parse_args()

    if not args.device.startswith("cuda") or not torch.cuda.is_available():
        print(f"needs a CUDA device (asked for {args.device!r}, torch.cuda.is_available() = "
              f"{torch.cuda.is_available()}); nothing measured", file=sys.stderr)
        return 2
    if importlib.util.find_spec("triton") is None:
        print("needs the triton package (≥ 3.0) for the kernel; nothing measured", file=sys.stderr)
        return 2
    from seg_tsam.trt_plugins.query_blur_kernel import load_triton_kernel, triton_query_blur

    models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = sorted(set(models) - set(SHAPES))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {sorted(SHAPES)}")
    sigmas = [float(part) for part in args.sigma.split(",") if part.strip()]
    rows = parse_rows(args.blurred_rows, args.batch)
    device = torch.device(args.device)
    torch.cuda.set_device(device)
    try:
        load_triton_kernel()
    except RuntimeError as error:  # e.g. triton older than 3.0
        print(f"the Triton kernel is unavailable here: {error}; nothing measured", file=sys.stderr)
        return 2
    import triton

    print(f"device {device} ({torch.cuda.get_device_name(device)}), torch {torch.__version__}, triton "
          f"{triton.__version__}, {args.dtype}, batch {args.batch}, blurred rows {rows or 'none'}, "
          f"warm-up+repeats {args.warmup}+{args.repeats} × {args.inner} calls")
    for name in models:
        results = [bench_shape(grid, channels, sigma, rows, args, triton_query_blur)
                   for grid, channels in SHAPES[name] for sigma in sigmas]
        print(f"\n{name} {SIZE[name]}:")
        table(["grid", "C", "σ", "standard (ms)", "triton (ms)", "triton/standard", "max abs err standard",
               "max abs err triton"], results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
