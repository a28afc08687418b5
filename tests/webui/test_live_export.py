"""The "SEG Export" API in a live WebUI (CPU, no TensorRT), driven over HTTP.

Set ``SEG_TSAM_WEBUI_URL`` to run (skipped otherwise); the WebUI needs the tiny SD1 checkpoint.
The export itself needs the ``onnx`` package in the WebUI's Python (``run_live_tests.sh`` puts
``TARGET/export-packages`` from ``setup_webui.sh`` on its path); without it those tests are
skipped with the reason (the routes and validation are still tested). With ``onnxruntime`` too,
the exported files are compared with the WebUI's own UNet and run as the "SD Unet" replacement.
With ``SEG_TSAM_WEBUI_MODELS`` (the WebUI's models folder, as the server sees it) the exported
file is also run with ONNX Runtime from this venv.
"""

from __future__ import annotations

import json

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest

from test_live_seg import BASE, URL, call, checkpoints, denoised_steps, generate, relative_difference

pytestmark = pytest.mark.skipif(not URL, reason="SEG_TSAM_WEBUI_URL is not set (no live WebUI to test against)")

MODELS = os.environ.get("SEG_TSAM_WEBUI_MODELS")


@pytest.fixture(scope="module")
def tiny_sd1():
    status, models = call("GET", "/sdapi/v1/sd-models")
    title = next((m["title"] for m in models if "tiny-sd1" in m["title"]), None)
    if title is None:
        pytest.skip("the tiny SD1 checkpoint is not installed in this WebUI")
    status, body = call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": title})
    assert status == 200, body
    return title


def test_status_and_engine_list_answer():
    status, body = call("GET", "/seg-tsam/export/status")
    assert status == 200 and "SD1.x 512-768" in body["presets"], body
    offer = body["tensorrt_offer"]  # the TensorRT wheel for the server's torch, or why there is none
    if offer["requirement"] is None:
        assert "CUDA" in offer["reason"], offer
    else:
        assert offer["requirement"].startswith("tensorrt-cu") and offer["requirement"] in offer["reason"], offer
    status, body = call("GET", "/seg-tsam/engines")
    assert status == 200 and isinstance(body["engines"], list), body


@pytest.mark.parametrize("payload, message", [
    ({"preset": "nope"}, "unknown preset"),
    ({"precision": "int8"}, "precision"),
    ({"seg_layers": "../../x"}, "SEG layers: unknown layer '../../x'"),
    ({"path": "/tmp/evil.onnx"}, "unknown field"),
    ({"preset": None, "profile": {"images": 1, "height": 500, "width": 512}}, "height"),
])
def test_bad_export_requests_get_422(payload, message):
    status, body = call("POST", "/seg-tsam/export", payload)
    assert status == 422 and message in str(body.get("detail")), body


def test_a_preset_for_another_model_family_is_refused_by_name():
    """The SDXL preset on an SD1 checkpoint used to be exported silently (with SDXL sizes)."""
    sd1 = next(title for kind, title in checkpoints() if kind == "sd1")
    assert call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": sd1})[0] == 200
    status, body = call("POST", "/seg-tsam/export", {"preset": "SDXL 768-1024", "build_engine": False})
    assert status == 422, body
    assert "'SDXL 768-1024' is for sdxl checkpoints, the loaded one is sd1; choose 'SD1.x 512-768'" in body["detail"]
    status, body = call("GET", "/seg-tsam/export/status")
    assert body["default_precision"] == "fp32"  # the live WebUI runs with --no-half: fp16 exports would fail


@pytest.mark.parametrize("engine_id", ["not-an-id", "0123456789ABCDEF", "..", "engines.json"])
def test_delete_with_a_bad_id_gets_422(engine_id):
    status, body = call("DELETE", f"/seg-tsam/engines/{engine_id}")
    assert status == 422 and "not an engine id" in str(body.get("detail")), body


def test_delete_unknown_engine_gets_404():
    status, body = call("DELETE", "/seg-tsam/engines/" + "0" * 16)
    assert status == 404, body


@pytest.mark.parametrize("name, status", [("x.json", 422), ("abc def.onnx", 422), ("nothing_mid_fp32.onnx", 404)])
def test_delete_export_with_a_bad_or_unknown_name(name, status):
    answer, body = call("DELETE", f"/seg-tsam/exports/{urllib.parse.quote(name)}")
    assert answer == status, body


def test_export_sd1_preset_then_generation_still_works(tiny_sd1):
    if not call("GET", "/seg-tsam/export/status")[1]["onnx_installed"]:
        pytest.skip("the WebUI's Python has no onnx package (the tab offers to install it)")
    status, body = call("POST", "/seg-tsam/export", {"preset": "SD1.x 512-768", "precision": "fp32"})
    assert status == 200, body
    assert body["onnx_file"].startswith("Unet-seg-onnx/") and body["onnx_file"].endswith("_mid_fp32.onnx")
    assert body["static_check"]["ok"], body["static_check"]["summary"]
    status_info = call("GET", "/seg-tsam/export/status")[1]
    if not status_info["tensorrt_installed"]:
        assert not body["engine_built"]
        assert "tensorrt" in body["engine_not_built_reason"].lower()
        assert "ONNX export still works" in body["engine_not_built_reason"]
    status, generated = call("POST", "/sdapi/v1/txt2img", BASE)
    assert status == 200 and generated["images"], generated
    if MODELS:
        _run_with_onnxruntime(Path(MODELS) / body["onnx_file"], body["levels"])


def _run_with_onnxruntime(path: Path, levels: list[int]) -> None:
    """The exported file loads and runs (identity blur rows, one σ-blurred row), finite output."""
    np = pytest.importorskip("numpy")
    onnxruntime = pytest.importorskip("onnxruntime")
    import torch

    from seg_tsam.export.seg_unet import blur_matrix_inputs

    session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs()}
    context = shapes["encoder_hidden_states"][2]
    batch, latent = 2, (8, 8)
    inputs = {"sample": np.random.randn(batch, 4, *latent).astype(np.float32),
              "timestep": np.full((batch,), 500.0, dtype=np.float32),
              "encoder_hidden_states": np.random.randn(batch, 77, context).astype(np.float32)}
    inputs.update({name: tensor.numpy() for name, tensor in
                   blur_matrix_inputs(levels, latent, batch, [1], 2.0, dtype=torch.float32).items()})
    output = session.run(None, inputs)[0]
    assert output.shape == (batch, 4, *latent) and np.isfinite(output).all()


# --- the export as the WebUI's UNet -------------------------------------------------------------------

SEG_MID = [True, 3.0, "2", "mid"]
EXPORTS = {"sd1": ("tiny-sd1", "SD1.x 512-768"), "sdxl": ("tiny-sdxl", "SDXL 768-1024")}


def _needs_runtime():
    status = call("GET", "/seg-tsam/export/status")[1]
    if not (status["onnx_installed"] and status["onnxruntime_installed"]):
        pytest.skip("the WebUI's Python lacks onnx or onnxruntime (setup_webui.sh installs them to export-packages)")


@dataclass(frozen=True)
class Export:
    title: str  #: the checkpoint
    request: dict  #: what was posted to /seg-tsam/export
    body: dict  #: its answer
    label: str  #: the export's "SD Unet" option


@pytest.fixture(scope="module", params=list(EXPORTS), ids=str)
def export(request):
    """Load the tiny checkpoint and export its UNet (SEG "mid", fp32)."""
    if not URL:
        pytest.skip("no live WebUI")
    _needs_runtime()
    name, preset = EXPORTS[request.param]
    models = call("GET", "/sdapi/v1/sd-models")[1]
    model = next((m for m in models if name in m["title"]), None)
    if model is None:
        pytest.skip(f"the {name} checkpoint is not installed in this WebUI")
    status, body = call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": model["title"], "sd_unet": "Automatic"})
    assert status == 200, body
    payload = {"preset": preset, "precision": "fp32", "seg_layers": "mid"}
    status, body = call("POST", "/seg-tsam/export", payload)
    assert status == 200, body
    yield Export(model["title"], payload, body, f"[SEG ONNX] {model['filename'].rsplit('/', 1)[-1]} (mid, fp32)")
    call("POST", "/seg-tsam-probe/release-unet")


#: How much larger than PyTorch's own float32 round-off the export's may be. ONNX Runtime and
#: PyTorch evaluate the same float32 graph with different kernels, so each rounds in its own
#: summation order; the largest error over all outputs varies by less than this between orders.
#: Measured on the tiny models (single call, against float64): the export's error is 0.49× (SD1)
#: and 0.95× (SDXL) PyTorch's; over a whole generation its difference from PyTorch is 0.90× and
#: 0.91× PyTorch's own batching round-off.
ROUNDOFF_FACTOR = 2.0


def test_exported_file_matches_the_webui_unet(export):
    """ONNX Runtime on the export and the WebUI's float32 UNet with SEG's hooks (odd 9×7 latent,
    mixed rows, σ 2 and ∞), each against a float64 copy of that UNet with the same hooks: the
    export is as accurate as the WebUI's own UNet."""
    status, result = call("POST", "/seg-tsam-probe/onnx-vs-unet", {"file": export.body["onnx_file"]})
    assert status == 200, result
    # The float64 copy is faithful (a hook or cast missing on it would make this 1e-2 or more),
    # so PyTorch's error is float32 round-off: a real, small scale to bound against.
    assert 0 < result["pytorch_vs_float64"] < 1e-4, result
    assert result["onnx_vs_float64"] <= ROUNDOFF_FACTOR * result["pytorch_vs_float64"], result
    assert result["layers"] and all(".attn1" in name or "attn1" in name for name in result["layers"]), result


def _with_unet(label, seg=SEG_MID, options=None, **fields):
    return denoised_steps({"override_settings": {"sd_unet": label, **(options or {})}}, seg=seg, **fields)


def export_bound(pytorch_steps, seg=SEG_MID, **fields) -> float:
    """The bound for a generation on the export against ``pytorch_steps`` (the same request on
    PyTorch): :data:`ROUNDOFF_FACTOR` × PyTorch's own float32 round-off over that generation,
    measured as the difference from the same request with "batch cond/uncond" off (each row in a
    call of its own: the same arithmetic in other summation orders)."""
    apart = _with_unet("None", seg=seg, options={"batch_cond_uncond": False}, **fields)
    roundoff = relative_difference(apart, pytorch_steps)
    assert roundoff > 0, "batching changed nothing: no round-off scale to bound against"
    return ROUNDOFF_FACTOR * roundoff


def test_seg_runs_on_the_export_as_sd_unet(export):
    """The export as SD Unet: every call (cond, uncond, SEG rows) on ONNX Runtime, same steps as PyTorch."""
    label = export.label
    pytorch = _with_unet("None")
    replaced = _with_unet(label)
    state = call("GET", "/seg-tsam-probe/replacement")[1]
    assert state["label"] == label, state
    assert state["session_calls"] > 0 and state["fallback_calls"] == 0, state
    assert relative_difference(replaced, pytorch) <= export_bound(pytorch)
    plain = _with_unet(label, seg=[False])
    assert relative_difference(plain, pytorch) > 1e-3  # SEG made a difference on the export too


def _generate_on(label):
    return generate({"override_settings": {"sd_unet": label}}, seg=SEG_MID)


def test_layers_the_export_lacks_fall_back_to_pytorch_with_a_notice(export):
    label = export.label
    call("POST", "/seg-tsam-probe/release-unet")
    pytorch = _with_unet("None", seg=[True, 3.0, "2", "up"])
    replaced = _with_unet(label, seg=[True, 3.0, "2", "up"])
    state = call("GET", "/seg-tsam-probe/replacement")[1]
    assert state["fallback_calls"] > 0 and state["session_calls"] == 0, state
    assert any("'up'" in notice and "'mid'" in notice for notice in state["notices"]), state
    assert replaced == pytorch  # every call ran on the PyTorch UNet with SEG's hooks: the same numbers
    # ... and the generation info says so, with the count and the reason (not only the console)
    body = generate({"override_settings": {"sd_unet": label}}, seg=[True, 3.0, "2", "up"])
    info = json.loads(body["info"])["infotexts"][0]
    calls = BASE["steps"]  # Euler, batched rows: one UNet call per step, all on PyTorch
    note = info[info.index("SEG export: "):]
    assert f"{calls} of {calls} UNet calls ran on PyTorch instead of {label}: " in note, info
    assert "'up'" in note, info
    plain_info = json.loads(_generate_on(label)["info"])["infotexts"][0]
    assert "SEG export:" not in plain_info  # a generation the export ran fully gets no note


def test_tsam_uses_pytorch_for_its_gradients_and_the_export_otherwise(export):
    label = export.label
    call("POST", "/seg-tsam-probe/release-unet")
    body = generate({"override_settings": {"sd_unet": label},
                     "alwayson_scripts": {"T-SAM alignment": {"args": [{"strength": 5.0}]}}})
    assert body["images"], body
    state = call("GET", "/seg-tsam-probe/replacement")[1]
    assert state["session_calls"] > 0 and state["fallback_calls"] > 0, state
    assert any("gradients" in notice for notice in state["notices"]), state


@pytest.mark.parametrize("script, args", [("Smoothed Energy Guidance", SEG_MID),
                                          ("T-SAM alignment", [{"strength": 5.0}])])
def test_seg_and_tsam_refuse_a_foreign_sd_unet(export, script, args):
    status, body = call("POST", "/sdapi/v1/txt2img", {**BASE, "override_settings": {"sd_unet": "[probe] passthrough"},
                                                      "alwayson_scripts": {script: {"args": args}}})
    assert status != 200 and "SD Unet" in str(body) and "[probe] passthrough" in str(body), body
    call("POST", "/seg-tsam-probe/release-unet")
    status, body = call("POST", "/sdapi/v1/txt2img", {**BASE, "override_settings": {"sd_unet": "[probe] passthrough"}})
    assert status == 200, body  # without SEG/T-SAM the foreign replacement is fine


# --- LoRA on the export ---------------------------------------------------------------------------------


def _lora_prompt() -> str:
    """A prompt with a LoRA the probe writes for the loaded checkpoint (every transformer Linear, every resnet conv)."""
    status, lora = call("POST", "/seg-tsam-probe/write-lora")
    assert status == 200 and lora["modules"] > 0, lora
    return f"{BASE['prompt']} <lora:{lora['name']}:0.8>"


def test_lora_runs_on_the_export_with_its_weights(export):
    """The export takes the LoRA-changed weights once and runs every call (0 fallbacks); each step
    equals PyTorch with the LoRA; the next prompt without it equals PyTorch without it."""
    prompt = _lora_prompt()
    call("POST", "/seg-tsam-probe/release-unet")
    pytorch_plain = _with_unet("None")
    pytorch_lora = _with_unet("None", prompt=prompt)
    assert relative_difference(pytorch_lora, pytorch_plain) > 1e-2  # the LoRA is applied and matters
    plain_bound, lora_bound = export_bound(pytorch_plain), export_bound(pytorch_lora, prompt=prompt)
    replaced_lora = _with_unet(export.label, prompt=prompt)
    state = call("GET", "/seg-tsam-probe/replacement")[1]
    assert state["session_calls"] > 0 and state["fallback_calls"] == 0 and state["weight_loads"] == 1, state
    assert relative_difference(replaced_lora, pytorch_lora) <= lora_bound
    replaced_plain = _with_unet(export.label)
    state = call("GET", "/seg-tsam-probe/replacement")[1]
    assert state["fallback_calls"] == 0 and state["weight_loads"] == 2, state
    assert relative_difference(replaced_plain, pytorch_plain) <= plain_bound


def test_export_after_a_lora_generation_holds_the_checkpoint_weights(export):
    """A LoRA generation leaves its weights applied in place; exporting right after must not bake them in."""
    prompt = _lora_prompt()
    call("POST", "/seg-tsam-probe/release-unet")
    _with_unet("None", prompt=prompt)
    status, body = call("POST", "/seg-tsam/export", export.request)
    assert status == 200 and body["onnx_file"] == export.body["onnx_file"], body
    pytorch_plain = _with_unet("None")
    replaced_plain = _with_unet(export.label)
    state = call("GET", "/seg-tsam-probe/replacement")[1]
    assert state["fallback_calls"] == 0 and state["weight_loads"] == 0, state
    assert relative_difference(replaced_plain, pytorch_plain) <= export_bound(pytorch_plain)


def test_an_export_is_listed_and_deleted_with_its_files(export):
    payload = {**export.request, "seg_layers": "up", "build_engine": False}
    status, body = call("POST", "/seg-tsam/export", payload)
    assert status == 200, body
    name = body["onnx_file"].rsplit("/", 1)[-1]
    listed = {e["onnx_file"]: e for e in call("GET", "/seg-tsam/exports")[1]["exports"]}
    assert listed[name]["lora_ready"] and listed[name]["seg_layers"] == "up", listed
    # Selected as SD Unet when deleted: the selection goes back to Automatic, and the answer says so.
    label = f"[SEG ONNX] {listed[name]['label']}"
    assert call("POST", "/sdapi/v1/options", {"sd_unet": label})[0] == 200
    generate(seg=[True, 3.0, "2", "up"])
    assert call("GET", "/seg-tsam-probe/replacement")[1]["label"] == label
    status, deleted = call("DELETE", f"/seg-tsam/exports/{name}")
    assert status == 200, deleted
    assert deleted["sd_unet_reset"] is True and call("GET", "/sdapi/v1/options")[1]["sd_unet"] == "Automatic"
    assert call("GET", "/seg-tsam-probe/replacement")[1]["label"] is None
    assert {name, name.replace(".onnx", ".json"), f"{name}.refit.json"} <= set(deleted["deleted"]["removed"])
    assert name not in {e["onnx_file"] for e in call("GET", "/seg-tsam/exports")[1]["exports"]}
    assert call("DELETE", f"/seg-tsam/exports/{name}")[0] == 404
    if MODELS:
        assert not list((Path(MODELS) / "Unet-seg-onnx").glob(name + "*"))


def test_export_progress_is_reported_while_it_runs(export):
    """Stages and percent in ``/sdapi/v1/progress`` during an export (the tab shows the same)."""
    import threading
    import time

    payload = {**export.request, "seg_layers": "down", "build_engine": False}
    answer = {}
    worker = threading.Thread(target=lambda: answer.update(result=call("POST", "/seg-tsam/export", payload)))
    seen = []
    worker.start()
    while worker.is_alive():
        status, progress = call("GET", "/sdapi/v1/progress?skip_current_image=true")
        if status == 200 and progress.get("state", {}).get("job") == "seg_export":
            seen.append((progress["progress"], progress["textinfo"]))
        time.sleep(0.05)
    worker.join()
    assert answer["result"][0] == 200, answer
    stages = [text for _, text in seen]
    assert any(text and text.startswith("SEG export: exporting") for text in stages), seen
    fractions = [fraction for fraction, _ in seen]
    assert fractions == sorted(fractions) and max(fractions) > 0, seen
    name = answer["result"][1]["onnx_file"].rsplit("/", 1)[-1]
    assert call("DELETE", f"/seg-tsam/exports/{name}")[0] == 200
