"""SEG step time over CFG step time, measured in a running WebUI over its HTTP API.

    .venv/bin/python bench/webui_step.py http://127.0.0.1:7861 [--checkpoint NAME] [--repeats 5]

The same txt2img request runs with SEG off, SEG with its rows in the host's own UNet call
("batched") and SEG with its rows in a separate call ("separate", the setting
``seg_batch_rows`` off), round-robin in rotating order. A step's time is measured by
differencing: (t(N₂ steps) − t(N₁ steps)) / (N₂ − N₁) cancels what every request pays once
(text encoding, VAE decoding, PNG encoding, HTTP). Medians over the rounds; the ratios are
medians of the per-round ratios. The line names the host (from the infotext's ``Version``).
Nothing is asserted: this prints measurements (DESIGN.md §3).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request

SEG_TITLE = "Smoothed Energy Guidance"


def _post(url: str, path: str, payload: dict) -> dict:
    request = urllib.request.Request(url + path, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3600) as response:
        return json.loads(response.read() or b"null")


def _request(args: argparse.Namespace, steps: int, variant: str) -> dict:
    payload = {"prompt": "a red cat on a table", "negative_prompt": "blurry", "steps": steps, "seed": 1,
               "width": args.size, "height": args.size, "sampler_name": "Euler", "cfg_scale": 5.0,
               "override_settings": {"seg_batch_rows": variant != "separate"}}
    if variant != "cfg":
        payload["alwayson_scripts"] = {SEG_TITLE: {"args": [True, 3.0, "inf", args.layers]}}
    return payload


def _timed(args: argparse.Namespace, steps: int, variant: str) -> tuple[float, str]:
    start = time.perf_counter()
    body = _post(args.url, "/sdapi/v1/txt2img", _request(args, steps, variant))
    elapsed = time.perf_counter() - start
    info = json.loads(body["info"])["infotexts"][0]
    version = next((part.split(": ", 1)[1] for part in info.split(", ") if part.startswith("Version: ")), "?")
    return elapsed, version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--checkpoint", help="select this checkpoint first (a title or part of one)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--layers", default="mid")
    parser.add_argument("--steps", default="4,12", help="N1,N2 for the step-time difference")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    low, high = (int(value) for value in args.steps.split(","))
    if args.checkpoint:
        models = json.loads(urllib.request.urlopen(args.url + "/sdapi/v1/sd-models", timeout=60).read())
        title = next(m["title"] for m in models if args.checkpoint in m["title"])
        _post(args.url, "/sdapi/v1/options", {"sd_model_checkpoint": title})
    variants = ("cfg", "batched", "separate")
    for variant in variants:  # warm-up: model load, first-call allocations
        _timed(args, low, variant)
    step_times: dict[str, list[float]] = {variant: [] for variant in variants}
    version = "?"
    for round_index in range(args.repeats):
        order = variants[round_index % 3:] + variants[:round_index % 3]
        for variant in order:
            short, version = _timed(args, low, variant)
            long, _ = _timed(args, high, variant)
            step_times[variant].append((long - short) / (high - low))
    ratios = {variant: statistics.median(seg / cfg for seg, cfg in zip(step_times[variant], step_times["cfg"]))
              for variant in ("batched", "separate")}
    spread = max(max(times) / min(times) for times in step_times.values())
    print(f"host {version}, checkpoint {args.checkpoint or 'loaded'}, {args.size}², layers {args.layers}, "
          f"Euler, {args.repeats} rounds, steps {low}→{high}")
    print("  step ms: " + ", ".join(f"{variant} {1000 * statistics.median(times):.1f}"
                                    for variant, times in step_times.items()))
    print(f"  SEG/CFG step: batched {ratios['batched']:.2f}, separate {ratios['separate']:.2f} "
          f"(worst max/min spread of a variant: {spread:.2f})")


if __name__ == "__main__":
    main()
