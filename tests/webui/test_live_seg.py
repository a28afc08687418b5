"""SEG in a live AUTOMATIC1111 WebUI, driven over HTTP.

Needs a running WebUI with this extension and ``tests/webui/probe_extension`` installed and the
tiny checkpoints from ``make_tiny_checkpoints.py``; ``tests/webui/run_live_tests.sh`` does all
of that. Set ``SEG_TSAM_WEBUI_URL`` (e.g. ``http://127.0.0.1:7871``) to run; skipped otherwise.
``SEG_TSAM_BASELINE`` points at the JSON of image hashes recorded by the same requests on a
WebUI *without* this extension (``SEG_TSAM_RECORD_BASELINE=path`` records it).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import os
import threading
import time
import urllib.error
import urllib.request

import pytest

URL = os.environ.get("SEG_TSAM_WEBUI_URL")
pytestmark = pytest.mark.skipif(not URL, reason="SEG_TSAM_WEBUI_URL is not set (no live WebUI to test against)")

TITLE = "Smoothed Energy Guidance"
BASE = {"prompt": "a red cat on a table", "negative_prompt": "blurry", "steps": 4, "width": 64, "height": 64,
        "seed": 11, "sampler_name": "Euler", "cfg_scale": 5.0}


def call(method: str, path: str, payload=None, timeout: float = 600):
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(URL + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body)
        except ValueError:
            return error.code, {"raw": body.decode(errors="replace")}


def generate(extra=None, *, endpoint="txt2img", seg=None, **fields):
    payload = {**BASE, **fields}
    if seg is not None:
        payload.setdefault("alwayson_scripts", {})[TITLE] = {"args": seg}
    if extra:
        payload.update(extra)
    status, body = call("POST", f"/sdapi/v1/{endpoint}", payload)
    assert status == 200, body
    return body


def image_hash(body, index=0) -> str:
    return hashlib.sha256(base64.b64decode(body["images"][index])).hexdigest()


def probe_state():
    status, body = call("GET", "/seg-tsam-probe/state")
    assert status == 200, "the probe extension (tests/webui/probe_extension) is not installed"
    return body


def denoised_steps(extra=None, **fields):
    call("POST", "/seg-tsam-probe/reset")
    generate(extra, **fields)
    return call("GET", "/seg-tsam-probe/denoised")[1]["steps"]


def relative_difference(steps_a, steps_b) -> float:
    """max |a − b| / max |a| over all steps: the WebUI's x0 outputs are O(σ) ≈ 15 early on, so
    float32 round-off between batch sizes shows up as ~1e-4 absolute but ~1e-6 relative."""
    assert len(steps_a) == len(steps_b) and steps_a
    worst, scale = 0.0, 0.0

    def walk(a, b):
        nonlocal worst, scale
        if isinstance(a, list):
            assert len(a) == len(b)
            for x, y in zip(a, b):
                walk(x, y)
        else:
            worst, scale = max(worst, abs(a - b)), max(scale, abs(a))

    walk(steps_a, steps_b)
    return worst / scale


def checkpoints():
    if not URL:
        return []
    status, models = call("GET", "/sdapi/v1/sd-models")
    names = {"sd1": "tiny-sd1", "sd2v": "tiny-sd2v", "sdxl": "tiny-sdxl"}
    return [(kind, next(m["title"] for m in models if name in m["title"])) for kind, name in names.items()
            if any(name in m["title"] for m in models)]


#: Options the tests override per request. WebUI 1.10.1 restores an overridden option only if it
#: was explicitly set before (``processing.py``: ``stored_opts`` skips keys not in
#: ``opts.data``), so they are set explicitly here; otherwise one override leaks into every
#: later request.
OVERRIDDEN_OPTIONS = {"skip_early_cond": 0.0, "batch_cond_uncond": True, "seg_batch_rows": True}


@pytest.fixture(scope="module", params=checkpoints(), ids=lambda c: c[0])
def model(request):
    kind, title = request.param
    known = call("GET", "/sdapi/v1/options")[1]  # without this extension, seg_batch_rows is unknown
    explicit = {key: value for key, value in OVERRIDDEN_OPTIONS.items() if key in known}
    status, body = call("POST", "/sdapi/v1/options", {**explicit, "sd_model_checkpoint": title})
    assert status == 200, body
    state = probe_state()
    assert title.startswith(state["checkpoint"]) or state["checkpoint"] in title
    return kind, state


SEG_ON = [True, 3.0, "2", "all"]
BASELINE_REQUESTS = {
    "euler": {},
    "ddim": {"sampler_name": "DDIM"},
    "hires": {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6,
              "hr_second_pass_steps": 2},
}


def test_record_or_compare_baseline_without_seg(model):
    """SEG off (the API runs every always-on script with its defaults) gives the bytes of a WebUI
    without this extension."""
    kind, _ = model
    hashes = {name: image_hash(generate(fields)) for name, fields in BASELINE_REQUESTS.items()}
    record, compare = os.environ.get("SEG_TSAM_RECORD_BASELINE"), os.environ.get("SEG_TSAM_BASELINE")
    if record:
        stored = json.load(open(record)) if os.path.exists(record) else {}
        stored[kind] = hashes
        json.dump(stored, open(record, "w"), indent=1)
        return
    if not compare:
        pytest.skip("SEG_TSAM_BASELINE not set (no hashes from a WebUI without the extension)")
    assert json.load(open(compare))[kind] == hashes


def test_seg_changes_the_image_and_leaves_the_model_untouched(model):
    _, before = model
    plain = image_hash(generate())
    seg = image_hash(generate(seg=SEG_ON))
    assert seg != plain
    assert image_hash(generate()) == plain
    after = probe_state()
    assert after["unet_hooks"] == before["unet_hooks"] == 0
    assert after["forward_overrides"] == before["forward_overrides"]
    assert after["fingerprint"] == before["fingerprint"]


BATCHED_VS_SEPARATE = {
    "euler": {},
    "euler-a": {"sampler_name": "Euler a"},
    "dpmpp-2m": {"sampler_name": "DPM++ 2M"},
    "heun-second-order": {"sampler_name": "Heun"},
    "ddim-eps": {"sampler_name": "DDIM"},
    "unipc": {"sampler_name": "UniPC"},
    "plms": {"sampler_name": "PLMS"},
    "and-prompt": {"prompt": "a red cat AND a blue dog :0.6"},
    "batch-2": {"batch_size": 2},
    "uncond-mode": {"_seg": [True, 3.0, "inf", "mid", 0, 1, "uncond"]},
    "cfg-1-seg-alone": {"cfg_scale": 1.0},
    "long-negative-different-lengths": {"negative_prompt": " ".join(["blurry"] * 90)},
    "ngms": {"s_min_uncond": 50.0},
    "skip-early-cfg": {"override_settings": {"skip_early_cond": 0.5}},
    "skip-early-cfg-uncond-mode": {"override_settings": {"skip_early_cond": 0.5},
                                   "_seg": [True, 3.0, "4", "all", 0, 1, "uncond"]},
    "batch-cond-uncond-off": {"batch_size": 2, "override_settings": {"batch_cond_uncond": False}},
    "hires": {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6,
              "hr_second_pass_steps": 2},
}


#: Configurations whose float32 batching round-off is measured (below): the samplers that amplify it
#: least and most, and an AND prompt (more rows per call).
ROUNDOFF_PROBES = {"euler": {}, "ddim": {"sampler_name": "DDIM"}, "plms": {"sampler_name": "PLMS"},
                   "unipc": {"sampler_name": "UniPC"}, "and-prompt": {"prompt": "a red cat AND a blue dog :0.6"}}


def seg_roundoff_weight(cfg_scale: float, seg_scale: float) -> float:
    """How much more a row's round-off weighs in SEG's combination than in plain CFG's:
    ``ε_u + w(ε_c − ε_u) + s(ε_c − ε̃_c)`` sums ``|1−w| + |w+s| + |s|`` of the rows' errors, CFG
    ``|1−w| + |w|``."""
    w, s = cfg_scale, seg_scale
    return (abs(1 - w) + abs(w + s) + abs(s)) / (abs(1 - w) + abs(w))


@pytest.fixture(scope="module")
def batching_roundoff(model):
    """The float32 round-off of running the same rows in differently sized UNet calls, measured on
    this model: the largest relative difference between the WebUI's "batch cond/uncond" on and
    off, for plain CFG and for SEG's separate pass, over :data:`ROUNDOFF_PROBES`. Each of these
    compares mathematically equal computations; so does SEG's batched vs separate pass."""
    worst = 0.0
    for fields in ROUNDOFF_PROBES.values():
        for seg in (None, SEG_ON):
            settings = [{"batch_cond_uncond": on, "seg_batch_rows": False} for on in (True, False)]
            runs = [denoised_steps(seg=seg, override_settings=options, **fields) for options in settings]
            worst = max(worst, relative_difference(*runs))
    assert worst > 0, "batching changed nothing: no round-off scale to bound against"
    return worst


def roundoff_bound(batching_roundoff: float, seg=SEG_ON, cfg_scale: float = BASE["cfg_scale"]) -> float:
    """The bound for SEG batched vs separate: the measured batching round-off, weighted as SEG's
    combination weighs it (:func:`seg_roundoff_weight`)."""
    return batching_roundoff * seg_roundoff_weight(cfg_scale, float(seg[1]))


@pytest.mark.parametrize("case", list(BATCHED_VS_SEPARATE), ids=str)
def test_batched_rows_equal_a_separate_pass(model, batching_roundoff, case):
    fields = dict(BATCHED_VS_SEPARATE[case])
    seg = fields.pop("_seg", SEG_ON)
    overrides = fields.pop("override_settings", {})

    def run(batched: bool):
        settings = {**overrides, "seg_batch_rows": batched}
        return denoised_steps(seg=seg, override_settings=settings, **fields)

    batched, separate = run(True), run(False)
    plain = denoised_steps(override_settings=overrides, **fields)
    bound = roundoff_bound(batching_roundoff, seg, fields.get("cfg_scale", BASE["cfg_scale"]))
    assert relative_difference(batched, separate) <= bound
    assert relative_difference(batched, plain) > 100 * bound  # SEG did something, far above round-off


def test_start_fraction_counts_steps_from_the_first_model_call(model):
    """start=0.5 over 4 Euler steps: steps 0 and 1 are plain, step 2 is the first guided one.

    Counting from ``params.sampling_step`` (one step late) would leave step 2 unguided, i.e.
    exactly equal to plain; batch-size round-off is ~1e-6, SEG's effect there ~4e-4."""
    plain = denoised_steps()
    late = denoised_steps(seg=[True, 3.0, "2", "all", 0.5, 1.0])
    assert relative_difference(plain[:2], late[:2]) == 0.0
    assert relative_difference(plain[2:3], late[2:3]) > 1e-4


def test_img2img(model):
    init = generate()["images"][0]
    fields = {"init_images": [init], "denoising_strength": 0.7}
    plain = image_hash(generate(endpoint="img2img", **fields))
    seg = image_hash(generate(endpoint="img2img", seg=SEG_ON, **fields))
    assert seg != plain
    assert image_hash(generate(endpoint="img2img", **fields)) == plain


def test_hires_override_is_written_and_used(model):
    fields = BATCHED_VS_SEPARATE["hires"]
    same = generate(seg=SEG_ON, **fields)
    override = generate(seg=SEG_ON + [0, 1, "cond", True, 6.0, "inf"], **fields)
    info = json.loads(override["info"])["infotexts"][0]
    assert "SEG hires scale: 6.0" in info and "SEG hires sigma: inf" in info
    assert image_hash(override) != image_hash(same)


def test_infotext_round_trip(model):
    seg = [True, 2.5, "8", "d0,m0", 0.0, 0.75, "uncond"]
    first = generate(seg=seg)
    status, parsed = call("POST", "/sdapi/v1/png-info", {"image": "data:image/png;base64," + first["images"][0]})
    assert status == 200
    parameters = parsed["parameters"]
    assert parameters["SEG scale"] == "2.5" and parameters["SEG sigma"] == "8"
    assert parameters["SEG layers"] == "d0,m0" and parameters["SEG end"] == "0.75" and parameters["SEG mode"] == "uncond"
    # Paste: the WebUI maps infotext into the script's arguments (no alwayson_scripts given).
    pasted = generate({"infotext": parsed["info"]}, prompt=BASE["prompt"])
    assert image_hash(pasted) == image_hash(first)


@functools.lru_cache(maxsize=None)
def samplers() -> tuple[str, ...]:
    """The names of the WebUI's samplers (one WebUI per test run)."""
    return tuple(sampler["name"] for sampler in call("GET", "/sdapi/v1/samplers")[1])


def xyz_script_args(x_axis: str, x_values: str, **by_label) -> list:
    """X/Y/Z plot arguments built from the WebUI's own ``/sdapi/v1/script-info`` (its argument
    list differs between versions: ``dev`` added ``draw_grid``): every argument at its default,
    the axis-type dropdowns as indices (the script reads them so), X set to ``x_axis`` over
    ``x_values``, and any argument named by its label (spaces as underscores) set."""
    status, info = call("GET", "/sdapi/v1/script-info")
    assert status == 200, info
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    labels = [arg["label"] for arg in xyz["args"]]
    args = [arg["value"] for arg in xyz["args"]]
    for axis in ("X type", "Y type", "Z type"):
        index = labels.index(axis)
        choices = xyz["args"][index]["choices"]
        args[index] = choices.index(x_axis if axis == "X type" else "Nothing")
    args[labels.index("X values")] = x_values
    for label, value in by_label.items():
        args[labels.index(label.replace("_", " "))] = value
    return args


def check_xyz_plot_over_sigma() -> None:
    """An X/Y/Z plot over σ through the API gives the grid and three different cells."""
    args = xyz_script_args("[SEG] Sigma", "0, 2, inf", Include_Sub_Images=True)
    body = generate(script_name="x/y/z plot", script_args=args)
    assert len(body["images"]) == 1 + 3  # the grid and the three cells
    cells = [image_hash(body, index) for index in range(1, 4)]
    assert len(set(cells)) == 3


#: ``(axis, values, message)``: X/Y/Z axes with a bad value, and what the answer must say.
XYZ_BAD_VALUES = [
    ("[SEG] Scale", "-3, 2", "X/Y/Z value -3.0: scale: must be in [0, 100]"),
    ("[SEG] Layers", "mid, q7", "X/Y/Z value 'q7': layers: unknown layer 'q7'"),
    ("[SEG] Layers", "m99", "layer m99 does not exist"),
]


def check_xyz_bad_value(axis: str, values: str, message: str) -> None:
    """A bad axis value stops the plot with a 422 naming SEG and the value, before any cell runs."""
    payload = {**BASE, "script_name": "x/y/z plot", "script_args": xyz_script_args(axis, values)}
    status, body = call("POST", "/sdapi/v1/txt2img", payload)
    assert status == 422, body
    assert TITLE in body["detail"] and message in body["detail"], body


def test_xyz_plot_over_sigma(model):
    check_xyz_plot_over_sigma()


@pytest.mark.parametrize(("axis", "values", "message"), XYZ_BAD_VALUES)
def test_xyz_plot_with_a_bad_value_says_which(model, axis, values, message):
    check_xyz_bad_value(axis, values, message)


MALFORMED = {
    "scale-string": [True, "abc"],
    "scale-negative": [True, -1],
    "scale-too-large": [True, 1000],
    "scale-null": [True, None],
    "sigma-negative": [True, 3, -2],
    "sigma-word": [True, 3, "wide"],
    "sigma-null": [True, 3, None],
    "sigma-bool": [True, 3, True],
    "layers-unknown": [True, 3, "inf", "x9"],
    "layers-out-of-range": [True, 3, "inf", "m99"],
    "layers-empty": [True, 3, "inf", ""],
    "layers-number": [True, 3, "inf", 5],
    "range-backwards": [True, 3, "inf", "mid", 0.9, 0.1],
    "start-negative": [True, 3, "inf", "mid", -0.5, 1],
    "end-above-one": [True, 3, "inf", "mid", 0, 2],
    "mode-unknown": [True, 3, "inf", "mid", 0, 1, "both"],
    "enabled-string": ["yes"],
    "named-unknown-key": [{"scale": 3, "blur": 2}],
    "named-bad-value": [{"sigma": "-1"}],
    "hires-sigma-negative": [True, 3, "inf", "mid", 0, 1, "cond", True, 3, -5],
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=str)
def test_malformed_arguments_get_a_clear_error(model, case):
    payload = {**BASE, "alwayson_scripts": {TITLE: {"args": MALFORMED[case]}}}
    status, body = call("POST", "/sdapi/v1/txt2img", payload)
    assert status == 422, body
    assert body["errors"].startswith("Smoothed Energy Guidance:"), body


def test_nan_and_extra_arguments(model):
    """NaN is not valid JSON: the server refuses the body itself. Extra positional values are
    dropped by the WebUI (documented), so the request succeeds with the first ten."""
    raw = json.dumps({**BASE, "alwayson_scripts": {TITLE: {"args": [True, math.nan]}}})
    request = urllib.request.Request(URL + "/sdapi/v1/txt2img", data=raw.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=120)
        raise AssertionError("NaN was accepted")
    except urllib.error.HTTPError as error:
        assert error.code in (400, 422)
    extra = generate(seg=SEG_ON + [0, 1, "cond", False, 3, "inf", "surplus", 1, 2])
    assert image_hash(extra) == image_hash(generate(seg=SEG_ON))
    assert probe_state()["unet_hooks"] == 0  # and the server still serves


def interrupt_midway(long_generation) -> dict:
    """Run ``long_generation()`` in a thread, press Interrupt after 2 s; return what it returned."""
    result = {}
    worker = threading.Thread(target=lambda: result.update(body=long_generation()))
    worker.start()
    time.sleep(2.0)
    call("POST", "/sdapi/v1/interrupt")
    worker.join(timeout=600)
    assert "body" in result, "the interrupted generation did not answer"
    return result["body"]


def test_interrupted_generation_leaves_no_hook(model):
    _, before = model
    interrupt_midway(lambda: generate(seg=SEG_ON, steps=150))
    after = probe_state()
    assert after["unet_hooks"] == 0 and after["fingerprint"] == before["fingerprint"]
    assert after["forward_overrides"] == before["forward_overrides"]
    assert image_hash(generate()) == image_hash(generate())


def test_defaults_are_the_fields_own_with_no_settings_of_our_own():
    """Settings → Defaults (the WebUI's) is how users change defaults. Our own default settings were
    saved unvalidated and then broke every API request: none remain, and the API's default
    arguments are the fields' defaults."""
    from seg_tsam.extension.core import fields
    from seg_tsam.extension.core.settings import SegSettings
    from seg_tsam.extension.core.tsam import TsamSettings

    options = call("GET", "/sdapi/v1/options")[1]
    assert not [key for key in options if key.startswith(("seg_default_", "tsam_default_"))]
    info = call("GET", "/sdapi/v1/script-info")[1]
    for cls, name in ((SegSettings, TITLE.lower()), (TsamSettings, "t-sam alignment")):
        script = next(s for s in info if s["name"] == name and not s["is_img2img"])
        expected = []
        for field in fields.fields_of(cls):
            value = field.spec.widget_default if field.default is None else fields.display(field.default, field)
            expected.append(str(value) if field.spec.control.kind == "dropdown" else value)
        assert [arg["value"] for arg in script["args"]] == expected, script["args"]
