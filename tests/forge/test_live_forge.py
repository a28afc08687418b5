"""SEG in a live Forge-family WebUI (Forge Neo, lllyasviel Forge, reForge), driven over HTTP.

Needs a running WebUI with this extension and ``tests/forge/probe_extension`` installed and the
Forge-shaped tiny checkpoints ``forge-sd1`` and ``forge-sdxl``; ``tests/forge/run_live_tests.sh``
does all of that. Set ``SEG_TSAM_WEBUI_URL`` (e.g. ``http://127.0.0.1:7921``) and
``SEG_TSAM_FORGE_VARIANT`` (``neo``, ``forge`` or ``reforge``) to run; skipped otherwise.
``SEG_TSAM_BASELINE`` points at the JSON of image hashes recorded by the same requests on the
same WebUI *without* this extension (``SEG_TSAM_RECORD_BASELINE=path`` records it).

The helpers (``call``, ``generate``, ``image_hash``, ``denoised_steps``, …) are the AUTOMATIC1111
live suite's (``tests/webui/test_live_seg.py``); they read ``SEG_TSAM_WEBUI_URL`` too.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import threading
import time

import pytest
from test_live_seg import (BASE, MALFORMED, SEG_ON, TITLE, XYZ_BAD_VALUES, call, check_xyz_bad_value,
                           check_xyz_plot_over_sigma, denoised_steps, generate, image_hash, relative_difference,
                           samplers, seg_roundoff_weight)

URL = os.environ.get("SEG_TSAM_WEBUI_URL")
VARIANT = os.environ.get("SEG_TSAM_FORGE_VARIANT")
pytestmark = pytest.mark.skipif(
    not (URL and VARIANT),
    reason="SEG_TSAM_WEBUI_URL and SEG_TSAM_FORGE_VARIANT are not both set (no live Forge-family WebUI to test)")

#: The host's name in this extension's messages.
HOST_LABELS = {"neo": "Forge Neo", "forge": "Forge", "reforge": "reForge"}
CHECKPOINTS = ["forge-sd1", "forge-sdxl"]
SEG_OFF = [False, 3.0, "2", "all"]


def measured(name: str, **values) -> None:
    """Append a measurement to ``SEG_TSAM_FORGE_MEASUREMENTS`` (JSON lines), if set: the run's
    round-off, bounds and effects, for the record."""
    path = os.environ.get("SEG_TSAM_FORGE_MEASUREMENTS")
    if path:
        with open(path, "a") as file:
            file.write(json.dumps({"variant": VARIANT, "name": name, **values}) + "\n")


def error_message(body: dict) -> str:
    """The exception's text in an API error answer: ``errors`` (the API's own handler), or
    ``message`` (Forge Neo's handler of its API-only app, webui.py ``_handle_exception``)."""
    return body.get("errors") or body.get("message") or ""


@functools.lru_cache(maxsize=None)
def hires_fields() -> dict:
    """A small hires fix: the "Latent" upscaler where the host has it (Forge Neo has no latent
    upscalers: there the image-space "None" upscaler, a plain resize). CFG in the second pass as
    in the first (the hosts' ``hr_cfg`` defaults to 1)."""
    modes = [mode["name"] for mode in call("GET", "/sdapi/v1/latent-upscale-modes")[1]]
    fields = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent" if "Latent" in modes else "None",
              "denoising_strength": 0.6, "hr_second_pass_steps": 2, "hr_cfg": BASE["cfg_scale"]}
    if VARIANT in ("neo", "forge"):  # Neo's hires pass fails without it (processing.py:1491, `in None`)
        fields["hr_additional_modules"] = ["Use same choices"]
    return fields


def png(width: int, height: int, pixel) -> str:
    """A PNG (base64) with ``pixel(x, y) -> (r, g, b)``: the same bytes in every run."""
    from PIL import Image

    image = Image.new("RGB", (width, height))
    image.putdata([pixel(x, y) for y in range(height) for x in range(width)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def img2img_fields(inpaint: bool = False) -> dict:
    init = png(64, 64, lambda x, y: (4 * x, 4 * y, 255 - 2 * (x + y)))
    fields = {"init_images": [init], "denoising_strength": 0.7}
    if inpaint:  # the right half is repainted
        fields |= {"mask": png(64, 64, lambda x, y: (255, 255, 255) if x >= 32 else (0, 0, 0)),
                   "mask_blur": 0, "inpainting_fill": 1, "inpaint_full_res": False}
    return fields


def baseline_requests() -> dict[str, tuple[str, dict]]:
    """``name: (endpoint, fields)`` of the plain requests whose bytes must not change with this extension."""
    requests = {"euler": ("txt2img", {}), "dpmpp-2m": ("txt2img", {"sampler_name": "DPM++ 2M"})}
    if "DDIM" in samplers():
        requests["ddim"] = ("txt2img", {"sampler_name": "DDIM"})
    requests["hires"] = ("txt2img", hires_fields())
    requests["img2img"] = ("img2img", img2img_fields())
    requests["inpaint"] = ("img2img", img2img_fields(inpaint=True))
    return requests


def probe_state() -> dict:
    status, body = call("GET", "/seg-tsam-probe/state")
    assert status == 200, "the probe extension (tests/forge/probe_extension) is not installed"
    return body


#: Options the tests override per request, set explicitly first: an overridden option is restored
#: after the request only if it was set before (``processing.py``, ``stored_opts``).
OVERRIDDEN_OPTIONS = {"skip_early_cond": 0.0, "seg_batch_rows": True}


@pytest.fixture(scope="module", params=CHECKPOINTS, ids=str)
def model(request):
    """The checkpoint selected (``/sdapi/v1/options``), loaded by one plain generation (Forge and
    Neo load on the first generation), and the probe's state then."""
    name = request.param
    models = call("GET", "/sdapi/v1/sd-models")[1]
    title = next((m["title"] for m in models if m["model_name"] == name), None)
    if title is None:
        pytest.skip(f"the WebUI lists no checkpoint {name!r}")
    known = call("GET", "/sdapi/v1/options")[1]  # without this extension, seg_batch_rows is unknown
    explicit = {key: value for key, value in OVERRIDDEN_OPTIONS.items() if key in known}
    status, body = call("POST", "/sdapi/v1/options", {**explicit, "sd_model_checkpoint": title})
    assert status == 200, body
    generate()
    state = probe_state()
    assert state["checkpoint"] == name, state
    assert state["host"] == VARIANT, state
    return name, state


def assert_model_untouched(before: dict, after: dict) -> None:
    """No hook or forward override left on the host's UNet, the same plain forward, and nothing of
    SEG on the patchers the host copies every generation from."""
    assert after["unet_hooks"] == before["unet_hooks"] == 0
    assert after["forward_overrides"] == before["forward_overrides"]
    assert after["fingerprint"] == before["fingerprint"]
    for key in ("original", "after_lora"):
        assert after["patcher"].get(key) == before["patcher"].get(key), key


def settled(endpoint: str, fields: dict) -> None:
    """Send an img2img request once and drop the answer. The hosts' img2img result depends on the
    request before it (seen in Forge Neo without SEG: an inpainting request changes the next img2img
    or inpainting image), so every compared img2img request follows one just like it."""
    if endpoint == "img2img":
        generate(endpoint=endpoint, **fields)


def test_record_or_compare_baseline_without_seg(model):
    """SEG off (not mentioned: the API runs every always-on script with its defaults; or disabled
    with ``[False, …]``) gives the bytes of the same WebUI without this extension."""
    name, _ = model
    record, compare = os.environ.get("SEG_TSAM_RECORD_BASELINE"), os.environ.get("SEG_TSAM_BASELINE")
    hashes, disabled = {}, {}
    for key, (endpoint, fields) in baseline_requests().items():
        settled(endpoint, fields)
        hashes[key] = image_hash(generate(endpoint=endpoint, **fields))
        if not record:
            disabled[key] = image_hash(generate(endpoint=endpoint, seg=SEG_OFF, **fields))
    if record:
        stored = json.load(open(record)) if os.path.exists(record) else {}
        stored[name] = hashes
        json.dump(stored, open(record, "w"), indent=1)
        return
    assert disabled == hashes
    if not compare:
        pytest.skip("SEG_TSAM_BASELINE not set (no hashes from a WebUI without the extension)")
    assert json.load(open(compare))[name] == hashes


def test_probe_sees_the_host(model):
    _, state = model
    assert state["host"] == VARIANT
    assert state["unet_hooks"] == 0 and state["fingerprint"]
    assert state["patcher"]["original"]["model_function_wrapper"] is False


def test_seg_changes_the_image_writes_infotext_and_leaves_the_model_untouched(model):
    _, before = model
    plain = image_hash(generate())
    body = generate(seg=SEG_ON)
    assert image_hash(body) != plain
    info = json.loads(body["info"])["infotexts"][0]
    for key in ("SEG scale: 3.0", "SEG sigma: 2", "SEG layers: all", "SEG start: 0.0", "SEG end: 1.0",
                "SEG mode: cond"):
        assert key in info, info
    after = probe_state()
    assert_model_untouched(before, after)
    assert after["patcher"] == before["patcher"]  # the host's own patcher is back, SEG's clone gone
    assert image_hash(generate()) == plain


#: Configurations whose float32 batching round-off is measured (below): first passes only (an
#: image-space hires pass re-encodes the batch, so image 0 of a batch of 2 is not image 0 of 1).
ROUNDOFF_PROBES = {"euler": {}, "dpmpp-2m": {"sampler_name": "DPM++ 2M"},
                   "and-prompt": {"prompt": "a red cat AND a blue dog :0.6"}}


def odd_size_fields(width: int, height: int) -> dict:
    """A request whose UNet sees a ``width/8 × height/8`` latent. Forge Neo rounds the first pass to
    multiples of 64 (processing.py:977), so there the hires second pass gets the size (the data
    folder sets "Resolution Step" to 8); the other hosts take it as the first pass's size."""
    if VARIANT == "neo":
        return {**hires_fields(), "hr_resize_x": width, "hr_resize_y": height}
    return {"width": width, "height": height}


def first_image(steps: list) -> list:
    return [step[0] for step in steps]


@pytest.fixture(scope="module")
def batching_roundoff(model):
    """The float32 round-off of running the same rows in differently sized UNet calls, measured on
    this host and model: image 0 of a batch of 2 against the same request with a batch of 1
    (same seed, so mathematically equal), per step's denoised, for plain CFG and for SEG's
    separate pass, over :data:`ROUNDOFF_PROBES` (and an odd size where the first pass takes it);
    the largest relative difference."""
    worst = 0.0
    probes = list(ROUNDOFF_PROBES.values())
    if VARIANT != "neo":
        probes.append(odd_size_fields(72, 56))
    for fields in probes:
        for seg in (None, SEG_ON):
            settings = {"seg_batch_rows": False} if seg else {}
            runs = [denoised_steps(seg=seg, override_settings=settings, batch_size=size, **fields) for size in (1, 2)]
            worst = max(worst, relative_difference(*map(first_image, runs)))
    measured(f"batching round-off {model[0]}", roundoff=worst)
    assert worst > 0, "batching changed nothing: no round-off scale to bound against"
    return worst


#: SEG's effect must exceed the round-off bound by this factor: an order of magnitude above the
#: largest round-off measured, so it cannot be round-off. (The tiny SDXL's middle block moves the
#: result ~2e-4 relative, ~20x its bound; the A1111 suite's tiny models allow 100x.)
EFFECT_FACTOR = 10


def roundoff_bound(batching_roundoff: float, seg=SEG_ON, cfg_scale: float = BASE["cfg_scale"]) -> float:
    """The measured batching round-off, weighted as SEG's combination weighs it."""
    return batching_roundoff * seg_roundoff_weight(cfg_scale, float(seg[1]))


BATCHED_VS_SEPARATE = {
    "euler": {},
    "euler-a": {"sampler_name": "Euler a"},
    "dpmpp-2m": {"sampler_name": "DPM++ 2M"},
    "and-prompt": {"prompt": "a red cat AND a blue dog :0.6"},
    "batch-2": {"batch_size": 2},
    "uncond-mode": {"_seg": [True, 3.0, "inf", "mid", 0, 1, "uncond"]},
    "uncond-mode-all-layers": {"_seg": [True, 3.0, "inf", "all", 0, 1, "uncond"]},
    "cfg-1-seg-alone": {"cfg_scale": 1.0},
    "hires": "hires",
    "size-72x56": (72, 56),
    "size-88x64": (88, 64),
}


@pytest.mark.parametrize("case", list(BATCHED_VS_SEPARATE), ids=str)
def test_batched_rows_equal_a_separate_pass(model, batching_roundoff, case):
    """SEG's blurred rows in the host's own UNet call ("seg_batch_rows" on) give what one extra
    pass gives (off), within the measured round-off; and both are far from plain CFG."""
    fields = BATCHED_VS_SEPARATE[case]
    size = fields if isinstance(fields, tuple) else None
    fields = dict(hires_fields() if fields == "hires" else odd_size_fields(*size) if size else fields)
    seg = fields.pop("_seg", SEG_ON)

    def run(batched: bool):
        return denoised_steps(seg=seg, override_settings={"seg_batch_rows": batched}, **fields)

    batched, separate = run(True), run(False)
    plain = denoised_steps(**fields)
    if size:  # the UNet saw the odd latent (the last step is the size's pass)
        assert [len(batched[-1][0][0]), len(batched[-1][0][0][0])] == [size[1] // 8, size[0] // 8]
    bound = roundoff_bound(batching_roundoff, seg, fields.get("cfg_scale", BASE["cfg_scale"]))
    # each pass on its own scale: a hires pass's round-off would hide behind the first pass's maximum
    for name, steps in passes(fields, batched, separate, plain).items():
        difference = relative_difference(steps[0], steps[1])
        effect = relative_difference(steps[0], steps[2])
        measured(f"batched vs separate {model[0]} {case} {name}", difference=difference, bound=bound, effect=effect)
        assert difference <= bound, f"{name}: batched vs separate {difference:.3g} > bound {bound:.3g}"
        assert effect > EFFECT_FACTOR * bound, \
            f"{name}: SEG's effect {effect:.3g} is not far above the round-off bound {bound:.3g}"


def passes(fields: dict, *runs: list) -> dict[str, tuple[list, ...]]:
    """Each run's steps split into the first pass and, with hires fix, the second."""
    if not fields.get("enable_hr"):
        return {"first pass": runs}
    first = BASE["steps"]
    return {"first pass": tuple(run[:first] for run in runs), "hires pass": tuple(run[first:] for run in runs)}


def test_start_and_end_count_steps_from_the_first_model_call(model, batching_roundoff):
    """start=0.5 over 4 Euler steps: steps 0 and 1 are plain (exactly), step 2 is the first guided
    one. end=0.5: steps 0 and 1 exactly as with SEG over the whole range."""
    plain = denoised_steps()
    late = denoised_steps(seg=SEG_ON + [0.5, 1.0])
    assert len(late) == len(plain) == BASE["steps"]
    assert relative_difference(plain[:2], late[:2]) == 0.0
    assert relative_difference(plain[2:3], late[2:3]) > EFFECT_FACTOR * roundoff_bound(batching_roundoff), \
        "step 2 is not guided: the start is counted one step late"
    full = denoised_steps(seg=SEG_ON)
    early = denoised_steps(seg=SEG_ON + [0.0, 0.5])
    assert relative_difference(full[:2], early[:2]) == 0.0
    assert relative_difference(full[:2], plain[:2]) > 0.0


@pytest.mark.parametrize("inpaint", [False, True], ids=["img2img", "inpaint"])
def test_img2img_and_inpainting(model, inpaint):
    fields = img2img_fields(inpaint)
    settled("img2img", fields)
    plain = image_hash(generate(endpoint="img2img", **fields))
    body = generate(endpoint="img2img", seg=SEG_ON, **fields)
    assert image_hash(body) != plain
    assert "SEG scale: 3.0" in json.loads(body["info"])["infotexts"][0]
    assert image_hash(generate(endpoint="img2img", seg=SEG_OFF, **fields)) == plain
    assert image_hash(generate(endpoint="img2img", **fields)) == plain


def recorded_steps() -> int:
    return len(call("GET", "/seg-tsam-probe/denoised")[1]["steps"])


def test_interrupted_generation_leaves_the_model_as_before(model):
    """Interrupt pressed mid-way through a long SEG generation (after ~2 s, once sampling runs):
    no hook, forward override or patcher change is left, the model computes as before, and the
    next plain image is the same as before."""
    _, before = model
    plain = image_hash(generate())
    call("POST", "/seg-tsam-probe/reset")
    result = {}
    worker = threading.Thread(target=lambda: result.update(body=generate(seg=SEG_ON, steps=150)))
    worker.start()
    time.sleep(2.0)
    deadline = time.monotonic() + 120
    while recorded_steps() == 0 and worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    call("POST", "/sdapi/v1/interrupt")
    worker.join(timeout=600)
    assert "body" in result, "the interrupted generation did not answer"
    steps = recorded_steps()
    assert 0 < steps < 150, f"{steps} steps ran: the interrupt did not land mid-way"
    after = probe_state()
    assert_model_untouched(before, after)
    assert after["patcher"] == before["patcher"]
    assert image_hash(generate()) == plain


def test_hires_pass_is_guided_once_with_its_override(model, batching_roundoff):
    """The second pass runs SEG with the hires override (scale 6, σ ∞): the first pass's steps are
    exactly those without the override, the second pass's differ; afterwards the host's own
    patcher is back."""
    fields = hires_fields()
    same = denoised_steps(seg=SEG_ON, **fields)
    call("POST", "/seg-tsam-probe/reset")
    body = generate(seg=SEG_ON + [0, 1, "cond", True, 6.0, "inf"], **fields)
    override = call("GET", "/seg-tsam-probe/denoised")[1]["steps"]
    info = json.loads(body["info"])["infotexts"][0]
    assert "SEG hires scale: 6.0" in info and "SEG hires sigma: inf" in info, info
    first_pass = BASE["steps"]
    assert len(override) == len(same) > first_pass
    assert relative_difference(same[:first_pass], override[:first_pass]) == 0.0
    second = relative_difference(same[first_pass:], override[first_pass:])
    assert second > EFFECT_FACTOR * roundoff_bound(batching_roundoff), second
    assert probe_state()["patcher"] == model[1]["patcher"]


INFOTEXT_SEG = [True, 2.5, "8", "d0,m0", 0.0, 0.75, "uncond"]


def test_infotext_is_parsed(model):
    first = generate(seg=INFOTEXT_SEG)
    status, parsed = call("POST", "/sdapi/v1/png-info", {"image": "data:image/png;base64," + first["images"][0]})
    assert status == 200, parsed
    parameters = parsed["parameters"]
    assert parameters["SEG scale"] == "2.5" and parameters["SEG sigma"] == "8"
    assert parameters["SEG layers"] == "d0,m0" and parameters["SEG start"] == "0.0"
    assert parameters["SEG end"] == "0.75" and parameters["SEG mode"] == "uncond"


def paste(info: str) -> tuple[int, dict]:
    """Generate with ``{"infotext": info}``: the WebUI maps it into the request and the scripts'
    arguments (no alwayson_scripts given)."""
    return call("POST", "/sdapi/v1/txt2img", {**BASE, "infotext": info})


def png_info(body: dict) -> str:
    status, parsed = call("POST", "/sdapi/v1/png-info", {"image": "data:image/png;base64," + body["images"][0]})
    assert status == 200, parsed
    return parsed["info"]


def test_infotext_round_trip(model):
    """Generating from a SEG image's infotext reproduces the image, where the host can paste
    infotext at all (checked with a plain image's infotext first)."""
    plain = generate()
    status, pasted = paste(png_info(plain))
    if status != 200:
        pytest.skip(f"the host cannot generate from infotext, even without SEG: {status} {error_message(pasted)!r}")
    assert image_hash(pasted) == image_hash(plain)
    first = generate(seg=INFOTEXT_SEG)
    status, pasted = paste(png_info(first))
    assert status == 200, pasted
    assert image_hash(pasted) == image_hash(first)


def test_xyz_plot_over_sigma(model):
    check_xyz_plot_over_sigma()


@pytest.mark.parametrize(("axis", "values", "message"), XYZ_BAD_VALUES)
def test_xyz_plot_with_a_bad_value_says_which(model, axis, values, message):
    check_xyz_bad_value(axis, values, message)


@pytest.mark.parametrize("case", list(MALFORMED), ids=str)
def test_malformed_arguments_get_a_clear_error(model, case):
    payload = {**BASE, "alwayson_scripts": {TITLE: {"args": MALFORMED[case]}}}
    status, body = call("POST", "/sdapi/v1/txt2img", payload)
    assert status == 422, body
    assert error_message(body).startswith("Smoothed Energy Guidance:"), body


def test_export_is_unavailable_naming_the_host():
    status, body = call("POST", "/seg-tsam/export",
                        {"preset": "SD1.x 512-768", "precision": "fp32", "seg_layers": "all", "build_engine": False})
    assert status == 409, body
    assert f"not available on {HOST_LABELS[VARIANT]}." in body["detail"], body
    status, body = call("GET", "/seg-tsam/export/status")
    assert status == 200, body
    assert body["available"] is False
    assert f"not available on {HOST_LABELS[VARIANT]}." in body["unavailable_reason"], body
