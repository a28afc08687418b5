"""The WebUI export service (``export/webui_export.py``) without a running WebUI.

Request validation, derived names and engine listing/deletion are pure; the export itself runs
on a tiny ldm UNet from a WebUI checkout's ``repositories/`` when ``SEG_TSAM_WEBUI_ROOT`` is set
(the same import as ``test_onnx_export.py``), with TensorRT reported missing.
"""

from __future__ import annotations

import types

import pytest

from seg_tsam.export import webui_export
from seg_tsam.export.profiles import PRESETS, EngineProfile
from seg_tsam.export.registry import EngineEntry, EngineKey, EngineRegistry
from seg_tsam.export.webui_export import (
    EngineNotFound,
    ExportRequest,
    ExportRequestError,
    check_engine_id,
    checkpoint_facts,
    delete_engine,
    engine_rows,
    export_current_checkpoint,
    list_engines,
    onnx_file_name,
)

SD1 = "SD1.x 512-768"
CUSTOM = {"images": [1, 1, 2], "height": [512, 512, 640], "width": 512}


# --- requests -------------------------------------------------------------------------------------


def test_default_request_is_the_sd1_preset():
    request = ExportRequest()
    assert request.preset == SD1 and request.engine_profile == PRESETS[SD1]
    assert (request.seg_layers, request.precision, request.build_engine) == ("mid", "fp16", True)


def test_custom_profile_is_parsed():
    request = ExportRequest(preset=None, profile=CUSTOM, precision="fp32")
    assert isinstance(request.profile, EngineProfile)
    assert request.engine_profile.height == (512, 512, 640)
    assert request.to_dict()["profile"]["width"] == [512, 512, 512]


@pytest.mark.parametrize("kwargs, message", [
    (dict(preset="SD3 huge"), "unknown preset"),
    (dict(preset=None), "choose a preset"),
    (dict(profile=CUSTOM), "not both"),
    (dict(preset=None, profile={"images": 1, "height": 500, "width": 512}), "custom profile: height"),
    (dict(preset=None, profile={"images": 1, "height": 512}), "custom profile: width"),
    (dict(precision="int8"), "precision"),
    (dict(seg_layers=""), "non-empty"),
    (dict(seg_layers="../../etc/passwd"), "layer names"),
    (dict(seg_layers="m" * 65), "layer names"),
    (dict(seg_layers=3), "non-empty text"),
    (dict(build_engine="yes"), "true or false"),
])
def test_bad_requests_are_refused_with_a_message(kwargs, message):
    with pytest.raises(ExportRequestError, match=message):
        ExportRequest(**kwargs)


def test_from_json():
    request = ExportRequest.from_json({"profile": CUSTOM, "seg_layers": "d2, m0", "build_engine": False})
    assert request.preset is None and request.seg_layers == "d2, m0" and not request.build_engine
    assert ExportRequest.from_json({}) == ExportRequest()
    with pytest.raises(ExportRequestError, match=r"unknown field\(s\) \['path'\]"):
        ExportRequest.from_json({"path": "/tmp/x.onnx"})
    with pytest.raises(ExportRequestError, match="JSON object"):
        ExportRequest.from_json(["SD1.x 512-768"])


# --- names ----------------------------------------------------------------------------------------


def test_onnx_file_names_are_derived_and_plain():
    assert onnx_file_name("a1b2c3d4e5", "mid", "fp16") == "a1b2c3d4e5_mid_fp16.onnx"
    assert onnx_file_name("a1b2c3d4e5", "D2, m0", "fp32") == "a1b2c3d4e5_d2-m0_fp32.onnx"
    assert "/" not in onnx_file_name("a/b", "x:y", "fp16")


@pytest.mark.parametrize("bad", ["../engines.json", "0123456789ABCDEF", "0123", None, 7, "0123456789abcdef/"])
def test_engine_ids_are_checked(bad):
    with pytest.raises(ExportRequestError, match="not an engine id"):
        check_engine_id(bad)


def _info(shorthash, name="tiny"):
    info = types.SimpleNamespace(shorthash=shorthash, name=name)
    info.calculate_shorthash = lambda: "f00dfeed00"
    return info


def test_checkpoint_facts():
    facts = checkpoint_facts(types.SimpleNamespace(sd_checkpoint_info=_info("abcdef0123"), is_sdxl=False, is_sd2=False))
    assert (facts.short_hash, facts.flavour, facts.family) == ("abcdef0123", "ldm", "sd1")
    sd2 = checkpoint_facts(types.SimpleNamespace(sd_checkpoint_info=_info(None), is_sd2=True))
    assert (sd2.family, sd2.short_hash) == ("sd2", "f00dfeed00")
    sdxl = checkpoint_facts(types.SimpleNamespace(sd_checkpoint_info=_info("1"), is_sdxl=True))
    assert (sdxl.flavour, sdxl.family) == ("sgm", "sdxl")
    with pytest.raises(webui_export.ExportFailed, match="no checkpoint"):
        checkpoint_facts(None)


# --- engines: list and delete ---------------------------------------------------------------------


def _register(models_dir, checkpoint_hash="abcdef0123") -> EngineEntry:
    folder = webui_export.engine_folder(models_dir)
    folder.mkdir(parents=True, exist_ok=True)
    registry = EngineRegistry(folder)
    key = EngineKey(checkpoint_hash, PRESETS[SD1], "mid", "10.9.0", "8.6")
    name = registry.engine_file_name(key, "tiny")
    (folder / name).write_bytes(b"plan")
    entry = EngineEntry(key=key, engine_file=name, checkpoint_name="tiny", family="sd1", preset=SD1)
    registry.add(entry)
    return entry


def test_list_and_delete_engines(tmp_path):
    assert list_engines(tmp_path) == []
    entry = _register(tmp_path)
    engines = list_engines(tmp_path)
    assert [engine["id"] for engine in engines] == [entry.id] and engines[0]["file_present"]
    rows = engine_rows(engines)
    assert rows[0][0] == entry.id and len(rows[0]) == len(webui_export.ENGINE_COLUMNS)
    with pytest.raises(EngineNotFound):
        delete_engine(tmp_path, "0" * 16)
    with pytest.raises(ExportRequestError):
        delete_engine(tmp_path, "../" + entry.engine_file)
    assert delete_engine(tmp_path, entry.id)["id"] == entry.id
    assert list_engines(tmp_path) == []
    assert not (webui_export.engine_folder(tmp_path) / entry.engine_file).exists()


def test_missing_engine_file_is_listed_as_missing(tmp_path):
    entry = _register(tmp_path)
    (webui_export.engine_folder(tmp_path) / entry.engine_file).unlink()
    engines = list_engines(tmp_path)
    assert not engines[0]["file_present"] and engine_rows(engines)[0][-1].endswith("(missing)")


# --- the export on a tiny WebUI (ldm) UNet ----------------------------------------------------------


def test_export_current_checkpoint_ldm(tmp_path, monkeypatch):
    test_onnx_export = pytest.importorskip("test_onnx_export")
    if not test_onnx_export.WEBUI_ROOT:
        pytest.skip("SEG_TSAM_WEBUI_ROOT is not set (a WebUI checkout with repositories/)")
    from seg_tsam.export.onnx_export import hooked_modules, keep_installed_attention

    modules_gen = test_onnx_export.openaimodel_modules.__wrapped__()
    modules = next(modules_gen)
    try:
        monkeypatch.setattr(modules["ldm"], "th", test_onnx_export.WebUICatShim())
        unet = test_onnx_export.tiny_openai_unet(modules, "ldm")
        sd_model = types.SimpleNamespace(sd_checkpoint_info=_info("abcdef0123", "tiny-sd1"), is_sdxl=False,
                                         is_sd2=False, model=types.SimpleNamespace(diffusion_model=unet))
        steps: list[str] = []
        result = export_current_checkpoint(
            sd_model, ExportRequest(precision="fp32"), models_dir=tmp_path, attention_path=keep_installed_attention,
            progress=lambda fraction, text: steps.append(text),
            tensorrt_check=lambda: (False, "tensorrt is not installed"),
        )
        assert result.onnx_file == "Unet-seg-onnx/abcdef0123_mid_fp32.onnx"
        assert (tmp_path / result.onnx_file).is_file()
        assert result.static_check_ok and "OK" in result.static_check_summary
        assert not result.engine_built and result.engine_id is None
        assert result.engine_not_built_reason.startswith("tensorrt is not installed")
        assert webui_export.NO_TENSORRT_HINT in result.engine_not_built_reason
        assert steps and hooked_modules(unet) == []
        assert result.to_dict()["static_check"]["ok"] and "No TensorRT engine" in result.to_markdown()

        skipped = export_current_checkpoint(
            sd_model, ExportRequest(precision="fp32", build_engine=False), models_dir=tmp_path,
            attention_path=keep_installed_attention, tensorrt_check=lambda: pytest.fail("must not be asked"),
        )
        assert skipped.engine_not_built_reason == "not requested"
        with pytest.raises(ExportRequestError, match="SEG layers 'd9'"):
            export_current_checkpoint(sd_model, ExportRequest(seg_layers="d9"), models_dir=tmp_path,
                                      attention_path=keep_installed_attention)
    finally:
        modules_gen.close()
