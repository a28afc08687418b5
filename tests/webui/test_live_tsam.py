"""T-SAM in a live AUTOMATIC1111 WebUI, driven over HTTP.

Same setup as ``test_live_seg.py`` (this extension and ``tests/webui/probe_extension`` in the
WebUI, the tiny SD1 and SDXL checkpoints); set ``SEG_TSAM_WEBUI_URL`` to run, skipped otherwise.
Images are 64×64 with 4 steps. On the tiny random-weight models every token's attention map
is nearly the same (cosines ≈ 1), so T-SAM's official defaults move the latent by ~1e-5
relative; :data:`STRONG` (large step, paper loss) makes the effect measurable where a test
needs to see it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os

import pytest
from test_live_seg import (URL, batching_roundoff, call, checkpoints, image_hash, interrupt_midway, probe_state,  # noqa: F401
                           relative_difference, roundoff_bound, xyz_script_args)

pytestmark = pytest.mark.skipif(not URL, reason="SEG_TSAM_WEBUI_URL is not set (no live WebUI to test against)")

TITLE = "T-SAM alignment"
SEG_TITLE = "Smoothed Energy Guidance"
#: Settings left in the shared config by other runs must not change what these tests compare.
STABLE_OPTIONS = {"skip_early_cond": 0.0, "batch_cond_uncond": True}
BASE = {"prompt": "a red cat, on a blue table", "negative_prompt": "blurry", "steps": 4, "width": 64,
        "height": 64, "seed": 11, "sampler_name": "Euler", "cfg_scale": 5.0}
STRONG = {"strength": 500, "iterations": 3, "refinement_steps": "none", "refinement_iterations": 0, "loss": "paper",
          "power": 4}
STRONG_POSITIONAL = [True, 500, 0.6, 3, "none", 0, "paper", 4, False]
LONG_PROMPT = " ".join(["red cat"] * 50)  # 100 tokens: two chunks
SEG_ON = [True, 3.0, "2", "all"]


def payload(tsam=None, seg=None, **fields):
    body = {**BASE, **fields}
    body["override_settings"] = {**STABLE_OPTIONS, **fields.get("override_settings", {})}
    scripts = {}
    if tsam is not None:
        scripts[TITLE] = {"args": tsam}
    if seg is not None:
        scripts[SEG_TITLE] = {"args": seg}
    if scripts:
        body["alwayson_scripts"] = scripts
    return body


def generate(tsam=None, seg=None, endpoint="txt2img", **fields):
    status, body = call("POST", f"/sdapi/v1/{endpoint}", payload(tsam, seg, **fields))
    assert status == 200, body
    return body


def denoised_steps(tsam=None, seg=None, **fields):
    call("POST", "/seg-tsam-probe/reset")
    generate(tsam, seg, **fields)
    return call("GET", "/seg-tsam-probe/denoised")[1]["steps"]


def decoded(body, index):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(body["images"][index])))


def pixels_hash(body, index=0) -> str:
    """Hash of the pixels only (``image_hash`` also covers the PNG's infotext)."""
    return hashlib.sha256(decoded(body, index).tobytes()).hexdigest()


@pytest.fixture(scope="module", params=checkpoints(), ids=lambda c: c[0])
def model(request):
    kind, title = request.param
    status, body = call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": title})
    assert status == 200, body
    state = probe_state()
    assert title.startswith(state["checkpoint"]) or state["checkpoint"] in title
    return kind, state


def assert_model_untouched(before):
    after = probe_state()
    assert after["unet_hooks"] == before["unet_hooks"] == 0
    assert after["forward_overrides"] == before["forward_overrides"]  # the capture's instance forwards are gone
    assert after["fingerprint"] == before["fingerprint"]


def test_tsam_on_changes_the_image_and_off_does_not(model):
    _, before = model
    plain = image_hash(generate())
    # The official schedule (refinement at 0, 0.2, 0.4 of the steps), 2 refinement iterations to stay quick.
    assert image_hash(generate(tsam=[True, 5.0, 0.6, 1, "0,0.2,0.4", 2])) != plain
    assert image_hash(generate(tsam=STRONG_POSITIONAL)) != plain
    assert image_hash(generate(tsam=[False, 500, 0.6, 3, "none", 0, "paper", 4, True])) == plain  # off
    assert image_hash(generate(tsam=[{"strength": 0}])) == plain  # on, but no effect
    assert image_hash(generate()) == plain
    assert_model_untouched(before)


def test_text_encoder_untouched_after_tsam(model):
    """Conditioning is cached per prompt; a prompt not seen since T-SAM ran the encoder with
    attention outputs is encoded again and must give the same bytes as before."""
    other = {"prompt": "a green bird", "negative_prompt": "dark"}
    first = image_hash(generate(**other))
    generate(tsam=[{"strength": 50, "refinement_steps": "none"}], prompt="a yellow dog BREAK in a garden")
    assert image_hash(generate(**other)) == first


def test_named_and_positional_forms_and_infotext(model):
    named = generate(tsam=[STRONG])
    positional = generate(tsam=STRONG_POSITIONAL)
    assert image_hash(named) == image_hash(positional)
    info = json.loads(named["info"])["infotexts"][0]
    for text in ("T-SAM strength: 500.0", "T-SAM iterations: 3", "T-SAM refinement steps: none", "T-SAM loss: paper",
                 "T-SAM power: 4.0", "T-SAM active fraction: 0.6"):
        assert text in info
    status, parsed = call("POST", "/sdapi/v1/png-info", {"image": "data:image/png;base64," + named["images"][0]})
    assert status == 200 and parsed["parameters"]["T-SAM strength"] == "500.0"
    # Paste: the WebUI maps the infotext into the script's arguments.
    status, pasted = call("POST", "/sdapi/v1/txt2img", {**payload(), "infotext": parsed["info"]})
    assert status == 200 and image_hash(pasted) == image_hash(named)


def test_each_image_of_a_batch_uses_its_own_prompt(model, batching_roundoff):
    """Prompt matrix: one batch of two different prompts ("a red cat", "a red cat, on a blue
    table") with the same seed. Image 1 of the batch must follow the single-image run of its
    own prompt; had it used image 0's T, it would differ by T-SAM's effect (checked > 1e-3)."""
    matrix = {"prompt": "a red cat|on a blue table", "batch_size": 2, "script_name": "prompt matrix",
              "script_args": [False, False, "positive", "comma", 0]}
    batch = denoised_steps(tsam=[STRONG], **matrix)
    single = denoised_steps(tsam=[STRONG])
    plain = denoised_steps()
    assert len(batch[0]) == 2 and len(single[0]) == 1
    image_1 = [[step[1]] for step in batch]
    assert relative_difference(single, plain) > 1e-3  # T-SAM visibly acts on this prompt
    # A batch of two vs a single image: the same computation in differently sized calls, so
    # bounded by the measured batching round-off (no SEG here: weight 1).
    assert relative_difference(image_1, single) <= batching_roundoff
    short = denoised_steps(tsam=[STRONG], prompt="a red cat")
    assert relative_difference([[step[0]] for step in batch], short) <= batching_roundoff


def test_prompt_of_100_tokens(model):
    plain = denoised_steps(prompt=LONG_PROMPT)
    aligned = denoised_steps(tsam=[STRONG], prompt=LONG_PROMPT)
    assert relative_difference(aligned, plain) > 1e-3
    # A batch mixing a one-chunk and a two-chunk prompt (the conditioning is padded to 154 tokens).
    generate(tsam=[STRONG], prompt=f"a dog|{LONG_PROMPT}", batch_size=2, script_name="prompt matrix",
             script_args=[False, False, "positive", "comma", 0])


def test_show_maps_returns_extra_images(model):
    without = generate(tsam=[STRONG], batch_size=2)
    with_maps = generate(tsam=[{**STRONG, "show_maps": True}], batch_size=2)
    extra = len(with_maps["images"]) - len(without["images"])
    assert extra == 2  # one per generated image
    infotexts = json.loads(with_maps["info"])["infotexts"]
    assert len(infotexts) == len(with_maps["images"])
    for index in (-2, -1):
        width, height = decoded(with_maps, index).size
        assert width > 300 and height > 200  # T, S before/after and token maps, not a 64×64 sample
    # The generated images themselves are the same with and without the maps.
    assert [image_hash(with_maps, i) for i in range(len(without["images"]))] == \
        [image_hash(without, i) for i in range(len(without["images"]))]


def test_tsam_together_with_seg(model, batching_roundoff):
    _, before = model
    seg_alone = denoised_steps(seg=SEG_ON)
    tsam_alone = denoised_steps(tsam=[STRONG])

    def both(batched: bool):
        return denoised_steps(tsam=[STRONG], seg=SEG_ON, override_settings={"seg_batch_rows": batched})

    batched, separate = both(True), both(False)
    # SEG's row bookkeeping is undisturbed by the T-SAM pass: its batched rows still equal a separate pass.
    assert relative_difference(batched, separate) <= roundoff_bound(batching_roundoff)
    assert relative_difference(batched, seg_alone) > 1e-3 and relative_difference(batched, tsam_alone) > 1e-3
    info = json.loads(generate(tsam=[STRONG], seg=SEG_ON)["info"])["infotexts"][0]
    assert "SEG scale: 3.0" in info and "T-SAM strength: 500.0" in info
    assert_model_untouched(before)


@pytest.mark.parametrize("sampler", ["DDIM", "Heun"])
def test_other_samplers(model, sampler):
    plain = denoised_steps(sampler_name=sampler)
    aligned = denoised_steps(tsam=[STRONG], sampler_name=sampler)
    assert relative_difference(aligned, plain) > 1e-3


def test_hires_fix_and_img2img(model):
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6,
             "hr_second_pass_steps": 2}
    assert image_hash(generate(tsam=[STRONG], **hires)) != image_hash(generate(**hires))
    init = {"init_images": [generate()["images"][0]], "denoising_strength": 0.9}
    assert image_hash(generate(tsam=[STRONG], endpoint="img2img", **init)) != \
        image_hash(generate(endpoint="img2img", **init))


def test_xyz_axis(model):
    status, info = call("GET", "/sdapi/v1/script-info")
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    choices = xyz["args"][0]["choices"]
    assert {"[T-SAM] Strength", "[T-SAM] Loss", "[T-SAM] Power", "[T-SAM] Active fraction"} <= set(choices)
    args = xyz_script_args("[T-SAM] Strength", "0, 500", Include_Sub_Images=True)
    body = generate(tsam=[False, 5, 0.6, 3, "none", 0, "paper", 4], script_name="x/y/z plot", script_args=args)
    assert len(body["images"]) == 1 + 2
    assert pixels_hash(body, 1) == pixels_hash(generate())  # strength 0
    assert pixels_hash(body, 2) == pixels_hash(generate(tsam=STRONG_POSITIONAL))


def test_no_hooks_left_after_a_failed_or_interrupted_generation(model):
    _, before = model
    status, body = call("POST", "/sdapi/v1/txt2img", payload([True], sampler_name="UniPC"))
    assert status == 422 and "UniPC" in body["errors"], body
    assert_model_untouched(before)

    interrupt_midway(lambda: generate(tsam=[{"strength": 5, "active_fraction": 1.0, "refinement_steps": "none"}],
                                      steps=150))
    assert_model_untouched(before)
    assert image_hash(generate()) == image_hash(generate())


MALFORMED = {
    "strength-string": [True, "abc"],
    "strength-too-large": [True, 5000],
    "strength-null": [True, None],
    "active-above-one": [True, 5, 1.5],
    "iterations-fraction": [True, 5, 0.6, 1.5],
    "refinement-out-of-range": [True, 5, 0.6, 1, "0,1.5"],
    "loss-unknown": [True, 5, 0.6, 1, "none", 0, "l2"],
    "power-zero": [True, 5, 0.6, 1, "none", 0, "paper", 0],
    "enabled-string": ["yes"],
    "named-unknown-key": [{"strength": 5, "alpha": 2}],
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=str)
def test_malformed_arguments_get_a_clear_error(model, case):
    status, body = call("POST", "/sdapi/v1/txt2img", payload(MALFORMED[case]))
    assert status == 422, body
    assert body["errors"].startswith(f"{TITLE}:"), body


def test_nan_is_refused(model):
    raw = json.dumps({**payload(), "alwayson_scripts": {TITLE: {"args": [True, math.nan]}}})
    import urllib.error
    import urllib.request

    request = urllib.request.Request(URL + "/sdapi/v1/txt2img", data=raw.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=120)
    assert error.value.code in (400, 422)


def test_show_maps_are_saved_with_the_images_and_carry_a_legend(model):
    """Saved beside the image when the request saves images; the colour scale drawn at the bottom."""
    models = os.environ.get("SEG_TSAM_WEBUI_MODELS")
    if not models:
        pytest.skip("SEG_TSAM_WEBUI_MODELS is not set (the WebUI's data folder is unknown)")
    from pathlib import Path

    from PIL import Image

    outputs = Path(models).parent / "outputs"
    before = set(outputs.rglob("*-tsam-maps.png")) if outputs.exists() else set()
    generate(tsam=[{**STRONG, "show_maps": True}], save_images=True)
    new = sorted(set(outputs.rglob("*-tsam-maps.png")) - before)
    assert len(new) == 1, new
    image = Image.open(new[0]).convert("RGB")
    row = image.height - 41  # the legend's colour bar: black → red → yellow → white, left to right
    bar = [image.getpixel((10 + x, row)) for x in range(0, 240, 8)]
    assert sum(bar[0]) < 60 and sum(bar[-1]) > 700, bar
    assert [pixel[0] for pixel in bar] == sorted(pixel[0] for pixel in bar), bar
